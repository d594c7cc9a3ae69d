"""The one exception type for mistakes a user can fix (bad config, bad data, stale cache).

The CLI prints its message on one line and exits with code 2, without a traceback; every other
exception is a bug and keeps its traceback.
"""


from collections.abc import Callable


class UserError(Exception):
    """A problem in the user's input: the message says what, where, and how to fix it."""


PREEMPTED_EXIT_CODE = 85


class Preempted(Exception):
    """Training stopped on SIGUSR1/SIGTERM after saving a checkpoint; `resume=auto` continues it.

    The CLI exits with PREEMPTED_EXIT_CODE, which launch/slurm/dpo.sbatch turns into a requeue.
    """


class RunStopped(UserError):
    """Training stopped on a fault it cannot train through (a non-finite loss or gradient, a full
    disk); the message says where, and which checkpoint is left to resume from."""


class Terminated(Exception):
    """SIGTERM outside the training loop (tokenization, the reference pass): the CLI says what was
    kept and exits with PREEMPTED_EXIT_CODE, as a preempted training run does."""


_stage: dict = {"doing": "start-up", "kept": lambda: "nothing was written yet"}


def set_stage(doing: str, kept: Callable[[], str]) -> None:
    """What the command does now, and a function saying what an interruption leaves and how to go
    on: the CLI's last line after Ctrl-C or SIGTERM."""
    _stage.update(doing=doing, kept=kept)


def interrupted_line(how: str) -> str:
    """e.g. 'interrupted (Ctrl-C) during the reference pass; kept: ...'."""
    return f"interrupted ({how}) during {_stage['doing']}; kept: {_stage['kept']()}"
