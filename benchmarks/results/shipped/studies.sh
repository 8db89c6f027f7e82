#!/bin/bash
# Issue 19: the CIFAR studies with the shipped recipe, one process with one torch thread, from the fixed
# commit of a worktree (`git worktree add ../studies 8fe7ac4`), resumable (finished cells are skipped).
# Before each phase the main checkout's `studies --link --at 8fe7ac4` takes in every cell another study
# already ran at 8fe7ac4 with the same resolved run config, and links same-identity datasets, so each run
# is computed once (benchmarks/same_runs.py).
# Order: the budget split (both seeds); MDC vs ADI with the IntraQ / BNS+CE rows at the default steps
# (ablation rows, W4A4); Table 3 (methods; squant_intraq is left out: at 8fe7ac4 the shipped recipe
# overrode its quant.method, fixed in the main checkout since); Table 1 (lor); Table 2 (data).
# Usage: bash studies.sh [PID to wait for]   (STUDIES / MAIN / PY override the locations)
WAIT_PID=${1:-}
if [ -n "$WAIT_PID" ]; then while kill -0 "$WAIT_PID" 2>/dev/null; do sleep 60; done; fi
STUDIES=${STUDIES:-/work/studies}
MAIN=${MAIN:-/work/main}
PY=${PY:-$MAIN/.venv/bin/python}
export INTRAQ_DATA_DIR=${INTRAQ_DATA_DIR:-/work/shared/data} RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1
R=$STUDIES/benchmarks/results/shipped
W=$STUDIES/runs/benchmarks-shipped
link() { (cd "$MAIN" && PYTHONPATH=$MAIN $PY -m benchmarks.studies lor data methods ablation --link --at 8fe7ac4 \
          --seeds 0 1 --recipes shipped --results-root "$R" --workdir "$W"); }
cd "$STUDIES" || exit 1
export PYTHONPATH=$STUDIES
for seed in 0 1; do
  $PY -m benchmarks.studies split --budget cpu --seeds $seed --bits W4A4 W3A3 --recipes shipped --results-root "$R" \
      --workdir "$W" --rows split_bns_ce_1280x150 split_intraq_1280x150 split_intraq_128x1500 split_bns_ce_128x1500 \
      split_intraq_256x750 split_bns_ce_256x750 split_intraq_640x300 split_bns_ce_640x300
done
link
$PY -m benchmarks.ablation --budget cpu --seeds 0 1 --bits W4A4 --rows intraq bns_ce intraq_adi --recipes shipped \
    --results "$R/ablation-cpu" --workdir "$W"
link
$PY -m benchmarks.studies methods --budget cpu --seeds 0 1 --recipes shipped --results-root "$R" --workdir "$W" \
    --rows real_distill squant squant_l8 gdfq qimera intraq
link
$PY -m benchmarks.studies lor --budget cpu --seeds 0 1 --recipes shipped --results-root "$R" --workdir "$W"
link
$PY -m benchmarks.studies data --budget cpu --seeds 0 1 --recipes shipped --results-root "$R" --workdir "$W"
