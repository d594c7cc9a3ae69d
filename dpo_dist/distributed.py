"""The only module that knows accelerate, DeepSpeed and process-group backends.

Works the same as one process, under `accelerate launch` (any accelerate config, DeepSpeed ZeRO 2/3
included) and under `torchrun` (DeepSpeed from `distributed.deepspeed`). The device comes from the
environment, never a hard-coded "cuda".
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from dpo_dist import models
from dpo_dist.config import Config
from dpo_dist.errors import UserError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _deepspeed_plugin(cfg: Config):
    """The DeepSpeed plugin from `distributed.deepspeed`, with our config as the one source of the
    batch size, accumulation and clipping (the JSON keeps only what is DeepSpeed's own)."""
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
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["gradient_clipping"] = cfg.train.max_grad_norm
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    plugin.gradient_accumulation_steps = cfg.train.grad_accum
    return plugin


def build_accelerator(cfg: Config):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import InitProcessGroupKwargs

    # DeepSpeed 0.19 calls collectives that torch 2.13 marks deprecated, once per step and rank.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)

    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.distributed.timeout_minutes))
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # accelerate 1.15 picks no backend for DeepSpeed on a CPU-only machine, and then every rank
        # believes it is process 0 of 1 while DeepSpeed partitions over all of them. Pick gloo.
        PartialState(backend="gloo", timeout=timeout.timeout)
    plugin = _deepspeed_plugin(cfg)
    if plugin is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # DeepSpeed always initialises a process group; give a lone process one of size 1.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum,
        deepspeed_plugin=plugin,
        kwargs_handlers=[timeout],
    )
    return accelerator


class PreemptionWatch:
    """Turns SIGUSR1 / SIGTERM (Slurm's `--signal`, a cloud spot notice) into a flag that every rank
    checks after each optimizer step; one tiny all-reduce makes all ranks stop at the same step."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.flag = torch.zeros(1, device=accelerator.device)
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.flag.fill_(1)
        print(f"[rank {self.accelerator.process_index}] got {signal.Signals(signum).name}: "
              "checkpointing after this step", flush=True)

    def requested(self) -> bool:
        flag = self.flag.clone()
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    if not uses_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def load_reference(cfg: Config, accelerator) -> torch.nn.Module:
    """The frozen reference, whole on every rank, on this rank's device.

    Under ZeRO-3 transformers would partition any model loaded after the Accelerator exists; the
    reference runs outside any DeepSpeed engine, so it must be loaded whole (and, being inference
    only, each rank scores its own shards without collectives).
    """
    with unpartitioned_loading(accelerator):
        model = models.load_reference(cfg.model)
    return model.to(accelerator.device)


@contextlib.contextmanager
def unpartitioned_loading(accelerator):
    """transformers partitions every model it loads while a ZeRO-3 DeepSpeed config is registered
    (accelerate's `zero3_init_context_manager(enable=False)` keeps it registered); lift it here."""
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


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
    return torch.optim.AdamW(params, **kwargs)


def prepare_policy(cfg: Config, accelerator, total_steps: int):
    """Builds the policy, AdamW and the LR schedule and hands model + optimizer to accelerate.

    The schedule wraps the plain torch optimizer and is stepped once per optimizer step by the
    trainer (not through accelerate, which would step it once per process).
    """
    from transformers import get_scheduler

    model = models.load_policy(cfg.model)  # partitioned from load time under ZeRO-3 (zero3_init_flag)
    optimizer = _optimizer(cfg, [p for p in model.parameters() if p.requires_grad], accelerator)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.train.scheduler]
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    model, prepared_optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    return model, prepared_optimizer, scheduler
