"""What resuming under another layout costs: a ZeRO checkpoint's own save, its conversion to a
universal checkpoint (once, at the first restart under another layout), and the restarts.

    python benchmarks/reshard_cost.py [--hidden 1024 --layers 8 --stage 2]

A ZeRO-STAGE run on 2 processes (`accelerate launch`, gloo) writes a checkpoint at steps 1 and 2;
step 2 is then resumed as 1 process without DeepSpeed (converted), and again (the conversion
reused). The alternative — saving in a layout-independent form — would pay the conversion at every
save; the table gives both, per checkpoint, and the disk each holds.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, make_data, make_model, timestamp
from safetensors.torch import load_file


def launch(args: list[str], processes: int, stage: int) -> tuple[str, float]:
    start = [sys.executable]
    if processes > 1:
        start += ["-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "launch" / "accelerate" / f"zero{stage}_cpu.yaml"), "--main_process_port", "29790"]
    t = time.perf_counter()
    out = subprocess.run([*start, "-m", "dpo_dist", "train", *args], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if out.returncode != 0:
        raise RuntimeError(f"benchmark run failed:\n{out.stderr[-3000:]}")
    return out.stdout, time.perf_counter() - t


def mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model", args.hidden, args.layers)
        params = sum(t.numel() for t in load_file(model / "model.safetensors").values())
        data = make_data(tmp / "data.jsonl", 8, prompt_words=(4, 16), response_words=(2, 8))
        common = [f"model.policy={model}", f"data.train={data}", f"ref_cache.dir={tmp / 'cache'}",
                  "train.global_batch_size=2", "train.micro_batch_size=1", "train.save_every=1",
                  "train.keep_last=5", "train.max_steps=3", "train.report_to=none"]
        out = tmp / "run"
        stdout, _ = launch([*common, f"output_dir={out}", "train.max_steps=2"], 2, args.stage)
        saves = [float(s) for s in re.findall(r"checkpoint step-\d+ saved in ([\d.]+) s", stdout)]
        checkpoint = out / "checkpoints" / "step-000002"
        native_mib = mib(checkpoint)

        restarts = []
        for _ in range(2):
            shutil.rmtree(out / "checkpoints" / "step-000003", ignore_errors=True)
            shutil.rmtree(out / "final", ignore_errors=True)
            (out / "checkpoints" / "latest").write_text("step-000002\n")
            stdout, seconds = launch([*common, f"output_dir={out}", "resume=auto"], 1, args.stage)
            converted = re.search(r"converted in ([\d.]+) s", stdout)
            restarts.append((seconds, float(converted.group(1)) if converted else None))
        universal_mib = mib(checkpoint / "universal")

    save = sum(saves) / len(saves)
    convert = restarts[0][1]
    print(f"\nmodel: Llama hidden {args.hidden} x {args.layers} layers, {params / 1e6:.0f}M parameters, fp32 AdamW; "
          f"ZeRO-{args.stage} x 2 processes -> 1 process; {timestamp()}\n")
    print("| per checkpoint | seconds | disk (MiB) |\n|---|---:|---:|")
    print(f"| save in the run's own layout (what dpo_dist does) | {save:.2f} | {native_mib:.0f} |")
    print(f"| conversion to universal (once, at the first restart under another layout) | {convert:.2f} | "
          f"{universal_mib:.0f} |")
    print(f"| a layout-independent save (own layout + conversion, at every save) | {save + convert:.2f} | "
          f"{native_mib + universal_mib:.0f} |")
    print("\n| restart of step 2 as 1 process | wall (s) |\n|---|---:|")
    print(f"| first (converts) | {restarts[0][0]:.1f} |\n| second (reuses the conversion) | {restarts[1][0]:.1f} |")


if __name__ == "__main__":
    main()
