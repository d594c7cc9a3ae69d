"""On the CPU a run keeps the memory it frees for its next tensors, and gives it back on `trim`;
a user's own glibc malloc settings win. Each case runs in a fresh interpreter (glibc's state is
per process)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from dpo_dist import host_memory

PROBE = """
import json, sys
import torch
from dpo_dist import host_memory

def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

host_memory.keep_freed_memory(torch.device(sys.argv[1]))
before = rss_mib()
blocks = [torch.ones(2**20) for _ in range(16)]  # 16 x 4 MiB, each below glibc's 32 MiB heap cap
touched = rss_mib()
del blocks
freed = rss_mib()
host_memory.trim(torch.device("cpu"))
print(json.dumps({"grown": touched - before, "kept": freed - before, "trimmed": rss_mib() - before}))
"""


def probe(device: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, device], cwd=REPO, capture_output=True, text=True,
                         env={**{k: v for k, v in os.environ.items()
                                 if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}, **env},
                         check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(host_memory._libc() is None, reason="glibc's malloc")
def test_cpu_run_keeps_freed_memory_until_trimmed():
    kept = probe("cpu")
    assert kept["grown"] > 60, kept
    assert kept["kept"] > 60, f"freed tensors left the process: {kept}"
    assert kept["trimmed"] < 20, f"trim gave nothing back: {kept}"
    # Without the setting (a GPU run's host memory), glibc returns freed buffers of this size at once.
    default = probe("meta")
    assert default["grown"] > 60 and default["kept"] < 20, default


@pytest.mark.skipif(host_memory._libc() is None, reason="glibc's malloc")
def test_user_malloc_settings_win():
    mine = probe("cpu", MALLOC_MMAP_THRESHOLD_=str(128 * 1024))  # e.g. benchmarks/long_sequences.py
    assert mine["grown"] > 60 and mine["kept"] < 20, mine
    # A tunable that is not malloc's leaves the policy on.
    assert probe("cpu", GLIBC_TUNABLES="glibc.pthread.rseq=0")["kept"] > 60
