"""One run per output folder: an advisory lock on `OUTPUT_DIR/.dpo_dist.lock`, held for the run's life.

The main process takes it (`fcntl.flock`; the kernel releases it on any exit, a crash or SIGKILL
included, so a lock left by a dead run is never in the way) and writes who holds it: host, pid,
Slurm job and start time, for the message a second run gets. Where the file system has no flock,
the holder's record decides: a live pid on this host holds it, a dead one is stale. A Slurm requeue
of the same job (same SLURM_JOB_ID, another SLURM_RESTART_COUNT) always gets it: its earlier
incarnation is gone, even if a lost node's lock on a network file system has not expired yet.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from dpo_dist.errors import UserError

LOCK_NAME = ".dpo_dist.lock"
_held: dict[str, int] = {}  # lock path -> open descriptor, kept for the life of the process


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": os.environ.get("SLURM_RESTART_COUNT"), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _earlier_incarnation(holder: dict) -> bool:
    """Whether `holder` is this Slurm job before its requeue (same job id, an earlier restart
    count): it is gone, whatever a lost node's file lock still says. Steps of one allocation share
    the job id but not a restart count, so two runs in one allocation still exclude each other."""
    me = _me()
    return bool(holder.get("slurm_job")) and holder.get("slurm_job") == me["slurm_job"] and \
        holder.get("slurm_restart") != me["slurm_restart"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holds(holder: dict) -> bool:
    """Whether the run `holder` recorded may still be running (for file systems without flock)."""
    me = _me()
    if not holder.get("pid") or _earlier_incarnation(holder):
        return False  # no record (a fresh lock file, a released one), or this job before its requeue
    if holder.get("host") == me["host"]:
        return holder.get("pid") != me["pid"] and _alive(int(holder.get("pid", 0)))
    return True  # another host: cannot tell, assume it runs


def _describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}"


def acquire(output_dir: Path) -> None:
    """Takes the lock of `output_dir` for this process, or raises a UserError naming its holder."""
    path = Path(output_dir) / LOCK_NAME
    if str(path) in _held:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _read(fd)
        held = err.errno in (errno.EWOULDBLOCK, errno.EACCES)  # else: no flock on this file system
        if not _earlier_incarnation(holder) if held else _holds(holder):
            os.close(fd)
            hint = "choose another output_dir" if held else f"remove {path} if that run is gone"
            raise UserError(f"output_dir={output_dir} is in use by another dpo-dist run ({_describe(holder)}); "
                            f"wait for it to end, or {hint}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_me()) + "\n").encode(), 0)
    _held[str(path)] = fd


def release_all() -> None:
    """Gives every lock this process holds back (the CLI, as a command ends; the kernel would on exit)."""
    while _held:
        fd = _held.popitem()[1]
        os.ftruncate(fd, 0)  # no record: where flock is missing, the next run sees the folder free
        os.close(fd)


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        return {}
