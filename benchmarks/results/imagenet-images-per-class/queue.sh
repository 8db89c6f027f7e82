#!/usr/bin/env bash
# The ImageNet queue after chain.sh 1 (one core): the W3A3 column on the two best BNS+CE splits (seed 0;
# datasets exist: training only), IntraQ's synthesis at the four splits (seed 0), then IntraQ seed 1
# and the W3A3 column at seed 1.
while pgrep -f "chain.sh 1" > /dev/null; do sleep 60; done
bash /work/ipc/chain2.sh bns_ce 0 "W3A3" 512:120 1024:60
bash /work/ipc/chain2.sh intraq 0 "W4A4" 512:120 1024:60 256:240 2048:30
bash /work/ipc/chain2.sh intraq 1 "W4A4" 512:120 1024:60 256:240 2048:30
bash /work/ipc/chain2.sh bns_ce 1 "W3A3" 512:120 1024:60
