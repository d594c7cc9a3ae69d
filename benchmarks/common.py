"""Shared by the benchmarks: a local Llama of a few million parameters and variable-length data."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is was for on that with as by at from this be are or an it his not but "
         "which have one all were her they there been has when who will more no if out so said what "
         "up its about into than them can only other new some could time these two may then do first").split()


def make_data(path: Path, n: int, seed: int = 0, prompt_words: tuple[int, int] = (8, 300),
              response_words: tuple[int, int] = (4, 200)) -> Path:
    """Preference pairs whose prompt and response lengths spread widely (log-uniform), like chat data."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        n_words = int(round(lo * (hi / lo) ** rng.random()))
        return " ".join(rng.choice(WORDS) for _ in range(n_words))

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(*prompt_words), "chosen": " " + text(*response_words),
                                "rejected": " " + text(*response_words)}) + "\n")
    return path


def make_model(path: Path, hidden: int = 256, layers: int = 4) -> Path:
    from dpo_dist.tiny import save_tiny_model

    if not (path / "config.json").is_file():
        save_tiny_model(path, [" ".join(WORDS)] * 20, seed=0, hidden_size=hidden, num_layers=layers, num_heads=8)
    return path


def run_measured(args: list[str], env: dict | None = None) -> dict:
    """Runs `python ARGS` in a child (with `env` added to the environment); returns wall seconds,
    the child's peak resident memory (MiB) and its stdout."""
    probe = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "print(rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    rc, seconds, max_rss_kib = out.stdout.strip().splitlines()[-1].split()
    if rc != "0":
        raise RuntimeError(f"benchmark run failed: {' '.join(args)}\n{out.stderr[-3000:]}")
    return {"seconds": float(seconds), "peak_mib": int(max_rss_kib) / 1024, "stdout": out.stdout}


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M")
