"""Sharded training checkpoints that resume exactly, and the final Hugging Face export.

A checkpoint is written by every rank into `checkpoints/.tmp-step-NNNNNN/` (accelerate's
`save_state`: model/optimizer shards — DeepSpeed's `zero_pp_rank_*` files under ZeRO —, the LR
schedule and every rank's RNG state), then renamed to `step-NNNNNN/`, and only then does
`checkpoints/latest` (a one-line file) name it. A crash at any point leaves `latest` naming the
previous complete checkpoint. The data position is the step count: the data order is a pure
function of the seed and the step (see batching.StepPlan).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dpo_dist.config import Config, ModelConfig, save_config
from dpo_dist.errors import UserError

STATE_FILE = "trainer_state.json"
BEST_FILE = "best.json"


def _root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest(output_dir: Path) -> Path | None:
    pointer = _root(output_dir) / "latest"
    if not pointer.is_file():
        return None
    path = _root(output_dir) / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        return latest(output_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume={resume}: not a complete dpo_dist checkpoint (no {STATE_FILE})")
    return path


def save(accelerator, output_dir: Path, step: int, keep_last: int, config: Config) -> Path:
    root = _root(output_dir)
    name = f"step-{step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's shards are on disk
    if accelerator.is_main_process:
        save_config(config, tmp / "config.yaml")  # what `dpo-dist export` rebuilds the model from
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}))  # last: marks the folder complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = root / ".latest.tmp"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, root / "latest")
        for old in sorted(root.glob("step-*"))[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return json.loads((Path(path) / STATE_FILE).read_text())


def export_final(accelerator, model, tokenizer, path: Path, model_cfg: ModelConfig, info: dict | None = None) -> None:
    """Hugging Face folder: full weights (gathered from ZeRO-3 shards) or the LoRA adapter, written
    to a temp folder and renamed into place; `info` goes into it as best.json."""
    state_dict = accelerator.get_state_dict(model)  # a collective under ZeRO-3: every rank calls it
    if accelerator.is_main_process:
        tmp = path.with_name(f".tmp-{path.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if model_cfg.lora is not None and model_cfg.lora.save_merged:
            # From the saved adapter and a fresh base, so it works whatever ZeRO did to the live model.
            from peft import AutoPeftModelForCausalLM

            from dpo_dist.distributed import transformers_zero3_off

            with transformers_zero3_off(accelerator):  # only this rank loads: no ZeRO-3 partitioning
                merged = AutoPeftModelForCausalLM.from_pretrained(tmp).merge_and_unload()
            merged.save_pretrained(tmp / "merged", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "merged")
        if info is not None:
            (tmp / BEST_FILE).write_text(json.dumps(info))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()


def best_so_far(output_dir: Path) -> dict | None:
    """What OUTPUT_DIR/best/ holds ({step, metric, value}), so a resumed run keeps improving on it."""
    path = Path(output_dir) / "best" / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def export_checkpoint(checkpoint_dir: Path, output: Path) -> None:
    """`dpo-dist export`: a sharded checkpoint (any ZeRO stage, any process count) -> HF folder.

    Runs as one process on the CPU: DeepSpeed's ZeRO shards are consolidated to fp32 with its own
    `zero_to_fp32` reader; a plain accelerate checkpoint is read as is.
    """
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from dpo_dist import models
    from dpo_dist.config import load_config

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / STATE_FILE).is_file():
        raise UserError(f"{checkpoint_dir}: not a complete dpo_dist checkpoint (no {STATE_FILE})")
    cfg = load_config(checkpoint_dir / "config.yaml")
    if (checkpoint_dir / "pytorch_model").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    else:
        state_dict = load_file(checkpoint_dir / "model.safetensors")
    model = models.load_policy(cfg.model)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # Every trained weight must come from the checkpoint; frozen ones (a LoRA base) from model.policy.
    missing_trained = {n for n, p in model.named_parameters() if p.requires_grad} & set(missing)
    if unexpected or missing_trained:
        raise UserError(f"{checkpoint_dir}: weights do not fit model.policy ({len(missing_trained)} trained "
                        f"weights missing, {len(unexpected)} unexpected keys)")
    export_final(Accelerator(cpu=True), model, models.load_tokenizer(cfg.model), Path(output), cfg.model)
