"""What dpo_dist may delete or replace: only what it wrote itself.

Every folder the project creates carries a marker file, `.dpo_dist.json`, naming what it is (a run's
output folder, a reference cache, a token cache, the checkpoints, an exported model). Before a folder
is written into, `claim` checks it is either new, empty, or already marked as that kind; a cache
folder holding files a cache never writes is refused, naming them. A rebuild (`remove_own`)
deletes only the files a cache of that kind writes, after checking there is nothing else there; a
folder replaced whole (`replace_folder`: an exported model) must carry the marker (or be an
earlier version's export inside a dpo_dist run folder). So a
`ref_cache.dir` pointed at a shared `runs/` folder with `ref_cache.overwrite=true` deletes nothing.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

from dpo_dist.errors import UserError

MARKER = ".dpo_dist.json"
_TMP = r"\..+\.tmp\d+"  # a file being written: `.NAME.tmpPID`, renamed into place when whole

# The files each kind of folder holds when dpo_dist alone wrote it (paths relative to the folder).
OWN_FILES = {
    "reference cache": re.compile(rf"(manifest\.json|(train|eval)-\d{{5}}\.safetensors|{_TMP})"),
    "token cache": re.compile(
        rf"(train|eval)(/(manifest\.json|part-\d{{6}}\.(index|offsets|starts|ids)\.npy|part-\d{{6}}\.json|{_TMP}))?"),
    "checkpoints": re.compile(r"(latest|\.latest\.tmp|(\.tmp-)?step-\d{6})(/.*)?"),
    # What `save_pretrained` of a model, its tokenizer and a LoRA adapter write (how an export made
    # before exports were marked is recognised in a run folder).
    "model export": re.compile(r"(merged/)?(config\.json|generation_config\.json|model(-\d{5}-of-\d{5})?\.safetensors|"
                               r"model\.safetensors\.index\.json|tokenizer[\w.]*|special_tokens_map\.json|vocab\.json|"
                               r"merges\.txt|chat_template\.jinja|adapter_config\.json|adapter_model\.safetensors|"
                               r"README\.md|best\.json|merged)"),
}


def marker(folder: Path) -> dict:
    """What `folder`'s marker says ({} when it has none, or an unreadable one)."""
    try:
        found = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def marker_kind(folder: Path) -> str | None:
    """The kind `folder`'s marker names; None when it has none."""
    return marker(folder).get("kind")


def foreign_entries(folder: Path, kind: str) -> list[str]:
    """What in `folder` a `kind` folder would not hold (its top-level names, for the message): a
    name it does not write, or a link (dpo_dist writes none; deleting through one would reach
    another folder)."""
    own = OWN_FILES[kind]
    foreign = {str(p.relative_to(folder)).split("/")[0] for p in folder.rglob("*")
               if p.name != MARKER and (p.is_symlink() or not own.fullmatch(str(p.relative_to(folder))))}
    return sorted(foreign)


def _mark(folder: Path, kind: str, **details: str) -> None:
    tmp = folder / f".{MARKER}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"kind": kind, "written_by": "dpo_dist", **details}) + "\n")
    os.replace(tmp, folder / MARKER)


def check_claim(folder: Path, kind: str, key: str) -> None:
    """Refuses in one line, writing nothing, a `folder` (config key `key`) that dpo_dist may not use
    as a `kind`: a file, another kind's folder, or (for the kinds in OWN_FILES) a folder holding
    anything else. Run before any work, so a refused run leaves nothing behind."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{key}={folder} is a file, not a folder; choose a folder for it")
    marked = marker_kind(folder) if folder.is_dir() else None
    if marked is not None and marked != kind:
        raise UserError(f"{key}={folder} is a dpo_dist {marked} folder, not a {kind} folder; give each its own folder")
    if marked is None and folder.is_dir() and kind in OWN_FILES:
        foreign = foreign_entries(folder, kind)
        if foreign:
            raise UserError(f"{key}={folder} holds files a {kind} does not write ({_listing(foreign)}); "
                            f"a {kind} needs a folder of its own: point {key} at a new or empty folder")


def claim(folder: Path, kind: str, key: str) -> Path:
    """Makes `folder` a `kind` folder of dpo_dist's (created and marked), or refuses (`check_claim`)."""
    folder = Path(folder)
    check_claim(folder, kind, key)
    if marker_kind(folder) is None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _mark(folder, kind)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
                raise
            raise UserError(f"{key}={folder}: cannot write there ({err.strerror}); choose a writable folder") from None
    return folder


def remove_own(folder: Path, kind: str, key: str, below: str | None = None) -> None:
    """Deletes the files a `kind` folder writes (only those under `below`, a sub-folder, if given),
    after checking `folder` is marked as that kind and holds nothing else; else refuses, deleting
    nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if marker_kind(folder) != kind:
        raise UserError(f"{key}={folder} was not written by dpo_dist as a {kind} (no {MARKER} marker); "
                        "refusing to delete anything in it; point it at a folder of its own")
    foreign = foreign_entries(folder, kind)
    if foreign:
        raise UserError(f"{key}={folder} holds files a {kind} does not write ({_listing(foreign)}); "
                        "refusing to delete anything in it")
    target = folder / below if below else folder  # (a link there is foreign: refused above)
    for path in sorted(target.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.name == MARKER and path.parent == folder:
            continue
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    if below and target.is_dir():
        target.rmdir()


def fresh_folder(tmp: Path, kind: str, **details: str) -> Path:
    """An empty temp folder `tmp` to write a `kind` into, marked (with `details`); a leftover of an
    earlier try is removed only if dpo_dist marked it."""
    tmp = Path(tmp)
    if tmp.exists():
        check_replaceable(tmp, kind)
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _mark(tmp, kind, **details)
    return tmp


def check_replaceable(path: Path, kind: str) -> None:
    """Refuses, before anything is written, to replace `path` unless dpo_dist wrote it as `kind`
    (or it is absent or empty, or an earlier version's export in a run folder)."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir() or path.is_symlink():
        raise UserError(f"{path} is a file or a link; refusing to replace it with a folder")
    # An unmarked folder may be replaced if it is empty, or if it is an export of an earlier version
    # in a run folder of dpo_dist's (a user's own model folder elsewhere is never taken for one).
    earlier_export = marker_kind(path.parent) == "run" and not foreign_entries(path, kind)
    if marker_kind(path) != kind and any(path.iterdir()) and not earlier_export:
        raise UserError(f"{path} exists and was not written by dpo_dist (no {MARKER} marker naming a {kind}); "
                        "refusing to replace it: choose a new folder, or move it away yourself")


def replace_folder(tmp: Path, path: Path, kind: str) -> None:
    """Moves the whole folder `tmp` (a `fresh_folder`, now written) to `path`, replacing what is
    there only if dpo_dist wrote it as that kind (`check_replaceable`)."""
    path = Path(path)
    check_replaceable(path, kind)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _listing(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
