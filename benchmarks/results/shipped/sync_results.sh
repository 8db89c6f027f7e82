#!/bin/bash
# Copy finished study cells from the background worktrees into this checkout and rebuild the named tables
# (split, ablation, lor, data, methods, r32, ref): /work/studies (8fe7ac4, studies.sh; its reference-recipe
# column, studies-reference.sh, to ../reference) and /work/studies-r32 (7572501, studies-resnet32.sh).
# Usage: bash sync_results.sh data r32 ref   (then commit the new cells).
set -u
S=/work/studies/benchmarks/results/shipped
M=/work/main/benchmarks/results/shipped
REF=/work/main/benchmarks/results/reference
W=/work/studies/runs/benchmarks-shipped
# copy_cells FROM TO NAME: every finished cell of FROM/NAME not yet (or not the same) in TO/NAME.
copy_cells() {
  [ -d "$1/$3" ] || return 0
  mkdir -p "$2/$3"
  local rel=${2#/work/main/benchmarks/results/}
  for f in "$1/$3"/*.json; do
    [ -e "$f" ] || continue
    cmp -s "$f" "$2/$3/$(basename "$f")" || { cp "$f" "$2/$3/"; echo "new: $rel/$3/$(basename "$f")"; }
  done
}
for d in study-split-cpu ablation-cpu study-methods-cpu study-lor-cpu study-data-cpu; do copy_cells $S $M $d; done
copy_cells /work/studies-r32/benchmarks/results/shipped/resnet32 $M/resnet32 study-methods-cpu
for d in study-methods-cpu ablation-cpu; do copy_cells /work/studies/benchmarks/results/reference $REF $d; done
cd /work/main
export INTRAQ_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/main
PY=/work/main/.venv/bin/python
for study in "$@"; do
  case $study in
    split) $PY -m benchmarks.studies split --table --seeds 0 1 --bits W4A4 W3A3 --recipes shipped --results-root $M --workdir $W > /dev/null ;;
    r32) $PY -m benchmarks.studies methods --teacher resnet32 --table --seeds 0 1 --recipes shipped --results-root $M --workdir /work/studies-r32/runs/benchmarks-shipped > /dev/null ;;
    ref) $PY -m benchmarks.studies methods --table --seeds 0 1 --recipes default --results-root $REF --workdir $W > /dev/null ;;
    ablation) $PY -m benchmarks.ablation --table --budget cpu --seeds 0 1 --bits W4A4 --rows intraq bns_ce intraq_adi --recipes shipped --results $M/ablation-cpu --workdir $W > /dev/null ;;
    *) $PY -m benchmarks.studies $study --table --seeds 0 1 --recipes shipped --results-root $M --workdir $W > /dev/null ;;
  esac
  echo "table: $study ($?)"
done
