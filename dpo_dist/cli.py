"""Command line: `dpo-dist {tokenize,precompute,train,evaluate,demo,export,report}` (also `python -m dpo_dist ...`).

Parse -> build -> run -> close. A UserError (bad config, data or cache) prints one line and exits
with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpo_dist.errors import PREEMPTED_EXIT_CODE, Preempted, UserError

COMMANDS = {
    "tokenize": "Tokenize data.train and data.eval once into the memory-mapped token cache (data.cache_dir), then "
    "exit; the other commands build it when missing.",
    "precompute": "Reference pass: write the reference log-prob cache for the train and eval data, then exit.",
    "train": "DPO training (reads the reference cache; builds it first when missing and ref_cache.auto).",
    "evaluate": "Preference metrics of model.policy on data.eval (or data.train) against the reference; "
    "prints JSON and writes OUTPUT_DIR/eval_metrics.json.",
    "demo": "Tiny model + bundled arithmetic preferences: precompute -> train -> evaluate on the CPU.",
    "export": "Convert a sharded checkpoint (checkpoints/step-NNNNNN) into a Hugging Face model folder.",
    "report": "Draw the curves of one or more runs (loss, rewards, accuracies, log-probs, lr, grad norm, "
    "throughput; eval dashed) into a PNG and print a summary (steps, best eval loss/accuracy, pairs/s).",
}

EPILOG = """\
overrides: dotted key=value pairs after the options, applied on top of --config, e.g.
  dpo-dist train --config cfg.yaml train.lr=1e-6 loss.beta=0.2 model.lora.r=8
values are YAML (null, true, [a, b]). Unknown keys are errors.

config keys (default: meaning):
"""


def _config_help() -> str:
    from dpo_dist.config import describe_keys

    return "\n".join(f"  {key} ({default}): {text}" for key, default, text in describe_keys() if text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-dist", description="Distributed DPO training with a cached reference pass.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        if name == "export":
            p = sub.add_parser(name, help=text, description=text)
            p.add_argument("checkpoint", type=Path, help="A checkpoint folder, e.g. runs/exp1/checkpoints/step-000500.")
            p.add_argument("--output_dir", type=Path, help="Where to write (default: CHECKPOINT/hf).")
            continue
        if name == "report":
            p = sub.add_parser(name, help=text, description=text)
            p.add_argument("runs", type=Path, nargs="+", metavar="OUTPUT_DIR", help="Training output folders.")
            p.add_argument("--output", type=Path, help="The PNG (default: OUTPUT_DIR/report.png for one run, "
                           "./report.png for several, overlaid).")
            continue
        p = sub.add_parser(name, help=text, description=text, epilog=EPILOG + _config_help(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", type=Path, help="YAML config file (see README 'Config reference').")
        if name == "demo":
            p.add_argument("--output_dir", default="runs/demo", help="Where the demo writes (default: runs/demo).")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="Config overrides, e.g. train.lr=1e-6.")
    return parser


def run(args: argparse.Namespace) -> None:
    from dpo_dist.config import load_config

    if args.command == "export":
        from dpo_dist.checkpoint import export_checkpoint

        output = args.output_dir or args.checkpoint / "hf"
        export_checkpoint(args.checkpoint, output)
        print(f"exported {args.checkpoint} to {output}")
        return
    if args.command == "report":
        from dpo_dist.report import write_report

        picture, text = write_report(args.runs, args.output)
        print(text)
        print(f"curves written to {picture}")
        return
    if args.command == "demo":
        from dpo_dist.demo import run_demo

        run_demo(args.output_dir, args.config, args.overrides)
        return
    cfg = load_config(args.config, args.overrides)
    if args.command == "train":
        from dpo_dist.trainer import Trainer

        trainer = Trainer(cfg)
        try:
            trainer.train()
        finally:
            trainer.close()
    elif args.command == "tokenize":
        from dpo_dist.trainer import setup_run

        acc, _, _ = setup_run(cfg)  # prints each split's summary
        acc.print(f"token cache ready at {cfg.token_cache_dir}")
        acc.end_training()
    elif args.command == "precompute":
        precompute_command(cfg)
    elif args.command == "evaluate":
        metrics = evaluate_command(cfg)
        print(json.dumps(metrics, indent=2))


def precompute_command(cfg) -> None:
    from dpo_dist import ref_cache
    from dpo_dist.trainer import setup_run

    acc, tokenizer, splits = setup_run(cfg)
    built = ref_cache.precompute(cfg, acc, splits, tokenizer)
    acc.print(f"reference cache {'written to' if built else 'already complete at'} {cfg.ref_cache_dir}")
    acc.end_training()


def evaluate_command(cfg) -> dict:
    """Evaluates model.policy against the reference log-probs (cache, built first if allowed)."""
    from dpo_dist import models
    from dpo_dist.ref_cache import prepare_reference
    from dpo_dist.trainer import evaluate_policy, setup_run

    # The same splits as `train`, so the training run's cache (same fingerprint) serves here too.
    acc, tokenizer, splits = setup_run(cfg)
    name = "eval" if "eval" in splits else "train"
    ref = prepare_reference(cfg, acc, splits, tokenizer)[name].to(acc.device)
    policy = acc.prepare_model(models.load_causal_lm(models.policy_path(cfg.model), cfg.model), evaluation_mode=True)
    metrics = evaluate_policy(policy, splits[name], ref, cfg, acc, tokenizer.pad_token_id)
    if acc.is_main_process:
        (Path(cfg.output_dir) / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))
    acc.end_training()
    return metrics


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as err:
        print(f"dpo-dist {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Preempted as stop:
        print(f"dpo-dist {args.command}: {stop}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
