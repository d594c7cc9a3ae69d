"""Preference metrics: summed on device per micro-batch, reduced across ranks once per log line.

Every mean is over all (weighted) pairs since the last reduction, on every rank: a zero-weight
padding pair counts for nothing. Names follow TRL's (`rewards/chosen`, `logps/rejected`, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path

import torch

from dpo_dist import collectives
from dpo_dist.errors import UserError
from dpo_dist.training.losses import LossOutput

# Per-pair quantities that are averaged over pairs; `pairs` and `tokens` are plain counts.
MEAN_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logps/accuracies",
)
COUNT_KEYS = ("pairs", "tokens")


def check_save_best(metric: str | None) -> None:
    """`train.save_best` must name an eval metric (the nearest one is suggested)."""
    known = [f"eval/{key}" for key in MEAN_KEYS]
    if metric is not None and metric not in known:
        close = difflib.get_close_matches(metric, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" ({', '.join(known)})"
        raise UserError(f"config: train.save_best={metric!r} is not an eval metric{hint}")


class MetricSums:
    """Running sums of MEAN_KEYS (weighted by pair) and of COUNT_KEYS, kept on one device. A rank
    that is not `counted` (it shares its pairs with the rank that is: sequence parallelism) adds
    nothing but takes part in the reduction."""

    def __init__(self, device: torch.device | str, counted: bool = True):
        self.sums = torch.zeros(len(MEAN_KEYS) + len(COUNT_KEYS), dtype=torch.float64, device=device)
        self.counted = counted

    def add(self, out: LossOutput, weight: torch.Tensor, tokens: torch.Tensor) -> None:
        """tokens: non-padding tokens of the micro-batch (prompt included, both responses)."""
        if not self.counted:
            return
        per_pair = torch.stack(
            [
                out.losses.detach(),
                out.chosen_rewards,
                out.rejected_rewards,
                out.chosen_rewards - out.rejected_rewards,
                (out.chosen_rewards > out.rejected_rewards).float(),
                out.chosen_logps,
                out.rejected_logps,
                (out.chosen_logps > out.rejected_logps).float(),
            ]
        ).double()
        self.sums[: len(MEAN_KEYS)] += per_pair @ weight.double()
        self.sums[len(MEAN_KEYS)] += weight.sum().double()
        self.sums[len(MEAN_KEYS) + 1] += tokens.double()

    def reduce(self, accelerator) -> dict[str, float]:
        """All-reduces the sums (one collective), returns the means and counts, and resets."""
        total = accelerator.reduce(self.sums.clone(), reduction="sum") if accelerator.num_processes > 1 else self.sums
        values = total.tolist()
        pairs = max(values[len(MEAN_KEYS)], 1.0)
        result = {key: values[i] / pairs for i, key in enumerate(MEAN_KEYS)}
        result["pairs"] = values[len(MEAN_KEYS)]
        result["tokens"] = values[len(MEAN_KEYS) + 1]
        self.sums.zero_()
        return result


def flat_config(tree: dict, prefix: str = "") -> dict:
    """The resolved config as tracker hyper-parameters: dotted keys, scalars (others as text)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a crash


class MetricsLogger:
    """Appends JSON lines to OUTPUT_DIR/metrics.jsonl (main process) and sends the same scalars to
    the experiment trackers of `train.report_to` through accelerate (TensorBoard events under
    OUTPUT_DIR/tensorboard/PROJECT), with the resolved config as hyper-parameters."""

    def __init__(self, cfg, accelerator):
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        missing = sorted(set(cfg.trackers) - {str(t) for t in accelerator.log_with})
        if missing:
            raise UserError(f"train.report_to: {', '.join(missing)} not installed here; "
                            f"pip install {' '.join(missing)} (or train.report_to=none)")
        if cfg.trackers:
            run_name = cfg.train.run_name or Path(cfg.output_dir).resolve().name
            accelerator.init_trackers(
                cfg.train.project, config=flat_config(dataclasses.asdict(cfg)),
                init_kwargs={"wandb": {"name": run_name, "dir": str(cfg.output_dir)}, "mlflow": {"run_name": run_name},
                             "comet_ml": {"name": run_name}, "aim": {"run_name": run_name}},
            )

    def forget_after(self, step: int) -> None:
        """Drops the lines of steps after `step` (a resumed run logs them again), so no step is
        in metrics.jsonl twice."""
        def rewrite() -> None:
            if not self.path.is_file():
                return
            lines = self.path.read_text(errors="replace").splitlines(keepends=True)
            kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
            if len(kept) != len(lines):
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                tmp.write_text("".join(kept))
                os.replace(tmp, self.path)

        collectives.on_main_with_tensor_verdict(self.accelerator, rewrite)  # a failure there stops every rank

    def log(self, step: int, values: dict[str, float]) -> None:
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=step)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
