"""benchmarks/gpu_check.sh, what the first GPU session runs, on the CPU: its checks pass here and a
check that is off makes it fail (exit code 1, a FAIL row), so it can never pass by printing alone."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def run(args: list[str], out, **env) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=900,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OUT": str(out), **env})


def test_equality_passes_on_the_cpu_layouts_and_fails_when_off(tmp_path):
    base = [sys.executable, "benchmarks/gpu_equality.py", "--device", "cpu", "--hidden", "64", "--layers", "2",
            "--pairs", "6"]
    good = run(base, tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr[-3000:]
    for layout in ("block_mask sdpa shared", "block_mask eager", "block_mask eager shared"):
        assert f"| {layout} |" in good.stdout and "PASS |" in good.stdout.split(f"| {layout} |")[1].splitlines()[0]
    assert "FAIL" not in good.stdout
    bad = run(base + ["--tolerance-scale", "-1"], tmp_path)
    assert bad.returncode == 1 and "FAIL" in bad.stdout


def test_check_run_names_a_wrong_first_loss_and_a_nan(tiny, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from check_run import problems

    run_dir = tmp_path / "run"
    shutil.copytree(tiny["policy"], run_dir / "final")
    lines = [{"step": 1, "loss": math.log(2), "grad_norm": 1.0}, {"step": 2, "loss": 0.5, "grad_norm": 2.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert problems(run_dir, "float32", None) == []
    lines = [{"step": 1, "loss": math.log(2) + 1e-3, "grad_norm": 1.0}, {"step": 2, "loss": float("nan")}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    found = problems(run_dir, "float32", None)
    assert len(found) == 2 and "not log 2" in found[0] and "steps [2]" in found[1]


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_check_and_fails_when_one_is_off(tmp_path):
    """The whole script in --cpu mode with the equality tolerances made impossible: every other check
    (ZeRO-2/3 training with eager attention, 2-rank LoRA + aot + SIGKILL + resume) passes, the
    equality check fails, and so does the script."""
    result = run(["bash", "benchmarks/gpu_check.sh", "--cpu"], tmp_path, GPU_CHECK_TOLERANCE_SCALE="-1")
    table = (tmp_path / "results.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()[2:]}
    assert rows.pop("equality_float32") == "FAIL"
    expected = {f"{kind}_{zero}_{attn}" for kind in ("train", "result") for zero in ("zero2", "zero3")
                for attn in ("eager",)}
    expected |= {"train_master_weights", "result_master_weights"}
    expected |= {"two_ranks_straight", "two_ranks_killed_and_resumed", "two_ranks_same_weights"}
    assert set(rows) == expected
    assert all(value == "PASS" for value in rows.values()), table + result.stdout[-4000:]
    assert result.returncode == 1
