#!/usr/bin/env bash
# Re-measure the shipped ImageNet CPU configs after min_images_per_class 0.5 -> 1 (commit in commit.txt), seed 0.
set -u
cd /work/inet-ship
export PYTHONPATH=/work/inet-ship INTRAQ_DATA_DIR=/work/shared/data RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/main/.venv/bin/python
source /work/main/benchmarks/results/imagenet-images-per-class/lib.sh  # complete, resume
R=/work/ship; seed=${1:-0}
git rev-parse HEAD > $R/commit.txt
C=configs/imagenet_mobilenetv1_025
d=$R/data-s$seed
complete $d || /usr/bin/time -v $PY -m pipeline.cli generate -c ${C}_w4a4_cpu.yaml --set seed=$seed -o $d --quiet > $d.log 2>&1
# The images-per-class protocol (stem output at 8 bits) on the same data: reproduces the committed
# BNS+CE 1,024 x 60 seed-0 row (7fca5b1) at this commit, and gives the IntraQ rows a BNS+CE student
# and dataset to be cross-scored against.
run=$R/stem8-s$seed
[ -f $run/metrics.json ] || /usr/bin/time -v $PY -m pipeline.cli train -c ${C}_w4a4_cpu.yaml --set seed=$seed --dataset $d -o $run $(resume $run) --quiet \
    --set "quant.act_bits={act_quant.stage1_0_2: 8}" > $run.log 2>&1
for cfg in w8a8 w4a4; do
  run=$R/$cfg-s$seed
  [ -f $run/metrics.json ] || /usr/bin/time -v $PY -m pipeline.cli train -c ${C}_${cfg}_cpu.yaml --set seed=$seed --dataset $d -o $run $(resume $run) --quiet > $run.log 2>&1
done
