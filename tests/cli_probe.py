"""Launched by multi-process tests: runs the real CLI (`dpo-dist ARGS`) and reports, per rank, how
each reference model that `reference.engine.load_reference` hands out is held, whether any is still alive
when the policy is built, the dtypes of its trained and frozen weights once prepared, how many files this rank hashed for the fingerprint, how many rows it
tokenized, and what the splits it opened hold: JSON lines in $PROBE_DIR/rank-R.jsonl (a file per
rank: lines of two ranks on one stdout can interleave)."""

import gc
import hashlib
import json
import os
import sys
import weakref

import numpy as np

from dpo_dist import cli, distributed, fingerprint, session
from dpo_dist.data import token_cache
from dpo_dist.reference import engine

load_reference = engine.load_reference
prepare_policy = distributed.prepare_policy
sha256_of_file = fingerprint.sha256_of_file
load_splits = session.load_splits
tokenize_rows = token_cache.tokenize_rows
hashed = []
tokenized_rows = []
references = []


def probe(record: dict) -> None:
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(os.environ["PROBE_DIR"], f"rank-{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"rank": rank, **record}) + "\n")


def probing_load_reference(cfg, accelerator):
    model = load_reference(cfg, accelerator)
    params = list(model.parameters())
    probe({
        "kind": "reference",
        "engine": type(model).__name__,
        "held": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
        "full": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params),
        "fractions": [p.ds_tensor.numel() / p.ds_numel for p in params if hasattr(p, "ds_tensor") and p.ds_numel > 1000],
        "unpartitioned": sum(not hasattr(p, "ds_tensor") for p in params),
        "requires_grad": sum(p.requires_grad for p in params),
    })
    references.append(weakref.ref(model))
    return model


def probing_prepare_policy(cfg, accelerator, *args, **kwargs):
    gc.collect()
    probe({"kind": "policy", "references_alive": sum(ref() is not None for ref in references)})
    model, optimizer, scheduler = prepare_policy(cfg, accelerator, *args, **kwargs)
    params = list(accelerator.unwrap_model(model).named_parameters())
    probe({"kind": "prepared", "trained_dtypes": sorted({str(p.dtype) for _, p in params if p.requires_grad}),
           "frozen_dtypes": sorted({str(p.dtype) for _, p in params if not p.requires_grad})})
    return model, optimizer, scheduler


def counting_sha256_of_file(path):
    hashed.append(str(path))
    return sha256_of_file(path)


def counting_tokenize_rows(rows, *args, **kwargs):
    tokenized_rows.extend(where for where, _ in rows)
    return tokenize_rows(rows, *args, **kwargs)


def probing_load_splits(*args, **kwargs):
    splits = load_splits(*args, **kwargs)
    for name, data in splits.items():
        ids = [part.ids for part in data.pairs.parts]
        probe({"kind": "split", "split": name, "pairs": len(data.pairs),
               "ids_sha256": hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in ids)).hexdigest(),
               "memory_mapped": all(isinstance(a, np.memmap) for a in ids)})
    return splits


engine.load_reference = probing_load_reference
session.load_splits = probing_load_splits
token_cache.tokenize_rows = counting_tokenize_rows
distributed.prepare_policy = probing_prepare_policy
fingerprint.sha256_of_file = counting_sha256_of_file
try:
    cli.main(sys.argv[1:])
finally:
    probe({"kind": "hashes", "files_hashed": len(hashed)})
    probe({"kind": "tokenized", "rows": tokenized_rows})
