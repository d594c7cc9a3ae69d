"""The on-disk cache of per-pair reference log-probs: its format, fingerprint, checks and reading.

The reference pass (`precompute`) writes it; training and evaluation read these numbers and never
hold the reference in memory. Layout of `ref_cache.dir`:

  manifest.json                 format_version, fingerprint (+ its parts), num_examples, shards, complete
  {split}-{k:05d}.safetensors   pairs [k·S, (k+1)·S) of the split: index (int64), chosen_logps,
                                rejected_logps, chosen_shared_logps, rejected_shared_logps (float32:
                                sums over all response tokens, and over the pair's shared length,
                                for LD-DPO), chosen_tokens, rejected_tokens (int64)

Shards cover fixed ranges of the data, so the files depend neither on the number of processes nor
on the ZeRO stage. Each is written to a temp name, then renamed; the manifest is marked complete
last. A cache whose fingerprint differs from the run's is refused, naming the parts that changed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dpo_dist import collectives, fingerprint
from dpo_dist.config import Config
from dpo_dist.data import PreferenceData
from dpo_dist.data.batching import MicroBatch
from dpo_dist.distributed import run_forward_dtypes
from dpo_dist.errors import UserError
from dpo_dist.model import loading
from dpo_dist.model.logprobs import SequenceScores

FORMAT_VERSION = 2
TENSOR_KEYS = ("index", "chosen_logps", "rejected_logps", "chosen_shared_logps", "rejected_shared_logps",
               "chosen_tokens", "rejected_tokens")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class RefLogps:
    """Reference log-probs of one split, looked up by pair index: [max index + 1] float32 each, NaN
    where no pair has that index; `*_shared`: over the pair's shared length (see SequenceScores)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_shared: torch.Tensor
    rejected_shared: torch.Tensor

    def for_batch(self, batch: MicroBatch) -> SequenceScores:
        index = batch.index.to(self.chosen.device)
        return SequenceScores(logps=torch.cat([self.chosen[index], self.rejected[index]]), tokens=None,
                              shared_logps=torch.cat([self.chosen_shared[index], self.rejected_shared[index]]))

    def to(self, device: torch.device | str) -> RefLogps:
        return RefLogps(*(t.to(device) for t in vars(self).values()))


def fingerprint_parts(cfg: Config, splits: dict[str, PreferenceData], tokenizer,
                      forward: tuple[torch.dtype, torch.dtype | None]) -> dict[str, str]:
    """What the cached numbers depend on, part by part, so a mismatch can say which part changed.
    `forward`: the dtypes of the reference's forward (weights, autocast; see `precision`).
    Reads the reference weights unless their digests are known: see `run_fingerprint`."""
    weights, config = model_digests(loading.reference_path(cfg.model))
    parts = {
        "reference weights": weights,
        "reference config": config,
        "tokenizer": fingerprint.tokenizer_digest(tokenizer),
    }
    for name, data in splits.items():
        parts[f"{name} data files"] = fingerprint.digest_of_files(data.files)
    settings = {
        "max_length": cfg.data.max_length,
        "truncation": cfg.data.truncation,
        "columns": cfg.data.columns,
        "chat_template_kwargs": cfg.data.chat_template_kwargs,
        "forms": {name: data.form for name, data in splits.items()},
        "shard_size": cfg.ref_cache.shard_size,
    }
    parts["preprocessing settings"] = json.dumps(settings, sort_keys=True)
    weights, autocast = forward
    parts["forward precision"] = json.dumps({"weights": str(weights).removeprefix("torch."),
                                             "autocast": autocast and str(autocast).removeprefix("torch.")})
    return parts


def model_digests(folder: Path) -> tuple[str, str]:
    """Digests of a model folder's weight files and of its config.json."""
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."))
    if not weights:
        raise UserError(f"model folder {folder} holds no weight files")
    return fingerprint.digest_of_files(weights), fingerprint.digest_of_files([folder / "config.json"])


def run_fingerprint(cfg: Config, accelerator, splits: dict[str, PreferenceData], tokenizer) -> dict[str, str]:
    """`fingerprint_parts`, computed once on the main process and broadcast to every rank."""
    forward = run_forward_dtypes(cfg, accelerator)
    return collectives.on_main_broadcast(accelerator, lambda: fingerprint_parts(cfg, splits, tokenizer, forward))


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.safetensors"


