"""accelerate, DeepSpeed and process-group backends: the accelerator, the prepared policy and its
optimizer, preemption signals.

Works the same as one process, under `accelerate launch` (any accelerate config, DeepSpeed ZeRO 2/3
included) and under `torchrun` (DeepSpeed from `distributed.deepspeed`). The device comes from the
environment, never a hard-coded "cuda".
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import signal
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from dpo_dist import fsdp2
from dpo_dist.model import attention, loading, ulysses, weight_files
from dpo_dist.config import Config
from dpo_dist.errors import UserError
from dpo_dist.precision import (ACCELERATE_NAMES, LOW, MasterWeightAdamW, check_deepspeed_precision, forward_dtypes,
                                fp32_master_copies, resolve_precision)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _deepspeed_plugin(cfg: Config, precision: str):
    """The DeepSpeed plugin from `distributed.deepspeed`, with our config as the one source of the
    batch size, accumulation, clipping and precision (the JSON keeps only what is DeepSpeed's own)."""
    from accelerate.utils import DeepSpeedPlugin

    path = cfg.distributed.deepspeed
    if path is None:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            return None
        plugin = DeepSpeedPlugin()  # from `accelerate launch --config_file` (environment variables)
    else:
        try:
            ds_config = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"distributed.deepspeed={path}: cannot read DeepSpeed JSON ({err})") from None
        zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
        plugin = DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=zero3)
    ds = plugin.deepspeed_config
    source = path or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "of `accelerate launch`")
    check_deepspeed_precision(ds, cfg, precision, f"DeepSpeed JSON {source}")
    if precision != "fp32":
        # DeepSpeed accumulates bf16 / fp16 gradients in that dtype unless told (DeepSpeed issue 2768).
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["gradient_clipping"] = cfg.train.max_grad_norm
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    plugin.gradient_accumulation_steps = cfg.train.grad_accum
    return plugin


def build_accelerator(cfg: Config):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    # DeepSpeed 0.19 calls collectives that torch 2.13 marks deprecated, once per step and rank.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)

    fsdp2.take_accelerate_request(cfg)
    if cfg.distributed.fsdp2:
        fsdp2.check_composes(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_sequence_parallel(cfg, world)
    derive_grad_accum(cfg, world // cfg.distributed.sequence_parallel)
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.distributed.timeout_minutes))
    precision = resolve_precision(cfg)
    plugin = _deepspeed_plugin(cfg, precision)
    if plugin is not None and cfg.distributed.fsdp2:
        raise UserError("distributed.fsdp2=true and a DeepSpeed config both shard the model; choose one engine "
                        "(README 'Engines')")
    chosen = "deepspeed" if plugin is not None else "fsdp2" if cfg.distributed.fsdp2 else "none"
    check_attention_precision(cfg, precision, casts=chosen != "none")
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # accelerate 1.15 picks no backend on a CPU-only machine: with DeepSpeed every rank believes
        # it is process 0 of 1 while DeepSpeed partitions over all of them; without it the ranks run
        # as DistributedType.NO (no DDP, barriers that do not wait). gloo, and for plain data
        # parallel accelerate's MULTI_CPU, which it only picks when told the run is on the CPU.
        PartialState(cpu=plugin is None, backend="gloo", timeout=timeout.timeout)
    if chosen != "none" and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # DeepSpeed and FSDP2 need a process group; give a lone process one of size 1.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    _release_state_of_another_precision(precision)
    accelerator = Accelerator(
        # FSDP2's MixedPrecisionPolicy casts, not accelerate's autocast
        mixed_precision=ACCELERATE_NAMES["fp32" if chosen == "fsdp2" else precision],
        gradient_accumulation_steps=cfg.train.grad_accum,
        deepspeed_plugin=plugin,
        kwargs_handlers=[timeout],
        log_with=cfg.trackers or None,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=str(Path(cfg.output_dir) / "tensorboard")),
    )
    accelerator.dpo_dist_engine = chosen
    accelerator.print(f"engine: {ENGINE_NAMES[chosen]}; precision: {describe_precision(cfg, precision, chosen)}")
    if accelerator.device.type == "cuda" and precision == "fp32":
        torch.set_float32_matmul_precision("high")
        accelerator.print("fp32 on CUDA: TF32 matmuls allowed (torch.set_float32_matmul_precision('high'))")
    return accelerator


