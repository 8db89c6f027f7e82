#!/usr/bin/env bash
# Issue 19 point 2 on ImageNet: the declared method choice (benchmarks/results/imagenet-mobilenetv1-cpu.md,
# "IntraQ's synthesis at the same splits"), applied as written once BNS+CE 1,024 x 60 (the shipped data,
# ship.sh) has two seeds: incumbent BNS+CE 1,024 x 60; challengers IntraQ at every split with a student;
# both data-free signals on the kept students, two seeds each: agreement on the ImageNet probe set
# (BNS + LOR, 256 x 120, seed 12345, no row trained on it) and the cross held-out KL, whose pool is every
# split of the other method at seeds 0 and 1 that exists here (datasets without a student via --pool);
# when the two disagree, the tie-break probe (BN statistics alone, tiebreak.sh's dataset) decides with them.
# Usage: bash decide.sh > OUT.md   (run from anywhere; reads /work/ship and /work/ipc)
set -u
cd /work/main
export INTRAQ_DATA_DIR=${INTRAQ_DATA_DIR:-/work/shared/data} OMP_NUM_THREADS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/main
S=/work/ship; I=/work/ipc
rows=("BNS+CE 1024 x 60, seed 0=$S/stem8-s0" "BNS+CE 1024 x 60, seed 1=$S/stem8-s1")
pool=()
for n in 256 512 1024 2048; do
  it=$((61440 / n))
  for seed in 0 1; do
    if [ -f $I/stem8-intraq-n$n-s$seed/metrics.json ]; then rows+=("IntraQ $n x $it, seed $seed=$I/stem8-intraq-n$n-s$seed")
    elif [ -d $I/data-intraq-n$n-s$seed/data ]; then pool+=("$I/data-intraq-n$n-s$seed"); fi
  done
done
for seed in 0 1; do [ -d $S/half-data-s$seed/data ] && pool+=("$S/half-data-s$seed"); done  # BNS+CE 512 x 120
tie=(); [ -d $S/probe-bns-inet/data ] && tie=(--tiebreak $S/probe-bns-inet)
.venv/bin/python -m benchmarks.runs_table --group --probe $S/probe-inet --cross ${pool:+--pool "${pool[@]}"} \
  --choose "BNS+CE 1024 x 60" "${tie[@]}" \
  --title "ImageNet MobileNetV1 x0.25: the synthesis method, W4A4 with the stem output at 8 bits, 61,440 image-iterations" \
  "${rows[@]}"
echo
echo "Rows: BNS+CE at 9c8c15c (ship.sh), IntraQ at 7fca5b1 (chain2.sh); pool-only datasets: ${pool[*]:-none}."
