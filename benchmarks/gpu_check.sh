#!/usr/bin/env bash
# The GPU path in one run (issue 21), at most 8 minutes on one H100; prints one table:
#   1. the suite's CUDA tests (pytest -m cuda: dense vs tiled on CUDA, CPU tensors through a
#      real NCCL group, the gradient cache on CUDA, the dense loss under CUDA autocast);
#   2. torchrun --nproc-per-node 1 training with NCCL, 50 steps with checkpoints, then --resume;
#   3. MiniLM training pairs/s at batch 64 and 512 (gradient cache) against
#      sentence-transformers' Trainer with (Cached)MultipleNegativesRankingLoss;
#   4. dense vs tiled BSC / WEINCE fwd+bwd time and peak memory, B = 8,192 to 262,144, d = 384
#      (the reading that sets losses/pair_loss.py AUTO_DENSE_OTHER on CUDA).
#
#   bash benchmarks/gpu_check.sh          # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu    # dry run: CPU, tiny sizes, gloo, a few steps (< 1 min)
#
# Each step has its own time limit; a step that fails or runs out of time is a FAIL row and the
# others still run. Exit status 1 when any row failed. Nothing is downloaded (HF_HUB_OFFLINE).
set -u
cd "$(dirname "$0")/.."

MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; elif [ -n "${1:-}" ]; then
    echo "usage: bash benchmarks/gpu_check.sh [--cpu]" >&2; exit 2
fi
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
RESULTS=$WORK/results.jsonl
: > "$RESULTS"
FLAG=()
if [ "$MODE" = cpu ]; then
    FLAG=(--cpu)
    export OMP_NUM_THREADS=1  # a dry run beside other jobs: threads would wait on each other
fi

# step NAME SECONDS(gpu) SECONDS(cpu) ARGS...: one step of gpu_check.py under its time limit.
step() {
    local name=$1 limit=$2
    [ "$MODE" = cpu ] && limit=$3
    shift 3
    timeout --kill-after=10 "$limit" "$PY" benchmarks/gpu_check.py "$name" \
        --results "$RESULTS" --work "$WORK" "${FLAG[@]}" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        "$PY" -c 'import sys, json; print(json.dumps({"check": sys.argv[1], "setting": "step",
"result": f"exit {sys.argv[2]}" + (" (time limit)" if sys.argv[2] in ("124", "137") else ""),
"status": "FAIL"}))' "$name" "$rc" >> "$RESULTS"
    fi
}

START=$SECONDS
step tests      70  40
step nccl       90  60
step throughput 150 60
step losses     150 30 --budget "$([ "$MODE" = cpu ] && echo 5 || echo 110)"

echo
echo "gpu_check ($MODE), $((SECONDS - START)) s:"
"$PY" benchmarks/gpu_check.py table --results "$RESULTS"
! grep -q '"status": "FAIL"' "$RESULTS"