def derive_grad_accum(cfg: Config, processes: int) -> None:
    """train.grad_accum from train.global_batch_size, for this data-parallel size (before anything
    reads it)."""
    total = cfg.train.global_batch_size
    if total is None:
        return
    per_pass = cfg.train.micro_batch_size * processes
    if total % per_pass:
        raise UserError(f"train.global_batch_size={total} is not a multiple of train.micro_batch_size x data-parallel "
                        f"processes = {cfg.train.micro_batch_size} x {processes}; choose a micro batch that divides it")
    cfg.train.grad_accum = total // per_pass


def _release_state_of_another_precision(precision: str) -> None:
    """accelerate keeps one state per process and refuses another precision in it; a later run in the
    same process (a notebook, tests after an in-process TRL run in bf16) starts from a fresh one."""
    from accelerate.state import AcceleratorState

    made_with = AcceleratorState._shared_state.get("_mixed_precision")
    if made_with is not None and made_with != ACCELERATE_NAMES[precision]:
        AcceleratorState._reset_state()


ENGINE_NAMES = {"deepspeed": "DeepSpeed", "fsdp2": "FSDP2 (fully_shard per decoder layer)",
                "none": "data parallel (no sharding)"}


def engine(accelerator) -> str:
    """What shards this run's model: "deepspeed", "fsdp2" or "none" (each rank holds it whole)."""
    return getattr(accelerator, "dpo_dist_engine", "deepspeed" if uses_deepspeed(accelerator) else "none")


def describe_precision(cfg: Config, precision: str, engine: str) -> str:
    """One line for the log: what runs in which dtype."""
    weights, autocast = forward_dtypes(cfg, precision, engine != "none")
    parts = [f"train.mixed_precision={cfg.train.mixed_precision} -> {precision}",
             f"forward weights {str(weights).removeprefix('torch.')}"]
    if autocast is not None:
        parts.append(f"autocast {str(autocast).removeprefix('torch.')}")
    parts.append({"deepspeed": "optimizer steps fp32 (DeepSpeed's master weights)",
                  "fsdp2": "optimizer steps fp32 (FSDP2's fp32 shards)"}.get(engine) or
                 "optimizer steps fp32" + (" master copies" if fp32_master_copies(cfg, False) else ""))
    return ", ".join(parts)


def check_attention_precision(cfg: Config, precision: str, casts: bool) -> None:
    """flash-attn has no fp32 kernels: refuse an fp32 forward with it here, not inside the kernel."""
    if cfg.model.attn_implementation.startswith("flash_attention") and forward_dtypes(cfg, precision, casts) == (
            torch.float32, None):
        raise UserError(f"model.attn_implementation={cfg.model.attn_implementation} runs in bf16 / fp16 only; "
                        "set train.mixed_precision=bf16 (or model.dtype=bfloat16), or use sdpa")


def run_forward_dtypes(cfg: Config, accelerator) -> tuple[torch.dtype, torch.dtype | None]:
    """`precision.forward_dtypes` of this run: what the policy's and the reference's forwards read."""
    return forward_dtypes(cfg, resolve_precision(cfg), engine(accelerator) != "none")


