"""Launched by fault tests: the real CLI (`dpo-dist ARGS`) with the loss of the optimizer steps
listed in $NAN_AT_STEPS (1-based, comma-separated) turned into NaN, as a diverging run would."""

import os
import sys

import torch

from dpo_dist import cli
from dpo_dist.training import trainer

NAN_AT = {int(s) for s in os.environ.get("NAN_AT_STEPS", "").split(",") if s}
train_step = trainer.Trainer.train_step
preference_loss = trainer.preference_loss
current = {"step": 0}


def tracking_train_step(self, positions, sums):
    current["step"] = self.step + 1
    return train_step(self, positions, sums)


def poisoned_loss(*args, **kwargs):
    out = preference_loss(*args, **kwargs)
    if current["step"] in NAN_AT:
        out.losses = out.losses * torch.tensor(float("nan"))
    return out


trainer.Trainer.train_step = tracking_train_step
trainer.preference_loss = poisoned_loss
sys.exit(cli.main(sys.argv[1:]))
