"""224x224 synthesis on one core: seconds per iteration and peak memory, whole batch vs micro-batches.

The shared ImageNet MobileNetV1 x0.25 (1000 classes; ``INTRAQ_IMAGENET_DIR``, default
``/work/shared/data/imagenet``) as the teacher, IntraQ's losses (BNS + SIL; MDC has no centres in
a first batch) with LOR on every iteration (``lor_prob=1``, the costlier iteration; the preset
draws it on half of them). Each case runs in a fresh process (one torch thread), so its peak
resident memory (``ru_maxrss``) is its own; ``baseline`` is the peak after loading the teacher
and before the batch. Seconds per iteration: the mean over iterations 2..k (the first one warms
up allocators). Also the bytes per image of a Parquet shard of the optimized 224x224 images,
stored in float32 and in float16 (snappy, features included).

    OMP_NUM_THREADS=1 python -m benchmarks.synth_224 --iterations 4 --out benchmarks/results/synth-224

Writes ``<out>.json`` and ``<out>.md``. The 1-minute load average before and after each case is
recorded: on a shared machine, seconds are only comparable between cases of similar load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

IMAGENET = Path(os.environ.get("INTRAQ_IMAGENET_DIR", "/work/shared/data/imagenet"))
#: (batch, micro-batch, channels_last) cases.
CASES = ((64, None, True), (64, None, False), (256, None, True), (256, 64, True))


def teacher() -> torch.nn.Module:
    from intraq_core.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
    from intraq_core.models import create_model

    sys.path.insert(0, str(IMAGENET))
    cfg = ModelConfig(
        arch="mobilenetv1_025:MobileNetV1",
        weights=str(IMAGENET / "mobilenetv1_025_imagenet.pth"),
        num_classes=1000,
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    return create_model(cfg).eval()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_case(batch: int, micro: int | None, channels_last: bool, iterations: int, shards: bool) -> dict[str, Any]:
    """One case in this process: time the iterations, record peak memory (and shard sizes)."""
    from intraq_core.config import SynthConfig
    from intraq_core.seeding import PURPOSE_IMAGE, derive_seed
    from intraq_core.synth.engine import Synthesizer
    from intraq_core.synth.labels import label_plan

    torch.set_num_threads(1)
    model = teacher()
    cfg = SynthConfig(
        method="intraq",
        batch_size=batch,
        iterations=iterations,
        lor_prob=1.0,
        micro_batch_size=micro,
        channels_last=channels_last,
    )
    synth = Synthesizer(model, cfg, image_shape=(3, 224, 224), num_classes=1000)
    labels = label_plan(batch, 1000, seed=0)  # fewer images than classes: distinct classes
    seeds = torch.tensor([derive_seed(0, PURPOSE_IMAGE, i) for i in range(batch)])
    baseline = peak_rss_mb()
    stamps: list[float] = []
    t0 = time.perf_counter()
    result = synth.synthesize(labels, seeds, batch_seed=1, progress=lambda *_: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
    out: dict[str, Any] = {
        "batch": batch,
        "micro_batch": micro,
        "channels_last": channels_last,
        "iterations": iterations,
        "s_per_iteration": sum(steps[1:]) / max(1, len(steps) - 1),
        "first_iteration_s": steps[0],
        "peak_rss_mb": peak_rss_mb(),
        "baseline_rss_mb": baseline,
        "final_total_loss": result.final["total"],
    }
    if shards:
        out["shard_bytes_per_image"] = shard_sizes(result)
    return out


def shard_sizes(result: Any) -> dict[str, float]:
    """Bytes per image of a shard of these images, float32 vs float16."""
    from pipeline.storage.shards import write_shard
    from pipeline.storage.store import Storage

    n = result.images.shape[0]
    meta = {
        "round": 0,
        "config_hash": "benchmark",
        "teacher_sha256": "benchmark",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "num_classes": 1000,
        "seed": 1,
    }
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        storage = Storage.from_url(tmp)
        for k, dtype in enumerate(("float32", "float16")):
            info = write_shard(
                storage,
                k,
                result.images.numpy(),
                result.labels.numpy(),
                result.seeds.numpy(),
                list(range(n)),
                meta,
                features=result.features.numpy(),
                store_dtype=dtype,
            )
            sizes[dtype] = info.bytes / n
    return sizes


def summarize(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """One case over its repeats: median seconds per iteration, the largest peak memory."""
    out = dict(repeats[0])
    out["s_per_iteration_runs"] = [r["s_per_iteration"] for r in repeats]
    out["s_per_iteration"] = statistics.median(out["s_per_iteration_runs"])
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in repeats)
    out["baseline_rss_mb"] = max(r["baseline_rss_mb"] for r in repeats)
    out["load_1min"] = [load for r in repeats for load in r["load_1min"]]
    return out


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        "# 224x224 synthesis: seconds per iteration and peak memory (one CPU core)",
        "",
        f"Date {info['date']}, commit `{info['commit']}`, machine: {info['machine']}.",
        f"Command: `{info['command']}`.",
        "",
        "Teacher: the shared ImageNet MobileNetV1 x0.25 (1000 classes, 224x224). IntraQ's losses with LOR on",
        "every iteration (the costlier iteration), fp32, `OMP_NUM_THREADS=1`, one torch thread. Each case ran",
        "in a fresh process: peak RSS is `ru_maxrss` of that process; the baseline is its peak after loading",
        f"the teacher and before the batch. Seconds per iteration: mean of iterations 2..{info['iterations']},",
        f"median over {info['repeats']} run(s) of each case, the cases interleaved; peak RSS: the largest run.",
        "",
        "| batch | micro-batch | memory format | s / iteration (runs) | image-iterations / s | peak RSS MB | "
        "baseline MB | batch's own MB | 1-min load avg before / after each run |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        fmt = "channels-last" if r["channels_last"] else "NCHW"
        runs = ", ".join(f"{v:.2f}" for v in r["s_per_iteration_runs"])
        loads = "; ".join(f"{a} / {b}" for a, b in zip(r["load_1min"][::2], r["load_1min"][1::2], strict=True))
        lines.append(
            f"| {r['batch']} | {r['micro_batch'] or 'whole batch'} | {fmt} | {r['s_per_iteration']:.2f} ({runs}) | "
            f"{r['batch'] / r['s_per_iteration']:.1f} | {r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} | {loads} |"
        )
    sizes = next((r["shard_bytes_per_image"] for r in rows if "shard_bytes_per_image" in r), None)
    if sizes:
        lines += [
            "",
            "Shard size of the optimized images (Parquet, snappy, with the 256-d feature column):",
            "",
            "| store dtype | bytes / image | 5,120 images | 100,000 images |",
            "| --- | ---: | ---: | ---: |",
        ]
        for dtype, b in sizes.items():
            lines.append(f"| {dtype} | {b:,.0f} | {b * 5120 / 1e9:.2f} GB | {b * 1e5 / 1e9:.1f} GB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/synth-224")
    ap.add_argument("--case", help="internal: batch:micro:channels_last, run in this process")
    args = ap.parse_args()
    if args.case:
        batch, micro, cl = args.case.split(":")
        row = run_case(int(batch), int(micro) or None, cl == "1", args.iterations, shards=args.case == "64:0:1")
        print(json.dumps(row))
        return

    from benchmarks.harness import git_commit, machine

    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):  # the cases interleaved, so a change of load hits them alike
        for batch, micro, cl in CASES:
            case = f"{batch}:{micro or 0}:{int(cl)}"
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, "-m", "benchmarks.synth_224", "--case", case, "--iterations", str(args.iterations)]
            load_before = round(os.getloadavg()[0], 2)
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["load_1min"] = [load_before, round(os.getloadavg()[0], 2)]
            runs.setdefault(case, []).append(row)
            print(json.dumps(row), flush=True)
    rows = [summarize(r) for r in runs.values()]
    torch.set_num_threads(1)
    info = {
        "date": date.today().isoformat(),
        "commit": git_commit(),
        "machine": machine(),
        "iterations": args.iterations,
        "repeats": args.repeats,
        "command": f"OMP_NUM_THREADS=1 python -m benchmarks.synth_224 --iterations {args.iterations} "
        f"--repeats {args.repeats} --out {args.out}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(rows, info))
    print(markdown(rows, info))


if __name__ == "__main__":
    main()
