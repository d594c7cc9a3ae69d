"""The only module that knows accelerate, DeepSpeed and process-group backends.

Works the same as one process, under `accelerate launch` (any accelerate config, DeepSpeed ZeRO 2/3
included) and under `torchrun` (DeepSpeed from `distributed.deepspeed`). The device comes from the
environment, never a hard-coded "cuda".
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
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
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    # DeepSpeed 0.19 calls collectives that torch 2.13 marks deprecated, once per step and rank.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)

    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.distributed.timeout_minutes))
    plugin = _deepspeed_plugin(cfg)
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # accelerate 1.15 picks no backend on a CPU-only machine: with DeepSpeed every rank believes
        # it is process 0 of 1 while DeepSpeed partitions over all of them; without it the ranks run
        # as DistributedType.NO (no DDP, barriers that do not wait). gloo, and for plain data
        # parallel accelerate's MULTI_CPU, which it only picks when told the run is on the CPU.
        PartialState(cpu=plugin is None, backend="gloo", timeout=timeout.timeout)
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
        log_with=cfg.trackers or None,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=str(Path(cfg.output_dir) / "tensorboard")),
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


def reference_is_partitioned(accelerator) -> bool:
    """ZeRO-3 over several processes partitions the reference too; otherwise it is whole on each rank."""
    return zero_stage(accelerator) == 3 and accelerator.num_processes > 1


def inference_ds_config(accelerator, hidden_size: int | None) -> dict:
    """The run's DeepSpeed config for a frozen model: no optimizer, scheduler or optimizer offload
    (DeepSpeed would build optimizer state for it), ZeRO's own sizes where the file says "auto"."""
    ds = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    zero = ds.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    # A frozen model's layers are used once per forward: release each right after its use. The
    # default (keep what is reused within 1e9 parameters) keeps every layer of a <1B model gathered.
    zero["stage3_max_reuse_distance"] = 0
    if hidden_size:  # accelerate's own formulas for these "auto" values
        sizes = {"reduce_bucket_size": hidden_size * hidden_size,
                 "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                 "stage3_param_persistence_threshold": 10 * hidden_size}
        zero.update({k: v for k, v in sizes.items() if zero.get(k) == "auto"})
    return _without_auto(ds)


def _without_auto(tree: dict) -> dict:
    """Drops keys still set to "auto" (DeepSpeed then uses its defaults)."""
    return {k: _without_auto(v) if isinstance(v, dict) else v for k, v in tree.items() if v != "auto"}


def load_reference(cfg: Config, accelerator) -> torch.nn.Module:
    """The frozen reference, ready to score batches on this rank's device.

    One process, or ZeRO-0/1/2: whole on every rank (it fits where the policy fits whole).
    ZeRO-3 on several processes: never whole on any rank. It is built partitioned and each rank
    reads only its slice of the weights (see `partitioned`), then runs as an inference-only
    DeepSpeed engine (partitioned parameters gathered layer by layer in forward; no fp32 master
    copy, no optimizer state; `offload_param` honoured). Its forwards are collectives: every rank
    must run the same number of them.
    """
    if not reference_is_partitioned(accelerator):
        with transformers_zero3_off(accelerator):
            return models.load_reference(cfg.model).to(accelerator.device)
    import deepspeed
    from transformers import AutoConfig

    from dpo_dist.logprobs import install_response_head
    from dpo_dist.partitioned import NotSliceable, build_partitioned

    path = models.reference_path(cfg.model)
    ds_config = inference_ds_config(accelerator, getattr(AutoConfig.from_pretrained(path), "hidden_size", None))
    with transformers_zero3_off(accelerator):
        try:
            model = build_partitioned(path, models.DTYPES[cfg.model.dtype], cfg.model.attn_implementation, ds_config,
                                      accelerator.process_index)
            install_response_head(model)  # load_causal_lm below installs it itself
        except NotSliceable as why:
            # transformers' ZeRO-3 loading: still partitioned on the devices, but rank 0 reads
            # the whole checkpoint into host memory first.
            accelerator.print(f"reference: loading through transformers ({why})")
            from transformers.integrations import HfDeepSpeedConfig

            keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  transformers holds only a weak reference
            model = models.load_causal_lm(path, cfg.model)
    if accelerator.device.type == "cpu":
        trim_host_heap(accelerator.device)  # the full tensors zero.Init made and freed, module by module
        for module in model.modules():  # and each layer's gathered weights, once it is done with them
            if next(module.parameters(recurse=False), None) is not None:
                module.register_forward_hook(lambda *_: trim_host_heap(accelerator.device))
    engine = deepspeed.initialize(model=models.freeze(model), config=ds_config)[0]
    engine.eval()  # returns None on a DeepSpeed engine
    return engine


def trim_host_heap(device: torch.device) -> None:
    """On the CPU, gives freed memory back to the OS (glibc's `malloc_trim`).

    PyTorch has no caching allocator on the CPU, and glibc keeps freed buffers of a few MB in its
    heap. Measured on a 303M-parameter fp32 reference partitioned over 2 ranks (0.6 GB each): RSS
    per rank peaked at 1.5-1.7 GB, grew ~12 MB per layer within a forward, and stayed at 1.1 GB after
    the reference was dropped; trimming after each layer holds the peak at 1.1 GB. (A fixed glibc
    mmap threshold does the same for the whole process, but cost CPU training 30% of its speed.)
    """
    if device.type == "cpu" and _libc() is not None:
        _libc().malloc_trim(0)


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only
    except OSError:
        return None


def drop_reference(model: torch.nn.Module) -> None:
    """Detaches a reference from DeepSpeed so that dropping the last reference to it frees it."""
    if not hasattr(model, "destroy"):  # whole on this rank: nothing holds it but the caller
        return
    model.destroy()  # its ZeRO-3 hooks
    # DeepSpeed 0.19 still holds every ZeRO-3 module after destroy(), in a module-level list and in
    # an unbounded class-level lru_cache (only a cache: it refills on demand). Without this the
    # reference's partitions would stay in memory for the whole training run.
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", [])
    stack[:] = [m for m in stack if m is not model.module]
    for method in vars(PartitionedParameterCoordinator).values():  # the cache sits under an nvtx wrapper
        for inner in [method, *(cell.cell_contents for cell in getattr(method, "__closure__", None) or ())]:
            if hasattr(inner, "cache_clear"):
                inner.cache_clear()


def release_memory(device: torch.device) -> None:
    """After dropping a model (the reference, before the policy is built): its memory goes back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trim_host_heap(device)


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


def on_main_broadcast(accelerator, compute):
    """`compute()` on the main process only, its result sent to every rank: expensive work (hashing
    gigabytes) done once, not once per rank. A UserError there is raised on every rank."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = compute()
        except UserError as err:
            error = str(err)
    if accelerator.num_processes > 1:
        # torch's own: accelerate's wrapper skips the broadcast for some CPU setups (MULTI_GPU yaml, gloo).
        box = [result, error]
        torch.distributed.broadcast_object_list(box, src=0)
        result, error = box
    if error is not None:
        raise UserError(error)
    return result


def all_gather_objects(accelerator, items: list) -> list:
    """Every rank's `items`, concatenated in rank order, on every rank."""
    if accelerator.num_processes == 1:
        return list(items)
    per_rank = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(per_rank, list(items))
    return [item for rank_items in per_rank for item in rank_items]


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
    model = models.load_policy(cfg.model)  # partitioned from load time under ZeRO-3 (zero3_init_flag)
    optimizer = _optimizer(cfg, [p for p in model.parameters() if p.requires_grad], accelerator)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.train.scheduler]
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    model, prepared_optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    return model, prepared_optimizer, scheduler
