#!/usr/bin/env bash
# Issue 19 points 2 and 3 on the shared ImageNet MobileNetV1 x0.25 (1,000 classes): the same 61,440
# image-iteration budget as chain.sh, for a synthesis METHOD (bns_ce | intraq | intraq_ref) and seed, at the splits
# given (N:ITERATIONS ...), then the shipped W4A4 train stage with the stem output at 8 bits (as chain.sh),
# and optionally W3A3 (BITS="W4A4 W3A3"; W3A3 = quant.w_bits=3 a_bits=3, stem output still 8-bit).
# Datasets of bns_ce reuse chain.sh's (data-nN-sS); 512 x 120 BNS+CE datasets are the shipped config's
# (/work/inet/data-s0, /work/inet2runs/data-s1). Runs from /work/inet-ipc (commit in /work/ipc/commit.txt),
# one torch thread, resumable (skips finished datasets and runs). intraq_ref is IntraQ with the reference's
# ImageNet loss settings (../shared/docs/intraq-method.md: SIL epsilon 1.0, MDC margins 0 and 2, i.e. MDC
# inactive; LOR crops of at least half the area, the default); intraq uses the CIFAR values (0.95, 0.05-0.8).
# Usage: bash chain2.sh METHOD SEED "BITS" N:IT [N:IT ...]
set -u
cd /work/inet-ipc
export PYTHONPATH=/work/inet-ipc INTRAQ_DATA_DIR=/work/shared/data RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/main/.venv/bin/python
source /work/main/benchmarks/results/imagenet-images-per-class/lib.sh  # complete, resume
R=/work/ipc
git rev-parse HEAD > $R/commit.txt
CFG=configs/imagenet_mobilenetv1_025_w4a4_cpu.yaml
method=$1; seed=$2; bits=$3; shift 3
sets="--set generate.method=$method"
[ "$method" = intraq_ref ] && sets="--set generate.method=intraq --set generate.sil_epsilon=1.0 --set generate.mdc_lower=0.0 --set generate.mdc_upper=2.0"
for cell in "$@"; do
  n=${cell%%:*}; it=${cell##*:}; rn=$(( n < 1024 ? n : 1024 ))
  if [ "$method" = bns_ce ]; then
    d=$R/data-n$n-s$seed; tag=""
    if [ "$n" = 512 ]; then [ "$seed" = 0 ] && d=/work/inet/data-s0 || d=/work/inet2runs/data-s1; fi
  else
    d=$R/data-$method-n$n-s$seed; tag="-$method"
  fi
  complete $d || /usr/bin/time -v $PY -m pipeline.cli generate -c $CFG --set seed=$seed \
      $sets --set generate.num_images=$n --set generate.iterations=$it -o $d $(resume $d) --quiet > $d.log 2>&1
  for b in $bits; do
    w=${b:1:1}; a=${b:3:1}
    run=$R/stem8$tag-n$n-s$seed; [ "$b" = W4A4 ] || run=$run-w${w}a${a}
    [ -f $run/metrics.json ] || /usr/bin/time -v $PY -m pipeline.cli train -c $CFG --set seed=$seed --dataset $d -o $run $(resume $run) --quiet \
        $sets --set generate.num_images=$n --set generate.iterations=$it \
        --set quant.reconstruct.num_images=$rn --set quant.w_bits=$w --set quant.a_bits=$a \
        --set "quant.act_bits={act_quant.stage1_0_2: 8}" > $run.log 2>&1
  done
done
