#!/usr/bin/env bash
# The declared realism signal R (declared.md) on every dataset of issue 19 that is on this machine and
# has test-set results, with the real-image sanity check and the separated-pairs check.
# Writes imagenet-w4a4.md, imagenet-w8a8.md, cifar-w4a4.md here. Usage: bash run.sh (from anywhere).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd); MAIN=$(cd "$HERE/../../.." && pwd)
cd "$MAIN"
export INTRAQ_DATA_DIR=${INTRAQ_DATA_DIR:-/work/shared/data} OMP_NUM_THREADS=1 PYTHONPATH=$MAIN
PY="nice -n 5 $MAIN/.venv/bin/python -m benchmarks.realism"
S=/work/ship; I=/work/ipc; C=/work/studies/runs/benchmarks-shipped/cpu
M=benchmarks/results/imagenet-images-per-class; X=benchmarks/results/shipped
header() { echo "# Realism signal R: $1"; echo; echo "\`bash benchmarks/results/realism/run.sh\` at $(git rev-parse --short HEAD), $(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), one torch thread. R as declared in declared.md (batches of 128, permutation seed 0); test top-1 is the kept model's (never a test-set choice). Budgets of the top-1 values: those of the tables their cells come from (ImageNet: 61,440 synthesis image-iterations, then the shipped train stage, \`imagenet-images-per-class/\`; CIFAR: the \`cpu\` budget with the shipped recipe, \`shipped/\`); R itself trains nothing."; echo; }

{ header "ImageNet MobileNetV1 x0.25, W4A4 with the stem output at 8 bits"
  $PY -c configs/imagenet_mobilenetv1_025_w4a4_cpu.yaml --real 1300 --json $HERE/imagenet-w4a4.json \
    "BNS+CE 1024 x 60, seed 0=$S/data-s0" "BNS+CE 1024 x 60, seed 1=$S/data-s1" \
    "IntraQ 256 x 240, seed 0=$I/data-intraq-n256-s0" "IntraQ 256 x 240, seed 1=$I/data-intraq-n256-s1" \
    "IntraQ 512 x 120, seed 0=$I/data-intraq-n512-s0" "IntraQ 512 x 120, seed 1=$I/data-intraq-n512-s1" \
    "IntraQ 1024 x 60, seed 0=$I/data-intraq-n1024-s0" "IntraQ 1024 x 60, seed 1=$I/data-intraq-n1024-s1" \
    "probe: BNS+LOR 256 x 120=$S/probe-inet" "probe: BNS alone 256 x 120=$S/probe-bns-inet" \
    --top1 "BNS+CE 1024 x 60=$M/ship-stem8-s0-metrics.json,$M/ship-stem8-s1-metrics.json" \
      "IntraQ 256 x 240=$M/intraq-n256-s0-metrics.json,$M/intraq-n256-s1-metrics.json" \
      "IntraQ 512 x 120=$M/intraq-n512-s0-metrics.json,$M/intraq-n512-s1-metrics.json" \
      "IntraQ 1024 x 60=$M/intraq-n1024-s0-metrics.json,$M/intraq-n1024-s1-metrics.json"
} > $HERE/imagenet-w4a4.md

{ header "ImageNet MobileNetV1 x0.25, W8A8 (the images-per-class rate)"
  $PY -c configs/imagenet_mobilenetv1_025_w8a8_cpu.yaml --json $HERE/imagenet-w8a8.json \
    "BNS+CE 1/class (1024 x 60), seed 0=$S/data-s0" "BNS+CE 1/class (1024 x 60), seed 1=$S/data-s1" \
    "BNS+CE 0.5/class (512 x 120), seed 0=$S/half-data-s0" "BNS+CE 0.5/class (512 x 120), seed 1=$S/half-data-s1" \
    --top1 "BNS+CE 1/class (1024 x 60)=$M/ship-w8a8-s0-metrics.json,$M/ship-w8a8-s1-metrics.json" \
      "BNS+CE 0.5/class (512 x 120)=$M/ship-half-w8a8-s0-metrics.json,$M/ship-half-w8a8-s1-metrics.json"
} > $HERE/imagenet-w8a8.md

rows=(); top=()
for r in real_distill bns_ce intraq intraq_adi gdfq qimera lor_L lor_LR; do
  f=$X/study-methods-cpu; [ -f $f/$r-W4A4-s0.json ] || f=$X/ablation-cpu; [ -f $f/$r-W4A4-s0.json ] || f=$X/study-lor-cpu
  files=""; for s in 0 1; do
    rows+=("$r, seed $s=$C/$r-s$s/data")
    [ -f $f/$r-W4A4-s$s.json ] && files="$files${files:+,}$f/$r-W4A4-s$s.json"
  done
  top+=("$r=$files")
done
{ header "CIFAR-10 ResNet-20, W4A4 (shipped recipe after synthesis)"
  $PY -c configs/cifar10_resnet20_w4a4_cpu.yaml --real 1280 --json $HERE/cifar-w4a4.json "${rows[@]}" \
    "probe: BNS+LOR 512 x 150=$C/probe-s12345/data" --top1 "${top[@]}"
} > $HERE/cifar-w4a4.md
