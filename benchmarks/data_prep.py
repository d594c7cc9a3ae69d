"""Data preparation speed and memory: `dpo-dist tokenize` against a per-row loop of three tokenizer
calls (TRL's way), in one run, per core: every run has TOKENIZERS_PARALLELISM=false (one thread
per process), so a process is a core.

    python benchmarks/data_prep.py [--pairs 50000 --loop-pairs 5000]

Synthetic chat-like text pairs (prompt and both responses log-normal, a few hundred tokens each)
and a byte-level BPE tokenizer with a 32k vocabulary trained locally on them. Measured: the per-row
loop's pairs/s (on the first --loop-pairs pairs), the first `tokenize` on 1 and on 2 processes,
a second `tokenize` (cache hit), peak RSS per rank, and the RSS of an opened token store per token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, run_measured, timestamp

RSS_PROBE = """
import json, sys
from dpo_dist.config import load_config
from dpo_dist import distributed
from dpo_dist.model import loading
from dpo_dist.data import prepare_split
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
cfg = load_config(None, sys.argv[1:])
acc = distributed.build_accelerator(cfg)
tokenizer = loading.load_tokenizer(cfg.model)
before = rss()
data = prepare_split(cfg, acc, "train", cfg.data.train, tokenizer)
print(json.dumps({"bytes": rss() - before, "tokens": data.pairs.num_tokens}))
"""


def make_words(rng: random.Random, n: int) -> list[str]:
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + ["th", "st", "ng", "er", "an"]
    return ["".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))) for _ in range(n)]


def make_pairs(path: Path, n: int, seed: int = 0) -> None:
    """Text pairs whose prompt and responses have log-normal lengths (median ~150 / ~100 words)."""
    rng = random.Random(seed)
    words = make_words(rng, 60_000)
    weights = [1 / (k + 1) for k in range(len(words))]  # Zipf-like word frequencies
    cumulative = list(__import__("itertools").accumulate(weights))

    def text(median: int) -> str:
        count = max(3, min(800, int(rng.lognormvariate(math.log(median), 0.6))))
        return " ".join(rng.choices(words, cum_weights=cumulative, k=count))

    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": "User: " + text(150) + "\nAssistant:",
                                "chosen": " " + text(100), "rejected": " " + text(100)}) + "\n")


def make_tokenizer(path: Path, data: Path, sample: int = 20_000):
    from dpo_dist.tiny import build_tokenizer

    texts = []
    with data.open() as f:
        for _, line in zip(range(sample), f):
            row = json.loads(line)
            texts += [row["prompt"], row["chosen"], row["rejected"]]
    tokenizer = build_tokenizer(texts, vocab_size=32_000)
    tokenizer.save_pretrained(path)
    return tokenizer


def per_row_loop(tokenizer, data: Path, n: int) -> float:
    """TRL 1.16's tokenization, row by row: prompt, prompt+chosen, prompt+rejected. Returns pairs/s."""
    rows = []
    with data.open() as f:
        for _, line in zip(range(n), f):
            rows.append(json.loads(line))
    eos = tokenizer.eos_token
    start = time.perf_counter()
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        chosen = tokenizer(row["prompt"] + row["chosen"] + eos)["input_ids"]
        rejected = tokenizer(row["prompt"] + row["rejected"] + eos)["input_ids"]
        n_prompt = next((k for k, (a, b) in enumerate(zip(prompt, chosen)) if a != b), len(prompt))
        _ = chosen[n_prompt:], rejected[n_prompt:]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=50_000)
    parser.add_argument("--loop-pairs", type=int, default=5_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "pairs.jsonl"
        make_pairs(data, args.pairs)
        tokenizer = make_tokenizer(tmp / "model", data)
        from dpo_dist.tiny import save_tiny_model

        save_tiny_model(tmp / "model", [], tokenizer=tokenizer)  # a model folder around the tokenizer
        os.environ["DPO_DIST_CACHE_HOME"] = str(tmp / "digests")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process, the loop's too
        loop = per_row_loop(tokenizer, data, args.loop_pairs)
        common = ["-m", "dpo_dist", "tokenize", f"model.policy={tmp / 'model'}", f"data.train={data}",
                  "data.max_length=4096", f"output_dir={tmp / 'out'}"]
        one = run_measured([*common, f"data.cache_dir={tmp / 'one'}"])
        two = run_measured(["-m", "accelerate.commands.launch", "--config_file",
                            str(REPO / "launch" / "accelerate" / "ddp_cpu.yaml"), *common,
                            f"data.cache_dir={tmp / 'two'}"])
        hit = run_measured([*common, f"data.cache_dir={tmp / 'one'}"])
        probe = subprocess.run([sys.executable, "-c", RSS_PROBE, *common[3:], f"data.cache_dir={tmp / 'one'}"],
                               capture_output=True, text=True, cwd=REPO, check=True)
        opened = json.loads(probe.stdout.strip().splitlines()[-1])

    print(f"\n{args.pairs} text pairs, {opened['tokens'] / args.pairs:.0f} tokens stored per pair "
          f"(prompt+chosen and prompt+rejected), BPE vocabulary 32000, 2 CPU cores; {timestamp()}\n")
    print("| preparation | pairs/s | pairs/s per core | wall (s) | peak RSS per rank (MiB) | per core vs per-row loop |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| per-row loop, 3 tokenizer calls per pair (TRL), first {args.loop_pairs} pairs | {loop:.0f} | {loop:.0f} | "
          f"{args.pairs / loop:.0f} (projected) | — | 1.0x |")
    for name, cores, r in (("`dpo-dist tokenize`, 1 process", 1, one), ("`dpo-dist tokenize`, 2 processes", 2, two)):
        rate = args.pairs / r["seconds"]
        print(f"| {name}, end to end | {rate:.0f} | {rate / cores:.0f} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | "
              f"{rate / cores / loop:.1f}x |")
        stage = float(re.search(r"tokenized \d+ rows on \d+ process\(es\) in ([\d.]+) s", r["stdout"]).group(1))
        print(f"| {name}, the tokenizing stage (its log line) | {args.pairs / stage:.0f} | "
              f"{args.pairs / stage / cores:.0f} | {stage:.1f} | — | {args.pairs / stage / cores / loop:.1f}x |")
    print(f"| second run: cache hit, 1 process | {args.pairs / hit['seconds']:.0f} | — | {hit['seconds']:.1f} | "
          f"{hit['peak_mib']:.0f} | — |")
    print(f"\nopened token store: RSS +{opened['bytes'] / 2**20:.1f} MiB for {opened['tokens'] / 1e6:.1f}M tokens "
          f"= {opened['bytes'] / opened['tokens']:.3f} bytes per token (memory-mapped)")


if __name__ == "__main__":
    main()