class PreemptionWatch:
    """Turns SIGUSR1 / SIGTERM (Slurm's `--signal`, a cloud spot notice) into a plain flag (a signal
    handler touches no tensor: no device work inside it). The trainer all-reduces it with its
    non-finite count, once per optimizer step, so every rank stops at the same step."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, accelerator):
        self.rank = accelerator.process_index
        self.signalled = False
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True
        print(f"[rank {self.rank}] got {signal.Signals(signum).name}: checkpointing after this step", flush=True)


class Topology:
    """Which ranks share what: `data_parallel` groups of ranks take different pairs (this rank is in
    group `data_rank`); within a group, `sequence` (None when distributed.sequence_parallel is 1)
    cuts every sequence across its ranks."""

    def __init__(self, data_parallel: int, data_rank: int, sequence: ulysses.SequenceParallel | None):
        self.data_parallel, self.data_rank, self.sequence = data_parallel, data_rank, sequence

    @property
    def shard(self) -> tuple[int, int]:
        """`collate`'s shard: (parts, this rank's part) of every row's columns."""
        return (1, 0) if self.sequence is None else (self.sequence.size, self.sequence.rank)

    @property
    def counts(self) -> bool:
        """Whether this rank's pairs count in metrics and caches (one rank of each sequence group)."""
        return self.sequence is None or self.sequence.rank == 0


def check_sequence_parallel(cfg: Config, world: int) -> None:
    """Refuses, in one line and before any work, what sequence parallelism cannot run."""
    size = cfg.distributed.sequence_parallel
    ulysses.check_supported(cfg.model.attn_implementation, size)
    if world % size:
        raise UserError(f"distributed.sequence_parallel={size} does not divide the {world} processes")


def topology(cfg: Config, accelerator) -> Topology:
    """Groups of distributed.sequence_parallel consecutive ranks share sequences; the groups split
    the data (`check_sequence_parallel` ran when the accelerator was built)."""
    size, world, rank = cfg.distributed.sequence_parallel, accelerator.num_processes, accelerator.process_index
    if size == 1:
        return Topology(world, rank, None)
    group = _sequence_group(size, world, rank)
    return Topology(world // size, rank // size,
                    ulysses.SequenceParallel(group, size, rank % size))


def cut_sequences(model: torch.nn.Module, cfg: Config, accelerator) -> torch.nn.Module:
    """`model` with its attention cut across this rank's sequence group (distributed.sequence_parallel > 1)."""
    sequence = topology(cfg, accelerator).sequence
    if sequence is not None:
        attention.install(model, sequence)
    return model


