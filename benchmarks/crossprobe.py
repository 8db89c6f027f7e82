"""Cross held-out signal: every cell of a study scored on the same pool of held-out synthetic images.

Each cell's own held-out images (``distill.holdout_fraction`` of its dataset, never trained on)
rank its epochs, but they cannot rank cells trained on different datasets: a student scores
well on images like its own, and IntraQ's images are easier to agree on than BNS+CE's. The pool
here is the union of the held-out images of every row of the study, at every seed whose datasets
are all complete (no cell trained on any of them), kept part by part (one part per dataset, with
its row and synthesis method). Each cell's kept and starting (calibrated) student is scored on
every part the way the training's selector scores held-out images (teacher agreement and mean KL
over the images and ``distill.watch_views`` augmented views of each,
:func:`intraq_core.distill.distillation_selector`), with the same views for every cell. The
study's table reads the cross held-out signal of ``recipe-choice-cpu.md`` §2 from the parts: each
student on the held-out images of the other synthesis method (:func:`other_method`). The test set
is not read.

Computed and written beside the study's cells by ``python -m benchmarks.studies split --cross``
(then shown in the study's table); e.g. for the budget split of the shipped recipe::

    python -m benchmarks.studies split --cross --table --budget cpu --seeds 0 1 --bits W4A4 W3A3 \\
        --recipes shipped --results-root benchmarks/results/shipped --workdir runs/benchmarks-shipped
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import RECIPES, Bench

#: Seed of the augmented views (the same views for every cell, whatever its own seed).
VIEWS_SEED = 4242


def dataset_images(location: str | Path) -> torch.Tensor:
    """All images of the complete dataset at ``location`` (a dataset folder or URL, or a run
    location holding ``data/``), as the teacher's normalized input.

    Raises ``ValueError`` for a dataset still being written (a partial dataset would score as a
    different one), ``FileNotFoundError`` when ``location`` holds no dataset.
    """
    from pipeline.storage.manifest import MANIFEST_NAME, Manifest, read_all
    from pipeline.storage.store import Storage

    data = Storage.from_url(str(location))
    if not Manifest.exists(data) and Manifest.exists(data.child("data")):
        data = data.child("data")
    if not Manifest.exists(data):
        raise FileNotFoundError(f"{location}: no dataset here (no {MANIFEST_NAME}, nor data/{MANIFEST_NAME})")
    manifest = Manifest.load(data)
    if not manifest.is_complete():
        raise ValueError(
            f"{data.url}: the dataset is not complete ({len(manifest.missing())} of its shards are still missing)"
        )
    return torch.from_numpy(read_all(data, manifest)[0])


def holdout_part(ctx: Any, source: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
    """The held-out images of the dataset of ``ctx`` (its training's ``distill.holdout_fraction`` at
    its seed), with ``source`` and their count."""
    from pipeline.stages.holdout import split_mask
    from pipeline.stages.train import load_dataset
    from pipeline.storage.manifest import Manifest

    images, _, indices = load_dataset(ctx, Manifest.load(ctx.dataset_storage))
    hold = split_mask(np.asarray(indices), ctx.cfg.seed, ctx.cfg.distill.holdout_fraction)
    return {**source, "images": int(hold.sum())}, images[torch.from_numpy(hold)]


def pooled_holdout(bench: Bench, seeds: list[int]) -> list[tuple[dict[str, Any], torch.Tensor]]:
    """The held-out images of every synthetic row at each seed whose rows' datasets are all
    complete, one part per dataset (its source: row, seed, count)."""
    from pipeline.context import RunContext

    rows = [r for r in bench.rows.values() if r.kind == "synthetic"]
    pool: list[tuple[dict[str, Any], torch.Tensor]] = []
    for seed in seeds:
        if not all(bench.dataset_complete(r, seed) for r in rows):
            continue
        done: set[str] = set()
        for row in rows:
            if (row.data_row or row.name) in done:
                continue
            done.add(row.data_row or row.name)
            loc = bench.data_location(row, seed)
            recipe = RECIPES[bench.recipes[0]] if len(bench.recipes) == 1 else ()  # its distill.holdout_fraction
            ctx = RunContext.create(bench.config(row, seed, [f"storage.url={loc}"], recipe))
            pool.append(holdout_part(ctx, {"row": row.name, "seed": seed, "method": ctx.cfg.generate.method}))
    if not pool:
        raise SystemExit("no seed has every row's dataset complete: nothing to pool")
    return pool


def score(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    pool: list[tuple[dict[str, Any], torch.Tensor]],
    cfg: Any,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Teacher agreement and KL of ``student`` on each part of ``pool`` and on the whole, scored as
    the selector of a training with ``cfg`` (a ``DistillConfig``) scores held-out images, with
    the views drawn at :data:`VIEWS_SEED` for every student."""
    from intraq_core.distill import distillation_selector

    parts = []
    for source, images in pool:
        selector = distillation_selector(teacher, images, cfg, device=device, seed=VIEWS_SEED)
        parts.append({**source, **selector.evaluate(student)["holdout"]})
    return {**over(parts), "parts": parts}


