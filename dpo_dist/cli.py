"""Command line: `dpo-dist {tokenize,precompute,train,evaluate,demo,export,report}` (also `python -m dpo_dist ...`).

Parse -> build -> run -> close. A UserError (bad config, data or cache) or a file-system fault (full
disk, read-only folder) prints one line and exits with code 2; Ctrl-C says what was kept and exits
130, SIGTERM the same with 85 (requeue, as a preempted training run); anything else is a bug: one
line, then its traceback, exit 1.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
from pathlib import Path

from dpo_dist import commands, run_lock
from dpo_dist.errors import PREEMPTED_EXIT_CODE, Preempted, Terminated, UserError, interrupted_line

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
            p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                           help="Dtype of the exported weights (default: the run's export.dtype, else model.dtype); "
                           "written from the fp32 master weights either way.")
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
    if args.command == "export":
        from dpo_dist.training.checkpoint import export_checkpoint

        output = args.output_dir or args.checkpoint / "hf"
        export_checkpoint(args.checkpoint, output, args.dtype)
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
    cfg = commands.load_run_config(args.config, args.overrides)
    if args.command == "evaluate":
        print(json.dumps(commands.evaluate_command(cfg), indent=2))
    else:
        {"train": commands.train_command, "tokenize": commands.tokenize_command,
         "precompute": commands.precompute_command}[args.command](cfg)


def _terminate(signum, frame) -> None:
    raise Terminated()


def console() -> None:
    """The `dpo-dist` and `python -m dpo_dist` entry point: `main`, then `_leave_without_finalizers`."""
    try:
        main()
    except SystemExit as stop:
        _leave_without_finalizers(stop.code)
        raise
    _leave_without_finalizers(0)


def _leave_without_finalizers(code) -> None:
    """Ends a rank of a multi-process run with os._exit once its work is written and its process group
    destroyed. Left to the interpreter's finalization, the gloo backend's C++ state is torn down after
    Python's and aborts a rank now and then ("terminate called without an active exception", pytorch
    PR 179291), turning a finished run into a failed launch."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not isinstance(code, (int, type(None))):
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    name = f"dpo-dist {args.command}"
    previous_handler = signal.signal(signal.SIGTERM, _terminate)  # training turns it into a checkpoint instead
    try:
        run(args)
    except UserError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Preempted as stop:
        print(f"{name}: {stop}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    except KeyboardInterrupt:
        print(f"\n{name}: {interrupted_line('Ctrl-C')}", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except Terminated:
        print(f"{name}: {interrupted_line('SIGTERM')}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    except OSError as err:
        if err.errno not in FILE_SYSTEM_ERRORS:
            _say_unexpected(name, err)
            raise
        where = f" {err.filename}" if err.filename else ""
        print(f"{name}: error: cannot use{where}: {err.strerror}; nothing was deleted (see README 'Faults')",
              file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        _say_unexpected(name, err)
        raise
    finally:
        run_lock.release_all()
        signal.signal(signal.SIGTERM, previous_handler)


# Where the fault is the machine's (a full disk, a read-only folder), not the code's.
FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                      errno.EISDIR, errno.ENAMETOOLONG}
INTERRUPTED_EXIT_CODE = 130  # what a shell reports for a Ctrl-C


def _say_unexpected(name: str, err: BaseException) -> None:
    """The one line before the traceback of an error dpo-dist did not foresee."""
    print(f"{name}: error: unexpected {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
          "(a bug in dpo-dist or a fault of the environment; the traceback follows, please report it)",
          file=sys.stderr, flush=True)
