"""Launched by test_reference_at_scale.py: runs the real CLI (`dpo-dist ARGS`) and reports, per rank,
how each reference model that `distributed.load_reference` hands out is held (one line prefixed PROBE)."""

import json
import sys

from dpo_dist import cli, distributed

load_reference = distributed.load_reference


def probing_load_reference(cfg, accelerator):
    model = load_reference(cfg, accelerator)
    params = list(model.parameters())
    print("PROBE " + json.dumps({
        "rank": accelerator.process_index,
        "engine": type(model).__name__,
        "held": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
        "full": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params),
        "fractions": [p.ds_tensor.numel() / p.ds_numel for p in params if hasattr(p, "ds_tensor") and p.ds_numel > 1000],
        "unpartitioned": sum(not hasattr(p, "ds_tensor") for p in params),
        "requires_grad": sum(p.requires_grad for p in params),
    }), flush=True)
    return model


distributed.load_reference = probing_load_reference
cli.main(sys.argv[1:])
