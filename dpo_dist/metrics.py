"""Preference metrics: summed on device per micro-batch, reduced across ranks once per log line.

Every mean is over all (weighted) pairs since the last reduction, on every rank: a zero-weight
padding pair counts for nothing. Names follow TRL's (`rewards/chosen`, `logps/rejected`, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpo_dist.losses import LossOutput

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


class MetricSums:
    """Running sums of MEAN_KEYS (weighted by pair) and of COUNT_KEYS, kept on one device."""

    def __init__(self, device: torch.device | str):
        self.sums = torch.zeros(len(MEAN_KEYS) + len(COUNT_KEYS), dtype=torch.float64, device=device)

    def add(self, out: LossOutput, weight: torch.Tensor, tokens: torch.Tensor) -> None:
        """tokens: non-padding tokens of the micro-batch (prompt included, both responses)."""
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


class MetricsLogger:
    """Appends JSON lines to OUTPUT_DIR/metrics.jsonl and scalars to TensorBoard (main process only)."""

    def __init__(self, output_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = {"step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
