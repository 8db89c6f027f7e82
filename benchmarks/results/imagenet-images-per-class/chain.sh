#!/usr/bin/env bash
# Issue 19 point 3: images per class on the shared ImageNet MobileNetV1 x0.25 (1,000 classes), one seed.
# Fixed synthesis budget = the shipped CPU config's 512 x 120 = 61,440 image-iterations (BNS+CE, batch 256,
# micro-batch 64); after synthesis the shipped train stage unchanged (10 KD epochs) except block
# reconstruction on min(N, 1024) images (the first n of the plan: with N >= 1000 the first 1,024 cover
# every class). Protocol: W4A4 with the stem output (act_quant.stage1_0_2) at 8 bits. The 512 x 120 row is
# the shipped config's own run. One torch thread, resumable; the commands are chain2.sh's (any method,
# bits and splits). Usage: bash chain.sh [SEED]
exec bash "$(dirname "$0")/chain2.sh" bns_ce "${1:-0}" W4A4 1024:60 2048:30 256:240
