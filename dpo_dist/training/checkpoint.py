"""Sharded training checkpoints that resume exactly, and the final Hugging Face export.

A checkpoint is written by every rank into `checkpoints/.tmp-step-NNNNNN/` (accelerate's
`save_state`: model/optimizer shards — DeepSpeed's `zero_pp_rank_*` files under ZeRO —, the LR
schedule and every rank's RNG state), then renamed to `step-NNNNNN/`, and only then does
`checkpoints/latest` (a one-line file) name it. A crash at any point leaves `latest` naming the
previous complete checkpoint. `trainer_state.json`, written last, records every file's size:
`resume=auto` passes over a checkpoint whose files were cut short (saying so) to the one before. The data position is the step count: the data order is a pure
function of the seed and the step (see `data.batching.StepPlan`).
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import os
import shutil
import time
from pathlib import Path

import torch

from dpo_dist import collectives, fsdp2, ownership
from dpo_dist.config import Config, ModelConfig, load_config, save_config
from dpo_dist.distributed import describe_layout, export_state_dict, same_layout, transformers_zero3_off
from dpo_dist.errors import RunStopped, UserError
from dpo_dist.model import loading
from dpo_dist.precision import export_dtype
from dpo_dist.training import reshard

STATE_FILE = "trainer_state.json"
EXPORT_KIND = "model export"
BEST_FILE = "best.json"


def _root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _complete_checkpoints(output_dir: Path) -> list[Path]:
    """step-* folders marked complete, newest first (the one `latest` names first of all)."""
    root = _root(output_dir)
    found = sorted((p for p in root.glob("step-*") if (p / STATE_FILE).is_file()), reverse=True)
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    return sorted(found, key=lambda p: p != named)


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint's files against the sizes recorded when it was written."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step recorded")
    except (OSError, ValueError) as err:
        return f"{path / STATE_FILE} is unreadable ({err})"
    for name, size in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} is {file.stat().st_size} bytes, {size} were written"
    return None


def latest(output_dir: Path, say=print) -> Path | None:
    """The newest complete, undamaged checkpoint; a damaged one is named and passed over."""
    for path in _complete_checkpoints(output_dir):
        problem = damage(path)
        if problem is None:
            return path
        say(f"checkpoint {path.name} is damaged ({problem}); trying the one before it")
    return None


def resolve_resume(resume: str | None, output_dir: Path, say=print) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        found = latest(output_dir, say)
        if found is None and any(_root(output_dir).glob("step-*")):
            raise UserError(f"resume=auto: no undamaged checkpoint left in {_root(output_dir)}; "
                            "start over with resume=null or another output_dir")
        return found
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume={resume}: not a complete dpo_dist checkpoint (no {STATE_FILE})")
    problem = damage(path)
    if problem is not None:
        raise UserError(f"resume={resume}: damaged checkpoint ({problem})")
    return path


def save(accelerator, output_dir: Path, step: int, keep_last: int, config: Config, run: dict, layout: dict,
         model=None, optimizer=None) -> Path:
    """Writes checkpoint `step` (see the module docstring); `run` (what the step count means: seed,
    global batch, data and reference fingerprints) and `layout` (processes, engine, ZeRO stage)
    are recorded for `check_resumable`. Under FSDP2 the model and optimizer shards go to
    CHECKPOINT/fsdp2/ (DCP), the rest through accelerate as under the other engines. A full disk stops the run with `latest` still naming the
    previous checkpoint and no half-written folder."""
    root = _root(output_dir)
    name = f"step-{step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    start = time.perf_counter()
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a crash's leftover, in our own checkpoints/ (claim_root)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if layout.get("engine") == "fsdp2":
            fsdp2.save_state(model, optimizer, tmp)
        accelerator.wait_for_everyone()  # every rank's shards are on disk
        if accelerator.is_main_process:
            save_config(config, tmp / "config.yaml")  # what `dpo-dist export` rebuilds the model from
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            # Last: marks the folder complete, with every file's size to check on resume.
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "run": run, "layout": layout, "files": files}))
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as a RuntimeError
        if not (getattr(err, "errno", None) == errno.ENOSPC or _disk_full(root)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(output_dir, say=lambda _: None)
        raise RunStopped(f"no space left on device writing checkpoint {name} in {root}; removed the partial "
                         f"folder; {'latest is still ' + previous.name if previous else 'no earlier checkpoint'}"
                         "; free space and rerun with resume=auto") from None
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = root / ".latest.tmp"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, root / "latest")
        for old in sorted(root.glob("step-*"))[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    accelerator.print(f"checkpoint {name} saved in {time.perf_counter() - start:.1f} s")
    return final


def _disk_full(folder: Path) -> bool:
    return shutil.disk_usage(folder).free < 16 * 2**20


def layout_change(path: Path, layout: dict) -> dict | None:
    """The layout checkpoint `path` was written under, if it is not `layout` (and was recorded)."""
    written = json.loads((Path(path) / STATE_FILE).read_text()).get("layout")
    return None if written is None or same_layout(written, layout) else written


def check_resumable(path: Path, run: dict, allow_changes: bool) -> None:
    """Refuses to resume `path` under settings that change the data order or what a step means (the
    global batch among them: a layout change must keep micro x accum x data-parallel size)."""
    saved = json.loads((Path(path) / STATE_FILE).read_text()).get("run", {})
    changed = [key for key in run if key in saved and saved[key] != run[key]]
    if changed and not allow_changes:
        raise UserError(f"resume from {path}: {', '.join(changed)} changed since it was written (the data order or "
                        "the meaning of a step would differ); use a new output_dir, resume=null, or "
                        "train.allow_resume_changes=true to resume anyway")


def load(accelerator, path: Path, layout: dict, model, optimizer, scheduler) -> int:
    """Restores the training state of checkpoint `path` and returns its step. Under the layout that
    wrote it, accelerate reads its shards as they are; under another, through a universal checkpoint
    (`reshard`), which `Trainer` announced to DeepSpeed before building the engine."""
    written = layout_change(path, layout)
    if written is None:
        accelerator.load_state(str(path))
        if layout.get("engine") == "fsdp2":
            fsdp2.load_state(model, optimizer, Path(path))
    else:
        accelerator.print(f"resume from {path}: written by {describe_layout(written)}, continuing as "
                          f"{describe_layout(layout)}")
        folder = reshard.universal_checkpoint(accelerator, path, written, layout,
                                              reshard.trained_parameter_shapes(accelerator, model))
        if layout["deepspeed"]:
            accelerator.load_state(str(folder))
        else:
            reshard.load_without_deepspeed(accelerator, model, optimizer, scheduler, folder)
    step = json.loads((Path(path) / STATE_FILE).read_text())["step"]
    # accelerate restores its micro-batch counter, which decides where accumulation ends; a checkpoint
    # of another train.grad_accum (another process count, same global batch) counted other micro-batches.
    accelerator.step = step * accelerator.gradient_accumulation_steps
    return step


def export_final(accelerator, model, tokenizer, path: Path, cfg: Config, optimizer=None,
                 info: dict | None = None) -> None:
    """Hugging Face folder in `export.dtype`: the full weights, from the optimizer's fp32 masters
    where it keeps them (`distributed.export_state_dict`), or the LoRA adapter; written to a temp
    folder and renamed into place, over an earlier export only (never a folder dpo_dist did not
    write); `info` goes into it as best.json. Its marker names the reference it was trained
    against, so `evaluate` of it can say which one to compare with."""
    state_dict = export_state_dict(accelerator, model, optimizer, trained_only=_adapter_alone(cfg))
    path = Path(path)

    def write() -> None:
        ownership.check_replaceable(path, EXPORT_KIND)
        tmp = ownership.fresh_folder(path.with_name(f".tmp-{path.name}"), EXPORT_KIND,
                                     reference=_trained_against(cfg.model))
        try:
            _write_hf_folder(accelerator, model, tokenizer, tmp, cfg, state_dict, info)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RunStopped(f"cannot write the model to {path} ({err.strerror or err}); removed the partial folder; "
                             "checkpoints/latest is kept: make room and rerun with resume=auto, or "
                             "`dpo-dist export` it") from None
        ownership.replace_folder(tmp, path, EXPORT_KIND)

    collectives.on_main_with_tensor_verdict(accelerator, write)  # every rank learns how it went


def _adapter_alone(cfg: Config) -> bool:
    """Whether the export needs the trained weights only: a LoRA adapter that targets no embedding
    layer (peft saves those layers' base weights beside such an adapter)."""
    if cfg.model.lora is None:
        return False
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    return not set(cfg.model.lora.target_modules) & set(EMBEDDING_LAYER_NAMES)


def _write_hf_folder(accelerator, model, tokenizer, tmp: Path, cfg: Config, state_dict: dict,
                     info: dict | None) -> None:
    dtype = export_dtype(cfg)
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if cfg.model.lora is None:  # save_pretrained names the live weights' dtype, not the exported one
        config = copy.deepcopy(unwrapped.config)
        config.dtype = dtype
        config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if cfg.model.lora is not None and cfg.model.lora.save_merged:
        # From the saved adapter and a fresh base, so it works whatever ZeRO did to the live model.
        from peft import AutoPeftModelForCausalLM

        with transformers_zero3_off(accelerator):  # only this rank loads: no ZeRO-3 partitioning
            merged = AutoPeftModelForCausalLM.from_pretrained(tmp).merge_and_unload()
        merged.save_pretrained(tmp / "merged", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "merged")
    if info is not None:
        (tmp / BEST_FILE).write_text(json.dumps(info))


def _trained_against(model_cfg: ModelConfig) -> str:
    """The reference of a run as the config names it (a local folder made absolute)."""
    name = model_cfg.reference or model_cfg.policy
    return str(Path(name).resolve()) if Path(name).exists() else name


def check_exports_replaceable(accelerator, output_dir: Path) -> None:
    """Refuses, before the training, an OUTPUT_DIR/final or best (or a leftover temp folder of one)
    that the run's exports could not replace."""
    def check() -> None:
        for name in ("final", "best"):
            for path in (Path(output_dir) / name, Path(output_dir) / f".tmp-{name}"):
                ownership.check_replaceable(path, EXPORT_KIND)

    collectives.on_main_broadcast(accelerator, check)


def claim_root(accelerator, output_dir: Path) -> None:
    """Marks OUTPUT_DIR/checkpoints as dpo_dist's (refusing one that holds anything else) before
    the run writes or prunes checkpoints in it."""
    collectives.on_main_broadcast(accelerator, lambda: ownership.claim(_root(output_dir), "checkpoints",
                                                                       "output_dir (its checkpoints/)"))


def best_so_far(output_dir: Path) -> dict | None:
    """What OUTPUT_DIR/best/ holds ({step, metric, value}), so a resumed run keeps improving on it."""
    path = Path(output_dir) / "best" / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def export_checkpoint(checkpoint_dir: Path, output: Path, dtype: str | None = None) -> None:
    """`dpo-dist export`: a sharded checkpoint (any ZeRO stage, any process count) -> HF folder in
    `dtype` (default: the run's export.dtype).

    Runs as one process on the CPU, from the fp32 master weights wherever the run kept them:
    DeepSpeed's ZeRO shards are consolidated with its own `zero_to_fp32` reader; a plain accelerate
    checkpoint is read as is, its trained weights from `MasterWeightAdamW`'s masters if it has them.
    """
    from accelerate import Accelerator
    from safetensors.torch import load_file

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / STATE_FILE).is_file():
        raise UserError(f"{checkpoint_dir}: not a complete dpo_dist checkpoint (no {STATE_FILE})")
    cfg = load_config(checkpoint_dir / "config.yaml")
    if dtype is not None:
        cfg.export.dtype = dtype
        cfg.validate()
    # A full fine-tune loaded in fp32, so that no master weight is rounded before export_final casts
    # to export.dtype (a LoRA adapter is fp32 whatever its base is).
    model = loading.load_policy(cfg.model if cfg.model.lora else dataclasses.replace(cfg.model, dtype="float32"),
                                seed=cfg.train.seed)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    if (checkpoint_dir / "pytorch_model").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    else:
        state_dict = load_file(checkpoint_dir / "model.safetensors")
        if json.loads((checkpoint_dir / STATE_FILE).read_text()).get("layout", {}).get("fp32_master_copies"):
            optimizer = torch.load(checkpoint_dir / "optimizer.bin", map_location="cpu", weights_only=True)
            state_dict.update(zip(trained, optimizer["master_weights"]))  # in the order the optimizer took them
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # Every trained weight must come from the checkpoint; frozen ones (a LoRA base) from model.policy.
    missing_trained = set(trained) & set(missing)
    if unexpected or missing_trained:
        raise UserError(f"{checkpoint_dir}: weights do not fit model.policy ({len(missing_trained)} trained "
                        f"weights missing, {len(unexpected)} unexpected keys)")
    export_final(Accelerator(cpu=True), model, loading.load_tokenizer(cfg.model), Path(output), cfg)
