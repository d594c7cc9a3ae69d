"""What every command starts with: the accelerator, the resolved config on disk, the tokenizer and
the tokenized splits (from the memory-mapped token cache, which the ranks build together when needed).
"""

from __future__ import annotations

from pathlib import Path

from dpo_dist import collectives, distributed, fingerprint, host_memory, ownership, run_lock
from dpo_dist.config import Config, save_config, written_by_us
from dpo_dist.errors import UserError, set_stage
from dpo_dist.data import PreferenceData, prepare_split
from dpo_dist.model import loading


def load_splits(cfg: Config, tokenizer, accelerator) -> dict[str, PreferenceData]:
    """The train (and eval) pairs from the token cache, which the ranks build together when needed."""
    splits = {"train": prepare_split(cfg, accelerator, "train", cfg.data.train, tokenizer)}
    if cfg.data.eval:
        splits["eval"] = prepare_split(cfg, accelerator, "eval", cfg.data.eval, tokenizer)
    for name, data in splits.items():
        accelerator.print(data.summary(name))
    if "eval" in splits:
        shared = sorted({f.resolve() for f in splits["eval"].files} & {f.resolve() for f in splits["train"].files})
        if shared:
            accelerator.print(f"warning: data.eval shares {len(shared)} file(s) with data.train ({shared[0]}); eval "
                              "metrics of pairs the policy trained on say little about held-out pairs")
    return splits


def take_output_dir(cfg: Config) -> None:
    """Claims OUTPUT_DIR for this run (marked as dpo_dist's, locked against a second run) and writes
    the resolved config there, never over a config.yaml that dpo-dist did not write."""
    out = Path(cfg.output_dir)
    ownership.check_claim(out, "run", "output_dir")
    caches = [(cfg.token_cache_dir, "token cache", "data.cache_dir")]
    if cfg.ref_cache.enabled:
        caches.append((cfg.ref_cache_dir, "reference cache", "ref_cache.dir"))
    for folder, kind, key in caches:  # checked now, before any work writes them
        if folder.resolve() == out.resolve():
            raise UserError(f"{key}={folder} is output_dir itself; a {kind} needs a folder of its own (the default "
                            "is one inside output_dir)")
        ownership.check_claim(folder, kind, key)
    if cfg.ref_cache.enabled and not cfg.ref_cache.overwrite:
        fingerprint.read_manifest(cfg.ref_cache_dir, "ref cache")  # a corrupt one is refused before tokenizing
    ownership.claim(out, "run", "output_dir")
    run_lock.acquire(out)
    resolved = out / "config.yaml"
    if resolved.exists() and not written_by_us(resolved):
        raise UserError(f"{resolved} was not written by dpo-dist (your own config?) and a run writes its resolved "
                        "config there; keep your config outside output_dir, or choose another output_dir")
    save_config(cfg, resolved)


def setup_run(cfg: Config):
    """What every command starts with: the accelerator, the resolved config on disk, the
    tokenizer and the tokenized splits. Returns (accelerator, tokenizer, splits)."""
    set_stage("start-up", lambda: "nothing yet; rerun the same command")
    accelerator = distributed.build_accelerator(cfg)
    host_memory.keep_freed_memory(accelerator.device)  # on the CPU: each step reuses the last one's memory
    distributed.seed_everything(cfg.train.seed)
    collectives.on_main_broadcast(accelerator, lambda: take_output_dir(cfg))  # the other ranks wait for the verdict
    tokenizer = loading.load_tokenizer(cfg.model)
    loading.check_vocabularies(cfg.model, tokenizer)
    if cfg.train.prefix_sharing and not cfg.share_prefix:
        accelerator.print(f"train.prefix_sharing: not with packing={cfg.packing_mode} (the attention kernel cannot "
                          "take the shared-prompt mask); sequences are packed unshared")
    return accelerator, tokenizer, load_splits(cfg, tokenizer, accelerator)
