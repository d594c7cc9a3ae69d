"""Ulysses sequence parallelism on 2 real processes (gloo): the log-probs and gradients of a batch
cut along the sequence equal those of the whole batch on one rank."""

import json
import os
import subprocess

import pytest

from conftest import REPO, torchrun

pytestmark = pytest.mark.slow


def test_sequence_cut_across_two_ranks_gives_the_whole_batch_numbers(tiny, text_file, chat_file, hh_file,
                                                                        dialogue_file, tmp_path):
    """Text, chat and multi-turn rows; padded, packed and shared-prompt layouts; sdpa and eager (and
    FlexAttention's forward, which cannot run backward on the CPU; wide rows masked a block of
    queries at a time, with every layer recomputed in backward):
    log-probs (sums of ~100 in size) within 1e-5 relative, and every parameter's gradient within
    1e-5 of its largest entry."""
    out = tmp_path / "sp.jsonl"
    files = [str(f) for f in (text_file, chat_file, hh_file, dialogue_file)]
    result = subprocess.run([*torchrun(29741), str(REPO / "tests" / "model" / "sp_probe.py"), str(tiny["reference"]),
                             str(out), *files], capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 * 4 * 3 + 2  # and: wide rows with checkpointed layers; FlexAttention's forward
    for line in lines:
        assert line["columns"][0] == 0 and line["columns"][1] > 0  # rank 0 held the first half
        assert line["logps"] <= 1e-5 * line["largest"], line
        assert line["grads"] < 1e-5, line
