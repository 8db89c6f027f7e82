"""The training guard end to end: a run whose distillation destroys the student keeps its start.

A deliberately destructive recipe (SGD at lr 20 on the real teacher's W4A4 student, tiny budget)
drives the student far from the teacher. The run must notice it by the data-free signals
(held-out synthetic images), write the calibrated student as ``student.pt``, and say so in
``metrics.json`` (``selected_epoch``: None = the starting student, ``selection_rule``).
The same run with ``distill.select=final`` keeps the destroyed student, so the guard is what
made the difference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from intraq_core.student import load_student
from pipeline.config import load_run_config
from pipeline.run import run_pipeline
from tests.pipeline.run_helpers import TINY, read_json

pytestmark = pytest.mark.timeout(300)

BAD = (
    *TINY,
    "distill.select=best",
    "distill.lr=20",
    "distill.momentum=0.9",
    "distill.epochs=3",
    "distill.eval_every=1",
)


def _run(url: Path, *extra: str) -> dict:
    return run_pipeline(load_run_config("smoke", [*BAD, f"storage.url={url}", *extra]), progress=False)


def test_destructive_distillation_keeps_the_starting_student(tmp_path: Path) -> None:
    metrics = _run(tmp_path / "guarded")
    training = metrics["training"]
    assert training["selected_epoch"] is None and training["kept_final"] is False
    assert "KL" in training["selection_rule"]
    # The terminal's summary says what was kept and the scores that decided it.
    from pipeline.cli import summary_lines

    guard = [line for line in summary_lines(metrics) if line.startswith("guard:")]
    kl = training["evaluations"][0]["kl"]
    assert len(guard) == 1 and "kept the starting (calibrated) student" in guard[0] and f"{kl:.4f}" in guard[0]
    evals = training["evaluations"]
    assert [e["epoch"] for e in evals] == [None, 0, 1, 2]
    assert evals[0]["kl"] < min(e["kl"] for e in evals[1:])  # the run saw training hurt
    # student.pt is the calibrated student, and the test set agrees.
    final, _, _, _ = load_student(tmp_path / "guarded" / "student.pt")
    start, _, _, _ = load_student(tmp_path / "guarded" / "student_calibrated.pt")
    for key, value in start.state_dict().items():
        torch.testing.assert_close(final.state_dict()[key], value)
    assert metrics["quant_top1"] == metrics["ptq_top1"]
    history = read_json(tmp_path / "guarded" / "train_history.json")
    assert all("holdout_kl" in row for row in history)

    unguarded = _run(tmp_path / "final", "distill.select=final")
    assert unguarded["training"]["kept_final"] is True
    assert unguarded["quant_top1"] < metrics["quant_top1"] - 5.0


def test_a_probe_set_is_scored_and_recorded(tmp_path: Path) -> None:
    """``distill.probe`` names another location's synthetic images: every evaluation scores the
    student on them too (metrics.json and train_history.json); a missing one is refused first."""
    from pipeline.errors import InputError
    from pipeline.run import generate_stage

    probe = tmp_path / "probe"
    probe_sets = [*TINY, "generate.method=custom", "generate.bns_weight=1", "generate.lor=true", "seed=7"]
    generate_stage(load_run_config("smoke", [*probe_sets, f"storage.url={probe}"]), progress=False)
    sets = [*TINY, "distill.eval_every=1", f"distill.probe={probe}", f"storage.url={tmp_path / 'run'}"]
    metrics = run_pipeline(load_run_config("smoke", sets), progress=False)
    evals = metrics["training"]["evaluations"]
    assert [e["epoch"] for e in evals] == [None, 0, 1]
    assert all(0.0 <= e["probe"]["agreement"] <= 100.0 and e["probe"]["kl"] >= 0.0 for e in evals)
    assert evals[0]["probe"] != evals[-1]["probe"]  # the student moved, the probe saw it
    history = read_json(tmp_path / "run" / "train_history.json")
    assert all("probe_agreement" in row and "probe_kl" in row for row in history)
    with pytest.raises(InputError, match=r"distill\.probe"):
        run_pipeline(
            load_run_config("smoke", [*TINY, f"distill.probe={tmp_path / 'nothing'}", f"storage.url={tmp_path / 'x'}"]),
            progress=False,
        )
