#!/usr/bin/env bash
# Issue 19 point 3 at W8A8: the shipped rate (one image per class, ship.sh) against half an image per class
# (half.sh: the W8A8 config before the change), two seeds each, by the data-free rule (data_choice, the
# shipped rate the incumbent): the ImageNet probe (BNS + LOR), the cross held-out KL (each student on
# the other rate's held-out images) and the tie-break probe (BN statistics alone).
# Usage: bash w8a8_rate.sh > OUT.md   (reads /work/ship)
set -u
cd /work/main
export INTRAQ_DATA_DIR=${INTRAQ_DATA_DIR:-/work/shared/data} OMP_NUM_THREADS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/main
S=/work/ship
.venv/bin/python -m benchmarks.runs_table --group --probe $S/probe-inet --cross --tiebreak $S/probe-bns-inet \
  --choose "W8A8, 1024 x 60 (min_images_per_class 1)" \
  --title "ImageNet MobileNetV1 x0.25, W8A8 (the shipped config): one and half an image per class, seeds 0 and 1" \
  "W8A8, 1024 x 60 (min_images_per_class 1), seed 0=$S/w8a8-s0" "W8A8, 1024 x 60 (min_images_per_class 1), seed 1=$S/w8a8-s1" \
  "W8A8, 512 x 120 (min_images_per_class 0.5), seed 0=$S/half-w8a8-s0" "W8A8, 512 x 120 (min_images_per_class 0.5), seed 1=$S/half-w8a8-s1"
