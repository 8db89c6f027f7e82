#!/usr/bin/env bash
# The tie-break probe declared in imagenet-mobilenetv1-cpu.md ("The rule applied with two seeds"), before it
# ran: when the probe (BNS + LOR) and the cross held-out KL prefer opposite sides, a third probe from a
# synthesis neither side trains on decides with them: BN statistics alone (no class term, no LOR; the
# probe config with generate.lor=false), 256 x 120, seed 12345, on the settings of decide.sh.
# WAIT=1 waits for the W8A8 control of seed 1 (half.sh 1) so that two runs share the two cores, not three
# (it ran without: started at once, as a third process).
# Usage: bash tiebreak.sh > OUT.md
set -u
[ -n "${WAIT:-}" ] && while [ ! -f /work/ship/half-w8a8-s1/metrics.json ]; do sleep 60; done
cd /work/main
export INTRAQ_DATA_DIR=${INTRAQ_DATA_DIR:-/work/shared/data} OMP_NUM_THREADS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/main
S=/work/ship; I=/work/ipc; P=$S/probe-bns-inet
source /work/main/benchmarks/results/imagenet-images-per-class/lib.sh  # complete, resume
complete $P || /usr/bin/time -v .venv/bin/python -m pipeline.cli generate -c configs/probe_cpu.yaml --set model.arch=mobilenet_v1_025 \
    --set model.weights=imagenet-mobilenetv1-025 --set generate.num_images=256 --set generate.iterations=120 \
    --set generate.micro_batch_size=64 --set generate.lor=false -o $P --quiet > $P.log 2>&1
rows=("BNS+CE 1024 x 60, seed 0=$S/stem8-s0" "BNS+CE 1024 x 60, seed 1=$S/stem8-s1")
for n in 256 512 1024; do
  for seed in 0 1; do
    [ -f $I/stem8-intraq-n$n-s$seed/metrics.json ] && rows+=("IntraQ $n x $((61440 / n)), seed $seed=$I/stem8-intraq-n$n-s$seed")
  done
done
nice -n 5 .venv/bin/python -m benchmarks.runs_table --group --probe $P \
  --title "ImageNet MobileNetV1 x0.25: the tie-break probe (BN statistics alone, 256 x 120, seed 12345), W4A4 stem 8-bit" \
  "${rows[@]}"
