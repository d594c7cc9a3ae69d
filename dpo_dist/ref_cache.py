"""The reference pass and its on-disk cache of per-pair reference log-probs.

The reference model scores every train and eval pair once; training then reads these numbers and
never holds the reference in memory. Layout of `ref_cache.dir`:

  manifest.json                 format_version, fingerprint (+ its parts), num_examples, shards, complete
  {split}-{k:05d}.safetensors   pairs [k·S, (k+1)·S) of the split: index (int64), chosen_logps,
                                rejected_logps, chosen_shared_logps, rejected_shared_logps (float32:
                                sums over all response tokens, and over the pair's shared length,
                                for LD-DPO), chosen_tokens, rejected_tokens (int64)

Shards cover fixed ranges of the data, cut into fixed batches, and ranks take the missing shards
round-robin, so the files depend neither on the number of processes nor on the ZeRO stage, and a
killed pass resumes by computing only the missing shards (each is written to a temp name, then
renamed). The manifest is marked complete last, after every rank. A ZeRO-3 reference is partitioned
and its forwards are collectives: a rank with fewer batches runs throw-away ones until every rank
has run as many as the busiest.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dpo_dist import distributed, fingerprint, models
from dpo_dist.batching import MicroBatch, collate, eval_batches
from dpo_dist.config import Config
from dpo_dist.data import PreferenceData
from dpo_dist.errors import UserError
from dpo_dist.logprobs import SequenceScores, sequence_logps

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


class ResidentReference:
    """The reference model kept in memory and run on every batch (`ref_cache.enabled=false`).

    Same scoring function as the cache's, so both give the same numbers; it exists as the
    baseline the cache is measured against, and for data that changes between epochs. The model
    is placed by `distributed.load_reference` (whole on this device, or ZeRO-3 partitioned).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def for_batch(self, batch: MicroBatch) -> SequenceScores:
        return sequence_logps(self.model, batch)

    def to(self, device: torch.device | str) -> ResidentReference:
        return self


