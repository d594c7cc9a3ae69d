"""Typed run configuration: one dataclass tree holds every key, its default and its help once.

A run's config is a YAML file plus dotted command-line overrides (`train.lr=1e-6`). Unknown keys
and values of the wrong type are errors that name the key (and suggest the closest one), so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpo_dist.errors import UserError


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class LoraConfig:
    r: int = _field(16, "LoRA rank.")
    alpha: int = _field(32, "LoRA scaling numerator (scale = alpha / r).")
    dropout: float = _field(0.05, "Dropout on the LoRA input.")
    target_modules: list[str] = _field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], "Module names that get adapters."
    )
    save_merged: bool = _field(False, "Also write the merged full model to OUTPUT_DIR/final/merged.")


@dataclass
class ModelConfig:
    policy: str = _field(
        "", "Model the policy starts from: a Hugging Face folder or a hub id (org/name, org/name@revision)."
    )
    reference: str | None = _field(
        None, "Reference (SFT) model: a folder or a hub id; null = the policy's starting weights."
    )
    lora: LoraConfig | None = _field(None, "LoRA settings; null trains all weights.")
    dtype: str = _field(
        "float32", "Dtype the weights are loaded (and exported) in: float32, bfloat16 or float16. Trainable weights "
        "step in float32 whatever it is (fp32 master copies of bf16/fp16 weights). Log-probs are summed in float32.")
    attn_implementation: str = _field(
        "sdpa", "transformers attention kernel: sdpa, eager, flex_attention (compiled; skips masked-out blocks; "
        "trains on GPUs only, PyTorch has no CPU backward) or flash_attention_2.")
    gradient_checkpointing: bool = _field(False, "Recompute activations in backward to save memory.")


@dataclass
class DatasetSource:
    path: str = _field("", "A hub dataset id (org/name) or a `datasets.save_to_disk` folder.")
    split: str | None = _field("train", "Its split.")
    name: str | None = _field(None, "Its configuration (`load_dataset`'s name); null = the default one.")


@dataclass
class DataConfig:
    train: str | list[str] | DatasetSource = _field(
        "", "Training pairs: a .jsonl/.json/.parquet file, a glob, a folder of them, a `datasets.save_to_disk` "
        "folder, a list of these, or {path: org/name, split: train, name: CONFIG} for a hub dataset."
    )
    eval: str | list[str] | DatasetSource | None = _field(None, "Held-out pairs, same forms as `train`; null = no eval.")
    max_length: int = _field(1024, "Longest prompt+response sequence in tokens.")
    truncation: str = _field(
        "keep_end",
        "Over-long sequences: keep_end (cut the prompt's start), keep_start (cut the response's end) or drop.",
    )
    columns: dict[str, str] = _field(
        {}, "Our field names -> the data's, e.g. {prompt: question, chosen: response_j, rejected: response_k}."
    )
    chat_template_kwargs: dict[str, Any] = _field({}, "Extra arguments of the chat template (conversational rows).")
    cache_dir: str | None = _field(
        None, "Token cache folder (memory-mapped token ids); null = `token_cache` next to the reference cache."
    )
    chunk_rows: int = _field(4096, "Rows per tokenization chunk: the unit of work per rank and of the token cache.")


@dataclass
class LossConfig:
    type: str | list[str] = _field(
        "sigmoid", "Loss, or a list of losses summed with `weights`: sigmoid (DPO), hinge, ipo, exo_pair, nca_pair, "
        "robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm "
        "(TRL 1.16's names and formulas; README loss table).")
    weights: list[float] | None = _field(None, "One weight per loss.type; null = 1 each.")
    beta: float = _field(0.1, "Strength of the KL penalty towards the reference (IPO's tau).")
    label_smoothing: float = _field(
        0.0, "Assumed share of flipped labels: cDPO (sigmoid), robust, exo_pair (needs > 0), aot, aot_unpaired.")
    f_divergence_type: str = _field(
        "reverse_kl", "f-DPO divergence: reverse_kl (DPO), forward_kl, js_divergence or alpha_divergence.")
    f_alpha_divergence_coef: float = _field(0.5, "alpha of alpha_divergence.")
    use_weighting: bool = _field(False, "WPO: weight each pair by its responses' per-token probability under the policy.")
    ld_alpha: float | None = _field(
        None, "LD-DPO: log-probs = sum over the pair's shared length + ld_alpha x the rest (in [0, 1]); null = off.")
    discopop_tau: float = _field(0.05, "Temperature of discopop's mixing.")
    rpo_alpha: float | None = _field(None, "Weight of an added NLL loss on the chosen response (RPO); null = off.")
    reference_free: bool = _field(False, "Ignore the reference (its log-probs are taken as 0).")


@dataclass
class TrainConfig:
    micro_batch_size: int = _field(4, "Pairs per forward pass per process.")
    grad_accum: int = _field(1, "Micro-batches per optimizer step.")
    global_batch_size: int | None = _field(
        None, "Pairs per optimizer step over all processes; when set, train.grad_accum is derived from it "
        "(global / (micro_batch_size x data-parallel processes), which must divide it), so a job that comes back on "
        "another number of GPUs keeps its global batch and resumes.")
    mixed_precision: str = _field(
        "auto", "Precision of every forward, the reference pass included: auto (bf16 on a GPU that has it, else "
        "fp32), fp32, bf16 or fp16 (GPU only). Without DeepSpeed: autocast over fp32 weights; under DeepSpeed: "
        "fills the JSON's \"auto\" bf16/fp16 blocks (a JSON that states another precision is refused).")
    lr: float = _field(5.0e-7, "Peak learning rate.")
    max_steps: int = _field(-1, "Optimizer steps; -1 = run `epochs` epochs.")
    epochs: int = _field(1, "Passes over the training pairs (used when max_steps is -1).")
    warmup_ratio: float = _field(0.1, "Share of the steps with linear warm-up.")
    scheduler: str = _field("cosine", "Decay after warm-up: cosine, linear or constant.")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    adam_betas: list[float] = _field([0.9, 0.999], "AdamW betas.")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm; 0 = off.")
    seed: int = _field(42, "Seed of the data order, dropout and LoRA init.")
    save_every: int = _field(500, "Checkpoint every N optimizer steps; 0 = only at the end.")
    keep_last: int = _field(2, "Checkpoints kept on disk.")
    eval_every: int = _field(500, "Evaluate every N optimizer steps (and at the end); 0 = only at the end.")
    eval_batch_size: int = _field(8, "Pairs per forward pass in evaluation and the reference pass.")
    packing: bool = _field(
        True,
        "Pack each micro-batch's sequences without padding: one row with varlen attention under flash_attention_2, "
        "else rows as long as the longest sequence with a block-diagonal mask. false = one padded row per sequence.",
    )
    prefix_sharing: bool = _field(
        True,
        "Compute each pair's prompt once: [prompt | chosen | rejected] in one packed unit, the rejected tokens "
        "hidden from the chosen ones (1.2-1.3x the pairs/s of unshared packing, measured). Needs train.packing "
        "with sdpa/eager (a 4-D mask) or flex_attention (a block mask); with flash_attention_2 sequences are "
        "packed unshared, with a note.",
    )
    pad_to_multiple_of: int = _field(
        64, "Round every micro-batch's width (padded or packed rows) up to a multiple of this many tokens, the tail "
        "masked: a few widths recur instead of a new shape per step (per-shape kernel caches, allocator "
        "fragmentation, FlexAttention recompiles; flex_attention: rounded up to a multiple of 128). 1 = the exact width.")
    log_every: int = _field(10, "Write a metrics line every N optimizer steps.")
    save_best: str | None = _field(
        None, "An eval metric (e.g. eval/loss, eval/rewards/accuracies): export OUTPUT_DIR/best/ (Hugging Face "
        "format) whenever it improves; null = off.")
    save_best_mode: str = _field("min", "min or max: which way save_best's metric improves.")
    on_nonfinite: str = _field(
        "stop", "A non-finite loss or gradient norm: stop (at that step, naming it and its pairs, nothing saved) or "
        "skip (no optimizer step; counted in metrics as nonfinite_skipped).")
    max_nonfinite_skips: int = _field(3, "on_nonfinite=skip: stop after this many non-finite steps in a row.")
    allow_resume_changes: bool = _field(
        False, "Resume even if the seed, global batch, training data or reference changed since the checkpoint.")
    report_to: str | list[str] = _field(
        ["tensorboard"], "Experiment trackers, through accelerate: tensorboard, wandb, mlflow, comet_ml, aim, clearml, "
        "dvclive, swanlab, trackio (a list); none = only OUTPUT_DIR/metrics.jsonl.")
    run_name: str | None = _field(None, "The run's name in the trackers; null = the output folder's name.")
    project: str = _field("dpo_dist", "The trackers' project (wandb) / experiment (mlflow) name.")


@dataclass
class RefCacheConfig:
    enabled: bool = _field(
        True, "false = no cache: the reference stays in memory and is run every step (TRL's default; a baseline)."
    )
    dir: str | None = _field(None, "Reference log-prob cache folder; null = OUTPUT_DIR/ref_cache.")
    auto: bool = _field(True, "`train`/`evaluate` run the reference pass when the cache is missing.")
    overwrite: bool = _field(False, "Rebuild the cache even if one exists (also a stale one).")
    shard_size: int = _field(2048, "Pairs per cache shard: the unit of work per rank and of resuming.")


@dataclass
class DistributedConfig:
    deepspeed: str | None = _field(
        None, "DeepSpeed JSON (see ds_configs/) when not set by `accelerate launch --config_file`; null = none."
    )
    fsdp2: bool = _field(
        False, "Shard the policy and the reference pass with PyTorch FSDP2 (fully_shard per decoder layer; "
        "README 'Engines'); set by `accelerate launch` with an FSDP config of fsdp_version 2.")
    fsdp_reshard_after_forward: bool = _field(
        True, "FSDP2: free each decoder layer's gathered weights after its forward and gather them again in "
        "backward (ZeRO-3's memory); false keeps them to the backward (ZeRO-2's, one gather fewer).")
    fsdp_offload: bool = _field(False, "FSDP2: keep the shards, gradients and optimizer state in CPU memory "
                                "(CPUOffloadPolicy).")
    timeout_minutes: int = _field(30, "Collective-operation timeout.")
    sequence_parallel: int = _field(
        1, "Ranks that share each sequence (Ulysses): every micro-batch row is cut along the sequence across a "
        "group of N ranks, and attention runs over the whole sequence on 1/N of the heads. The data-parallel size is "
        "processes / N.")


@dataclass
class ExportConfig:
    dtype: str | None = _field(
        None, "Dtype of final/ and best/: float32, bfloat16 or float16; null = model.dtype (a LoRA adapter: float32). "
        "Written from the optimizer's fp32 master weights: float32 of a bf16 run keeps every update bf16 rounds away.")


@dataclass
class Config:
    output_dir: str = _field("runs/exp1", "Where config.yaml, metrics, checkpoints and final/ go.")
    model: ModelConfig = _field(ModelConfig(), "")
    data: DataConfig = _field(DataConfig(), "")
    loss: LossConfig = _field(LossConfig(), "")
    train: TrainConfig = _field(TrainConfig(), "")
    ref_cache: RefCacheConfig = _field(RefCacheConfig(), "")
    distributed: DistributedConfig = _field(DistributedConfig(), "")
    export: ExportConfig = _field(ExportConfig(), "")
    resume: str | None = _field("auto", "auto = continue from checkpoints/latest if present; null; or a path.")

    @property
    def packing_mode(self) -> str | None:
        """How batching.collate lays sequences out: None (padded), "varlen", "flex" or "block_mask"."""
        if not self.train.packing:
            return None
        attn = self.model.attn_implementation
        return "varlen" if attn.startswith("flash_attention") else "flex" if attn == "flex_attention" else "block_mask"

    @property
    def batch_layout(self) -> dict[str, Any]:
        """batching.collate's layout arguments of this run: packing, prefix sharing and the width
        multiple (FlexAttention's blocks are 128 tokens: rounded up to a multiple of 128)."""
        multiple = self.train.pad_to_multiple_of
        return {"packing": self.packing_mode, "share_prefix": self.share_prefix,
                "multiple_of": -(-multiple // 128) * 128 if self.packing_mode == "flex" else multiple}

    @property
    def share_prefix(self) -> bool:
        """Whether batching.collate lays pairs out with one shared prompt (train.prefix_sharing)."""
        return self.train.prefix_sharing and self.packing_mode in ("block_mask", "flex")

    @property
    def trackers(self) -> list[str]:
        """train.report_to as a list of accelerate tracker names ([] for none)."""
        names = [self.train.report_to] if isinstance(self.train.report_to, str) else self.train.report_to
        return [name for name in names if name != "none"]

    @property
    def ref_cache_dir(self) -> Path:
        return Path(self.ref_cache.dir) if self.ref_cache.dir else Path(self.output_dir) / "ref_cache"

    @property
    def token_cache_dir(self) -> Path:
        return Path(self.data.cache_dir) if self.data.cache_dir else self.ref_cache_dir.parent / "token_cache"

    def validate(self) -> None:
        """Every key by range and meaning, before any work: one line naming the key, the value and
        what is allowed. What needs another module's knowledge (loss names, metric names) is checked
        there when a run is built: `commands.load_run_config`."""
        if not str(self.output_dir).strip() or Path(self.output_dir).expanduser().resolve() == Path.cwd().resolve():
            raise UserError(f"config: output_dir={self.output_dir!r} is empty or the current folder; a run writes "
                            "config.yaml, checkpoints and final/ there: name a folder of its own, e.g. runs/exp1")
        choices = {
            "data.truncation": (self.data.truncation, ("keep_end", "keep_start", "drop")),
            "train.scheduler": (self.train.scheduler, ("cosine", "linear", "constant")),
            "train.on_nonfinite": (self.train.on_nonfinite, ("stop", "skip")),
            "train.save_best_mode": (self.train.save_best_mode, ("min", "max")),
            "model.dtype": (self.model.dtype, ("float32", "bfloat16", "float16")),
            "export.dtype": (self.export.dtype or "float32", ("float32", "bfloat16", "float16")),
            "model.attn_implementation": (self.model.attn_implementation, ATTENTION_KERNELS),
            "train.mixed_precision": (self.train.mixed_precision, ("auto", "fp32", "bf16", "fp16")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                close = difflib.get_close_matches(str(value), allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise UserError(f"config: {key}={value!r} is not one of {', '.join(allowed)}{hint}")
        _check_kernel_installed(self.model.attn_implementation)
        t, loss = self.train, self.loss
        ranges = [  # (key, value, allowed: (test, in words)); None values are off and not checked
            ("train.micro_batch_size", t.micro_batch_size, AT_LEAST_1),
            ("train.grad_accum", t.grad_accum, AT_LEAST_1),
            ("train.global_batch_size", t.global_batch_size, AT_LEAST_1),
            ("train.eval_batch_size", t.eval_batch_size, AT_LEAST_1),
            ("train.log_every", t.log_every, AT_LEAST_1),
            ("train.pad_to_multiple_of", t.pad_to_multiple_of, AT_LEAST_1),
            ("train.keep_last", t.keep_last, AT_LEAST_1),
            ("train.epochs", t.epochs, AT_LEAST_1),
            ("train.max_steps", t.max_steps, (lambda v: v >= 1 or v == -1, "-1 (run train.epochs) or >= 1")),
            ("train.save_every", t.save_every, AT_LEAST_0),
            ("train.eval_every", t.eval_every, AT_LEAST_0),
            ("train.max_nonfinite_skips", t.max_nonfinite_skips, AT_LEAST_0),
            ("train.seed", t.seed, (lambda v: 0 <= v < 2**32, "an integer in [0, 2^32)")),
            ("train.lr", t.lr, POSITIVE),
            ("train.weight_decay", t.weight_decay, NON_NEGATIVE),
            ("train.max_grad_norm", t.max_grad_norm, NON_NEGATIVE),
            ("train.warmup_ratio", t.warmup_ratio, (lambda v: 0 <= v < 1, "a number in [0, 1)")),
            ("train.adam_betas", t.adam_betas, (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                                               "two numbers in [0, 1), e.g. [0.9, 0.999]")),
            ("loss.beta", loss.beta, POSITIVE),
            ("loss.weights", loss.weights, (lambda v: all(math.isfinite(w) and w >= 0 for w in v) and any(v),
                                            "finite numbers >= 0, not all 0")),
            ("loss.rpo_alpha", loss.rpo_alpha, NON_NEGATIVE),
            ("loss.f_alpha_divergence_coef", loss.f_alpha_divergence_coef, POSITIVE),
            ("ref_cache.shard_size", self.ref_cache.shard_size, AT_LEAST_1),
            ("data.chunk_rows", self.data.chunk_rows, AT_LEAST_1),
            ("data.max_length", self.data.max_length,
             (lambda v: v >= 2, "an integer >= 2 (a prompt token, then at least one response token to score)")),
            ("distributed.sequence_parallel", self.distributed.sequence_parallel, AT_LEAST_1),
            ("distributed.timeout_minutes", self.distributed.timeout_minutes, AT_LEAST_1),
        ]
        if self.model.lora is not None:
            lora = self.model.lora
            ranges += [("model.lora.r", lora.r, AT_LEAST_1), ("model.lora.alpha", lora.alpha, POSITIVE),
                       ("model.lora.dropout", lora.dropout, (lambda v: 0 <= v < 1, "a number in [0, 1)")),
                       ("model.lora.target_modules", lora.target_modules, (bool, "at least one module name"))]
        for key, value, (allowed, words) in ranges:
            if value is not None and not _holds(allowed, value):
                raise UserError(f"config: {key}={value!r} is out of range; allowed: {words}")
        trackers = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
        for name in self.trackers:
            if name not in trackers:
                close = difflib.get_close_matches(name, trackers, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f" ({', '.join(trackers)} or none)"
                raise UserError(f"config: train.report_to: unknown tracker {name!r}{hint}")
        if self.ref_cache.enabled and self.ref_cache_dir.resolve() == self.token_cache_dir.resolve():
            raise UserError(f"config: ref_cache.dir and data.cache_dir are one folder ({self.ref_cache_dir}); each "
                            "cache needs its own")
        if self.model.reference is not None and not self.model.reference.strip():
            raise UserError("config: model.reference='' names no model; leave it null to use the policy's start")


ATTENTION_KERNELS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
AT_LEAST_1 = (lambda v: v >= 1, "an integer >= 1")
AT_LEAST_0 = (lambda v: v >= 0, "an integer >= 0 (0 = off)")
POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def _holds(test, value) -> bool:
    try:
        return bool(test(value))
    except (TypeError, ValueError):
        return False


def _check_kernel_installed(name: str) -> None:
    """flash_attention_N needs its package: refuse here, not inside transformers at load time."""
    package = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise UserError(f"config: model.attn_implementation={name} needs the {package} package, which is not "
                        "installed here (pip install flash-attn on a CUDA machine); or use sdpa")


# --- loading -----------------------------------------------------------------------------------


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _union_args(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Returns `value` as type `tp`, or raises a UserError naming `key`."""
    options = _union_args(tp)
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"config: {key} may not be null")
    if isinstance(value, dict):  # a mapping can only mean a section: its own error names the key
        options = [o for o in options if _is_dataclass_type(o) or typing.get_origin(o) is dict] or options
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _coerce_one(value, option, key)
        except UserError as err:
            errors.append(err)
    raise errors[-1] if len(errors) == 1 else UserError(
        f"config: {key}={value!r} has the wrong type (expected {_type_name(tp)})"
    )


def _coerce_one(value: Any, tp: Any, key: str) -> Any:
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise UserError(f"config: {key} must be a mapping of keys, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin is dict:
        _, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise UserError(f"config: {key} must be a mapping, got {value!r}")
        return {str(k): v if value_tp is Any else _coerce_one(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"config: {key} must be a list, got {value!r}")
        return [_coerce_one(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-7" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(f"config: {key}={value!r} has the wrong type (expected {_type_name(tp)})")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise UserError(f"config: unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        tp = hints[f.name]
        # An empty mapping for an optional section (`lora: {}`) means "on, with defaults".
        kwargs[f.name] = _coerce(values[f.name], tp, f"{prefix}{f.name}")
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise UserError(f"override '{text}': value is not valid YAML ({err.problem})") from None
    return key.strip().split("."), value


def _set_dotted(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):  # absent or null section: overriding a sub-key turns it on
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Reads `path` (YAML; optional), applies `key.sub=value` overrides, validates, returns the tree."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise UserError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"config file {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"{path}: the top level must be a mapping of keys")
        tree = loaded or {}
    for text in overrides:
        keys, value = _parse_override(text)
        _set_dotted(tree, keys, value)
    config = _build(Config, tree)
    config.validate()
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


RESOLVED_HEADER = "# The resolved config of a dpo-dist run, written by dpo-dist (it replaces this file on each run).\n"


def save_config(config: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RESOLVED_HEADER + yaml.safe_dump(config_to_dict(config), sort_keys=False))


def written_by_us(path: str | Path) -> bool:
    """Whether `path` is a resolved config `save_config` wrote (so a run may replace it): it starts
    with RESOLVED_HEADER, or (written before the header existed) it is a whole resolved dump, every
    section of the config at the top level and nothing else, with no comment of a user's."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        if text.startswith(RESOLVED_HEADER):
            return True
        tree = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return "#" not in text and isinstance(tree, dict) and list(tree) == [f.name for f in dataclasses.fields(Config)]


def describe_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf key: the source of `--help` and the README table."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        nested = [t for t in _union_args(tp) if _is_dataclass_type(t)]
        if nested:
            if f.metadata.get("help"):
                rows.append((f"{prefix}{f.name}", "null", f.metadata["help"]))
            rows.extend(describe_keys(nested[0], f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = yaml.safe_dump(default, default_flow_style=True).removesuffix("...\n").strip()
        rows.append((f"{prefix}{f.name}", shown, f.metadata.get("help", "")))
    return rows