@functools.cache
def _sequence_group(size: int, world: int, rank: int):
    """This rank's process group of `size` consecutive ranks; every rank creates every group, in order."""
    import torch.distributed as dist

    groups = [dist.new_group(list(range(start, start + size))) for start in range(0, world, size)]
    return groups[rank // size]


def layout(cfg: Config, accelerator) -> dict:
    """How this run lays its training state out on disk: what its checkpoints can resume under.
    (Sequence parallelism is not part of it: ZeRO partitions over all processes either way.)"""
    name = engine(accelerator)
    written = {"processes": accelerator.num_processes, "deepspeed": name == "deepspeed",
               "zero_stage": zero_stage(accelerator), "fp32_master_copies": fp32_master_copies(cfg, name != "none")}
    return written | ({"engine": "fsdp2"} if name == "fsdp2" else {})


def same_layout(written: dict, layout: dict) -> bool:
    """Whether a checkpoint of layout `written` loads as it is: the same layout, or FSDP2 under any
    process count (DCP stores every shard's place in the whole weight)."""
    return written == layout or (written.get("engine") == layout.get("engine") == "fsdp2")


def describe_layout(layout: dict) -> str:
    """e.g. '2 processes under DeepSpeed ZeRO-2', '1 process without DeepSpeed, fp32 master copies'."""
    n = layout["processes"]
    text = f"{n} process{'es' if n != 1 else ''} "
    text += (f"under DeepSpeed ZeRO-{layout['zero_stage']}" if layout["deepspeed"] else "under FSDP2"
             if layout.get("engine") == "fsdp2" else "without DeepSpeed")
    return text + (", fp32 master copies" if layout.get("fp32_master_copies") else "")


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    if not uses_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def transformers_zero3_off(accelerator):
    """transformers partitions every model it loads while a ZeRO-3 DeepSpeed config is registered
    (accelerate registers the run's for the policy); lifted here, put back after."""
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def export_state_dict(accelerator, model, optimizer=None, trained_only: bool = False) -> dict[str, torch.Tensor]:
    """The weights an export writes, whole on the main process ({} on the others; every rank calls it):
    each trained weight from the optimizer's fp32 master copy where there is one (DeepSpeed's master
    partitions under any ZeRO stage, `MasterWeightAdamW`), not the bf16 copy the forward read — most
    DPO-sized updates are below one bf16 ulp. Gathered one parameter at a time (ZeRO-3), to the CPU.
    `trained_only`: just the trained weights (a LoRA adapter), without gathering the frozen base."""
    fp32_master = None
    if engine(accelerator) == "fsdp2":
        fsdp2.gather_all(model)  # every unit on its shards (an eval forward leaves the head unit gathered)
    if uses_deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_fp32_param as fp32_master
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper around ours
    masters = ({id(p): m for p, m in zip(inner.model_params, inner.masters())}
               if isinstance(inner, MasterWeightAdamW) else {})
    whole: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in accelerator.unwrap_model(model).state_dict(keep_vars=True).items():
        trained = isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad
        if trained_only and not trained:
            continue
        if id(tensor) not in whole:  # tied weights: one gather
            whole[id(tensor)] = _whole_weight(tensor, trained, masters, fp32_master, accelerator.is_main_process)
        if accelerator.is_main_process:
            out[name] = whole[id(tensor)]
    return out


def _whole_weight(tensor, trained: bool, masters: dict, fp32_master, keep: bool) -> torch.Tensor | None:
    """One weight, whole, on the CPU if `keep` (the main process); every rank takes part in the
    collectives (ZeRO), the others keep nothing."""
    if trained and fp32_master is not None:
        value = fp32_master(tensor)  # a collective (ZeRO-1/2: all-reduce, ZeRO-3: all-gather)
        if value is not None:
            return value.detach().cpu() if keep else None
    if hasattr(tensor, "full_tensor"):  # an FSDP2 shard (of an fp32 trained weight: the master itself)
        whole = tensor.full_tensor()  # a collective
        return whole.detach().cpu() if keep else None
    if hasattr(tensor, "ds_id"):  # a frozen ZeRO-3 partition
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().cpu().clone() if keep else None
    if not keep:
        return None
    if id(tensor) in masters:
        return masters[id(tensor)].detach().cpu().clone()
    return tensor.detach().cpu()


def _optimizer(cfg: Config, params: list, accelerator) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas), weight_decay=cfg.train.weight_decay)
    offload = {}
    if uses_deepspeed(accelerator):
        offload = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get(
            "offload_optimizer", {}
        )
    if offload.get("device") in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload steps the optimizer on the CPU

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    # One fused kernel over all parameters. PyTorch's default is foreach on GPUs, whose step
    # temporaries are as large as the parameters (75M: 288 MiB), and a per-tensor loop on the CPU,
    # several times slower than fused (benchmarks/optimizer_step.py).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if fp32_master_copies(cfg, engine(accelerator) != "none"):
        return MasterWeightAdamW(params, fused=fused, **kwargs)
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def prepare_policy(cfg: Config, accelerator, total_steps: int):
    """Builds the policy, AdamW and the LR schedule and hands model + optimizer to accelerate.

    The schedule wraps the plain torch optimizer and is stepped once per optimizer step by the
    trainer (not through accelerate, which would step it once per process).
    """
    from transformers import get_scheduler

    if cfg.model.attn_implementation == "flex_attention" and accelerator.device.type == "cpu":
        raise UserError("model.attn_implementation=flex_attention cannot train on the CPU (PyTorch has no CPU "
                        "backward for FlexAttention); use sdpa here (precompute and evaluate run with flex)")
    if engine(accelerator) == "fsdp2":
        model = _fsdp2_policy(cfg, accelerator)
    else:  # ZeRO-3: partitioned from load time (transformers' zero.Init)
        model = loading.load_policy(cfg.model, seed=cfg.train.seed)
    model = cut_sequences(model, cfg, accelerator)
    optimizer = _optimizer(cfg, [p for p in model.parameters() if p.requires_grad], accelerator)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.train.scheduler]
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    if engine(accelerator) == "fsdp2":  # sharded already; accelerate would wrap it again
        accelerator.register_for_checkpointing(scheduler)
        return model, optimizer, scheduler
    model, prepared_optimizer = accelerator.prepare(model, optimizer)
    if uses_deepspeed(accelerator) and LOW.get(resolve_precision(cfg)) and cfg.model.dtype == "float32" \
            and cfg.model.lora is None:
        _masters_from_weight_files(accelerator, accelerator.unwrap_model(model), loading.policy_path(cfg.model))
    accelerator.register_for_checkpointing(scheduler)
    return model, prepared_optimizer, scheduler


