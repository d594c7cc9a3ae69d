"""Resuming a checkpoint under another layout: process count, ZeRO stage, DeepSpeed or not.

Checkpoints are saved in their own layout (every rank writes its shard; nothing is gathered). When
a run resumes one under another layout, the checkpoint is converted once into DeepSpeed's universal
checkpoint: a folder per trained parameter holding its whole fp32 value, Adam moments and step
(`zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`), which no layout owns. ZeRO checkpoints are
converted by DeepSpeed's own `ds_to_universal`; a checkpoint written without DeepSpeed (one
accelerate folder: weights, AdamW state) is written out in the same files. The conversion goes to
`step-N/universal/` (a temp folder renamed into place, once, by the main process on the shared
filesystem) and is reused by later restarts. A ZeRO run loads it with DeepSpeed's
`checkpoint.load_universal`, a run without DeepSpeed as weights and AdamW state.

What carries over: weights, Adam moments and step, the LR schedule, the data position (the step:
the data order is a function of the seed and the step, whatever the layout), and the RNG stream of
each rank that exists in both layouts. A rank that did not exist before starts its stream from the
run's seed; the streams draw no data, only dropout (LoRA's, for one).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

from dpo_dist import collectives, fsdp2
from dpo_dist.distributed import describe_layout
from dpo_dist.errors import UserError

UNIVERSAL = "universal"
TAG = "pytorch_model"  # accelerate's DeepSpeed checkpoint tag: CHECKPOINT/pytorch_model/
SCHEDULER_FILE = "custom_checkpoint_0.pkl"  # the LR schedule (accelerate.register_for_checkpointing)
STATES = ("fp32", "exp_avg", "exp_avg_sq")
# The file DeepSpeed reads a universal checkpoint's metadata from: ZeRO-1/2 name it one way, ZeRO-3 another.
MODEL_STATE_NAMES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def load_universal_at_prepare(accelerator) -> None:
    """Tells DeepSpeed, before the engine is built, that this run's checkpoint is a universal one."""
    accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True


def universal_checkpoint(accelerator, path: Path, written: dict, layout: dict, shapes: dict[str, torch.Size]) -> Path:
    """`path/universal/`, converted by the main process now if no earlier restart did; every rank
    waits for it, and a conversion that fails stops every rank with the same line. `written` and
    `layout` (the run's) only name the change in that line."""
    folder = Path(path) / UNIVERSAL
    collectives.on_main_broadcast(  # the main process alone decides (a rank that looked later would see it done)
        accelerator, lambda: None if folder.is_dir() else _convert(accelerator, Path(path), written, layout, shapes))
    return folder


def _convert(accelerator, path: Path, written: dict, layout: dict, shapes: dict[str, torch.Size]) -> None:
    folder, tmp = path / UNIVERSAL, path / f".tmp-{UNIVERSAL}"
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.print(f"converting {path} to a universal checkpoint (once; later restarts reuse {folder})")
    start = time.perf_counter()
    try:
        if written["deepspeed"]:
            _from_deepspeed(path / TAG, tmp / TAG, shapes, written["zero_stage"])
        elif written.get("engine") == "fsdp2":
            _from_fsdp2(path, tmp / TAG, shapes, written["processes"])
        else:
            _from_accelerate(path, tmp / TAG, list(shapes), written["processes"])
    except (AssertionError, KeyError, RuntimeError, NotImplementedError, ValueError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"resume from {path}: written by {describe_layout(written)}, this run is "
                        f"{describe_layout(layout)}, and converting it to a universal checkpoint failed "
                        f"({type(err).__name__}: {err}); launch it as it was written, or start over with "
                        "resume=null") from None
    for carried in [path / SCHEDULER_FILE, *path.glob("random_states_*.pkl")]:
        shutil.copy2(carried, tmp / carried.name)
    os.replace(tmp, folder)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    accelerator.print(f"converted in {time.perf_counter() - start:.1f} s ({size / 2**20:.1f} MiB)")


