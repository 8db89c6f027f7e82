#!/bin/bash
# The shipped ImageNet CPU configs at one image per class (9c8c15c, ship.sh SEED) and the W8A8 control at
# half an image per class (half.sh SEED), from the metrics files committed in this folder
# (ship-<config>-s<seed>-metrics.json), one line per config, mean ± std over the seeds there are.
cd "$(dirname "$0")/../../.." || exit 1
F=benchmarks/results/imagenet-images-per-class
rows=()
for cfg in "w4a4:imagenet_mobilenetv1_025_w4a4_cpu (all layers 4-bit)" \
           "stem8:the same, stem output 8-bit (quant.act_bits)" \
           "w8a8:imagenet_mobilenetv1_025_w8a8_cpu" \
           "half-w8a8:W8A8 control, min_images_per_class 0.5 (the config before the change)"; do
  for seed in 0 1; do
    f=$F/ship-${cfg%%:*}-s$seed-metrics.json
    [ -f $f ] && rows+=("${cfg#*:}, seed $seed=$f")
  done
done
${PY:-.venv/bin/python} -m benchmarks.runs_table --group \
  --title "ImageNet MobileNetV1 x0.25: the shipped CPU configs at one image per class (9c8c15c, Intel Xeon 2 cores)" \
  "${rows[@]}"
