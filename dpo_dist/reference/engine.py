"""The frozen reference model: built whole or ZeRO-3 partitioned, run, and freed for good.

One process, or ZeRO-0/1/2: the reference is whole on every rank. ZeRO-3 on several processes: it is
built partitioned (each rank reads only its slice, see `partitioned`) and runs as an inference-only
DeepSpeed engine. `drop_reference` + `release_memory` return its memory before the policy is built.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import re

import torch

from dpo_dist import fsdp2, host_memory
from dpo_dist.config import Config
from dpo_dist.distributed import (cut_sequences, engine as run_engine, run_forward_dtypes, sharded_from_weight_files,
                                  transformers_zero3_off, zero_stage)
from dpo_dist.model import loading
from dpo_dist.model.logprobs import install_response_head
from dpo_dist.model.weight_files import NotSliceable, checkpoint_index
from dpo_dist.precision import DTYPES
from dpo_dist.reference.partitioned import build_partitioned


def reference_is_partitioned(accelerator) -> bool:
    """ZeRO-3 or FSDP2 over several processes partition the reference too; otherwise it is whole on
    each rank."""
    return (zero_stage(accelerator) == 3 or run_engine(accelerator) == "fsdp2") and accelerator.num_processes > 1



def inference_ds_config(accelerator, hidden_size: int | None, layer_params: int | None) -> dict:
    """The run's DeepSpeed config for a frozen model: no optimizer, scheduler or optimizer offload
    (DeepSpeed would build optimizer state for it), ZeRO's own sizes where the file says "auto", and
    gathered parameters bounded to about two of its `layer_params`-sized layers whatever the JSON
    allows for training (the Hugging Face docs' 1e9 keeps most of a <1B model gathered at once)."""
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
    if layer_params:
        zero["stage3_max_live_parameters"] = 2 * layer_params
        # Prefetching overlaps the next layer's gather with this one's compute on a GPU's streams;
        # on the CPU nothing overlaps and it only holds more (ranks peaked at 2.4 GB vs 1.1 GB here).
        zero["stage3_prefetch_bucket_size"] = layer_params if accelerator.device.type == "cuda" else 0
    return _without_auto(ds)


def largest_layer_params(folder) -> int | None:
    """Parameters of the checkpoint's largest numbered block (a decoder layer: `...layers.17.`), from
    the safetensors headers alone; None where they cannot be read."""
    try:
        stored = checkpoint_index(folder)
    except NotSliceable:
        return None
    blocks: dict[str, int] = {}
    for name, tensor in stored.items():
        numbered = re.search(r"\.\d+\.", name)
        if numbered:
            blocks[name[: numbered.end()]] = blocks.get(name[: numbered.end()], 0) + tensor.numel
    return max(blocks.values(), default=None)


def _without_auto(tree: dict) -> dict:
    """Drops keys still set to "auto" (DeepSpeed then uses its defaults)."""
    return {k: _without_auto(v) if isinstance(v, dict) else v for k, v in tree.items() if v != "auto"}


def load_reference(cfg: Config, accelerator) -> torch.nn.Module:
    """The frozen reference, ready to score batches on this rank's device (see `_placed_reference`),
    its sequences cut across the ranks of a group under distributed.sequence_parallel."""
    return cut_sequences(_placed_reference(cfg, accelerator), cfg, accelerator)


def _placed_reference(cfg: Config, accelerator) -> torch.nn.Module:
    """The frozen reference on this rank.

    One process, or ZeRO-0/1/2: whole on every rank (it fits where the policy fits whole).
    ZeRO-3 on several processes: never whole on any rank. It is built partitioned and each rank
    reads only its slice of the weights (see `partitioned`), then runs as an inference-only
    DeepSpeed engine (partitioned parameters gathered layer by layer in forward; no fp32 master
    copy, no optimizer state; `offload_param` honoured). Its forwards are collectives: every rank
    must run the same number of them.
    """
    weights_dtype, _ = run_forward_dtypes(cfg, accelerator)  # as the policy's forward reads them
    if run_engine(accelerator) == "fsdp2" and reference_is_partitioned(accelerator):
        return _fsdp2_reference(cfg, accelerator, weights_dtype)
    if not reference_is_partitioned(accelerator):
        with transformers_zero3_off(accelerator):
            return loading.load_reference(cfg.model).to(accelerator.device, dtype=weights_dtype)
    import deepspeed
    from transformers import AutoConfig

    path = loading.reference_path(cfg.model)
    ds_config = inference_ds_config(accelerator, getattr(AutoConfig.from_pretrained(path), "hidden_size", None),
                                    largest_layer_params(path))
    with transformers_zero3_off(accelerator):
        try:
            model = build_partitioned(path, weights_dtype, cfg.model.attn_implementation, ds_config,
                                      accelerator.process_index)
            install_response_head(model)  # load_causal_lm below installs it itself
        except NotSliceable as why:
            # transformers' ZeRO-3 loading: still partitioned on the devices, but rank 0 reads
            # the whole checkpoint into host memory first.
            accelerator.print(f"reference: loading through transformers ({why})")
            from transformers.integrations import HfDeepSpeedConfig

            keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  transformers holds only a weak reference
            model = loading.load_causal_lm(path, cfg.model)
    _trim_after_each_layer(model, accelerator.device)  # and the full tensors zero.Init made and freed
    engine = deepspeed.initialize(model=loading.freeze(model), config=ds_config)[0]
    engine.eval()  # returns None on a DeepSpeed engine
    return engine


def _fsdp2_reference(cfg: Config, accelerator, dtype: torch.dtype) -> torch.nn.Module:
    """The reference sharded by FSDP2 like the policy, every unit resharded after its forward: a
    rank holds its 1/N of the weights and one gathered layer. Each rank reads only its rows."""
    device, world = accelerator.device, accelerator.num_processes
    path = loading.reference_path(cfg.model)
    # Built in `dtype`, not cast to it: the rotary frequencies stay fp32, as in the FSDP2 policy.
    model_cfg = dataclasses.replace(cfg.model, dtype=next(name for name, d in DTYPES.items() if d == dtype))
    shard = functools.partial(fsdp2.shard, device=device, world=world, compute_dtype=None, reshard_after_forward=True,
                              offload=False, training=False)
    model = sharded_from_weight_files(accelerator, "reference", path, shard,
                                      build=lambda empty: loading.freeze(loading.load_causal_lm(path, model_cfg,
                                                                                                empty=empty)))
    _trim_after_each_layer(model, device)
    return model


def _trim_after_each_layer(model: torch.nn.Module, device: torch.device) -> None:
    """On the CPU, hands each layer's gathered weights back to the system once it is done with them
    (glibc keeps freed buffers in its heap, and a sharded reference frees one layer per forward)."""
    if device.type != "cpu":
        return
    host_memory.trim(device)
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is not None:
            module.register_forward_hook(lambda *_: host_memory.trim(device))


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
    host_memory.trim(device)
