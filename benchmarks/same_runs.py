"""Cells and datasets that one study would compute again, taken from another study's run.

Several studies contain the same run: the budget split's ``IntraQ 1,280 × 150`` row, Table 1's
``L+F`` (the reference code's LOR), Table 2's 1,280 images, Table 3's IntraQ and the MDC row of
MDC vs ADI resolve to one run config at a seed whose default distillation steps are those the
split and data rows set (seed 0 at the CPU budget; at seed 1 the first three and the last three
are two runs). At ~25 core-minutes a cell, computing it once per
study is hours of CPU for the same numbers (a run is deterministic on one machine). Before a
study runs, :func:`link_same_runs` writes each cell whose run another study already finished
as a copy of that cell (its own row name and label, ``same_run_as`` naming the source), and
:func:`link_same_datasets` points a row's dataset folder at a finished dataset of the same
identity, so the harness skips both (it skips every cell whose file exists).

A cell is the same run when, resolved by the config code of this checkout: the run config of
its one recipe (``run_settings`` as the cell recorded them) is equal (``RunConfig.config_hash``:
model, synthesis, quantization, distillation, evaluation, seed; storage locations aside;
distillation steps per epoch resolved, so ``distill.iterations_per_epoch=9`` equals a default
that resolves to 9 — the default depends on the seed's held-out split, so it may not), and the
source cell ran at the commit the study runs at (a checkout with uncommitted code changes records
``<commit>-dirty`` and never matches), on this machine. Cells that chose among
several recipes are never linked (their choice depends on the other candidates' results).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from benchmarks.harness import RECIPES, Bench, Row, machine


def run_identity(settings: list[str]) -> str | None:
    """Hash of the run config that ``settings`` (applied in order) resolve to; None where the
    config alone does not fix the run (``generate.min_images_per_class`` sizes the plan from the
    teacher's class count when the run starts)."""
    from intraq_core.distill import steps_per_epoch
    from pipeline.config import load_run_config
    from pipeline.stages.holdout import training_images

    cfg = load_run_config(None, settings)
    if cfg.generate.min_images_per_class:
        return None
    d = cfg.distill
    if d.iterations_per_epoch is None:
        n = training_images(cfg.generate.num_images, cfg.seed, d.holdout_fraction)
        cfg = cfg.model_copy(update={"distill": d.model_copy(update={"iterations_per_epoch": steps_per_epoch(n, d)})})
    return cfg.config_hash()


def _read(path: Path) -> dict[str, Any]:
    """A JSON file, or {} while another process is still writing it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return {}


def _bits(bits: str) -> list[str]:
    w, a = bits[1:].split("A")
    return [f"quant.w_bits={w}", f"quant.a_bits={a}"]


def cell_identity(cell: dict[str, Any]) -> str | None:
    """The run identity of a finished cell from what it recorded (None: not linkable)."""
    if len(cell.get("recipe_candidates") or {}) != 1 or "recipe_settings" not in cell:
        return None
    if "run_settings" in cell:
        return run_identity(cell["run_settings"])
    # Cells written before run_settings was recorded: the harness then applied the recipe after
    # the row's settings.
    seed = [f"seed={cell['seed']}", "executor=local"]
    return run_identity(
        [*cell["budget_settings"], *cell["row_settings"], *seed, *cell["recipe_settings"], *_bits(cell["bits"])]
    )


def planned_identity(bench: Bench, row: Row, seed: int, bits: str) -> str | None:
    """The run identity of a cell ``bench`` would compute (None: not linkable)."""
    if row.kind != "synthetic" or len(bench.recipes) != 1:
        return None
    return run_identity([*bench.settings(row, seed, RECIPES[bench.recipes[0]]), *_bits(bits)])


def link_same_runs(target: Bench, sources: dict[Path, dict[str, Row]], commit: str) -> list[str]:
    """Write each missing cell of ``target`` that a source cell already ran; returns their names.

    ``sources`` maps results folders to their rows (only synthetic rows' cells are sources);
    ``commit`` is the commit ``target`` runs at (a source cell must have run at it too).
    """
    here = machine()
    index: dict[str, Path] = {}
    for folder, rows in sources.items():
        if folder.resolve() == target.results.resolve():
            continue
        for path in sorted(folder.glob("*.json")):
            cell = _read(path)
            row = rows.get(cell.get("row", ""))
            if row is None or row.kind != "synthetic" or "same_run_as" in cell:
                continue
            if cell.get("commit") != commit or cell.get("machine") != here:
                continue
            ident = cell_identity(cell)
            if ident is not None:
                index.setdefault(ident, path)
    linked = []
    for row in target.rows.values():
        for seed in target.seeds:
            for w, a in target.bits:
                bits = f"W{w}A{a}"
                path = target.cell_path(row, (w, a), seed)
                ident = planned_identity(target, row, seed, bits)
                if path.exists() or ident is None or ident not in index:
                    continue
                source = index[ident]
                cell = json.loads(source.read_text())
                cell.update(
                    row=row.name,
                    label=row.label,
                    row_settings=list(row.settings),
                    same_run_as=f"{source.parent.name}/{source.name}",
                )
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(cell, indent=1) + "\n")
                linked.append(f"{path.name} = {cell['same_run_as']}")
    return linked


def _dataset_identity(bench: Bench, row: Row, seed: int) -> str | None:
    cfg = bench.config(row, seed)
    return None if cfg.generate.min_images_per_class else cfg.dataset_hash()


def link_same_datasets(target: Bench, sources: dict[str, Row]) -> list[str]:
    """Point each missing dataset of ``target``'s synthetic rows at a finished one of the same
    identity in the same work folder (``sources``: every row whose dataset may be there, by name).

    The row's folder is created and its ``data`` is a symbolic link, so the row's own trainings
    stay in its own folder; returns what was linked.
    """
    base = target.workdir / target.budget
    have: dict[str, Path] = {}
    for folder in sorted(base.glob("*-s*")):
        name, _, seed = folder.name.rpartition("-s")
        row = sources.get(name)
        if row is None or row.kind != "synthetic" or not seed.isdigit() or folder.joinpath("data").is_symlink():
            continue
        manifest = folder / "data" / "manifest.json"
        ident = _dataset_identity(target, row, int(seed))
        if ident is not None and manifest.is_file() and _read(manifest).get("complete"):
            have.setdefault(ident, folder)
    linked = []
    for row in target.rows.values():
        if row.kind != "synthetic":
            continue
        for seed in target.seeds:
            loc = base / f"{row.data_row or row.name}-s{seed}"
            ident = _dataset_identity(target, row, seed)
            source = have.get(ident) if ident is not None else None
            if loc.joinpath("data").exists() or loc.joinpath("data").is_symlink() or source is None or source == loc:
                continue
            loc.mkdir(parents=True, exist_ok=True)
            os.symlink(source / "data", loc / "data")
            if (source / "generation_seconds.json").is_file():
                (loc / "generation_seconds.json").write_text((source / "generation_seconds.json").read_text())
            linked.append(f"{loc.name}/data -> {source.name}/data")
    return linked
