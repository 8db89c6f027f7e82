#!/usr/bin/env bash
# The ImageNet queue for the next session (one core, resumable: finished datasets and runs are skipped).
# Worktrees: `git worktree add /work/inet-ship 9c8c15c` (ship.sh, half.sh: the shipped configs) and
# `git worktree add /work/inet-ipc 7fca5b1` (chain2.sh: the images-per-class rows); scripts copied to
# /work/ship and /work/ipc. Order: seed 1 of the shipped configs at one image per class and of the W8A8
# control at half an image per class (does W8A8's 1.2-point test-set cost hold?), which also gives the
# BNS+CE 1,024 x 60 seed-1 student and dataset the cross / probe signals need against IntraQ 256 x 240
# seed 1; then IntraQ's remaining splits (seed 1 at 512 / 1,024, seed 0 at 2,048).
set -u
bash /work/ship/ship.sh 1
bash /work/ship/half.sh 1
bash /work/ipc/chain2.sh intraq 1 "W4A4" 256:240 512:120 1024:60
bash /work/ipc/chain2.sh intraq 0 "W4A4" 2048:30
