#!/usr/bin/env bash
# What to run the first time a GPU is lent (about 20 minutes on one H100), so that session measures
# instead of guessing. From the repository root, after the README's install:
#     bash benchmarks/gpu_check.sh            # logs and tables under $OUT (the device tool's) or gpu_results/
# 1. attention backends vs the padded path, log-probs and gradients, fp32 and bf16
#    (FlexAttention's backward and flash varlen cannot be checked on the CPU);
# 2. bf16 training under ZeRO-2 and ZeRO-3 on one GPU, sdpa and flex_attention, through accelerate;
# 3. pairs/s and tokens/s against TRL 1.16 (fp32 and its defaults), sdpa and flex_attention.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
work="$(mktemp -d)"
status=0
step() {  # step NAME COMMAND...: runs it, logs to $out/NAME.log, keeps going on failure
  local name="$1"; shift
  echo "== $name: $*"
  if ! "$@" >"$out/$name.log" 2>&1; then
    echo "   FAILED (see $out/$name.log)"; status=1
  fi
  tail -n 12 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)"

step equality_fp32 python benchmarks/gpu_equality.py --dtype float32
step equality_bf16 python benchmarks/gpu_equality.py --dtype bfloat16

python - "$work" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from common import make_data, make_model
make_model(Path(sys.argv[1]) / "model", hidden=1024, layers=8)
make_data(Path(sys.argv[1]) / "data.jsonl", 512, prompt_words=(120, 480), response_words=(40, 160))
PY
for zero in zero2 zero3; do
  for attn in sdpa flex_attention; do
    step "train_${zero}_${attn}" accelerate launch --config_file "launch/accelerate/$zero.yaml" --num_processes 1 \
      -m dpo_dist train "output_dir=$work/run_${zero}_${attn}" "model.policy=$work/model" \
      "data.train=$work/data.jsonl" model.dtype=bfloat16 "model.attn_implementation=$attn" \
      train.micro_batch_size=8 train.max_steps=40 train.log_every=10 train.save_every=20 "ref_cache.dir=$work/cache_$attn"
  done
done

for attn in sdpa flex_attention; do
  step "vs_trl_$attn" python benchmarks/vs_trl.py --device cuda --attn "$attn" --shape long_prompt \
    --pairs 512 --batch 16 --hidden 1024 --layers 8 --repeats 2 --max_length 2048
done
cp benchmarks/results-cuda-*.md "$out/" 2>/dev/null
rm -rf "$work"
exit $status