def _from_deepspeed(source: Path, target: Path, shapes: dict[str, torch.Size], zero_stage: int) -> None:
    """DeepSpeed's converter, then what its output lacks to load under every ZeRO stage (ZeRO-3's
    converter writes flat tensors and no per-parameter step; ZeRO-1/2's loader needs both)."""
    from deepspeed.checkpoint.ds_to_universal import main, parse_arguments

    workers = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
    argv = ["ds_to_universal", "--input_folder", str(source), "--output_folder", str(target),
            "--num_extract_workers", workers, "--num_merge_workers", workers, "--inject_missing_state"]
    saved_argv, sys.argv = sys.argv, argv
    try:
        with redirect_stdout(sys.stderr):  # its progress lines are a log, not the run's output
            main(parse_arguments())
    finally:
        sys.argv = saved_argv
    (target.parent / "latest_universal").unlink(missing_ok=True)  # names the tag; we pass it explicitly
    zero = target / "zero"
    common = torch.load(zero / "optimizer_state.pt", weights_only=False)
    step = _step_of(zero, common)
    if zero_stage == 3:  # rewritten in ZeRO-1/2's form (the others' files are in it already: not read again)
        for name, shape in shapes.items():
            for key in STATES:
                flat = torch.load(zero / name / f"{key}.pt", weights_only=False)
                torch.save({"param": flat.reshape(shape), "cat_dim": 0}, zero / name / f"{key}.pt")
            torch.save(step, zero / name / "step.pt")
    _write_common(zero, common, common["param_groups"], step)
    states = [target / name for name in MODEL_STATE_NAMES if (target / name).is_file()]
    if not states:
        states = sorted(target.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    for name in MODEL_STATE_NAMES:
        if not (target / name).is_file():
            shutil.copy2(states[0], target / name)


def _step_of(zero: Path, common: dict) -> torch.Tensor:
    inner = common.get("optimizer_state_dict", {}).get("state", {})
    if inner:
        return torch.as_tensor(next(iter(inner.values()))["step"])
    return torch.load(next(zero.glob("*/step.pt")), weights_only=False)


def _write_common(zero: Path, common: dict, param_groups: list[dict], step: torch.Tensor) -> None:
    """zero/optimizer_state.pt in both of the forms DeepSpeed reads: ZeRO-1/2 read the param groups at
    the top, ZeRO-3 reads them and the step from an optimizer state dict (and ds_to_universal writes
    only the form of the stage it converted)."""
    import deepspeed

    groups = [{k: v for k, v in group.items() if k != "params"} | {"params": [0]} for group in param_groups]
    kept = {k: v for k, v in common.items() if k in ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad")}
    torch.save({**kept, "ds_version": common.get("ds_version", deepspeed.__version__), "param_groups": groups,
                "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups}},
               zero / "optimizer_state.pt")


def _from_accelerate(source: Path, target: Path, trained_names: list[str], processes: int) -> None:
    """A checkpoint written without DeepSpeed (model.safetensors, optimizer.bin) in universal files."""
    from safetensors.torch import load_file

    weights = load_file(source / "model.safetensors")
    optimizer = torch.load(source / "optimizer.bin", weights_only=False, map_location="cpu")
    masters = optimizer.get("master_weights")  # MasterWeightAdamW: the fp32 copies of low-precision weights

    def entries():
        for i, name in enumerate(trained_names):
            state = optimizer["state"].get(i)
            if state is None:
                raise KeyError(f"optimizer.bin has no state for {name}")
            fp32 = masters[i] if masters is not None else weights[name]
            yield name, fp32, state["exp_avg"], state["exp_avg_sq"], state["step"]

    _write_universal(target, entries(), optimizer["param_groups"], processes)


def _from_fsdp2(source: Path, target: Path, shapes: dict[str, torch.Size], processes: int) -> None:
    """An FSDP2 checkpoint (DCP shards) in universal files, one whole weight at a time."""
    groups = torch.load(source / fsdp2.DCP_FOLDER / fsdp2.PARAM_GROUPS_FILE, weights_only=False)
    _write_universal(target, fsdp2.read_whole(source, shapes), groups, processes)


def _write_universal(target: Path, entries, param_groups: list[dict], processes: int) -> None:
    """Universal files from (name, fp32 weight, exp_avg, exp_avg_sq, step) of every trained weight."""
    zero = target / "zero"
    step = None
    for name, fp32, exp_avg, exp_avg_sq, step in entries:
        step = torch.as_tensor(step, dtype=torch.float32)
        (zero / name).mkdir(parents=True)
        for key, value in (("fp32", fp32), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            torch.save({"param": value.float().reshape(fp32.shape), "cat_dim": 0}, zero / name / f"{key}.pt")
        torch.save(step, zero / name / "step.pt")
    _write_common(zero, {}, param_groups, step)
    # What DeepSpeed reads beside zero/ when it loads a universal checkpoint (not the weights).
    steps = int(step)
    meta = {"dp_world_size": processes, "mp_world_size": 1, "global_steps": steps, "global_samples": 0,
            "skipped_steps": 0}
    for name in MODEL_STATE_NAMES:
        torch.save(meta, target / name)


def load_without_deepspeed(accelerator, model, optimizer, scheduler, folder: Path) -> None:
    """A universal checkpoint into a run without DeepSpeed (FSDP2, or none): the trained weights, AdamW's state (and
    the fp32 master copies of MasterWeightAdamW), the LR schedule, this rank's RNG state."""
    from accelerate.checkpointing import load_accelerator_state, load_custom_state

    zero = Path(folder) / TAG / "zero"
    trained = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    state_dict = inner.state_dict()
    masters = [] if "master_weights" in state_dict else None
    state = {}
    with torch.no_grad():
        for i, (name, param) in enumerate(trained):
            # FSDP2: this rank's shard of each (fsdp2.like); otherwise the whole tensor
            values = {key: fsdp2.like(param, torch.load(zero / name / f"{key}.pt", weights_only=False)["param"])
                      for key in STATES}
            param.copy_(values["fp32"])
            if masters is not None:
                masters.append(values["fp32"])
            step = torch.as_tensor(torch.load(zero / name / "step.pt", weights_only=False), dtype=torch.float32)
            state[i] = {"step": step, "exp_avg": values["exp_avg"], "exp_avg_sq": values["exp_avg_sq"]}
    state_dict["state"] = state
    if masters is not None:
        state_dict["master_weights"] = masters
    inner.load_state_dict(state_dict)
    load_custom_state(scheduler, str(folder), 0)
    load_accelerator_state(str(folder), [], [], [], [], accelerator.process_index)  # RNG (of a rank that existed)
    for group, lr in zip(inner.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # what the schedule had set when the checkpoint was written


def trained_parameter_shapes(accelerator, model) -> dict[str, torch.Size]:
    """The trained parameters' names (as DeepSpeed names their folders) and whole shapes (ZeRO-3's
    partitioned parameters keep theirs in `ds_shape`), in the optimizer's order."""
    return {name: getattr(p, "ds_shape", p.shape)
            for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
