"""Run-once links between studies (benchmarks/same_runs.py): what is the same run, and what is not."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.harness import BUDGETS, RECIPES, Bench, machine, parse_bits
from benchmarks.same_runs import cell_identity, link_same_runs, planned_identity
from benchmarks.split_study import split_rows
from benchmarks.studies import LOR_ROWS, METHOD_ROWS, data_rows


def _bench(tmp_path: Path, rows, seeds=(0, 1), recipes=("shipped",), bits=("W4A4",)) -> Bench:
    return Bench(
        "cpu",
        rows,
        tmp_path / "work",
        tmp_path / "results" / "x",
        list(seeds),
        parse_bits(list(bits)),
        False,
        list(recipes),
    )


def test_same_run_identity_resolves_the_default_steps_per_epoch(tmp_path: Path) -> None:
    """Table 1's L+F, Table 2's 1,280 images and the split's IntraQ 1,280 x 150 are one run at seed 0
    (1,167 training images: 9 steps of 128, what the split and data rows set explicitly); at seed 1
    the default resolves to 8 steps (1,151 images) and L+F is another run."""
    split, data = split_rows("cpu"), data_rows("cpu")
    bench_split, bench_lor, bench_data = (_bench(tmp_path, r) for r in (split, LOR_ROWS, data))
    ref = {s: planned_identity(bench_split, split["split_intraq_1280x150"], s, "W4A4") for s in (0, 1)}
    assert planned_identity(bench_data, data["data_1280"], 0, "W4A4") == ref[0]
    assert planned_identity(bench_data, data["data_1280"], 1, "W4A4") == ref[1]
    assert planned_identity(bench_lor, LOR_ROWS["lor_LF"], 0, "W4A4") == ref[0]
    assert planned_identity(bench_lor, LOR_ROWS["lor_LF"], 1, "W4A4") != ref[1]
    assert planned_identity(bench_split, split["split_intraq_1280x150"], 0, "W3A3") != ref[0]
    assert ref[0] != ref[1]


def test_a_row_keeps_its_own_settings_under_a_recipe(tmp_path: Path) -> None:
    """The shipped recipe sets quant.method=reconstruct; the SQuant-started row must stay SQuant
    (applied after the row, the recipe made it the IntraQ row's run)."""
    bench = _bench(tmp_path, METHOD_ROWS)
    assert bench.config(METHOD_ROWS["squant_intraq"], 0, recipe=RECIPES["shipped"]).quant.method == "squant"
    assert planned_identity(bench, METHOD_ROWS["squant_intraq"], 0, "W4A4") != planned_identity(
        bench, METHOD_ROWS["intraq"], 0, "W4A4"
    )
    assert (
        planned_identity(
            _bench(tmp_path, METHOD_ROWS, recipes=("shipped", "default")), METHOD_ROWS["intraq"], 0, "W4A4"
        )
        is None
    )


def _cell(bench: Bench, row, seed: int, commit: str, **extra) -> dict:
    return {
        "row": row.name,
        "label": row.label,
        "bits": "W4A4",
        "seed": seed,
        "budget_settings": [],
        "row_settings": list(row.settings),
        "recipe_settings": RECIPES["shipped"],
        "run_settings": [*bench.settings(row, seed, RECIPES["shipped"]), "quant.w_bits=4", "quant.a_bits=4"],
        "recipe_candidates": {"shipped": {}},
        "recipe": "shipped",
        "commit": commit,
        "machine": machine(),
        "top1_all": 90.12,
        **extra,
    }


def test_link_same_runs_copies_only_a_same_run_at_the_same_commit(tmp_path: Path) -> None:
    split = split_rows("cpu")
    source = _bench(tmp_path, split)
    source.results = tmp_path / "results" / "study-split-cpu"
    source.results.mkdir(parents=True)
    row = split["split_intraq_1280x150"]
    for seed in (0, 1):
        path = source.cell_path(row, (4, 4), seed)
        path.write_text(json.dumps(_cell(source, row, seed, "abc1234")))
    assert cell_identity(json.loads(source.cell_path(row, (4, 4), 0).read_text())) == planned_identity(
        source, row, 0, "W4A4"
    )

    target = _bench(tmp_path, LOR_ROWS)
    target.results = tmp_path / "results" / "study-lor-cpu"
    assert link_same_runs(target, {source.results: split}, "other00") == []  # another commit: nothing
    linked = link_same_runs(target, {source.results: split}, "abc1234")
    assert linked == ["lor_LF-W4A4-s0.json = study-split-cpu/split_intraq_1280x150-W4A4-s0.json"]  # seed 1: 8 steps
    cell = json.loads((target.results / "lor_LF-W4A4-s0.json").read_text())
    assert (cell["row"], cell["label"], cell["top1_all"]) == ("lor_LF", LOR_ROWS["lor_LF"].label, 90.12)
    assert link_same_runs(target, {source.results: split}, "abc1234") == []  # once


def test_cells_written_before_run_settings_resolve_with_the_recipe_last(tmp_path: Path) -> None:
    """The harness used to apply the recipe after the row: an old SQuant-started cell was the IntraQ run."""
    bench = _bench(tmp_path, METHOD_ROWS)
    old = _cell(bench, METHOD_ROWS["squant_intraq"], 0, "c0ffee0")
    del old["run_settings"]
    old["budget_settings"] = list(BUDGETS["cpu"])
    assert cell_identity(old) == planned_identity(bench, METHOD_ROWS["intraq"], 0, "W4A4")
    assert cell_identity({**old, "recipe_candidates": {"shipped": {}, "default": {}}}) is None