def _fsdp2_policy(cfg: Config, accelerator) -> torch.nn.Module:
    """The policy under FSDP2: built on the meta device and sharded, each rank reading only its rows
    of the weights (a whole load, then sharding, where the files cannot be read row by row). Its
    trained weights are fp32 before sharding: their shards are the optimizer's master weights, and
    the forward gathers them in the run's precision."""
    weights, _ = run_forward_dtypes(cfg, accelerator)

    def shard(model: torch.nn.Module) -> torch.nn.Module:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        return fsdp2.shard(model, accelerator.device, accelerator.num_processes,
                           compute_dtype=None if weights == torch.float32 else weights,
                           reshard_after_forward=cfg.distributed.fsdp_reshard_after_forward,
                           offload=cfg.distributed.fsdp_offload, training=True)

    return sharded_from_weight_files(
        accelerator, "policy", loading.policy_path(cfg.model), shard, seed=cfg.train.seed,
        build=lambda empty: loading.load_policy(cfg.model, seed=cfg.train.seed, empty=empty))


def sharded_from_weight_files(accelerator, what: str, folder: Path, shard, *, build, seed: int = 0):
    """`build(empty=True)`'s model, made on the meta device, sharded by `shard` (FSDP2), each rank
    copying only its rows of every weight from the safetensors files in `folder` and of every new
    adapter (`loading.initial_adapter_weight`): no rank ever holds the whole model. Where the files
    cannot be read that way (names, shapes, not safetensors), `build(empty=False)` loads it
    whole on each rank, then `shard` shards it, and the run says so."""
    readable = _meta_model_readable_from(folder, build)
    if readable is None:
        accelerator.print(f"{what}: its safetensors cannot be read row by row; loading it whole, then sharding")
        return shard(build(empty=False))
    model, stored = readable
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # computed at build, not stored
    model = shard(model)
    model.to_empty(device=accelerator.device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        for name, param in model.named_parameters():
            local = param.to_local()
            if name in stored:
                first, _ = fsdp2.local_rows(param)
                part = stored[name].read_flat(first * math.prod(param.shape[1:]), local.numel())
            else:
                part = fsdp2.like(param, loading.initial_adapter_weight(name, param.shape, seed)).to_local()
            local.copy_(part.reshape(local.shape))
    return model


def _meta_model_readable_from(folder: Path, build):
    """(`build(empty=True)`'s model, the stored tensor of each of its parameters by parameter name),
    or None where some parameter is neither stored (same shape) nor a new adapter."""
    try:
        stored = weight_files.checkpoint_index(folder)
    except weight_files.NotSliceable:
        return None
    model = build(empty=True)
    sources = {}
    for name, param in model.named_parameters():
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")  # a peft wrapper's names
        if key in stored and tuple(stored[key].shape) == tuple(param.shape):
            sources[name] = stored[key]
        elif not (param.requires_grad and loading.adapter_role(name)):
            return None
    return model, sources


def backward(accelerator, model: torch.nn.Module, loss: torch.Tensor) -> None:
    """One micro-batch's backward. FSDP2 accumulates whole gradients locally and reduce-scatters
    them once per optimizer step, on its last micro-batch (ZeRO and DDP sync in their own way)."""
    if engine(accelerator) == "fsdp2":
        model.set_requires_gradient_sync(accelerator.sync_gradients)
    accelerator.backward(loss)


def clip_gradients(accelerator, model: torch.nn.Module, max_norm: float) -> float | None:
    """Clips the step's gradients to `max_norm`; their global norm (None where DeepSpeed keeps it)."""
    if engine(accelerator) == "fsdp2":
        return float(fsdp2.clip_gradients([p for p in model.parameters() if p.requires_grad], max_norm))
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    return None if norm is None else float(norm)


def _masters_from_weight_files(accelerator, model: torch.nn.Module, folder: Path) -> None:
    """DeepSpeed makes its fp32 masters from the bf16 / fp16 copy it casts the weights to, which rounds
    the fp32 starting weights by up to half an ulp — often more than a DPO run moves them. Every rank
    sets its own part of them again from the policy's fp32 safetensors files, reading only the rows
    that part spans (a 1/N share under ZeRO). A resumed run then loads its checkpoint's masters over
    them. Weights with no fp32 entry there (.bin files, renamed keys) keep the rounded start, and the
    run says how many."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    names = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"] if (folder / "model.safetensors").is_file() else [])
    files = {}
    for name in names:
        handle = safe_open(str(folder / name), framework="pt")
        files.update(dict.fromkeys(handle.keys(), handle))
    trained = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    kept = 0
    for name, param in trained:
        saved = files[name].get_slice(name) if name in files else None
        if saved is None or saved.get_dtype() != "F32" or not _set_master(param, functools.partial(_flat_range, saved)):
            kept += 1
    if kept:
        accelerator.print(f"note: {kept} of {len(trained)} trained weights keep DeepSpeed's "
                          f"{'bf16' if accelerator.mixed_precision == 'bf16' else 'fp16'}-rounded start (no float32 "
                          f"entry for them in {folder}'s safetensors files)")


def _flat_range(saved, start: int, count: int) -> torch.Tensor:
    """Elements [start, start + count) of a safetensors tensor flattened, reading only the rows they span."""
    shape = saved.get_shape()
    row = math.prod(shape[1:])
    first, last = start // row, -(-(start + count) // row)
    return saved[first:last].flatten()[start - first * row:start - first * row + count]


def _set_master(param, read) -> bool:
    """This rank's part of `param`'s fp32 master from `read(start, count)` (a range of the whole
    weight, flattened); False if DeepSpeed keeps none for it. By hand, from DeepSpeed's own maps:
    its `set_full_hp_param` wants the whole weight on every rank, and under ZeRO-3 reads past the
    end of one whose size the process count does not divide (the last partition is padded)."""
    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition of the weight
        optimizer = param._z3_optimizer
        part, group = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
        start = part.numel() * optimizer._get_param_partition_rank(param)
        count = max(0, min(part.numel(), param.ds_numel - start))
        if count:
            part.data[:count].copy_(read(start, count))
        if optimizer._swappable_optimizer_subgroup(group):
            optimizer._optimizer_states_and_gradient_swap_out(group)
        return True
    if not hasattr(param, "_hp_mapping"):
        return False
    if param._hp_mapping is not None:  # ZeRO-1/2: the fragment this rank holds, if any
        address = param._hp_mapping.lp_fragment_address
        param._hp_mapping.get_hp_fragment().data.copy_(read(address.start, address.numel))
    return True