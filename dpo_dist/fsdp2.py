"""PyTorch FSDP2 (`fully_shard`) as a training engine, sharded the way torchtitan shards.

Asked for by `distributed.fsdp2=true` (torchrun) or by an accelerate config with
`distributed_type: FSDP` and `fsdp_version: 2`. dpo_dist shards the model itself and never hands it
to `accelerator.prepare` (accelerate drops its FSDP plugin on a CPU, and on a GPU would reduce in
bf16): accelerate keeps the process state, the RNG, the LR schedule and the gathers.

Units: every decoder layer, then the embeddings, then [final norm, head] (with the embeddings when
tied: one unit owns the shared weight), then the root. Trained parameters are fp32 before sharding,
so the fp32 shards are the optimizer's master weights; `train.mixed_precision=bf16` gathers bf16
copies for the forward (`MixedPrecisionPolicy`) and reduce-scatters gradients in fp32.
"""

from __future__ import annotations

import functools
import os

import torch

from dpo_dist.errors import UserError

ACCELERATE_TRUE = ("true", "1", "yes")


def take_accelerate_request(cfg) -> None:
    """An accelerate FSDP config (the FSDP_* variables `accelerate launch` sets) becomes
    distributed.fsdp2 and its options; accelerate is told not to wrap the model itself."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ACCELERATE_TRUE:
        return
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise UserError(f"the accelerate config asks for FSDP with fsdp_version {version}; dpo_dist runs FSDP2 only: "
                        "set fsdp_version: 2 (see launch/accelerate/fsdp2.yaml)")
    cfg.distributed.fsdp2 = True
    if "FSDP_RESHARD_AFTER_FORWARD" in os.environ:
        cfg.distributed.fsdp_reshard_after_forward = os.environ["FSDP_RESHARD_AFTER_FORWARD"].lower() in ACCELERATE_TRUE
    if "FSDP_OFFLOAD_PARAMS" in os.environ:
        cfg.distributed.fsdp_offload = os.environ["FSDP_OFFLOAD_PARAMS"].lower() in ACCELERATE_TRUE
    os.environ["ACCELERATE_USE_FSDP"] = "false"


@functools.cache
def mesh(device_type: str, world: int):
    """One data-parallel mesh over all ranks, on this run's device type (gloo on the CPU)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world,))


def _units(model: torch.nn.Module) -> tuple[list, list[list[torch.nn.Module]]]:
    """(decoder layers, the other units) of a Hugging Face causal LM, also inside a peft wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(inner, "_no_split_modules", None) or ())
    layers = [m for m in inner.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise UserError(f"distributed.fsdp2: {type(inner).__name__} names no decoder layer class "
                        "(_no_split_modules) to shard by; use DeepSpeed ZeRO-3 for it")
    embeddings, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    base = getattr(inner, inner.base_model_prefix, None)
    norm = getattr(base, "norm", None) if base is not None else None
    tail = [m for m in (norm, head) if m is not None]
    tied = head is not None and head.weight is embeddings.weight
    others = [[embeddings, *tail]] if tied else [[embeddings], tail]
    return layers, [unit for unit in others if unit]


def shard(model: torch.nn.Module, device: torch.device, world: int, *, compute_dtype: torch.dtype | None,
          reshard_after_forward: bool, offload: bool, training: bool) -> torch.nn.Module:
    """`model` sharded over all ranks (see the module docstring). In training the [norm, head] unit
    stays gathered from its forward to its backward: the response head recomputes its logits in
    backward from the head's weight. A frozen model reshards every unit after its forward, the root
    too: no backward would ever reshard it."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options = dict(mesh=mesh(device.type, world),
                   mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32),
                   offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    layers, others = _units(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward or not training, **options)
    for unit in others:
        keep = training and any(m is model.get_output_embeddings() for m in unit)
        fully_shard(unit if len(unit) > 1 else unit[0], reshard_after_forward=not keep, **options)
    fully_shard(model, reshard_after_forward=not training, **options)
    return model


def gather_all(model: torch.nn.Module) -> None:
    """Puts every unit back to its shards (after an eval forward left [norm, head] gathered), before
    a state dict or an export reads the parameters."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global gradient norm over the sharded gradients (the same on every rank, so every rank
    makes the same non-finite decision), and the gradients clipped to `max_norm`."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def local_rows(tensor) -> tuple[int, int]:
    """(first row, rows) of the whole weight that this rank's shard of `tensor` (a DTensor) holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return (offset[0], shape[0]) if shape else (0, 1)


def like(param, whole: torch.Tensor) -> torch.Tensor:
    """`whole` (a full weight or optimizer moment) as `param` holds it: this rank's shard of it for
    a sharded parameter, else as is."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return whole
    first, rows = local_rows(param)
    part = whole.reshape(param.shape)[first:first + rows] if whole.dim() else whole
    local = part.to(param.to_local().dtype).contiguous()
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride(),
                              run_check=False)


def check_composes(cfg) -> None:
    """Refuses, in one line, what has not been made to work under FSDP2 yet."""
    unsupported = {"distributed.sequence_parallel > 1": cfg.distributed.sequence_parallel > 1}
    for key, present in unsupported.items():
        if present:
            raise UserError(f"distributed.fsdp2 with {key} is not supported yet; shard with DeepSpeed ZeRO-2/3 for it "
                            "(launch/accelerate/zero2.yaml, zero3.yaml)")


DCP_FOLDER = "fsdp2"  # CHECKPOINT/fsdp2/: the model and optimizer shards, in torch.distributed.checkpoint's format
PARAM_GROUPS_FILE = "param_groups.pt"  # AdamW's settings beside them, for the conversion to the other engines


def save_state(model: torch.nn.Module, optimizer, folder) -> None:
    """Every rank writes its shards of the weights and of AdamW's state (DCP records each shard's place
    in the whole tensor, so any process count reads them back)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    gather_all(model)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=str(folder / DCP_FOLDER))
    if torch.distributed.get_rank() == 0:
        torch.save(optimizer.state_dict()["param_groups"], folder / DCP_FOLDER / PARAM_GROUPS_FILE)


def load_state(model: torch.nn.Module, optimizer, folder) -> None:
    """`save_state`'s shards into this run's, whatever its process count."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    gather_all(model)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder / DCP_FOLDER))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def read_whole(folder, names_and_shapes: dict[str, torch.Size]):
    """(name, fp32 weight, exp_avg, exp_avg_sq, step) of each trained weight of an FSDP2 checkpoint,
    whole, one weight at a time, in one process (no process group)."""
    import torch.distributed.checkpoint as dcp

    for name, shape in names_and_shapes.items():
        keys = {"model": {name: torch.empty(shape)},
                "optim": {"state": {name: {"exp_avg": torch.empty(shape), "exp_avg_sq": torch.empty(shape),
                                           "step": torch.zeros(())}}}}
        dcp.load(keys, checkpoint_id=str(folder / DCP_FOLDER), no_dist=True)
        moments = keys["optim"]["state"][name]
        yield name, keys["model"][name], moments["exp_avg"], moments["exp_avg_sq"], moments["step"]
