"""Weight files read a row range at a time, without loading them: each rank of a sharded model
copies only its part of every weight (ZeRO-3 partitions, FSDP2 shards).

The safetensors layout (8-byte header length, JSON header of dtype, shape and byte offsets, then
raw little-endian data) is what makes a flat range of a tensor a byte range of its file.
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
