"""The reference pass: the frozen reference scores every train and eval pair once into the cache.

Ranks take the missing shards round-robin and a killed pass resumes by computing only the missing
ones. A ZeRO-3 reference is partitioned and its forwards are collectives: a rank with fewer batches
runs throw-away ones until every rank has run as many as the busiest. The reference is dropped and
its memory returned before any policy exists.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpo_dist import collectives, distributed, fingerprint, ownership
from dpo_dist.config import Config
from dpo_dist.data import PreferenceData
from dpo_dist.data.batching import MicroBatch, collate, eval_batches
from dpo_dist.errors import UserError, set_stage
from dpo_dist.model.logprobs import SequenceScores, sequence_logps
from dpo_dist.reference import engine
from dpo_dist.reference.cache import (TENSOR_KEYS, cache_status, expected_index, load_cache, manifest_of,
                                      plan_shards, run_fingerprint, shard_is_done, shard_name, write_shard)


class ResidentReference:
    """The reference model kept in memory and run on every batch (`ref_cache.enabled=false`).

    Same scoring function as the cache's, so both give the same numbers; it exists as the
    baseline the cache is measured against, and for data that changes between epochs. The model
    is placed by `engine.load_reference` (whole on this device, or ZeRO-3 partitioned); `autocast`
    (the accelerator's) runs it in the run's precision, as the policy.
    """

    def __init__(self, model: torch.nn.Module, autocast):
        self.model = model
        self.autocast = autocast

    @torch.no_grad()
    def for_batch(self, batch: MicroBatch) -> SequenceScores:
        with self.autocast():
            return sequence_logps(self.model, batch)

    def to(self, device: torch.device | str) -> ResidentReference:
        return self


def _batches_in(count: int, batch_size: int) -> int:
    return -(-count // batch_size)


def score_shard(model, data: PreferenceData, start: int, count: int, cfg: Config, pad_id: int, device,
                shard: tuple[int, int] = (1, 0)):
    """Reference log-probs of pairs [start, start+count) of `data`, in batches of train.eval_batch_size
    (fixed by the shard alone, so the numbers do not depend on the process count); `shard`: this
    rank's columns under sequence parallelism (the ranks of a group score the same pairs)."""
    out = {k: [] for k in TENSOR_KEYS}
    for positions, _ in eval_batches(count, cfg.train.eval_batch_size, 1, 0):
        batch = collate([data.pairs[start + p] for p in positions], pad_id, shard=shard,
                        **cfg.batch_layout).to(device)
        with torch.no_grad():
            scores = sequence_logps(model, batch)
        (chosen, rejected), (chosen_shared, rejected_shared) = scores.halves("logps"), scores.halves("shared_logps")
        chosen_tokens, rejected_tokens = scores.halves("tokens")
        values = (batch.index, chosen, rejected, chosen_shared, rejected_shared, chosen_tokens, rejected_tokens)
        for key, value in zip(TENSOR_KEYS, values):
            out[key].append(value.cpu())
    return {k: torch.cat(v).contiguous() for k, v in out.items()}


def _missing_shards(plan: list, splits: dict[str, PreferenceData], cache_dir: Path, accelerator,
                    topology: distributed.Topology) -> list:
    """The shards of `plan` not yet complete on disk; data-parallel groups check disjoint ones,
    every rank gets the whole list. Call before any rank writes a shard, so all see the same state."""
    groups, group = topology.data_parallel, topology.data_rank
    missing = [
        i for i, (split, k, start, count) in enumerate(plan)
        if i % groups == group and topology.counts
        and not shard_is_done(cache_dir / shard_name(split, k), expected_index(splits[split], start, count))
    ]
    return [plan[i] for i in sorted(collectives.all_gather_objects(accelerator, missing))]


def _reference_pass(cfg: Config, accelerator, splits: dict[str, PreferenceData], shards: list, fillers: int,
                    pad_id: int, topology: distributed.Topology) -> None:
    """Loads the reference, writes `shards` (one rank of a sequence group writes what the group
    computed), runs `fillers` throw-away forwards, drops the reference."""
    set_stage("the reference pass", lambda: f"the complete shards of the reference cache {cfg.ref_cache_dir}; rerun "
              "the same command to continue from them")
    model = engine.load_reference(cfg, accelerator)
    device, shard = accelerator.device, topology.shard
    with accelerator.autocast():  # the run's precision (DeepSpeed runs cast the weights instead)
        with tqdm(total=sum(s[3] for s in shards), desc="reference pass", unit="pair",
                  disable=not accelerator.is_local_main_process) as bar:  # closed before any error line
            for split, k, start, count in shards:
                tensors = score_shard(model, splits[split], start, count, cfg, pad_id, device, shard)
                if topology.counts:
                    write_shard(cfg.ref_cache_dir / shard_name(split, k), tensors)
                bar.update(count)
        any_split = next(iter(splits.values()))
        for _ in range(fillers):  # as many collective forwards as the busiest rank; results unused
            score_shard(model, any_split, 0, 1, cfg, pad_id, device, shard)
    engine.drop_reference(model)


def build_cache(cfg: Config, accelerator, splits: dict[str, PreferenceData], tokenizer,
                parts: dict[str, str]) -> None:
    """Runs the reference pass over the shards this cache still lacks, then frees the reference.

    Call after `cache_status(cfg, parts)` (on every rank), which refuses a cache made from anything
    else; `parts` is this run's `run_fingerprint`.
    """
    cache_dir = cfg.ref_cache_dir

    def open_folder() -> None:  # only ever deletes what a reference cache writes (see `ownership`)
        ownership.claim(cache_dir, "reference cache", "ref_cache.dir")
        if cfg.ref_cache.overwrite:
            ownership.remove_own(cache_dir, "reference cache", "ref_cache.dir")
        if not (cache_dir / "manifest.json").exists():
            fingerprint.write_json_atomic(cache_dir / "manifest.json", manifest_of(parts, splits, [], complete=False))

    collectives.on_main_broadcast(accelerator, open_folder)  # every rank waits for it, and hears a refusal

    topology = distributed.topology(cfg, accelerator)
    groups, group = topology.data_parallel, topology.data_rank
    plan = plan_shards(splits, cfg.ref_cache.shard_size)
    todo = _missing_shards(plan, splits, cache_dir, accelerator, topology)
    mine = todo[group::groups]
    print(f"[rank {accelerator.process_index}] reference pass: {len(mine)} shard(s) to compute, "
          f"{len(plan) - len(todo)} already complete", flush=True)
    lockstep = engine.reference_is_partitioned(accelerator)
    if mine or (lockstep and todo):
        batches = [sum(_batches_in(s[3], cfg.train.eval_batch_size) for s in todo[g::groups]) for g in range(groups)]
        fillers = max(batches) - batches[group] if lockstep else 0
        _reference_pass(cfg, accelerator, splits, mine, fillers, tokenizer.pad_token_id, topology)
        engine.release_memory(accelerator.device)  # the reference leaves memory before any policy exists
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fingerprint.write_json_atomic(cache_dir / "manifest.json", manifest_of(parts, splits, plan, complete=True))
    accelerator.wait_for_everyone()


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
        reference = ResidentReference(engine.load_reference(cfg, accelerator), accelerator.autocast)
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
