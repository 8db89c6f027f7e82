#!/bin/bash
# Issue 19 point 1's second column: Table 3's image rows on the shared ResNet-20 with the reference
# recipe (the `cpu` budget's own distillation: min/max ranges, CE + KD, 120 epochs; `--recipes
# default`) instead of the shipped one, two seeds, W4A4; to show whether the recipe, not the images,
# is what makes IntraQ > Qimera and SQuant > Qimera "not separated" / "not held" with the shipped
# recipe. SQuant's rows use no recipe (the same cells as the shipped column; 30 s each) and run here so
# that the column's claims are judged on its own cells. Same fixed commit and worktree as
# studies.sh (8fe7ac4, ../studies) and the same work folder, so every row reuses its dataset (the
# students go to w4a4-default/ beside w4a4-shipped/); cells to their own results root
# (benchmarks/results/reference). One process, one torch thread, resumable; SQuant, then IntraQ and Qimera (the
# rows the two claims compare).
# Usage: bash studies-reference.sh [PID to wait for]   (STUDIES / PY override the locations)
WAIT_PID=${1:-}
if [ -n "$WAIT_PID" ]; then while kill -0 "$WAIT_PID" 2>/dev/null; do sleep 60; done; fi
STUDIES=${STUDIES:-/work/studies}
PY=${PY:-/work/main/.venv/bin/python}
export INTRAQ_DATA_DIR=${INTRAQ_DATA_DIR:-/work/shared/data} RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1
cd "$STUDIES" || exit 1
export PYTHONPATH=$STUDIES
$PY -m benchmarks.studies methods --budget cpu --seeds 0 1 --recipes default \
    --rows squant squant_l8 intraq qimera gdfq real_distill \
    --results-root "$STUDIES/benchmarks/results/reference" --workdir "$STUDIES/runs/benchmarks-shipped"
# 8fe7ac4's methods study has no BNS+CE row (the main checkout takes it in from the ablation, as for the
# shipped column): run it there, then link it into the methods table from the main checkout.
$PY -m benchmarks.ablation --budget cpu --seeds 0 1 --bits W4A4 --rows bns_ce --recipes default \
    --results "$STUDIES/benchmarks/results/reference/ablation-cpu" --workdir "$STUDIES/runs/benchmarks-shipped"
MAIN=${MAIN:-/work/main}
(cd "$MAIN" && PYTHONPATH=$MAIN $PY -m benchmarks.studies methods --link --at 8fe7ac4 --seeds 0 1 --recipes default \
    --results-root "$STUDIES/benchmarks/results/reference" --workdir "$STUDIES/runs/benchmarks-shipped")
