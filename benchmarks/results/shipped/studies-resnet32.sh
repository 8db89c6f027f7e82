#!/bin/bash
# Issue 19, Table 3 on the shared CIFAR-10 ResNet-32 (FP 92.63%) with the shipped recipe, two seeds, one
# process with one torch thread, from the fixed commit of a worktree (`git worktree add ../studies-r32
# 7572501`: rows win over the recipe there, so "SQuant start + IntraQ distillation" runs as named),
# resumable (finished cells are skipped). Cells and datasets go to the resnet32/ subfolders of the results
# root and work folder (`--teacher resnet32`).
# Usage: bash studies-resnet32.sh [PID to wait for]   (STUDIES / PY override the locations)
WAIT_PID=${1:-}
if [ -n "$WAIT_PID" ]; then while kill -0 "$WAIT_PID" 2>/dev/null; do sleep 60; done; fi
STUDIES=${STUDIES:-/work/studies-r32}
PY=${PY:-/work/main/.venv/bin/python}
export INTRAQ_DATA_DIR=${INTRAQ_DATA_DIR:-/work/shared/data} RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1
cd "$STUDIES" || exit 1
export PYTHONPATH=$STUDIES
$PY -m benchmarks.studies methods --teacher resnet32 --budget cpu --seeds 0 1 --recipes shipped \
    --results-root "$STUDIES/benchmarks/results/shipped" --workdir "$STUDIES/runs/benchmarks-shipped"
