"""What once destroyed user data, run as a user would: each loses nothing (every file around the run
byte-identical afterwards). Plus the mechanisms underneath: folder markers, the run lock, and a
resumed run's metrics."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli, text_rows, wait_for, write_jsonl
from dpo_dist import cli, ownership, run_lock
from dpo_dist.errors import UserError


def tree(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def user(tiny, tmp_path):
    """A user's folder: data, a commented config, and a finished run under runs/."""
    data = write_jsonl(tmp_path / "pairs.jsonl", text_rows(16, seed=4))
    finished = tmp_path / "runs" / "exp0"
    (finished / "final").mkdir(parents=True)
    (finished / "final" / "model.safetensors").write_bytes(os.urandom(4096))
    (finished / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    config = tmp_path / "config.yaml"
    config.write_text(f"# my experiment: beta sweep\nmodel: {{policy: {tiny['policy']}}}\n"
                      f"data: {{train: {data}}}\ntrain: {{max_steps: 4, micro_batch_size: 2, report_to: none}}\n")
    return tmp_path


def test_overwrite_of_a_shared_folder_as_the_cache_deletes_nothing(user):
    before = tree(user / "runs")
    result = run_cli("precompute", "--config", str(user / "config.yaml"), f"output_dir={user / 'runs' / 'exp1'}",
                     f"ref_cache.dir={user / 'runs'}", "ref_cache.overwrite=true")
    assert result.returncode == 2 and "holds files a reference cache does not write (exp0" in result.stderr, \
        result.stderr[-2000:]
    after = tree(user / "runs")
    assert {k: v for k, v in after.items() if not k.startswith("exp1/")} == before


def test_empty_output_dir_beside_the_config_overwrites_nothing(user):
    before = tree(user)
    for bad in ("output_dir=", "output_dir=.", f"output_dir={user}"):
        result = subprocess.run([sys.executable, "-m", "dpo_dist", "train", "--config", "config.yaml", bad],
                                cwd=user, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
        assert result.returncode == 2 and "is empty or the current folder" in result.stderr, result.stderr[-2000:]
        assert tree(user) == before


def test_a_config_inside_output_dir_is_never_written_over(user):
    run = user / "runs" / "exp2"
    run.mkdir()
    (run / "config.yaml").write_text((user / "config.yaml").read_text())
    before = tree(user)
    result = run_cli("train", "--config", str(run / "config.yaml"), f"output_dir={run}")
    assert result.returncode == 2 and "config.yaml was not written by dpo-dist" in result.stderr, result.stderr[-2000:]
    assert {k: v for k, v in tree(user).items() if not k.startswith("runs/exp2/.")} == before


@pytest.mark.slow
def test_two_runs_on_one_output_dir_one_is_refused_the_other_unmixed(user):
    out, alone = user / "runs" / "shared", user / "runs" / "alone"
    # Long enough that the second run starts while the first trains.
    args = ["--config", str(user / "config.yaml"), f"ref_cache.dir={user / 'cache'}", "train.max_steps=300",
            "train.log_every=1", "train.save_every=0"]
    assert run_cli("precompute", *args, f"output_dir={alone}").returncode == 0
    first = subprocess.Popen([sys.executable, "-m", "dpo_dist", "train", *args, f"output_dir={out}"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "DS_ACCELERATOR": "cpu"})
    lock = out / run_lock.LOCK_NAME
    wait_for(lambda: lock.is_file() and lock.read_text().strip())
    second = run_cli("train", *args, f"output_dir={out}")
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use by another dpo-dist run (pid {first.pid} on" in second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert run_cli("train", *args, f"output_dir={alone}").returncode == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 301))
    shared, single = load_file(out / "final" / "model.safetensors"), load_file(alone / "final" / "model.safetensors")
    assert all(torch.equal(shared[k], single[k]) for k in single)
    # The lock went with its holder: a third run on the folder gets it (and resumes: nothing to do but export).
    assert run_cli("train", *args, f"output_dir={out}").returncode == 0


def test_resumed_run_logs_no_step_twice(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "t.jsonl", text_rows(12, seed=2))
    args = ["train", f"output_dir={tmp_path / 'run'}", f"model.policy={tiny['policy']}", f"data.train={data}",
            "train.max_steps=4", "train.save_every=2", "train.log_every=1", "train.micro_batch_size=2",
            "train.report_to=none"]
    cli.main(args)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-000002\n")  # as if killed after step 3
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.5}\n{"step": 4, "lo')  # ...with a line cut short
    cli.main(args)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_remove_own_deletes_only_a_caches_files(tmp_path):
    cache = ownership.claim(tmp_path / "cache", "reference cache", "ref_cache.dir")
    (cache / "manifest.json").write_text("{}")
    (cache / "train-00000.safetensors").write_bytes(b"x")
    ownership.remove_own(cache, "reference cache", "ref_cache.dir")
    assert sorted(p.name for p in cache.iterdir()) == [ownership.MARKER]
    (cache / "train-00000.safetensors").write_bytes(b"x")
    (cache / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match=r"holds files a reference cache does not write \(thesis.tex\)"):
        ownership.remove_own(cache, "reference cache", "ref_cache.dir")
    assert (cache / "train-00000.safetensors").exists() and (cache / "thesis.tex").exists()
    unmarked = tmp_path / "theirs"
    unmarked.mkdir()
    (unmarked / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="was not written by dpo_dist"):
        ownership.remove_own(unmarked, "reference cache", "ref_cache.dir")
    assert ownership.claim(unmarked, "reference cache", "k") and ownership.marker_kind(unmarked) == "reference cache"


def test_replace_folder_replaces_only_its_own_kind(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    tmp = ownership.fresh_folder(tmp_path / ".tmp-final", "model export")
    with pytest.raises(UserError, match="was not written by dpo_dist"):
        ownership.replace_folder(tmp, target, "model export")
    assert (target / "mine.txt").read_text() == "keep"
    (target / "mine.txt").unlink()
    ownership.replace_folder(tmp, target, "model export")  # an empty folder may be replaced
    again = ownership.fresh_folder(tmp_path / ".tmp-final", "model export")
    (again / "model.safetensors").write_bytes(b"w")
    ownership.replace_folder(again, target, "model export")  # an earlier export may be replaced
    assert (target / "model.safetensors").read_bytes() == b"w"
    users_model = tmp_path / "models" / "sft"  # unmarked, only export-like files: a user's model, kept
    users_model.mkdir(parents=True)
    (users_model / "model.safetensors").write_bytes(b"sft")
    with pytest.raises(UserError, match="was not written by dpo_dist"):
        ownership.check_replaceable(users_model, "model export")
    run = ownership.claim(tmp_path / "run", "run", "output_dir")
    (run / "final").mkdir()
    (run / "final" / "model.safetensors").write_bytes(b"old")  # an earlier version's final/: replaceable
    ownership.check_replaceable(run / "final", "model export")


def _holder(folder, job=None):
    """Another process holding `folder`'s run lock (optionally as Slurm job `job`, first start)."""
    code = ("import os, sys, time\nfrom dpo_dist import run_lock\n"
            f"run_lock.acquire({str(folder)!r})\nprint('held', flush=True)\ntime.sleep(60)\n")
    env = {**os.environ, **({"SLURM_JOB_ID": job, "SLURM_RESTART_COUNT": "0"} if job else {})}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_run_lock_refuses_a_second_run_and_frees_on_a_crash(tmp_path, monkeypatch):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(UserError, match=rf"in use by another dpo-dist run \(pid {holder.pid} on "):
            run_lock.acquire(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up; the kernel drops the lock
        holder.wait()
    run_lock.acquire(tmp_path)
    run_lock.release_all()


def test_run_lock_goes_to_a_requeue_of_the_same_slurm_job(tmp_path, monkeypatch):
    holder = _holder(tmp_path, job="4242")  # e.g. a node that vanished still holding the lock
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "777")
        with pytest.raises(UserError, match="Slurm job 4242"):
            run_lock.acquire(tmp_path)
        monkeypatch.setenv("SLURM_JOB_ID", "4242")  # another step of the same allocation: still refused
        monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
        with pytest.raises(UserError, match="Slurm job 4242"):
            run_lock.acquire(tmp_path)
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the job requeued
        run_lock.acquire(tmp_path)
        assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()
        run_lock.release_all()


def test_a_read_only_output_dir_gets_one_line(tiny, tmp_path):
    """A read-only file system (a tmpfs mounted read-only here as root) under output_dir."""
    disk = tmp_path / "ro"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the read-only case needs root")
    try:
        data = write_jsonl(tmp_path / "t.jsonl", text_rows(4))
        result = run_cli("precompute", f"output_dir={disk / 'run'}", f"model.policy={tiny['policy']}",
                         f"data.train={data}")
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"output_dir={disk / 'run'}: cannot write there (Read-only file system)" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_remove_own_never_follows_a_link(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "part-000000.json").write_text("precious")
    root = ownership.claim(tmp_path / "tokens", "token cache", "data.cache_dir")
    (root / "train").symlink_to(theirs)
    with pytest.raises(UserError, match=r"does not write \(train\)"):
        ownership.remove_own(root, "token cache", "data.cache_dir", below="train")
    assert (theirs / "part-000000.json").read_text() == "precious"


def test_resolved_configs_of_earlier_versions_are_ours(tmp_path):
    from dpo_dist.config import config_to_dict, load_config, written_by_us
    import yaml

    old = tmp_path / "config.yaml"
    old.write_text(yaml.safe_dump(config_to_dict(load_config(None, [])), sort_keys=False))  # no header
    assert written_by_us(old)
    old.write_text("# mine\n" + old.read_text())
    assert not written_by_us(old)
