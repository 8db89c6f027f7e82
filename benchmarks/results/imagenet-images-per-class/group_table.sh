#!/bin/bash
cd /work/main
export INTRAQ_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1 RAY_USAGE_STATS_ENABLED=0
.venv/bin/python -m benchmarks.runs_table --cross --group --title "ImageNet MobileNetV1 x0.25: images per class at 61,440 image-iterations (BNS+CE), W4A4 with the stem output at 8 bits, seeds 0 and 1" \
  "256 x 240, seed 0=/work/ipc/stem8-n256-s0" "256 x 240, seed 1=/work/ipc/stem8-n256-s1" \
  "512 x 120, seed 0=/work/inet/w4a4-stem8-s0" "512 x 120, seed 1=/work/inet/w4a4-stem8-s1" \
  "1024 x 60, seed 0=/work/ipc/stem8-n1024-s0" "1024 x 60, seed 1=/work/ipc/stem8-n1024-s1" \
  "2048 x 30, seed 0=/work/ipc/stem8-n2048-s0" "2048 x 30, seed 1=/work/ipc/stem8-n2048-s1"
