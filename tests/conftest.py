"""Shared fixtures: tiny local models and tokenizer, small preference files, a CLI runner."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# File digests remembered by tests stay out of the user's ~/.cache (children inherit this).
os.environ["DPO_DIST_CACHE_HOME"] = tempfile.mkdtemp(prefix="dpo_dist_digests_")

REPO = Path(__file__).resolve().parent.parent
# Step-0 rewards when the policy is the reference: exactly 0 on the CPU (the same reductions in both
# forwards); on a GPU, nondeterministic reductions and other batch layouts leave one forward's noise.
ZERO_REWARD_TOLERANCE = 1e-4 if torch.cuda.is_available() else 0.0
WORDS = ("the cat sat on a mat while dogs ran far away from home to see some birds fly high over "
         "green hills and blue seas under bright warm sun every day").split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def text_rows(n: int, seed: int = 0) -> list[dict]:
    """Text pairs with prompts and responses of widely varied lengths."""
    rng = random.Random(seed)
    return [
        {"prompt": sentence(rng, 1, 25) + "?", "chosen": " " + sentence(rng, 1, 30), "rejected": " " + sentence(rng, 1, 12)}
        for _ in range(n)
    ]


def chat_rows(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [{"role": "user", "content": sentence(rng, 2, 15)}]
        if rng.random() < 0.5:
            prompt = [{"role": "system", "content": sentence(rng, 2, 6)}] + prompt
        rows.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": sentence(rng, 1, 20)}],
            "rejected": [{"role": "assistant", "content": sentence(rng, 1, 10)}],
        })
    return rows


def hh_rows(n: int, seed: int = 2) -> list[dict]:
    """HH-RLHF style: no prompt; chosen and rejected hold the whole dialogue, the last answer differs."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        history = "".join(f"\n\nHuman: {sentence(rng, 2, 8)}\n\nAssistant: {sentence(rng, 2, 8)}"
                          for _ in range(rng.randint(0, 2)))
        history += f"\n\nHuman: {sentence(rng, 2, 10)}\n\nAssistant:"
        rows.append({"chosen": f"{history} yes {sentence(rng, 1, 12)}", "rejected": f"{history} no {sentence(rng, 1, 6)}"})
    return rows


def dialogue_rows(n: int, seed: int = 3) -> list[dict]:
    """Message lists with an implicit prompt: system message, multi-turn history, then the answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        history = [{"role": "system", "content": sentence(rng, 2, 6)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(0, 2)):
            history += [{"role": "user", "content": sentence(rng, 2, 8)},
                        {"role": "assistant", "content": sentence(rng, 2, 8)}]
        history.append({"role": "user", "content": sentence(rng, 2, 10)})
        rows.append({"chosen": history + [{"role": "assistant", "content": "yes " + sentence(rng, 1, 12)}],
                     "rejected": history + [{"role": "assistant", "content": "no " + sentence(rng, 1, 6)}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Two different tiny Llamas (policy A, reference B) sharing one tokenizer."""
    from dpo_dist.tiny import build_tokenizer, save_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    texts = [" ".join(WORDS)] * 4 + [r["prompt"] + r["chosen"] for r in text_rows(200, seed=7)]
    tokenizer = build_tokenizer(texts)
    return {
        "policy": save_tiny_model(root / "policy", [], seed=0, tokenizer=tokenizer),
        "reference": save_tiny_model(root / "reference", [], seed=1, tokenizer=tokenizer),
    }


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "text.jsonl", text_rows(12))


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_rows(10))


@pytest.fixture(scope="session")
def hh_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "hh.jsonl", hh_rows(10))


@pytest.fixture(scope="session")
def dialogue_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "dialogue.jsonl", dialogue_rows(10))


def run_cli(*args: str, env: dict | None = None, timeout: int = 300, launcher: list[str] | None = None):
    """Runs `python -m dpo_dist ARGS` (or `LAUNCHER ... -m dpo_dist ARGS`) in a fresh process."""
    cmd = (launcher or [sys.executable]) + ["-m", "dpo_dist", *args]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def accelerate(config: str, port: int) -> list[str]:
    """`accelerate launch` with launch/accelerate/CONFIG: the start of a command line."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "launch" / "accelerate" / config), "--main_process_port", str(port)]


def torchrun(port: int) -> list[str]:
    """`torchrun` with 2 processes: the start of a command line."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


def probe_launch(args: list[str], port: int, env: dict | None = None, launcher: str = "zero3_cpu.yaml") -> list[dict]:
    """`dpo-dist ARGS` through tests/cli_probe.py on 2 processes — under `accelerate launch` with
    launch/accelerate/LAUNCHER, or "torchrun" (DeepSpeed from `distributed.deepspeed`) — and the
    records the probe wrote."""
    probe_dir = Path(tempfile.mkdtemp(prefix="probe_"))
    start = torchrun(port) if launcher == "torchrun" else accelerate(launcher, port)
    result = subprocess.run([*start, str(REPO / "tests" / "cli_probe.py"), *args],
                            capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "PROBE_DIR": str(probe_dir), **(env or {})})
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for f in sorted(probe_dir.glob("rank-*.jsonl")) for line in f.read_text().splitlines()]


def launch_background(args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    """`dpo-dist train ARGS` in its own process group, for tests that kill it."""
    cmd = (launcher or [sys.executable]) + ["-m", "dpo_dist", "train", *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"}, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, no chance to clean up
    proc.wait()


def latest_step(out) -> int:
    pointer = out / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("-")[1]) if pointer.is_file() else 0


def wait_for(condition, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def one_line_error(result, *phrases):
    """Exit code 2 and one line saying what (each rank says the same line; a launcher above the
    ranks may add its own report of the exit code, but no traceback comes from dpo_dist)."""
    assert result.returncode in (1, 2), result.stderr[-3000:]
    assert 'dpo_dist/' not in "".join(line for line in result.stderr.splitlines() if line.lstrip().startswith("File"))
    lines = {line for line in result.stderr.splitlines() if line.startswith("dpo-dist train: error:")}
    assert len(lines) == 1, result.stderr[-3000:]
    (line,) = lines
    for phrase in phrases:
        assert phrase in line, line
    return line
