"""runs_table: rows from run folders or from metrics files kept beside a table."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.runs_table import _load, grouped_table

METRICS = {
    "fp_top1": 60.0,
    "ptq_top1": 10.0,
    "quant_top1": 15.0,
    "seconds": {},
    "num_images": 1024,
    "gen_iterations": 60,
    "epochs": 10,
    "training": {"kept_final": False, "selected_epoch": 3, "holdout_agreement_final": {"agreement": 40.0, "kl": 1.0}},
}


def test_a_metrics_file_reads_as_its_run_folder(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(METRICS))
    (tmp_path / "n1024-s0-metrics.json").write_text(json.dumps({**METRICS, "quant_top1": 17.0}))
    assert _load(str(tmp_path / "run"))["quant_top1"] == 15.0
    assert _load(str(tmp_path / "n1024-s0-metrics.json"))["quant_top1"] == 17.0


def test_grouped_rows_average_over_seeds() -> None:
    second = {"agreement": 44.0, "kl": 0.8}
    rows = [
        ("BNS+CE, seed 0", METRICS),
        (
            "BNS+CE, seed 1",
            {**METRICS, "quant_top1": 17.0, "training": {**METRICS["training"], "holdout_agreement_final": second}},
        ),
    ]
    line = grouped_table(rows, {}).splitlines()[2]
    # kept 15 and 17: mean 16.00, sample std 1.41; drop from FP 45 and 43
    assert line.startswith("| BNS+CE | 1024 × 60 |") and "| 2 |" in line
    assert "| 16.00 ± 1.41 | 44.00 ± 1.41 |" in line and "epoch 4, epoch 4" in line
    # own held-out agreement 40 and 44 (std 2.83), KL 1.0 and 0.8 (std 0.141)
    assert "| 42.0 ± 2.8 (0.900 ± 0.141) |" in line


def test_group_signals_collect_each_settings_kept_probe_agreement_and_cross_kl() -> None:
    """The per-setting inputs of the data-free choice: the KEPT model's probe agreement and cross
    held-out KL (not the start's, not the other field), one value per seed, rows without a score
    (an empty pool) left out."""
    from benchmarks.runs_table import group_signals

    def sig(start: tuple[float, float], kept: tuple[float, float]) -> dict[str, dict[str, float]]:
        return {
            "start": dict(zip(("agreement", "kl"), start, strict=True)),
            "kept": dict(zip(("agreement", "kl"), kept, strict=True)),
        }

    rows = [("A, seed 0", METRICS), ("A, seed 1", METRICS), ("B, seed 0", METRICS)]
    signals = {
        "probe agreement (KL), start → kept": {
            "A, seed 0": sig((1.0, 9.0), (20.0, 0.9)),
            "A, seed 1": sig((2.0, 8.0), (24.0, 0.8)),
            "B, seed 0": sig((3.0, 7.0), (10.0, 1.7)),
        },
        "cross held-out agreement (KL), start → kept": {
            "A, seed 0": sig((50.0, 3.0), (48.0, 1.15)),
            "A, seed 1": sig((51.0, 4.0), (49.0, 1.25)),
            "B, seed 0": None,
        },
        "tie-break probe agreement (KL), start → kept": {
            "A, seed 0": sig((4.0, 2.0), (13.0, 0.94)),
            "A, seed 1": sig((5.0, 2.1), (14.0, 0.95)),
            "B, seed 0": sig((6.0, 2.2), (12.0, 0.90)),
        },
    }
    assert group_signals(rows, signals) == {
        "A": {"probe": [20.0, 24.0], "cross_kl": [1.15, 1.25], "tiebreak": [13.0, 14.0]},
        "B": {"probe": [10.0], "cross_kl": [], "tiebreak": [12.0]},
    }


def test_cross_pool_takes_each_dataset_once_whether_a_row_or_a_pool_dataset(monkeypatch) -> None:
    """A train run's dataset and the same dataset given with --pool (its generate run) are one
    part of the cross pool, so no dataset weighs twice; other datasets and seeds are parts of their own."""
    from types import SimpleNamespace

    import benchmarks.crossprobe
    from benchmarks.runs_table import cross_pool

    monkeypatch.setattr(benchmarks.crossprobe, "holdout_part", lambda ctx, source: (source, None))

    def ctx(dataset: str | None, seed: int, method: str) -> SimpleNamespace:
        cfg = SimpleNamespace(
            dataset=dataset,
            seed=seed,
            distill=SimpleNamespace(holdout_fraction=0.1),
            generate=SimpleNamespace(method=method),
        )
        return SimpleNamespace(cfg=cfg)

    contexts = {
        "/r/stem8-s0": ctx("/d/data-s0/", 0, "bns_ce"),  # a row trained on /d/data-s0
        "/d/data-s0": ctx(None, 0, "bns_ce"),  # the same dataset, given with --pool
        "/d/half-data-s0": ctx(None, 0, "bns_ce"),
        "/r/intraq-s1": ctx("/d/intraq-s1", 1, "intraq"),
    }
    parts = [source for source, _ in cross_pool(contexts)]
    assert parts == [
        {"dataset": "/d/data-s0", "method": "bns_ce"},
        {"dataset": "/d/half-data-s0", "method": "bns_ce"},
        {"dataset": "/d/intraq-s1", "method": "intraq"},
    ]
