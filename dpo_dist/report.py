"""`dpo-dist report RUN [RUN ...]`: a run's curves in one PNG, and a short text summary.

Reads OUTPUT_DIR/metrics.jsonl (train lines every `train.log_every` steps, `eval/...` lines at each
evaluation). One panel per quantity; several runs are overlaid in one figure, one colour each (a single run gets
a colour per curve).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from dpo_dist.errors import UserError

# (panel title, [metric keys]); the eval curve of a train key is drawn dashed in the same panel.
PANELS = [
    ("loss", ["loss"]),
    ("rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
    ("accuracies", ["rewards/accuracies", "logps/accuracies"]),
    ("log-probs", ["logps/chosen", "logps/rejected"]),
    ("learning rate", ["lr"]),
    ("gradient norm", ["grad_norm"]),
    ("pairs / s", ["pairs_per_s"]),
    ("tokens / s", ["tokens_per_s"]),
]
MARKERS = {"chosen": "o", "rejected": "x", "margins": "^", "logps/accuracies": "s"}


def read_metrics(run: Path) -> list[dict]:
    """Every line of RUN/metrics.jsonl; a missing file or a broken line is a UserError naming it."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run}: no metrics.jsonl (is it a dpo-dist train output folder?)")
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not a JSON line ({err.msg})") from None
    return lines


def curve(lines: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(m["step"], m[key]) for m in lines if m.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def summary(run: Path, lines: list[dict]) -> str:
    """Steps, best eval loss and accuracy (with their steps), median pairs/s; the `best/` export."""
    parts = [f"{run}: {max((m['step'] for m in lines), default=0)} steps"]
    evals = [m for m in lines if "eval/loss" in m]
    if evals:
        low = min(evals, key=lambda m: m["eval/loss"])
        high = max(evals, key=lambda m: m["eval/rewards/accuracies"])
        parts.append(f"best eval loss {low['eval/loss']:.4f} (step {low['step']})")
        parts.append(f"best eval accuracy {high['eval/rewards/accuracies']:.3f} (step {high['step']})")
    speeds = [m["pairs_per_s"] for m in lines if m.get("pairs_per_s")]
    if speeds:
        parts.append(f"{statistics.median(speeds):.2f} pairs/s")
    best = Path(run) / "best" / "best.json"
    if best.is_file():
        info = json.loads(best.read_text())
        parts.append(f"best/ holds step {info['step']} ({info['metric']} {info['value']:.4f})")
    return ", ".join(parts)


def write_report(runs: list[Path], output: Path | None = None) -> tuple[Path, str]:
    """Draws every run's curves into one PNG; returns its path and the text summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output) if output else (Path(runs[0]) / "report.png" if len(runs) == 1 else Path("report.png"))
    metrics = {Path(run): read_metrics(run) for run in runs}
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for r, (run, lines) in enumerate(metrics.items()):
            for k, key in enumerate(keys):  # one colour per run, or per curve when there is one run
                colour = colours[(k if len(metrics) == 1 else r) % len(colours)]
                marker = next((m for part, m in MARKERS.items() if part in key), None)
                for shown, style in ((key, "-"), (f"eval/{key}", "--")):
                    steps, values = curve(lines, shown)
                    if steps:
                        label = shown if len(metrics) == 1 else f"{run.name}: {shown}"
                        ax.plot(steps, values, style, color=colour, marker=marker, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(", ".join(run.name for run in metrics) + " (dashed: eval)")
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output, "\n".join(summary(run, lines) for run, lines in metrics.items())
