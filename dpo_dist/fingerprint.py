"""Content digests of what a cache was computed from: files (weights, data) and tokenizers.

Hashing a 70B reference reads ~140 GB, so a file is read at most once while it stays unchanged:
  - a large file in the Hugging Face hub cache is a link to `blobs/SHA256`, named by the SHA-256 of
    its content, so that name is its digest and nothing is read (the same digest as the same file
    in a local folder: a cache made from either serves both);
  - any other file's SHA-256 is kept in a sidecar (`DPO_DIST_CACHE_HOME`, default
    `~/.cache/dpo_dist/file_digests.json`) keyed by its path, size, mtime and inode, as make and
    rsync trust them; rewriting a file changes its mtime, so it is hashed again.
Callers hash on one rank and broadcast the result (see `collectives.on_main_broadcast`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

SIDECAR_NAME = "file_digests.json"
SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def _sidecar_path() -> Path:
    root = os.environ.get("DPO_DIST_CACHE_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dpo_dist"
    return Path(root) / SIDECAR_NAME


def _read_sidecar(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # missing or damaged: only costs a re-hash


def _write_sidecar(path: Path, entries: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-hash next time


def sha256_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def file_digests(files: list[Path]) -> dict[str, str]:
    """SHA-256 of each file (keyed by `str(path)`): a hub blob's name, a sidecar hit, or read and
    hashed (then remembered in the sidecar)."""
    sidecar = _sidecar_path()
    entries = _read_sidecar(sidecar)
    digests, changed = {}, False
    for path in files:
        real = path.resolve()
        if path.is_symlink() and real.parent.name == "blobs" and SHA256_NAME.fullmatch(real.name):
            digests[str(path)] = real.name
            continue
        key = _stat_key(real)
        entry = entries.get(str(real))
        if entry is None or entry["stat"] != key:
            entry = entries[str(real)] = {"stat": key, "sha256": sha256_of_file(real)}
            changed = True
        digests[str(path)] = entry["sha256"]
    if changed:
        _write_sidecar(sidecar, entries)
    return digests


def digest_of_files(files: list[Path]) -> str:
    """One digest for a list of files: their names and contents, in order."""
    per_file = file_digests(files)
    listing = [[path.name, per_file[str(path)]] for path in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def tokenizer_digest(tokenizer) -> str:
    """Hash of what decides the token ids (vocabulary, merges, special tokens, chat template), not
    of file bytes, so the same tokenizer re-saved elsewhere (e.g. in final/) still matches."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = {
        "backend": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template,
        "class": type(tokenizer).__name__,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def combined(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# --- cache manifests: both caches (reference log-probs, tokens) keep their fingerprint the same way ---


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def read_manifest(folder: Path, what: str) -> dict | None:
    """`folder/manifest.json`, None when there is none; a corrupt one is a UserError."""
    from dpo_dist.errors import UserError

    path = folder / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as err:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise UserError(f"{what} {path} is corrupt ({getattr(err, 'msg', None) or err}); rebuild it") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{what} {path} is corrupt (not a JSON object); rebuild it")
    return manifest


def changed_parts(manifest: dict, parts: dict[str, str]) -> list[str]:
    """The fingerprint parts in which `manifest` differs from `parts` ([] when it matches)."""
    if manifest.get("fingerprint") == combined(parts):
        return []
    old = manifest.get("fingerprint_parts", {})
    return [k for k in sorted(set(parts) | set(old)) if parts.get(k) != old.get(k)] or ["fingerprint"]