def fingerprint_parts(cfg: Config, splits: dict[str, PreferenceData], tokenizer) -> dict[str, str]:
    """What the cached numbers depend on, part by part, so a mismatch can say which part changed.
    Reads the reference weights unless their digests are known: see `run_fingerprint`."""
    ref_dir = models.reference_path(cfg.model)
    weights = sorted(p for p in ref_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."))
    if not weights:
        raise UserError(f"reference model folder {ref_dir} holds no weight files")
    parts = {
        "reference weights": fingerprint.digest_of_files(weights),
        "reference config": fingerprint.digest_of_files([ref_dir / "config.json"]),
        "tokenizer": fingerprint.tokenizer_digest(tokenizer),
    }
    for name, data in splits.items():
        parts[f"{name} data files"] = fingerprint.digest_of_files(data.files)
    settings = {
        "max_length": cfg.data.max_length,
        "truncation": cfg.data.truncation,
        "columns": cfg.data.columns,
        "chat_template_kwargs": cfg.data.chat_template_kwargs,
        "dtype": cfg.model.dtype,
        "forms": {name: data.form for name, data in splits.items()},
        "shard_size": cfg.ref_cache.shard_size,
    }
    parts["preprocessing settings"] = json.dumps(settings, sort_keys=True)
    return parts


def run_fingerprint(cfg: Config, accelerator, splits: dict[str, PreferenceData], tokenizer) -> dict[str, str]:
    """`fingerprint_parts`, computed once on the main process and broadcast to every rank."""
    return distributed.on_main_broadcast(accelerator, lambda: fingerprint_parts(cfg, splits, tokenizer))


def _shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.safetensors"


def _plan(splits: dict[str, PreferenceData], shard_size: int) -> list[tuple[str, int, int, int]]:
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


def _load_shard(path: Path, expected_index: torch.Tensor) -> dict[str, torch.Tensor]:
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


def _shard_is_done(path: Path, expected_index: torch.Tensor) -> bool:
    if not path.is_file():
        return False
    try:
        _load_shard(path, expected_index)
        return True
    except UserError:
        return False


def _batches_in(count: int, batch_size: int) -> int:
    return -(-count // batch_size)


def score_shard(model, data: PreferenceData, start: int, count: int, cfg: Config, pad_id: int, device):
    """Reference log-probs of pairs [start, start+count) of `data`, in batches of train.eval_batch_size
    (fixed by the shard alone, so the numbers do not depend on the process count)."""
    out = {k: [] for k in TENSOR_KEYS}
    for positions, _ in eval_batches(count, cfg.train.eval_batch_size, 1, 0):
        batch = collate([data.pairs[start + p] for p in positions], pad_id, packing=cfg.packing_mode,
                        share_prefix=cfg.share_prefix).to(device)
        with torch.no_grad():
            scores = sequence_logps(model, batch)
        (chosen, rejected), (chosen_shared, rejected_shared) = scores.halves("logps"), scores.halves("shared_logps")
        chosen_tokens, rejected_tokens = scores.halves("tokens")
        values = (batch.index, chosen, rejected, chosen_shared, rejected_shared, chosen_tokens, rejected_tokens)
        for key, value in zip(TENSOR_KEYS, values):
            out[key].append(value.cpu())
    return {k: torch.cat(v).contiguous() for k, v in out.items()}


def _missing_shards(plan: list, splits: dict[str, PreferenceData], cache_dir: Path, accelerator) -> list:
    """The shards of `plan` not yet complete on disk; ranks check disjoint ones, every rank gets
    the whole list. Call before any rank writes a shard, so all ranks see the same state."""
    world, rank = accelerator.num_processes, accelerator.process_index
    missing = [
        i for i, (split, k, start, count) in enumerate(plan)
        if i % world == rank
        and not _shard_is_done(cache_dir / _shard_name(split, k), _expected_index(splits[split], start, count))
    ]
    return [plan[i] for i in sorted(distributed.all_gather_objects(accelerator, missing))]


def _reference_pass(cfg: Config, accelerator, splits: dict[str, PreferenceData], shards: list, fillers: int,
                    pad_id: int) -> None:
    """Loads the reference, writes `shards`, runs `fillers` throw-away forwards, drops the reference."""
    model = distributed.load_reference(cfg, accelerator)
    bar = tqdm(total=sum(s[3] for s in shards), desc="reference pass", unit="pair",
               disable=not accelerator.is_local_main_process)
    for split, k, start, count in shards:
        tensors = score_shard(model, splits[split], start, count, cfg, pad_id, accelerator.device)
        path = cfg.ref_cache_dir / _shard_name(split, k)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file(tensors, tmp)
        os.replace(tmp, path)
        bar.update(count)
    bar.close()
    any_split = next(iter(splits.values()))
    for _ in range(fillers):  # as many collective forwards as the busiest rank; results unused
        score_shard(model, any_split, 0, 1, cfg, pad_id, accelerator.device)
    distributed.drop_reference(model)


def build_cache(cfg: Config, accelerator, splits: dict[str, PreferenceData], tokenizer,
                parts: dict[str, str]) -> None:
    """Runs the reference pass over the shards this cache still lacks, then frees the reference.

    Call after `cache_status(cfg, parts)` (on every rank), which refuses a cache made from anything
    else; `parts` is this run's `run_fingerprint`.
    """
    cache_dir = cfg.ref_cache_dir
    if accelerator.is_main_process:
        if cfg.ref_cache.overwrite and cache_dir.exists():
            shutil.rmtree(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        if not (cache_dir / "manifest.json").exists():
            fingerprint.write_json_atomic(cache_dir / "manifest.json", _manifest(parts, splits, [], complete=False))
    accelerator.wait_for_everyone()

    world, rank = accelerator.num_processes, accelerator.process_index
    plan = _plan(splits, cfg.ref_cache.shard_size)
    todo = _missing_shards(plan, splits, cache_dir, accelerator)
    mine = todo[rank::world]
    print(f"[rank {rank}] reference pass: {len(mine)} shard(s) to compute, "
          f"{len(plan) - len(todo)} already complete", flush=True)
    lockstep = distributed.reference_is_partitioned(accelerator)
    if mine or (lockstep and todo):
        batches = [sum(_batches_in(s[3], cfg.train.eval_batch_size) for s in todo[r::world]) for r in range(world)]
        fillers = max(batches) - batches[rank] if lockstep else 0
        _reference_pass(cfg, accelerator, splits, mine, fillers, tokenizer.pad_token_id)
        distributed.release_memory(accelerator.device)  # the reference leaves memory before any policy exists
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fingerprint.write_json_atomic(cache_dir / "manifest.json", _manifest(parts, splits, plan, complete=True))
    accelerator.wait_for_everyone()


def _expected_index(data: PreferenceData, start: int, count: int) -> torch.Tensor:
    return torch.from_numpy(data.pairs.indices[start : start + count].copy())


def _manifest(parts: dict[str, str], splits: dict[str, PreferenceData], plan: list, complete: bool) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint.combined(parts),
        "fingerprint_parts": parts,
        "num_examples": {name: len(data.pairs) for name, data in splits.items()},
        "shards": [
            {"file": _shard_name(split, k), "split": split, "start": start, "count": count}
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
        for _, k, start, count in _plan({name: data}, cfg.ref_cache.shard_size):
            index = _expected_index(data, start, count)
            tensors = _load_shard(cache_dir / _shard_name(name, k), index)
            for column, key in zip(columns, keys):
                column[index] = tensors[key]
        result[name] = RefLogps(*columns)
    return result


def precompute(cfg: Config, accelerator, splits: dict[str, PreferenceData], tokenizer) -> bool:
    """Builds or finishes the cache; returns False when a complete matching one was already there."""
    parts = run_fingerprint(cfg, accelerator, splits, tokenizer)
    if not cfg.ref_cache.overwrite and cache_status(cfg, parts) == "complete":
        return False
    build_cache(cfg, accelerator, splits, tokenizer, parts)
    return True


def prepare_reference(cfg: Config, accelerator, splits: dict[str, PreferenceData], tokenizer,
                      parts: dict[str, str] | None = None) -> dict:
    """Reference log-probs per split: from the cache (built or finished first if allowed), or a
    resident reference model when the cache is disabled. Each value has `for_batch(batch)`.
    `parts`: this run's `run_fingerprint`, if the caller has it already."""
    if not cfg.ref_cache.enabled:
        reference = ResidentReference(distributed.load_reference(cfg, accelerator))
        return {name: reference for name in splits}
    parts = parts or run_fingerprint(cfg, accelerator, splits, tokenizer)
    if cfg.ref_cache.overwrite or cache_status(cfg, parts) != "complete":
        if not cfg.ref_cache.auto:
            raise UserError(
                f"no complete reference cache at {cfg.ref_cache_dir} (ref_cache.auto=false); run first:\n"
                f"  dpo-dist precompute --config YOUR_CONFIG.yaml ref_cache.dir={cfg.ref_cache_dir}"
            )
        build_cache(cfg, accelerator, splits, tokenizer, parts)
    return load_cache(cfg, splits)
