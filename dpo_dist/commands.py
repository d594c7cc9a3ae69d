"""What `dpo-dist tokenize / precompute / train / evaluate` do, given a resolved config: the functions
the CLI and the demo both call. Each builds its run (accelerator, tokenizer, splits), works, closes.

Heavy imports stay inside the functions, so `dpo-dist --help` and config errors answer at once.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpo_dist.errors import UserError, set_stage
from dpo_dist.config import Config, load_config


def load_run_config(path: Path | None, overrides: list[str]) -> Config:
    """`config.load_config`, plus the checks that need the losses' and metrics' own names."""
    from dpo_dist.training.losses import check_loss_config, couples_pairs
    from dpo_dist.training.metrics import check_save_best

    cfg = load_config(path, overrides)
    check_loss_config(cfg.loss)
    check_save_best(cfg.train.save_best)
    if cfg.train.save_best is not None and not cfg.data.eval:
        raise UserError(f"config: train.save_best={cfg.train.save_best} needs data.eval (an eval metric decides "
                        "what is best); set data.eval or train.save_best=null")
    if cfg.distributed.sequence_parallel > 1 and couples_pairs(cfg.loss):
        raise UserError(f"loss.type={cfg.loss.type} looks across the step's pairs; with "
                        "distributed.sequence_parallel > 1 it is not supported yet")
    return cfg


def tokenize_command(cfg: Config) -> None:
    from dpo_dist.session import setup_run

    acc, _, _ = setup_run(cfg)  # prints each split's summary
    acc.print(f"token cache ready at {cfg.token_cache_dir}")
    acc.end_training()


def precompute_command(cfg: Config) -> None:
    from dpo_dist.reference.precompute import precompute
    from dpo_dist.session import setup_run

    acc, tokenizer, splits = setup_run(cfg)
    built = precompute(cfg, acc, splits, tokenizer)
    acc.print(f"reference cache {'written to' if built else 'already complete at'} {cfg.ref_cache_dir}")
    acc.end_training()


def train_command(cfg: Config) -> None:
    from dpo_dist.training.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()


def check_not_against_itself(cfg: Config) -> None:
    """Refuses to evaluate a model dpo-dist trained against itself (no model.reference): every
    reward would be 0 and the accuracy meaningless."""
    from dpo_dist import ownership
    from dpo_dist.model import loading

    if cfg.model.reference or cfg.model.lora is not None:
        return
    folder = loading.policy_path(cfg.model)
    marker = ownership.marker(folder) or ownership.marker(folder.parent)  # final/ or final/merged
    if marker.get("kind") == "model export":
        raise UserError(f"model.policy={cfg.model.policy} is a model dpo-dist trained, and model.reference is not set, "
                        "so the reference would be the model itself and every reward 0; set model.reference to the "
                        f"model it was trained against ({marker.get('reference', 'its SFT model')})")


def evaluate_command(cfg: Config) -> dict:
    """Evaluates model.policy against the reference log-probs (cache, built first if allowed)."""
    from dpo_dist.distributed import cut_sequences, run_forward_dtypes
    from dpo_dist.model import loading
    from dpo_dist.reference.precompute import prepare_reference
    from dpo_dist.session import setup_run
    from dpo_dist.training.trainer import evaluate_policy

    check_not_against_itself(cfg)
    # The same splits as `train`, so the training run's cache (same fingerprint) serves here too.
    acc, tokenizer, splits = setup_run(cfg)
    name = "eval" if "eval" in splits else "train"
    ref = prepare_reference(cfg, acc, splits, tokenizer)[name].to(acc.device)
    set_stage("evaluation", lambda: f"the reference cache {cfg.ref_cache_dir}; evaluate writes only at its end: "
              "rerun it")
    weights_dtype, _ = run_forward_dtypes(cfg, acc)  # the precision training runs in (autocast: by prepare_model)
    policy = loading.load_causal_lm(loading.policy_path(cfg.model), cfg.model).to(dtype=weights_dtype)
    policy = cut_sequences(policy, cfg, acc)
    policy = acc.prepare_model(policy, evaluation_mode=True)
    metrics = evaluate_policy(policy, splits[name], ref, cfg, acc, tokenizer.pad_token_id)
    if acc.is_main_process:
        (Path(cfg.output_dir) / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))
    acc.end_training()
    return metrics
