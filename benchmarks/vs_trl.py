"""dpo_dist vs TRL 1.16 DPOTrainer, side by side in one invocation, on the CPU.

    python benchmarks/vs_trl.py [--pairs 96 --batch 8 --repeats 3 --hidden 256 --layers 4 --shape loguniform]

Same locally built Llama, same variable-length pairs, same global batch, one epoch each.
--shape loguniform: prompt 8-300 words, responses 4-200 (log-uniform); long_prompt: prompt 120-480
words, responses 40-160 (prompts ~3x the responses, as in multi-turn data); short: prompt 8-40,
responses 4-30 (with --hidden 1024 --layers 8: a weight-bound ~70M model, where peak memory is the
training state). Runs, interleaved, `--repeats` times:
  trl           DPOTrainer, the reference model resident and run every step, fp32 without
                gradient checkpointing (as dpo_dist runs here)
  trl_defaults  DPOTrainer as configured out of the box: bf16 autocast, gradient checkpointing
  trl_precomp   DPOTrainer fp32 with precompute_ref_log_probs=True (its reference pass included)
  dpo_dist      dpo-dist precompute + train with packing, prefix sharing off (the cache pass
                included: it is part of epoch 1's cost)
  dpo_dist_padded   the same with train.packing=false (one padded row per sequence, as TRL)
  dpo_dist_shared   packing and train.prefix_sharing (each pair's prompt computed once), fp32
  dpo_dist_bf16     the same with train.mixed_precision=bf16: autocast over fp32 weights
  dpo_dist_bf16_weights   bf16 weights (model.dtype=bfloat16) with fp32 master weights in the optimizer
All dpo_dist runs but the bf16 ones set train.mixed_precision=fp32 (auto would pick bf16 on a GPU).
Each run is its own child process; time covers building the trainer through the end of training
and what a run leaves behind (model loading included for all). Both sides write the same: a final
resumable checkpoint (weights and Adam state; TRL's default save strategy writes one when training
ends, as train.save_every=0 does) and the exported model (TRL: trainer.save_model(), as its
scripts end). "training pairs/s" leaves start-up and saving out on both sides: TRL's own
train_runtime (its reference forwards are in it, but not trl_precomp's reference pass, which
DPOTrainer's constructor runs) less its checkpoint save, against dpo_dist's reference pass plus
its training loop (metrics.jsonl's pairs_per_s). Prints a table of medians and writes
benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, make_data, make_model, timestamp  # noqa: E402

# Each dpo_dist run's settings on top of the defaults (packing and prefix sharing on).
DPO_DIST_MODES = {
    "dpo_dist": ["train.prefix_sharing=false", "train.mixed_precision=fp32"],
    "dpo_dist_padded": ["train.packing=false", "train.prefix_sharing=false", "train.mixed_precision=fp32"],
    "dpo_dist_shared": ["train.mixed_precision=fp32"],
    "dpo_dist_bf16": ["train.mixed_precision=bf16"],
    "dpo_dist_bf16_weights": ["train.mixed_precision=bf16", "model.dtype=bfloat16"],
}
MODES = ("trl", "trl_defaults", "trl_precomp", *DPO_DIST_MODES)
SHAPES = {"loguniform": {}, "long_prompt": {"prompt_words": (120, 480), "response_words": (40, 160)},
          "short": {"prompt_words": (8, 40), "response_words": (4, 30)}}


def epoch_work(model: Path, data: Path, max_length: int, batch: int) -> dict[str, int]:
    """Tokens of one epoch ("tokens": prompt + both responses per pair) and the token slots
    (rows x width of every micro-batch, what the linear layers compute) that each layout gives
    the epoch's global batches: one padded row per sequence, as TRL; packed; packed and shared."""
    from transformers import AutoTokenizer

    from dpo_dist.data.batching import StepPlan, collate
    from dpo_dist.config import TrainConfig
    from dpo_dist.data import load_preference_data

    pairs = load_preference_data(str(data), AutoTokenizer.from_pretrained(model), max_length, "keep_start").pairs
    plan = StepPlan(len(pairs), batch, seed=TrainConfig().seed)  # the order the timed dpo_dist runs train in
    work = {"tokens": sum(p.num_tokens for p in pairs), "padded": 0, "packed": 0, "shared": 0}
    for step in range(plan.steps_per_epoch):
        step_pairs = [pairs[k] for k in plan.step_positions(step)[1]]
        for layout, kwargs in (("padded", {}), ("packed", {"packing": "block_mask"}),
                               ("shared", {"packing": "block_mask", "share_prefix": True})):
            work[layout] += collate(step_pairs, 0, **kwargs).input_ids.numel()
    return work