def over(parts: list[dict[str, Any]]) -> dict[str, float]:
    """Agreement and KL over the images of ``parts`` (each part a mean over its images and views)."""
    n = sum(p["images"] for p in parts)
    return {k: sum(p[k] * p["images"] for p in parts) / n for k in ("agreement", "kl")}


def score_cells(bench: Bench, pool: list[tuple[dict[str, Any], torch.Tensor]]) -> dict[str, dict[str, Any]]:
    """:func:`score` of each finished cell's starting and kept student on ``pool``."""
    from intraq_core.student import load_student
    from pipeline.context import RunContext

    out: dict[str, dict[str, Any]] = {}
    teacher = None
    for path in sorted(bench.results.glob("*.json")):
        cell = json.loads(path.read_text())
        row = bench.rows.get(cell["row"])
        if row is None or row.kind != "synthetic" or "recipe" not in cell:
            continue
        w, a = (int(x) for x in cell["bits"][1:].split("A"))
        recipe = cell["recipe"]
        # A cell taken in from another study (benchmarks/same_runs.py) trained in that row's folder.
        trained = cell["same_run_as"].rpartition("/")[2].rsplit("-", 2)[0] if cell.get("same_run_as") else row.name
        run = bench.workdir / bench.budget / f"{trained}-s{cell['seed']}" / f"w{w}a{a}-{recipe}"
        if not (run / "student.pt").is_file():
            print(f"{path.name}: no student at {run}, skipped", flush=True)
            continue
        ctx = RunContext.create(bench.config(row, cell["seed"], [f"storage.url={run}"], RECIPES[recipe]))
        if teacher is None:  # every row of a study distils the same teacher
            teacher = ctx.teacher().to(bench.device).eval()
        scores = {
            name: score(load_student(run / file)[0], teacher, pool, ctx.cfg.distill, bench.device)
            for name, file in (("start", "student_calibrated.pt"), ("kept", "student.pt"))
        }
        out[path.stem] = {"row": row.name, "bits": cell["bits"], "seed": cell["seed"], **scores}
        print(f"{path.stem}: kept {scores['kept']['agreement']:.1f}% KL {scores['kept']['kl']:.4f}", flush=True)
    return out


def other_method(scores: dict[str, Any], method: str, method_of: dict[str, str]) -> dict[str, float] | None:
    """Agreement and KL of one student on the held-out images of the other synthesis methods only
    (the cross held-out signal of ``benchmarks/results/recipe-choice-cpu.md`` §2): every student is
    scored on images unlike its own training data. ``method_of`` maps a part's row to its method
    (for parts written before they recorded it); None when no part is of another method."""
    parts = [p for p in scores["parts"] if p.get("method", method_of.get(p["row"])) != method]
    return over(parts) if parts else None


def signal_path(results: Path) -> Path:
    """Where a study's cross held-out scores are kept (beside its cells, not among them)."""
    return results.parent / f"{results.name}-crossprobe.json"


def write_signal(bench: Bench, seeds: list[int]) -> Path:
    """Score every finished cell of ``bench`` on the pool of ``seeds`` and write the scores."""
    torch.set_num_threads(1)
    pool = pooled_holdout(bench, seeds)
    sources = [source for source, _ in pool]
    print(f"pool: {sum(s['images'] for s in sources)} held-out images from {len(sources)} datasets", flush=True)
    payload = {"pool": sources, "views_seed": VIEWS_SEED, "cells": score_cells(bench, pool)}
    path = signal_path(bench.results)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def read_signal(results: Path) -> dict[str, Any]:
    """A study's cross held-out scores as :func:`write_signal` wrote them (``pool``: its parts'
    sources; ``cells``: the scores by cell name); empty when not computed."""
    path = signal_path(results)
    return json.loads(path.read_text()) if path.is_file() else {}
