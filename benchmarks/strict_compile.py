"""`dpo-dist ARGS` with torch.compile made strict: a recompile past dynamo's limit is an error (not a
silent fall-back to eager), and `TORCH_LOGS=recompiles` names each one. gpu_check.sh launches the
FlexAttention runs through it:

    accelerate launch ... benchmarks/strict_compile.py train output_dir=... model.attn_implementation=flex_attention
"""

import sys

import torch._dynamo

from dpo_dist.cli import main

torch._dynamo.config.fail_on_recompile_limit_hit = True
sys.exit(main(sys.argv[1:]))
