#!/bin/bash
# IntraQ's synthesis against BNS+CE at the same splits of 61,440 image-iterations on the shared ImageNet
# MobileNetV1 x0.25 (W4A4, stem output at 8 bits), from the metrics files committed in this folder
# (n<N>-s<seed>-metrics.json: BNS+CE, chain.sh; intraq-n<N>-s<seed>-metrics.json: IntraQ, chain2.sh intraq).
cd "$(dirname "$0")/../../.." || exit 1
F=benchmarks/results/imagenet-images-per-class
rows=()
for n in 256 512 1024 2048; do
  for method in bns_ce intraq; do
    for seed in 0 1; do
      f=$F/n$n-s$seed-metrics.json; label="BNS+CE"
      [ $method = intraq ] && f=$F/intraq-n$n-s$seed-metrics.json && label="IntraQ (BNS+SIL+MDC+LOR)"
      [ -f $f ] && rows+=("$label, $n images, seed $seed=$f")
    done
  done
done
${PY:-.venv/bin/python} -m benchmarks.runs_table --group \
  --title "ImageNet MobileNetV1 x0.25: IntraQ's and BNS+CE synthesis at 61,440 image-iterations, W4A4 with the stem output at 8 bits" \
  "${rows[@]}"
