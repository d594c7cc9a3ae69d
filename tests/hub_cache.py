"""A Hugging Face hub cache laid out on disk as `huggingface_hub` writes it, for offline tests."""

import hashlib
from pathlib import Path


def add_to_hub_cache(model_dir: Path, cache: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """Puts `model_dir`'s files into `cache` as snapshot `revision` of `repo_id` (refs/main names it):
    content in `blobs/`, named as the hub names them (SHA-256 for weights, git's blob SHA-1 for small
    files), linked from `snapshots/REVISION/`. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(model_dir.iterdir()):
        data = file.read_bytes()
        if file.suffix == ".safetensors":
            name = hashlib.sha256(data).hexdigest()
        else:
            name = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / name).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
