#!/usr/bin/env bash
# Issue 19 point 3: images per class on the shared ImageNet MobileNetV1 x0.25 (1,000 classes), seed 0.
# Fixed synthesis budget = the shipped CPU config's 512 x 120 = 61,440 image-iterations (BNS+CE, batch 256,
# micro-batch 64); after synthesis the shipped train stage unchanged (10 KD epochs) except block
# reconstruction on min(N, 1024) images (the first n of the plan: with N >= 1000 the first 1,024 cover
# every class). Protocol: W4A4 with the stem output (act_quant.stage1_0_2) at 8 bits, and all-4-bit W4A4.
# Runs from the worktree /work/inet-ipc (commit in /work/ipc/commit.txt), one torch thread, resumable.
set -u
cd /work/inet-ipc
export PYTHONPATH=/work/inet-ipc INTRAQ_DATA_DIR=/work/shared/data RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/main/.venv/bin/python
R=/work/ipc
CFG=configs/imagenet_mobilenetv1_025_w4a4_cpu.yaml
git rev-parse HEAD > $R/commit.txt
seed=${1:-0}
for cell in "1024 60" "2048 30" "256 240"; do
  set -- $cell; n=$1; it=$2; rn=$(( n < 1024 ? n : 1024 ))
  d=$R/data-n$n-s$seed
  [ -f $d/data/manifest.json ] || /usr/bin/time -v $PY -m pipeline.cli generate -c $CFG --set seed=$seed \
      --set generate.num_images=$n --set generate.iterations=$it -o $d --quiet > $d.log 2>&1
  run=$R/stem8-n$n-s$seed
  [ -f $run/metrics.json ] || /usr/bin/time -v $PY -m pipeline.cli train -c $CFG --set seed=$seed --dataset $d -o $run --quiet \
      --set generate.num_images=$n --set generate.iterations=$it --set quant.reconstruct.num_images=$rn \
      --set "quant.act_bits={act_quant.stage1_0_2: 8}" > $run.log 2>&1
done
