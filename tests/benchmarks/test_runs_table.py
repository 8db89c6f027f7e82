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
