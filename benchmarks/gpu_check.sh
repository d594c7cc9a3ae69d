#!/usr/bin/env bash
# What the first session with a GPU runs: checks that fail when a number is off, then speed.
#     bash benchmarks/gpu_check.sh          # on a GPU machine, from the repository root
#     bash benchmarks/gpu_check.sh --cpu    # the same checks' CPU parts, small (tests/test_gpu_check.py)
# Writes logs and results.md under $OUT (the device tool's) or gpu_results/; prints a table of every
# check (PASS / FAIL / its seconds) and exits 1 if any check failed. GPU_CHECK_TOLERANCE_SCALE
# multiplies gpu_equality.py's tolerances (a negative one makes it fail: the test of this script).
#
# Plan on one H200, about 7 minutes in all (a device command may run 10; a session has 15 minutes):
#  0. install  `.[test]` unless GPU_CHECK_NO_INSTALL=1 (the TRL comparison imports trl)      ~0.5 min
#  1. equality every attention layout vs padded sdpa, log-probs + gradients, fp32 and bf16
#              (eager, flex, flash varlen in bf16 only when flash_attn is installed)           ~1 min
#  2. train    ZeRO-2 and ZeRO-3 on one GPU, bf16, sdpa and flex_attention, each run its own
#              reference pass; step-1 loss = log 2, all finite, final/ loads. flex runs through
#              strict_compile.py with TORCH_LOGS=recompiles: a recompile storm fails the run. And
#              without DeepSpeed: bf16 weights with fp32 master copies under bf16 autocast     ~3.5 min
#  3. 2 ranks  (>= 2 GPUs; on the CPU: gloo) ZeRO-3 with the partitioned reference, LoRA, the aot
#              loss (gathered over ranks), SIGKILL after the first checkpoint, resume=auto:
#              the final adapter equals an uninterrupted run's                                  ~1 min
#  4. speed    pairs/s against TRL 1.16 (fp32 and its defaults), sdpa and flex_attention       ~2 min
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") mode=gpu ;;
  --cpu) mode=cpu ;;
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--cpu]" >&2; exit 2 ;;
esac
if [ "$mode" = gpu ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check.sh: no CUDA GPU here; bash benchmarks/gpu_check.sh --cpu runs the CPU parts" >&2
  exit 2
fi
out="${OUT:-gpu_results}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rows=()
status=0

check() {  # check NAME LIMIT_SECONDS COMMAND...: runs it (logs in $out/NAME.log), records PASS / FAIL
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS result=PASS bound=(timeout "$limit")
  declare -F "$1" >/dev/null && bound=()  # a function of this script bounds its own commands
  echo "== $name: $*"
  if ! "${bound[@]}" "$@" >"$out/$name.log" 2>&1; then
    result=FAIL; status=1
    tail -n 15 "$out/$name.log"
  fi
  rows+=("| $name | $result | $((SECONDS - start)) |")
}

if [ "$mode" = cpu ]; then
  export DS_ACCELERATOR=cpu
  device=cpu; dtypes=(float32); precision=fp32; train_dtype=float32; attns=(eager); suffix=_cpu
  size=(64 2); pairs=32; steps=4; ranks=2
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  [ "${GPU_CHECK_NO_INSTALL:-0}" = 1 ] || pip install -q -e ".[test]" || status=1
  device=cuda; dtypes=(float32 bfloat16); precision=bf16; train_dtype=bfloat16; attns=(sdpa flex_attention); suffix=
  size=(1024 8); pairs=256; steps=40
  ranks=$(python -c "import torch; print(torch.cuda.device_count())")
fi
python -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)"

for dtype in "${dtypes[@]}"; do
  check "equality_$dtype" 240 python benchmarks/gpu_equality.py --device "$device" --dtype "$dtype" \
    --tolerance-scale "${GPU_CHECK_TOLERANCE_SCALE:-1}"
done

python - "$work" "${size[@]}" "$pairs" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from common import make_data, make_model
work, hidden, layers, pairs = Path(sys.argv[1]), *map(int, sys.argv[2:])
make_model(work / "model", hidden=hidden, layers=layers)
make_data(work / "data.jsonl", pairs, prompt_words=(60, 240), response_words=(20, 80))
PY
common=("model.policy=$work/model" "data.train=$work/data.jsonl" "train.mixed_precision=$precision" train.lr=1e-5
        train.log_every=1 train.micro_batch_size=4 train.report_to=none)

for zero in zero2 zero3; do
  for attn in "${attns[@]}"; do
    run="$work/${zero}_${attn}"
    entry=(-m dpo_dist)
    [ "$attn" = flex_attention ] && entry=(benchmarks/strict_compile.py)
    check "train_${zero}_${attn}" 240 env TORCH_LOGS=recompiles accelerate launch \
      --config_file "launch/accelerate/$zero$suffix.yaml" --num_processes 1 "${entry[@]}" train "${common[@]}" \
      "output_dir=$run" "model.attn_implementation=$attn" "train.max_steps=$steps" train.save_every=0
    check "result_${zero}_${attn}" 120 python benchmarks/check_run.py "$run" --dtype "$train_dtype"
  done
done

# Without DeepSpeed: bf16 weights stepped through fp32 master copies (and bf16 autocast), both modes.
check train_master_weights 240 python -m dpo_dist train "${common[@]}" train.mixed_precision=bf16 \
  model.dtype=bfloat16 "output_dir=$work/master" "train.max_steps=$steps" train.save_every=0
check result_master_weights 120 python benchmarks/check_run.py "$work/master" --dtype bfloat16

if [ "$ranks" -ge 2 ]; then
  two=("${common[@]}" model.lora.r=8 loss.type=aot train.max_steps=24 train.save_every=4 train.keep_last=10)
  launch=(accelerate launch --config_file "launch/accelerate/zero3$suffix.yaml" --num_processes 2 -m dpo_dist train)
  check two_ranks_straight 240 "${launch[@]}" "${two[@]}" "output_dir=$work/straight"
  killed_and_resumed() {  # SIGKILL every rank once the first checkpoint is complete, then resume=auto
    setsid timeout 240 "${launch[@]}" "${two[@]}" "output_dir=$work/resumed" &
    local pid=$!
    until [ -f "$work/resumed/checkpoints/latest" ] || ! kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    kill -KILL -- -"$pid" 2>/dev/null
    wait "$pid"
    [ -f "$work/resumed/final/adapter_model.safetensors" ] && { echo "finished before the kill"; return 1; }
    timeout 240 "${launch[@]}" "${two[@]}" "output_dir=$work/resumed" && grep -q "resumed from" "$out/$name.log"
  }
  check two_ranks_killed_and_resumed 0 killed_and_resumed
  check two_ranks_same_weights 120 python benchmarks/check_run.py "$work/resumed" --dtype "$train_dtype" \
    --same-weights-as "$work/straight"
fi

if [ "$mode" = gpu ]; then
  for attn in sdpa flex_attention; do
    check "vs_trl_$attn" 150 python benchmarks/vs_trl.py --device cuda --attn "$attn" --shape long_prompt \
      --pairs 256 --batch 16 --hidden 1024 --layers 8 --repeats 1 --max_length 2048
  done
  cp benchmarks/results-cuda-*.md "$out/" 2>/dev/null
fi

{
  echo "| check | result | seconds |"
  echo "|---|---|---:|"
  printf '%s\n' "${rows[@]}"
} | tee "$out/results.md"
exit $status