def timed(function, seconds: list[float]):
    """`function`, adding the wall time of each call to `seconds`."""
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - began)

    return wrapper


def child(mode: str, model: Path, data: Path, work: Path, batch: int, max_length: int, device: str, attn: str) -> dict:
    """One timed run in this (fresh) process; returns seconds and peak RSS."""
    start = time.perf_counter()
    if mode.startswith("dpo_dist"):
        from dpo_dist.cli import main
        from dpo_dist.reference import precompute

        reference_seconds = []
        precompute._reference_pass = timed(precompute._reference_pass, reference_seconds)

        common = [f"model.policy={model}", f"data.train={data}", f"data.max_length={max_length}",
                  "data.truncation=keep_start", f"ref_cache.dir={work / 'cache'}", f"train.eval_batch_size={batch}",
                  f"model.attn_implementation={attn}", *DPO_DIST_MODES[mode]]
        try:
            main(["precompute", f"output_dir={work / 'pre'}", *common])
            main(["train", f"output_dir={work / 'run'}", *common, f"train.micro_batch_size={batch}",
                  "train.lr=1e-6", "train.save_every=0", "train.log_every=1000", "resume=null"])
        except SystemExit as stop:
            if stop.code:
                raise
        last = json.loads((work / "run" / "metrics.jsonl").read_text().splitlines()[-1])  # one window: the loop
        training = sum(reference_seconds) + last["pairs"] / last["pairs_per_s"]
    else:
        from datasets import load_dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(
            output_dir=str(work / "trl"), use_cpu=device == "cpu", report_to=[], per_device_train_batch_size=batch,
            num_train_epochs=1, learning_rate=1e-6, logging_steps=1000,
            max_length=max_length, precompute_ref_log_probs=mode == "trl_precomp",
            precompute_ref_batch_size=batch, dataloader_num_workers=0, disable_tqdm=True,
            # TRL 1.16 defaults to bf16 and gradient checkpointing; the other TRL runs are fp32 without
            # recomputation, as dpo_dist's fp32 runs.
            bf16=mode == "trl_defaults", gradient_checkpointing=mode == "trl_defaults",
        )
        trainer = DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model, attn_implementation=attn),
            ref_model=AutoModelForCausalLM.from_pretrained(model, attn_implementation=attn),
            args=args, train_dataset=load_dataset("json", data_files=str(data), split="train"),
            processing_class=AutoTokenizer.from_pretrained(model),
        )
        # TRL's default strategy saves every 500 steps and when training ends; these runs are shorter.
        saving = []
        trainer._save_checkpoint = timed(trainer._save_checkpoint, saving)
        training = trainer.train().metrics["train_runtime"] - sum(saving)
        if not saving:
            raise RuntimeError("TRL wrote no checkpoint at the end of training")
        trainer.save_model(str(work / "trl" / "final"))
    return {"seconds": time.perf_counter() - start, "training_seconds": training,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def torch_device_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--shape", choices=SHAPES, default="loguniform")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--attn", default="sdpa", help="model.attn_implementation of every run (TRL's too)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.work / "model", args.work / "data.jsonl", args.work,
                                              args.batch, args.max_length, args.device, args.attn)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model(work / "model", args.hidden, args.layers)
        data = make_data(work / "data.jsonl", args.pairs, **SHAPES[args.shape])
        work_done = epoch_work(model, data, args.max_length, args.batch)
        tokens = work_done["tokens"]
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for r in range(args.repeats):
            for mode in MODES:
                run_dir = work / f"{mode}-{r}"
                run_dir.mkdir()
                for name in ("model", "data.jsonl"):
                    (run_dir / name).symlink_to(work / name)
                out = subprocess.run(
                    [sys.executable, __file__, "--child", mode, "--work", str(run_dir), "--batch", str(args.batch),
                     "--max_length", str(args.max_length), "--device", args.device, "--attn", args.attn],
                    cwd=REPO, capture_output=True, text=True,
                    env={**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"},
                )
                lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
                if out.returncode or not lines:
                    raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
                runs[mode].append(json.loads(lines[-1][7:]))
                print(f"repeat {r + 1}/{args.repeats} {mode}: {runs[mode][-1]['seconds']:.1f} s", flush=True)

    med = {m: {k: statistics.median(x[k] for x in runs[m]) for k in ("seconds", "training_seconds", "peak_mib")}
           for m in MODES}
    rows = []
    for m in MODES:
        pairs_s = args.pairs / med[m]["seconds"]
        rows.append((m, pairs_s, tokens / med[m]["seconds"], med[m]["peak_mib"], args.pairs / med[m]["training_seconds"]))
    base = {m: (p, mem, t) for m, p, _, mem, t in rows}
    table = [
        "| run | pairs/s | tokens/s | peak RSS (MiB) | pairs/s vs trl | pairs/s vs trl_defaults | "
        "pairs/s vs trl_precomp | memory vs trl | memory vs trl_defaults | training pairs/s | "
        "training vs trl_defaults |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, pairs_s, tokens_s, mem, training in rows:
        table.append(f"| {m} | {pairs_s:.2f} | {tokens_s:.0f} | {mem:.0f} | {pairs_s / base['trl'][0]:.2f}x | "
                     f"{pairs_s / base['trl_defaults'][0]:.2f}x | {pairs_s / base['trl_precomp'][0]:.2f}x | "
                     f"{mem / base['trl'][1]:.2f}x | {mem / base['trl_defaults'][1]:.2f}x | {training:.2f} | "
                     f"{training / base['trl_defaults'][2]:.2f}x |")
    where = f"CPU ({os.cpu_count()} cores)" if args.device == "cpu" else torch_device_name()
    header = (f"Llama hidden {args.hidden} x {args.layers} layers (vocab 512), {args.pairs} pairs "
              f"({tokens} tokens, {args.shape} prompt+response lengths), global batch {args.batch}, one epoch, "
              f"fp32 but trl_defaults (bf16 autocast, gradient checkpointing) and dpo_dist_bf16* (bf16 autocast; "
              f"_weights: bf16 weights, fp32 masters), {args.attn}, {where}; "
              f"median of {args.repeats} interleaved repeats; {timestamp()}.")
    command = (f"python benchmarks/vs_trl.py --pairs {args.pairs} --batch {args.batch} --repeats {args.repeats} "
               f"--hidden {args.hidden} --layers {args.layers} --shape {args.shape}")
    if (args.device, args.attn) != ("cpu", "sdpa"):
        command += f" --device {args.device} --attn {args.attn}"
    slots = (f"Token slots per epoch (rows x width of the micro-batches, what the linear layers compute): "
             f"padded {work_done['padded']} (TRL's layout), packed {work_done['packed']}, shared {work_done['shared']}. "
             f"Both sides run about four forwards' worth over their slots per epoch (forward + backward, and one "
             f"reference forward: TRL's every step, dpo_dist's once, in the cache pass), so where compute is "
             f"linear in tokens the ceilings are: packed {work_done['padded'] / work_done['packed']:.2f}x and "
             f"shared {work_done['padded'] / work_done['shared']:.2f}x trl; shared "
             f"{work_done['packed'] / work_done['shared']:.2f}x packed.")
    text = "\n".join([header, "", *table, "", slots, "", f"Command: `{command}`"])
    print("\n" + text)
    name = "results.md" if args.shape == "loguniform" else f"results-{args.shape}.md"
    if args.device != "cpu":
        name = name.replace("results", f"results-{args.device}-{args.attn}")
    (REPO / "benchmarks" / name).write_text("# dpo_dist vs TRL 1.16 DPOTrainer\n\n" + text + "\n")


if __name__ == "__main__":
    main()
