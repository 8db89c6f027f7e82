# Helpers sourced by this folder's queue scripts (chain2.sh, ship.sh, half.sh, tiebreak.sh), from the main
# checkout (`source /work/main/benchmarks/results/imagenet-images-per-class/lib.sh`), so the copies that
# run from /work/ship and /work/ipc share one definition.

# A dataset counts as done only when its manifest says complete (the manifest is written with the first
# shard; `complete` is the saved Manifest.is_complete()).
complete() { python3 -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get('complete') else 1)" "$1/data/manifest.json" 2>/dev/null; }

# A train run a session's end interrupted holds its run.yaml: continue it (--resume) rather than fail.
resume() { [ -f "$1/run.yaml" ] && echo --resume; }
