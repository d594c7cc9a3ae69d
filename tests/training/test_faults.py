"""Faults injected into real runs: each ends in one clear line, no traceback, nothing lost, and the
checkpoint that remains loads (`dpo-dist export`) with finite weights."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, accelerate, one_line_error, run_cli, text_rows, write_jsonl
from dpo_dist.ownership import MARKER

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = write_jsonl(root / "train.jsonl", text_rows(24, seed=3))
    args = [f"model.policy={tiny['policy']}", f"data.train={data}", f"ref_cache.dir={root / 'cache'}",
            "train.lr=1e-3", "train.micro_batch_size=2", "train.log_every=1", "train.save_every=2",
            "train.keep_last=3", "train.max_steps=8"]
    result = run_cli("precompute", f"output_dir={root / 'pre'}", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    return root, args


def with_nan(args, steps, launcher=None):
    start = launcher or [sys.executable]
    return subprocess.run([*start, str(REPO / "tests" / "fault_probe.py"), "train", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "NAN_AT_STEPS": steps})


def exported_is_finite(checkpoint, out):
    result = run_cli("export", str(checkpoint), "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    return weights


@pytest.mark.parametrize("launcher", [None, "zero2"], ids=["one process", "2 procs ZeRO-2"])
def test_nonfinite_loss_stops_at_that_step_naming_its_pairs(base, tmp_path, launcher):
    root, args = base
    out = tmp_path / "run"
    start = accelerate("zero2_cpu.yaml", 29681) if launcher else None
    result = with_nan([f"output_dir={out}", *args], "5", launcher=start)
    line = one_line_error(result, "non-finite loss or gradient norm at step 5", "training pairs [",
                          "checkpoints/latest is step-000004")
    assert len(json.loads(line.split("training pairs ")[1].split(")")[0])) == 2 * (2 if launcher else 1)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert not (out / "checkpoints" / "step-000006").exists() and not (out / "final").exists()
    exported_is_finite(out / "checkpoints" / "step-000004", tmp_path / "export")


def test_nonfinite_steps_skipped_then_too_many_in_a_row_stop(base, tmp_path):
    root, args = base
    out = tmp_path / "run"
    result = with_nan([f"output_dir={out}", *args, "train.on_nonfinite=skip", "train.max_nonfinite_skips=2"], "3,4")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["nonfinite_skipped"] for line in lines] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert all(line["loss"] == line["loss"] for line in lines if line["step"] not in (3, 4))  # no NaN
    final = load_file(out / "final" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in final.values())

    again = tmp_path / "again"
    result = with_nan([f"output_dir={again}", *args, "train.on_nonfinite=skip", "train.max_nonfinite_skips=2"],
                      "3,4,5")
    one_line_error(result, "at step 5", "3 in a row, more than train.max_nonfinite_skips=2",
                   "checkpoints/latest is step-000004")


def test_truncated_latest_checkpoint_falls_back_to_the_previous(base, tmp_path):
    root, args = base
    out = tmp_path / "run"
    straight = run_cli("train", f"output_dir={tmp_path / 'straight'}", *args)
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = run_cli("train", f"output_dir={out}", *args, "train.max_steps=8")
    assert first.returncode == 0
    shutil.rmtree(out / "final")
    # Cut the largest file of the latest checkpoint (step 8) short; step 6 stays intact.
    latest = out / "checkpoints" / "step-000008"
    victim = max((f for f in latest.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (out / "checkpoints" / "step-000008" / "trainer_state.json").touch()
    result = run_cli("train", f"output_dir={out}", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert f"checkpoint step-000008 is damaged ({victim} is" in said and "resumed from" in said
    assert "step-000006 at step 6" in said
    resumed, expected = load_file(out / "final" / "model.safetensors"), load_file(
        tmp_path / "straight" / "final" / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6)

    for step in ("000006", "000004", "000002"):  # every checkpoint damaged: stop, say so
        state = out / "checkpoints" / f"step-{step}"
        if state.exists():
            (state / "trainer_state.json").write_text(json.dumps({"step": 1, "files": {"gone": 1}}))
    shutil.rmtree(out / "final")
    (out / "checkpoints" / "step-000008").exists() and shutil.rmtree(out / "checkpoints" / "step-000008")
    result = run_cli("train", f"output_dir={out}", *args)
    one_line_error(result, "no undamaged checkpoint left")


@pytest.mark.parametrize("change,what", [("train.seed=7", "train.seed"), ("train.micro_batch_size=4", "global batch"),
                                         ("data.max_length=16", "train data")])
def test_resume_with_changed_settings_is_refused(base, tmp_path, change, what):
    root, args = base
    out = tmp_path / "run"
    first = run_cli("train", f"output_dir={out}", *args, "train.max_steps=8")
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.rmtree(out / "final")
    (out / "checkpoints" / "latest").write_text("step-000004\n")
    changed = [change, f"ref_cache.dir={tmp_path / 'cache'}"]  # other data needs its own reference log-probs
    result = run_cli("train", f"output_dir={out}", *args, *changed)
    one_line_error(result, f"{what} changed since it was written", "train.allow_resume_changes=true")
    result = run_cli("train", f"output_dir={out}", *args, *changed, "train.allow_resume_changes=true")
    assert result.returncode == 0, result.stderr[-2000:]


def test_full_disk_while_checkpointing_keeps_latest_and_resumes(base, tmp_path):
    """A small tmpfs (mounted here as root) fills up at the second checkpoint."""
    root, args = base
    probe = tmp_path / "probe"
    result = run_cli("train", f"output_dir={probe}", *args, "train.max_steps=2", "train.report_to=none")
    assert result.returncode == 0, result.stderr[-2000:]
    one_checkpoint = sum(f.stat().st_size for f in (probe / "checkpoints").rglob("*") if f.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    size_kib = int(one_checkpoint * 1.5 / 1024) + 256
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the full-disk case needs root")
    try:
        out = disk / "run"
        result = run_cli("train", f"output_dir={out}", *args, "train.report_to=none")
        one_line_error(result, "no space left on device writing checkpoint step-000004",
                       "latest is still step-000002", "resume=auto")
        assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
        left = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != MARKER)  # (the folder's own marker)
        assert left == ["latest", "step-000002"]
        exported_is_finite(out / "checkpoints" / "step-000002", tmp_path / "export")
        subprocess.run(["mount", "-o", f"remount,size={size_kib * 8}k", str(disk)], check=True)
        result = run_cli("train", f"output_dir={out}", *args, "train.report_to=none")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resumed from" in result.stdout + result.stderr and (out / "final" / "model.safetensors").is_file()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
