"""Launched by test_distributed.py under `accelerate launch`: builds the real Trainer and reports,
per rank, what the distributed setup looks like (one JSON line prefixed PROBE)."""

import json
import sys

from dpo_dist.data.batching import rank_share
from dpo_dist.config import load_config
from dpo_dist.training.trainer import Trainer

trainer = Trainer(load_config(None, sys.argv[1:]))
acc = trainer.accelerator
_, positions = trainer.plan.step_positions(0)
share = rank_share(positions, acc.num_processes, acc.process_index, trainer.cfg.train.grad_accum)
params = list(acc.unwrap_model(trainer.model).parameters())
held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
print("PROBE " + json.dumps({
    "rank": acc.process_index,
    "num_processes": acc.num_processes,
    "first_step_pairs": [trainer.splits["train"].pairs[p].index for part, _ in share for p in part],
    "held": held,
    "full": full,
    "per_param_fraction": sorted({round(p.ds_tensor.numel() / p.ds_numel, 3) for p in params if hasattr(p, "ds_tensor")}),
}), flush=True)
trainer.close()
