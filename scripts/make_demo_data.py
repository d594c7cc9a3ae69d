"""Writes the demo's bundled preference data: correct vs wrong sums of two small numbers.

    python scripts/make_demo_data.py   # -> dpo_dist/demo_data/{train,eval}.jsonl

Each problem "a+b=" (a, b in 0..19) gets the correct sum as the chosen answer and several nearby
wrong sums as rejected answers. Problems, not pairs, are split: the eval problems never appear in
training, so a gain in eval accuracy means the policy learned to prefer correct sums, not answers.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "dpo_dist" / "demo_data"
WRONG_PER_PROBLEM = 6
EVAL_SHARE = 0.2


def main() -> None:
    rng = random.Random(0)
    problems = [(a, b) for a in range(20) for b in range(20)]
    rng.shuffle(problems)
    n_eval = int(len(problems) * EVAL_SHARE)
    splits = {"eval": problems[:n_eval], "train": problems[n_eval:]}
    OUT.mkdir(parents=True, exist_ok=True)
    for name, subset in splits.items():
        rows = []
        for a, b in subset:
            total = a + b
            wrong = [w for w in range(max(0, total - 6), total + 7) if w != total]
            for w in rng.sample(wrong, WRONG_PER_PROBLEM):
                rows.append({"prompt": f"{a}+{b}=", "chosen": str(total), "rejected": str(w)})
        rng.shuffle(rows)
        with (OUT / f"{name}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{name}: {len(rows)} pairs from {len(subset)} problems")


if __name__ == "__main__":
    main()
