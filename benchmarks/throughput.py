"""Pipeline overhead: generation and training throughput, bare loop vs the Ray pipeline.

In one run, on the same budget and the same thread count per worker:

- generation: image·iterations/s of a bare single-process loop (``Synthesizer`` in this
  process, one torch thread, shards one after the other, nothing written) vs the Ray
  pipeline (``generate_ray``: actors, Parquet shards, manifest, progress) with 1 and 2
  actors of one CPU each. Overhead = 1 − pipeline(1 actor) / bare loop; with 2 actors the
  ideal is twice the bare loop (the plan's rounds hold two shards so both actors work);
- training: distillation samples/s with 1 vs 2 Ray Train workers (``train_ray``), against
  the single-process loop (``train_local``) of the same recipe.

    python -m benchmarks.throughput --out benchmarks/results/throughput

Writes ``<out>.json`` and ``<out>.md``. Wall times include everything a user waits for
inside each stage (actor start-up, shard writes, Ray Data reads, checkpoints), except the
one-time start of the local Ray cluster.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from benchmarks.harness import machine
from intraq_core.synth.engine import Synthesizer
from pipeline.config import load_run_config
from pipeline.context import RunContext
from pipeline.plan import make_plan


def budget(shards: int, batch: int, iterations: int, extra: list[str]) -> list[str]:
    return [
        f"generate.num_images={shards * batch}",
        f"generate.batch_size={batch}",
        f"generate.iterations={iterations}",
        "generate.shards_per_round=2",
        "generate.method=intraq",
        "ray.cpus_per_actor=1",
        *extra,
    ]


def bare_loop(sets: list[str]) -> float:
    """Image-iterations/s of the engine alone, one thread, shards in sequence."""
    cfg = load_run_config(None, [*sets, "executor=local", "device=cpu"])
    ctx = RunContext.create(cfg)
    torch.set_num_threads(1)
    synth = Synthesizer(
        ctx.teacher(),
        cfg.generate,
        image_shape=ctx.image_shape,
        num_classes=ctx.num_classes,
        normalization=ctx.normalization,
    )
    tasks = make_plan(cfg, ctx.num_classes)
    t0 = time.perf_counter()
    for task in tasks:
        synth.synthesize(torch.tensor(task.labels), torch.tensor(task.image_seeds), task.batch_seed)
    seconds = time.perf_counter() - t0
    return cfg.generate.num_images * cfg.generate.iterations / seconds


def pipeline_generation(sets: list[str], actors: int, root: Path) -> float:
    from pipeline.ray_generate import generate_ray

    cfg = load_run_config(
        None,
        [*sets, "executor=ray", "device=cpu", f"ray.generation_actors={actors}", f"storage.url={root}/gen{actors}"],
    )
    ctx = RunContext.create(cfg)
    t0 = time.perf_counter()
    generate_ray(ctx, progress=False)
    seconds = time.perf_counter() - t0
    return cfg.generate.num_images * cfg.generate.iterations / seconds


def training(sets: list[str], workers: int | None, root: Path, dataset: Path) -> float:
    """Distillation samples/s: Ray Train with ``workers`` workers, or the local loop (None)."""
    from pipeline.shards import Manifest
    from pipeline.train import train_local

    tag = "local" if workers is None else f"w{workers}"
    extra = (
        ["executor=local"]
        if workers is None
        else ["executor=ray", f"ray.train_workers={workers}", "ray.cpus_per_train_worker=0.5"]
    )
    cfg = load_run_config(None, [*sets, *extra, "device=cpu", f"storage.url={root}/train-{tag}", f"dataset={dataset}"])
    ctx = RunContext.create(cfg)
    from pipeline.generate import dataset_storage

    manifest = Manifest.load(dataset_storage(ctx))
    if workers is None:
        torch.set_num_threads(1)
        outcome = train_local(ctx, manifest, progress=False)
    else:
        from pipeline.ray_train import train_ray

        outcome = train_ray(ctx, manifest, progress=False)
    samples = outcome.num_train * cfg.distill.epochs
    return samples / outcome.seconds_distill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/throughput")
    args = ap.parse_args()

    from pipeline.ray_session import start_ray, stop_ray

    sets = budget(args.shards, args.batch, args.iterations, [f"distill.epochs={args.epochs}", "distill.batch_size=64"])
    root = Path(tempfile.mkdtemp(prefix="intraq-throughput-"))
    result: dict = {"date": date.today().isoformat(), "machine": machine(), "budget": sets}
    result["bare_img_it_per_s"] = bare_loop(sets)
    start_ray(load_run_config(None, [*sets, "ray.num_cpus=2", "ray.dashboard=false"]), None)
    try:
        # Warm-up: the first actor start in a fresh cluster pays for worker processes.
        pipeline_generation(
            [*sets, "generate.iterations=1", "generate.num_images=64", "generate.batch_size=32"], 1, root / "warm"
        )
        result["pipeline_1_actor_img_it_per_s"] = pipeline_generation(sets, 1, root)
        result["pipeline_2_actors_img_it_per_s"] = pipeline_generation(sets, 2, root)
        dataset = root / "gen2"
        result["train_local_samples_per_s"] = training(sets, None, root, dataset)
        result["train_1_worker_samples_per_s"] = training(sets, 1, root, dataset)
        result["train_2_workers_samples_per_s"] = training(sets, 2, root, dataset)
    finally:
        stop_ray()
    bare = result["bare_img_it_per_s"]
    result["overhead_1_actor"] = 1.0 - result["pipeline_1_actor_img_it_per_s"] / bare
    result["overhead_2_actors_vs_2x_bare"] = 1.0 - result["pipeline_2_actors_img_it_per_s"] / (2 * bare)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        "# Pipeline throughput",
        "",
        f"Command: `python -m benchmarks.throughput --shards {args.shards} --batch {args.batch} "
        f"--iterations {args.iterations} --epochs {args.epochs}`. Date {result['date']}. Machine: {result['machine']}.",
        f"Budget: `{' '.join(sets)}`.",
        "",
        "| stage | setting | throughput | vs reference |",
        "| --- | --- | ---: | --- |",
        f"| generation | bare loop, 1 process, 1 thread | {bare:.1f} img·it/s | reference |",
        f"| generation | pipeline, 1 actor × 1 CPU | {result['pipeline_1_actor_img_it_per_s']:.1f} img·it/s "
        f"| overhead {100 * result['overhead_1_actor']:.1f}% |",
        f"| generation | pipeline, 2 actors × 1 CPU | {result['pipeline_2_actors_img_it_per_s']:.1f} img·it/s "
        f"| {100 * result['overhead_2_actors_vs_2x_bare']:.1f}% below 2× bare |",
        f"| distillation | local loop, 1 thread | {result['train_local_samples_per_s']:.1f} samples/s | reference |",
        f"| distillation | Ray Train, 1 worker | {result['train_1_worker_samples_per_s']:.1f} samples/s | "
        f"{result['train_1_worker_samples_per_s'] / result['train_local_samples_per_s']:.2f}× local |",
        f"| distillation | Ray Train, 2 workers | {result['train_2_workers_samples_per_s']:.1f} samples/s | "
        f"{result['train_2_workers_samples_per_s'] / result['train_1_worker_samples_per_s']:.2f}× 1 worker |",
        "",
    ]
    Path(f"{out}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
