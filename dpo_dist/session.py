"""What every command starts with: the accelerator, the resolved config on disk, the tokenizer and
the tokenized splits (from the memory-mapped token cache, which the ranks build together when needed).
"""

from __future__ import annotations

from pathlib import Path

from dpo_dist import distributed, host_memory
from dpo_dist.config import Config, save_config
from dpo_dist.data import PreferenceData, prepare_split
from dpo_dist.model import loading


def load_splits(cfg: Config, tokenizer, accelerator) -> dict[str, PreferenceData]:
    """The train (and eval) pairs from the token cache, which the ranks build together when needed."""
    splits = {"train": prepare_split(cfg, accelerator, "train", cfg.data.train, tokenizer)}
    if cfg.data.eval:
        splits["eval"] = prepare_split(cfg, accelerator, "eval", cfg.data.eval, tokenizer)
    for name, data in splits.items():
        accelerator.print(data.summary(name))
    return splits


def setup_run(cfg: Config):
    """What every command starts with: the accelerator, the resolved config on disk, the
    tokenizer and the tokenized splits. Returns (accelerator, tokenizer, splits)."""
    accelerator = distributed.build_accelerator(cfg)
    host_memory.keep_freed_memory(accelerator.device)  # on the CPU: each step reuses the last one's memory
    distributed.seed_everything(cfg.train.seed)
    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    tokenizer = loading.load_tokenizer(cfg.model)
    if cfg.train.prefix_sharing and not cfg.share_prefix:
        accelerator.print(f"train.prefix_sharing: not with packing={cfg.packing_mode} (the attention kernel cannot "
                          "take the shared-prompt mask); sequences are packed unshared")
    return accelerator, tokenizer, load_splits(cfg, tokenizer, accelerator)
