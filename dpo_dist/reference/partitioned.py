"""Loading a frozen model straight into ZeRO-3 partitions: each rank reads only its own slice.

transformers' ZeRO-3 loading has rank 0 read the whole checkpoint into host memory and hand each
layer out through collective gathers: rank 0 then holds the whole model after all (measured on a
363 MB model: rank 0 peaked at 1056 MiB, above the 846 MiB of one process holding it whole). Here
the model is built empty and partitioned (`deepspeed.zero.Init`, no random init), and each rank
copies its flat range `[r·P, (r+1)·P)` of every weight from the safetensors files with plain reads,
so no rank ever holds, reads or receives more than its 1/N of the weights. The safetensors layout
(8-byte header length, JSON header of dtype, shape and byte offsets, then raw little-endian data)
is what makes a flat range a byte range.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class NotSliceable(Exception):
    """The checkpoint cannot be read slice by slice (not safetensors, names or shapes differ)."""


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    offset: int  # absolute byte offset of the tensor's data in `file`
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def read_flat(self, start: int, count: int) -> torch.Tensor:
        """Elements [start, start+count) of the flattened tensor, read from disk (no mmap)."""
        size = torch.empty(0, dtype=self.dtype).element_size()
        buffer = bytearray(count * size)
        with self.file.open("rb") as f:
            f.seek(self.offset + start * size)
            if f.readinto(buffer) != len(buffer):
                raise NotSliceable(f"{self.file} is shorter than its header says")
        return torch.frombuffer(buffer, dtype=self.dtype) if count else torch.empty(0, dtype=self.dtype)


def _read_header(path: Path) -> dict[str, StoredTensor]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in SAFETENSORS_DTYPES:
            raise NotSliceable(f"{path}: tensor {name} has dtype {meta['dtype']}")
        entries[name] = StoredTensor(path, 8 + length + meta["data_offsets"][0], SAFETENSORS_DTYPES[meta["dtype"]],
                                     tuple(meta["shape"]))
    return entries


def checkpoint_index(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors checkpoint (one file or an index of shards) by name."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise NotSliceable(f"{folder} holds no safetensors weights")
    entries = {}
    for name in files:
        entries.update(_read_header(folder / name))
    return entries


def load_partitions(model: torch.nn.Module, stored: dict[str, StoredTensor], rank: int) -> None:
    """Copies this rank's slice of every ZeRO-3 parameter (and any stored buffer, whole) from disk.

    DeepSpeed keeps partition r of a parameter with n elements as `ds_tensor`, P = ceil(n / N)
    elements holding flat elements [r·P, min((r+1)·P, n)), zero-padded at the end.
    """
    params = dict(model.named_parameters())  # tied weights appear once
    missing = [n for n in params if n not in stored]
    wrong = [n for n, p in params.items() if n in stored and stored[n].numel != p.ds_numel]
    if missing or wrong:
        raise NotSliceable(f"parameter names or shapes differ from the checkpoint ({(missing + wrong)[:3]} ...)")
    for name, param in params.items():
        part = param.ds_tensor
        start = rank * part.numel()
        count = max(0, min(part.numel(), param.ds_numel - start))
        with torch.no_grad():
            part[:count].copy_(stored[name].read_flat(start, count))
            part[count:].zero_()
    for name, buffer in model.named_buffers():
        if name in stored:
            with torch.no_grad():
                buffer.copy_(stored[name].read_flat(0, stored[name].numel).view(stored[name].shape))


def build_partitioned(folder: Path, dtype: torch.dtype, attn_implementation: str, ds_config: dict, rank: int):
    """The model in `folder`, partitioned by ZeRO-3 as `ds_config` says (dtype, `offload_param`)
    from construction on, with its weights loaded slice by slice. Raises NotSliceable when the
    checkpoint cannot be read that way; the caller then loads it through transformers."""
    import deepspeed
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM
    from transformers import initialization
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    if ds_config.get("zero_optimization", {}).get("offload_param", {}).get("device") == "nvme":
        raise NotSliceable("offload_param to NVMe swaps partitions out as they are made")
    stored = checkpoint_index(folder)  # before building: refuse cheaply
    config = AutoConfig.from_pretrained(folder)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise NotSliceable(f"transformers has no causal-LM class for {type(config).__name__}")
    # Resolving the class imports its module here, outside zero.Init: a class first created inside
    # zero.Init gets back, when it exits, an __init__ without its class decorators' wrappers
    # (transformers >= 5.25 with `kernels`: every LlamaAttention built afterwards, the policy's
    # too, lacks `_kernel_funcs`).
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    class PartitionWithoutBroadcast(deepspeed.zero.Init):
        """zero.Init sends rank 0's value of every new parameter to all ranks so that they agree; here
        each is overwritten from disk next, so that would send the whole model, unused, through rank 0."""

        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    # No random init (every weight is overwritten), RoPE buffers kept in their own dtype (as
    # transformers does under zero.Init), parameters partitioned as each module is created.
    with initialization.no_init_weights(), prevent_arange_dtype_change(), PartitionWithoutBroadcast(config_dict_or_path=ds_config):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    load_partitions(model, stored, rank)
    return model
