"""Pipeline overhead: the Ray pipeline against the bare loops, side by side, on one machine.

    python -m benchmarks.throughput --stage distill --out DIR      # training only
    python -m benchmarks.throughput --stage generate --out DIR     # generation only
    python -m benchmarks.throughput --out DIR                      # both

Writes ``DIR/throughput.json`` and ``DIR/throughput.md``. A run of one stage replaces that stage's
section of an existing ``throughput.json`` and keeps the other's: each section records its own
date, commit and command.

* **distill**: on ONE synthetic dataset, the local executor (``train_local``: the training loop
  in this process, one torch thread) and Ray Train with 1 and 2 workers (``train_ray``: the same
  loop in each worker, one thread each, the global batch split between them). Per variant:
  ``samples_per_s``, the steady state after the first epoch (samples = optimizer steps x global
  batch, the same for every variant since the recipe does not depend on the worker count,
  divided by the wall time of epochs 2..E), and ``startup_s``, from the call of the training
  stage to its first step (reading the data, calibration, for Ray the trainer, worker group,
  process group and the workers' data loading). ``ratio_ray1_vs_local`` and
  ``ratio_ray2_vs_ray1`` compare the steady states. The variants run interleaved,
  ``--repeats`` times, and the median of each is reported (the machine may be shared).
* **generate**: image·iterations/s of a bare single-process loop (``Synthesizer`` in this
  process, one torch thread, shards one after the other, nothing written) against the Ray
  pipeline (``generate_ray``: actors, Parquet shards, manifest) with 1 and 2 actors of one CPU
  each, wall time of the whole stage (actor start-up included). ``ratio_1_actor_vs_bare`` is
  the pipeline's share of the bare loop's speed; with 2 actors the ideal is twice the bare loop.

Every measurement records the 1-minute load average before and after it: on a shared machine
the numbers are only comparable when the load was the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import git_commit, machine
from intraq_core.synth.engine import Synthesizer
from pipeline.config import load_run_config
from pipeline.context import RunContext
from pipeline.stages.plan import make_plan

VARIANTS = ("local", "ray_1_worker", "ray_2_workers")
LABELS = {
    "local": "local loop, 1 thread",
    "ray_1_worker": "Ray Train, 1 worker",
    "ray_2_workers": "Ray Train, 2 workers",
}


def load() -> float:
    """The 1-minute load average."""
    return round(os.getloadavg()[0], 2)


def generation_budget(args: argparse.Namespace) -> list[str]:
    return [
        f"generate.num_images={args.shards * args.batch}",
        f"generate.batch_size={args.batch}",
        f"generate.iterations={args.iterations}",
        "generate.shards_per_round=2",
        "generate.method=intraq",
        "ray.cpus_per_actor=1",
        "device=cpu",
    ]


def distill_budget(args: argparse.Namespace) -> list[str]:
    return [
        f"generate.num_images={args.train_images}",
        "generate.batch_size=256",
        "generate.method=gaussian",  # throughput does not depend on what the images show
        f"distill.epochs={args.epochs}",
        f"distill.batch_size={args.train_batch}",
        "quant.calibration_batches=2",
        "device=cpu",
    ]


# -- generation -------------------------------------------------------------------------------


def bare_generation(sets: list[str]) -> dict[str, float]:
    """Image-iterations/s of the engine alone, one thread, shards in sequence."""
    cfg = load_run_config(None, [*sets, "executor=local"])
    ctx = RunContext.create(cfg)
    torch.set_num_threads(1)
    before = load()
    synth = Synthesizer(
        ctx.teacher(),
        cfg.generate,
        image_shape=ctx.image_shape,
        num_classes=ctx.num_classes,
        normalization=ctx.normalization,
    )
    t0 = time.perf_counter()
    for task in make_plan(cfg, ctx.num_classes):
        synth.synthesize(torch.tensor(task.labels), torch.tensor(task.image_seeds), task.batch_seed)
    seconds = time.perf_counter() - t0
    work = cfg.generate.num_images * cfg.generate.iterations
    return {"img_it_per_s": work / seconds, "seconds": seconds, "load_before": before, "load_after": load()}


def pipeline_generation(sets: list[str], actors: int, url: Path) -> dict[str, float]:
    """Image-iterations/s of ``generate_ray`` with ``actors`` actors, whole-stage wall time."""
    from pipeline.ray.generate import generate_ray

    cfg = load_run_config(None, [*sets, "executor=ray", f"ray.generation_actors={actors}", f"storage.url={url}"])
    ctx = RunContext.create(cfg)
    before = load()
    t0 = time.perf_counter()
    _, stats = generate_ray(ctx, progress=False)
    seconds = time.perf_counter() - t0
    work = cfg.generate.num_images * cfg.generate.iterations
    return {
        "img_it_per_s": work / seconds,
        "seconds": seconds,
        # Inside the actors only: the optimization loops, without start-up, writes and dispatch.
        "actor_img_it_per_s": stats.image_iterations / stats.seconds * actors,
        "load_before": before,
        "load_after": load(),
    }


def bench_generation(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    sets = generation_budget(args)
    # Warm-up: the first actor start in a fresh cluster pays for worker processes.
    warm = [*sets, "generate.iterations=1", "generate.num_images=64", "generate.batch_size=32"]
    pipeline_generation(warm, 1, root / "gen-warm")
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "ray_1_actor": [], "ray_2_actors": []}
    for r in range(args.repeats):
        runs["bare"].append(bare_generation(sets))
        runs["ray_1_actor"].append(pipeline_generation(sets, 1, root / f"gen1-{r}"))
        runs["ray_2_actors"].append(pipeline_generation(sets, 2, root / f"gen2-{r}"))
    out: dict[str, Any] = {"budget": sets, "repeats": args.repeats}
    work = args.shards * args.batch * args.iterations
    for name, rs in runs.items():
        out[name] = {"img_it_per_s": statistics.median(x["img_it_per_s"] for x in rs), "runs": rs}
        if name != "bare":
            out[name]["actor_img_it_per_s"] = statistics.median(x["actor_img_it_per_s"] for x in rs)
            out[name]["fixed_s"] = statistics.median(x["seconds"] - work / x["actor_img_it_per_s"] for x in rs)
    bare = out["bare"]["img_it_per_s"]
    out["ratio_1_actor_vs_bare"] = out["ray_1_actor"]["img_it_per_s"] / bare
    out["ratio_2_actors_vs_bare"] = out["ray_2_actors"]["img_it_per_s"] / bare
    return out


# -- distillation -----------------------------------------------------------------------------


def make_dataset(args: argparse.Namespace, root: Path) -> Path:
    from pipeline.stages.generate import generate_local

    url = root / "dataset"
    cfg = load_run_config(None, [*distill_budget(args), "executor=local", f"storage.url={url}"])
    generate_local(RunContext.create(cfg), progress=False)
    return url


def train_variant(args: argparse.Namespace, variant: str, url: Path, dataset: Path) -> dict[str, Any]:
    """One training stage: steady-state samples/s after the first epoch, and start-up seconds."""
    from pipeline.storage.manifest import Manifest

    extra = {
        "local": ["executor=local"],
        "ray_1_worker": ["executor=ray", "ray.train_workers=1", "ray.cpus_per_train_worker=1"],
        "ray_2_workers": ["executor=ray", "ray.train_workers=2", "ray.cpus_per_train_worker=1"],
    }[variant]
    cfg = load_run_config(None, [*distill_budget(args), *extra, f"storage.url={url}", f"dataset={dataset}"])
    ctx = RunContext.create(cfg)
    manifest = Manifest.load(ctx.dataset_storage)
    before = load()
    t0 = time.perf_counter()
    if variant == "local":
        from pipeline.stages.train import train_local

        torch.set_num_threads(1)
        outcome = train_local(ctx, manifest, progress=False)
    else:
        from pipeline.ray.train import train_ray

        outcome = train_ray(ctx, manifest, progress=False)
    wall = time.perf_counter() - t0
    steady = outcome.epoch_seconds[1:]
    if len(steady) != cfg.distill.epochs - 1:
        raise RuntimeError(f"{variant}: expected {cfg.distill.epochs} epoch times, got {outcome.epoch_seconds}")
    samples = outcome.steps_per_epoch * outcome.global_batch_size * len(steady)
    return {
        "samples_per_s": samples / sum(steady),
        "startup_s": outcome.startup_s,
        "stage_wall_s": wall,
        "epoch_seconds": outcome.epoch_seconds,
        "train_workers": outcome.train_workers,
        "global_batch_size": outcome.global_batch_size,
        "steps_per_epoch": outcome.steps_per_epoch,
        "optimizer_steps": outcome.optimizer_steps,
        "load_before": before,
        "load_after": load(),
    }


def bench_distill(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    dataset = make_dataset(args, root)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for variant in VARIANTS:
            runs[variant].append(train_variant(args, variant, root / f"{variant}-{r}", dataset))
    out: dict[str, Any] = {"budget": distill_budget(args), "dataset_images": args.train_images, "repeats": args.repeats}
    for variant, rs in runs.items():
        out[variant] = {
            "samples_per_s": statistics.median(x["samples_per_s"] for x in rs),
            "startup_s": statistics.median(x["startup_s"] for x in rs),
            "runs": rs,
        }
    out["ratio_ray1_vs_local"] = out["ray_1_worker"]["samples_per_s"] / out["local"]["samples_per_s"]
    out["ratio_ray2_vs_ray1"] = out["ray_2_workers"]["samples_per_s"] / out["ray_1_worker"]["samples_per_s"]
    return out


# -- report -----------------------------------------------------------------------------------


def _loads(runs: list[dict[str, Any]]) -> str:
    values = [v for r in runs for v in (r["load_before"], r["load_after"])]
    return f"{min(values):.1f}–{max(values):.1f}"


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        "# Pipeline throughput",
        "",
        f"Machine: {result['machine']}.",
        "The load column is the machine's 1-minute load average around the runs of that row (the",
        "machine is shared: a load above its core count means other jobs were running).",
        "",
    ]
    d = result.get("distill")
    if d:
        lines += [
            "## Distillation (one dataset, the same recipe for every variant)",
            "",
            _provenance(d, result, command),
            "",
            f"Budget: `{' '.join(d['budget'])}`; median of {d['repeats']} interleaved runs.",
            "",
            "| variant | steady samples/s (after epoch 1) | start-up s | vs local | load |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        local = d["local"]["samples_per_s"]
        for v, label in zip(
            VARIANTS, ("local loop, 1 thread", "Ray Train, 1 worker", "Ray Train, 2 workers"), strict=True
        ):
            row = d[v]
            lines.append(
                f"| {label} | {row['samples_per_s']:.1f} | {row['startup_s']:.1f} | "
                f"{row['samples_per_s'] / local:.2f}× | {_loads(row['runs'])} |"
            )
        lines += [
            "",
            f"`ratio_ray1_vs_local` = {d['ratio_ray1_vs_local']:.3f}; 2 workers vs 1: {d['ratio_ray2_vs_ray1']:.2f}×.",
            "",
        ]
    g = result.get("generate")
    if g:
        lines += [
            "## Generation",
            "",
            _provenance(g, result, command),
            "",
            f"Budget: `{' '.join(g['budget'])}`; median of {g['repeats']} interleaved runs.",
            "",
            "| setting | img·it/s (whole stage) | vs bare loop | inside the actors | fixed s | load |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
            f"| bare loop, 1 process, 1 thread | {g['bare']['img_it_per_s']:.1f} | 1.00× | | "
            f"| {_loads(g['bare']['runs'])} |",
        ]
        for name, label, ratio in (
            ("ray_1_actor", "pipeline, 1 actor × 1 CPU", g["ratio_1_actor_vs_bare"]),
            ("ray_2_actors", "pipeline, 2 actors × 1 CPU", g["ratio_2_actors_vs_bare"]),
        ):
            row = g[name]
            lines.append(
                f"| {label} | {row['img_it_per_s']:.1f} | {ratio:.3f}× | {row['actor_img_it_per_s']:.1f} | "
                f"{row['fixed_s']:.1f} | {_loads(row['runs'])} |"
            )
        lines += [
            "",
            "Whole stage: the wall time of `generate_ray`, actor start-up (process, imports, teacher),",
            "shard writes and dispatch included. Inside the actors: their optimization loops alone.",
            "Fixed s: whole-stage seconds minus the loops' seconds (with 2 actors, per actor).",
            "One actor against the bare loop, each interleaved pair: "
            + ", ".join(
                f"{a['img_it_per_s'] / b['img_it_per_s']:.3f}×"
                for a, b in zip(g["ray_1_actor"]["runs"], g["bare"]["runs"], strict=True)
            )
            + ".",
            "",
        ]
    return "\n".join(lines)


def _provenance(section: dict[str, Any], result: dict[str, Any], command: str) -> str:
    """``Command …, date …, commit …`` of one stage's section (older files kept them at the top level)."""
    date_ = section.get("date", result.get("date", "?"))
    return f"Command: `{section.get('command', command)}`. Date {date_}, commit `{section.get('commit', '?')}`."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=("distill", "generate", "all"), default="all")
    ap.add_argument("--out", default="benchmarks/results/throughput", help="output directory")
    ap.add_argument("--repeats", type=int, default=2)
    # Generation budget (the "medium" budget: 4 shards of 128 images, 60 iterations).
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=60)
    # Distillation budget.
    ap.add_argument("--train-images", type=int, default=1024)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    args = ap.parse_args()

    from pipeline.ray.session import start_ray, stop_ray

    out = Path(args.out)
    root = Path(tempfile.mkdtemp(prefix="intraq-throughput-"))
    command = f"python -m benchmarks.throughput --stage {args.stage} --repeats {args.repeats} --out {args.out}"
    stamp = {"date": date.today().isoformat(), "commit": git_commit(), "command": command}
    previous = out / "throughput.json"
    result: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() else {}
    result.update({"machine": machine(), "args": vars(args)})
    # The product's default Ray: the dashboard (and its State API, which Ray Train polls) on.
    start_ray(load_run_config(None, [f"ray.num_cpus={args.ray_cpus}", "ray.dashboard=true"]), None)
    try:
        if args.stage in ("distill", "all"):
            result["distill"] = {**bench_distill(args, root), **stamp}
            for key in ("ratio_ray1_vs_local", "ratio_ray2_vs_ray1"):
                result[key] = result["distill"][key]
            for v in VARIANTS:
                result[v] = {k: result["distill"][v][k] for k in ("samples_per_s", "startup_s")}
        if args.stage in ("generate", "all"):
            result["generate"] = {**bench_generation(args, root), **stamp}
            result["ratio_1_actor_vs_bare"] = result["generate"]["ratio_1_actor_vs_bare"]
    finally:
        stop_ray()
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result, command)
    (out / "throughput.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
