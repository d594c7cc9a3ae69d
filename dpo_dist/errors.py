"""The one exception type for mistakes a user can fix (bad config, bad data, stale cache).

The CLI prints its message on one line and exits with code 2, without a traceback; every other
exception is a bug and keeps its traceback.
"""


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
