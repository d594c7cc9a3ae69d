"""File digests: a file is read to hash it once while it is unchanged; hub blobs are never read."""

import os
import time

import pytest

from conftest import run_cli
from dpo_dist import cli, fingerprint
from hub_cache import add_to_hub_cache


@pytest.fixture
def counted_reads(monkeypatch, tmp_path):
    """Every file `fingerprint` reads to hash; a fresh, empty digest sidecar."""
    monkeypatch.setenv("DPO_DIST_CACHE_HOME", str(tmp_path / "digests"))
    reads = []
    real = fingerprint.sha256_of_file
    monkeypatch.setattr(fingerprint, "sha256_of_file", lambda path: reads.append(path.name) or real(path))
    return reads


def test_unchanged_file_is_hashed_once_and_a_changed_one_again(tmp_path, counted_reads):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(1 << 20))
    first = fingerprint.digest_of_files([weights])
    assert fingerprint.digest_of_files([weights]) == first
    assert counted_reads == ["model.safetensors"]

    time.sleep(0.05)  # file times tick in milliseconds; a real rewrite of weights takes far longer
    weights.write_bytes(os.urandom(1 << 20))  # same size, same inode, other content
    assert fingerprint.digest_of_files([weights]) != first
    assert counted_reads == ["model.safetensors"] * 2


def test_hub_blobs_are_named_by_their_sha256_and_not_read(tiny, tmp_path, counted_reads):
    snapshot = add_to_hub_cache(tiny["reference"], tmp_path / "hub", "org/ref")
    from_hub = fingerprint.file_digests([snapshot / "model.safetensors"])
    assert counted_reads == []
    local = fingerprint.file_digests([tiny["reference"] / "model.safetensors"])
    assert list(from_hub.values()) == list(local.values())  # one cache serves both


def test_second_precompute_does_not_read_the_reference_weights(tiny, text_file, tmp_path, counted_reads):
    """Through the real command, in-process: the second run hashes nothing of the weights."""
    args = ["precompute", f"output_dir={tmp_path / 'out'}", f"model.policy={tiny['policy']}",
            f"model.reference={tiny['reference']}", f"data.train={text_file}"]
    cli.main(args)
    assert "model.safetensors" in counted_reads
    counted_reads.clear()
    cli.main([*args, "ref_cache.overwrite=true"])  # recomputes the cache; the digests are known
    assert "model.safetensors" not in counted_reads


def test_digest_home_that_cannot_be_written_costs_only_a_rehash(tiny, text_file, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the digest folder would go")
    result = run_cli("precompute", f"output_dir={tmp_path / 'out'}", f"model.policy={tiny['policy']}",
                     f"data.train={text_file}", env={"DPO_DIST_CACHE_HOME": str(blocked / "sub")})
    assert result.returncode == 0, result.stderr[-2000:]