def plan_shards(splits: dict[str, PreferenceData], shard_size: int) -> list[tuple[str, int, int, int]]:
    """Every shard as (split, k, start, count), in a fixed order."""
    shards = []
    for name, data in splits.items():
        n = len(data.pairs)
        for k, start in enumerate(range(0, n, shard_size)):
            shards.append((name, k, start, min(shard_size, n - start)))
    return shards


def _refuse_if_stale(manifest: dict, parts: dict[str, str], cache_dir: Path) -> None:
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"ref cache {cache_dir} has format_version {manifest.get('format_version')}, this dpo_dist writes "
            f"{FORMAT_VERSION}; rebuild with ref_cache.overwrite=true or use a new ref_cache.dir"
        )
    changed = fingerprint.changed_parts(manifest, parts)
    if changed:
        raise UserError(
            f"ref cache {cache_dir} was computed from different {', '.join(changed)} than this run; "
            "refusing to use it. Rebuild with ref_cache.overwrite=true (or point ref_cache.dir at a new folder)"
        )


def load_shard(path: Path, expected_index: torch.Tensor) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"ref cache shard {path} is unreadable ({err}); rebuild with ref_cache.overwrite=true") from None
    missing = [k for k in TENSOR_KEYS if k not in tensors]
    if missing or any(tensors[k].shape != expected_index.shape for k in TENSOR_KEYS):
        raise UserError(f"ref cache shard {path} is incomplete (keys or lengths wrong); rebuild with ref_cache.overwrite=true")
    if not torch.equal(tensors["index"], expected_index):
        raise UserError(f"ref cache shard {path} holds other rows than the data; rebuild with ref_cache.overwrite=true")
    return tensors


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Writes a shard under a temp name, then renames it: a killed pass never leaves half a shard."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, tmp)
    os.replace(tmp, path)


def shard_is_done(path: Path, expected_index: torch.Tensor) -> bool:
    if not path.is_file():
        return False
    try:
        load_shard(path, expected_index)
        return True
    except UserError:
        return False


def expected_index(data: PreferenceData, start: int, count: int) -> torch.Tensor:
    return torch.from_numpy(data.pairs.indices[start : start + count].copy())


def manifest_of(parts: dict[str, str], splits: dict[str, PreferenceData], plan: list, complete: bool) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint.combined(parts),
        "fingerprint_parts": parts,
        "num_examples": {name: len(data.pairs) for name, data in splits.items()},
        "shards": [
            {"file": shard_name(split, k), "split": split, "start": start, "count": count}
            for split, k, start, count in plan
        ],
        "complete": complete,
    }


def cache_status(cfg: Config, parts: dict[str, str]) -> str:
    """'complete' (matches this run's `fingerprint_parts`), 'partial' (same run, pass interrupted)
    or 'missing'. A cache computed from anything else is refused with a UserError saying what differs.
    """
    manifest = fingerprint.read_manifest(cfg.ref_cache_dir, "ref cache")
    if manifest is None:
        return "missing"
    _refuse_if_stale(manifest, parts, cfg.ref_cache_dir)
    return "complete" if manifest.get("complete") else "partial"


def load_cache(cfg: Config, splits: dict[str, PreferenceData]) -> dict[str, RefLogps]:
    """Reads and checks every shard of a complete cache; a bad shard is refused with its name."""
    cache_dir = cfg.ref_cache_dir
    result = {}
    for name, data in splits.items():
        size = int(data.pairs.indices.max()) + 1
        keys = ("chosen_logps", "rejected_logps", "chosen_shared_logps", "rejected_shared_logps")
        columns = [torch.full((size,), float("nan")) for _ in keys]
        for _, k, start, count in plan_shards({name: data}, cfg.ref_cache.shard_size):
            index = expected_index(data, start, count)
            tensors = load_shard(cache_dir / shard_name(name, k), index)
            for column, key in zip(columns, keys):
                column[index] = tensors[key]
        result[name] = RefLogps(*columns)
    return result


