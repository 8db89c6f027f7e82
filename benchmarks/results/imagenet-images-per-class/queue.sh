#!/usr/bin/env bash
# The ImageNet queue for the next session (one core, resumable: finished datasets and runs are skipped,
# an interrupted train run is resumed). Worktrees: `git worktree add /work/inet-ship 9c8c15c` (ship.sh,
# half.sh: the shipped configs) and `git worktree add /work/inet-ipc 7fca5b1` (chain2.sh: the
# images-per-class rows); scripts copied to /work/ship and /work/ipc. Done in session 8: seed 1 of the
# shipped configs and of the W8A8 control, IntraQ 512 and 1,024 seed 1. Done in session 9: IntraQ 2,048 x 30
# at both seeds, then decide.sh (-> method-final-s01.md) and method_table.sh (-> method-split-s01.md).
# Nothing is left in this queue; rerunning it only skips finished work.
set -u
bash /work/ipc/chain2.sh intraq 0 "W4A4" 2048:30
bash /work/ipc/chain2.sh intraq 1 "W4A4" 2048:30
