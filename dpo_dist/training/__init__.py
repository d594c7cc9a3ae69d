"""DPO training: the loop and its parts.

trainer.py     the loop, top to bottom: steps, evaluation, checkpoints, export
losses.py      pure per-pair losses (the TRL 1.16 family) and a registry
metrics.py     metric sums on device, reduced once per log line; trackers
checkpoint.py  atomic sharded checkpoints, resume checks, Hugging Face export
"""
