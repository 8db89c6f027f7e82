#!/usr/bin/env bash
# Control for the W8A8 re-measure: the previous ImageNet data (min_images_per_class 0.5: 512 x 120,
# reconstruction from 512) on this machine, same commit as ship.sh, seed 0; then W8A8.
set -u
cd /work/inet-ship
export PYTHONPATH=/work/inet-ship INTRAQ_DATA_DIR=/work/shared/data RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/main/.venv/bin/python
source /work/main/benchmarks/results/imagenet-images-per-class/lib.sh  # complete, resume
R=/work/ship; seed=${1:-0}
C=configs/imagenet_mobilenetv1_025
HALF="--set generate.min_images_per_class=0.5 --set quant.reconstruct.num_images=512"
d=$R/half-data-s$seed
complete $d || /usr/bin/time -v $PY -m pipeline.cli generate -c ${C}_w4a4_cpu.yaml --set seed=$seed $HALF -o $d --quiet > $d.log 2>&1
run=$R/half-w8a8-s$seed
[ -f $run/metrics.json ] || /usr/bin/time -v $PY -m pipeline.cli train -c ${C}_w8a8_cpu.yaml --set seed=$seed $HALF --dataset $d -o $run $(resume $run) --quiet > $run.log 2>&1
