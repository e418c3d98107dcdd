#!/usr/bin/env bash
# The GPU run: the linear, conv and MoE experts training-step rows on CUDA in bfloat16, each table as it runs, then
# every row in one table with aten ops and CUDA kernels (torch.profiler) per step; experts at 8 and 128 experts,
# under transformers' default experts implementation there (grouped_mm) and eager. About 2-3 minutes on one
# H100; stopped at 290 s. Needs torch, transformers 5 and peft (loralib's row is left out, with a note, if absent).
#
#   bash benchmarks/gpu.sh                 # PYTHON=/path/to/python to choose; extra arguments go to bench_lora.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "benchmarks/gpu.sh: no CUDA device here (torch.cuda.is_available() is False in $PYTHON), and this run" \
         "measures CUDA kernels. On a CPU: python benchmarks/bench_lora.py --layers linear,conv,experts --summary" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import transformers.integrations.moe, peft' 2>/dev/null; then
    echo "benchmarks/gpu.sh: the experts rows need transformers 5 and peft: pip install -r requirements-test.txt" >&2
    exit 2
fi
exec timeout 290 "$PYTHON" benchmarks/bench_lora.py --device cuda --dtypes bfloat16 --layers linear,conv,experts \
    --ranks 8 --conv-ranks 8 --num-experts 8 128 --experts-ranks 8 --warmup 3 --reps 9 --summary "$@"
