"""The training guard end to end: a run whose distillation destroys the student keeps its start.

A deliberately destructive recipe (SGD at lr 20 on the real teacher's W4A4 student, tiny budget)
drives the student far from the teacher. The run must notice it by the data-free signals
(held-out synthetic images), write the calibrated student as ``student.pt``, and say so in
``metrics.json`` (``selected_epoch``: None = the starting student, ``selection_rule``).
The same run with ``distill.select=final`` keeps the destroyed student, so the guard is what
made the difference.

A training that first improves the student and then destroys it (a scripted learning rate that
turns negative after two epochs) must end with the student of the best middle epoch, bit for bit;
the probe set's recorded scores are recomputed from the written students; and neither the guard nor
anything else in the training stage opens the test set (``eval.data``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from intraq_core.evaluate import agreement
from intraq_core.student import load_student
from pipeline.config import load_run_config
from pipeline.context import RunContext
from pipeline.run.job import run_pipeline
from pipeline.stages.holdout import load_probe
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
    from pipeline.cli.summary import summary_lines

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
    from pipeline.run.job import generate_stage

    probe = tmp_path / "probe"
    probe_sets = [*TINY, "generate.method=custom", "generate.bns_weight=1", "generate.lor=true", "seed=7"]
    generate_stage(load_run_config("smoke", [*probe_sets, f"storage.url={probe}"]), progress=False)
    sets = [*TINY, "distill.eval_every=1", f"distill.probe={probe}", f"storage.url={tmp_path / 'run'}"]
    metrics = run_pipeline(load_run_config("smoke", sets), progress=False)
    evals = metrics["training"]["evaluations"]
    assert [e["epoch"] for e in evals] == [None, 0, 1]
    # The recorded probe scores are those of the calibrated start and of the final student (select=final)
    # on the probe location's images, recomputed here from the written students.
    ctx = RunContext.create(load_run_config("smoke", sets))
    probe_images = load_probe(ctx)
    assert probe_images is not None and probe_images.shape[0] == 32
    teacher = ctx.teacher()
    for row, path in ((evals[0], "student_calibrated.pt"), (evals[-1], "student.pt")):
        student, _, _, _ = load_student(tmp_path / "run" / path)
        expected = agreement(student, teacher, probe_images)
        assert row["probe"]["agreement"] == expected["agreement"], path
        assert row["probe"]["kl"] == pytest.approx(expected["kl"], rel=1e-6), path
    assert evals[0]["probe"] != evals[-1]["probe"]  # the student moved, the probe saw it
    history = read_json(tmp_path / "run" / "train_history.json")
    assert all("probe_agreement" in row and "probe_kl" in row for row in history)
    with pytest.raises(InputError, match=r"distill\.probe"):
        run_pipeline(
            load_run_config("smoke", [*TINY, f"distill.probe={tmp_path / 'nothing'}", f"storage.url={tmp_path / 'x'}"]),
            progress=False,
        )


# Epochs 0 and 1 distil gently (KD only, lr 1e-4); from epoch 2 on the learning rate is -100x that
# (gradient ascent on the KD loss: a training that destroys the student). Measured held-out KL of
# this run: start 1.157, epochs 0-3: 0.539, 0.469, 185, 802.
MIDDLE = (
    *TINY,
    "distill.select=best",
    "distill.eval_every=1",
    "distill.epochs=4",
    "distill.lr=1e-4",
    "distill.ce_weight=0",
)


def _improve_then_destroy(cfg: object, step: int, steps_per_epoch: int) -> float:
    """A learning-rate factor: 1 for the first two epochs, then -100."""
    return 1.0 if step < 2 * steps_per_epoch else -100.0


def test_a_middle_epoch_that_scores_best_is_the_student_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard keeps epoch 1 (neither the start nor the final student): ``student.pt`` is, bit for
    bit, the student of the same training stopped after epoch 1, and the test set measures that one."""
    import intraq_core.distill as distill_module

    monkeypatch.setattr(distill_module, "lr_factor", _improve_then_destroy)
    metrics = run_pipeline(load_run_config("smoke", [*MIDDLE, f"storage.url={tmp_path / 'guarded'}"]), progress=False)
    training = metrics["training"]
    evals = training["evaluations"]
    kls = [e["kl"] for e in evals]
    assert [e["epoch"] for e in evals] == [None, 0, 1, 2, 3]
    assert kls[2] < kls[1] < kls[0] and 10 * kls[2] < min(kls[3:])  # improved twice, then destroyed
    assert training["selected_epoch"] == 1 and training["kept_final"] is False

    stopped = run_pipeline(
        load_run_config(
            "smoke", [*MIDDLE, "distill.epochs=2", "distill.select=final", f"storage.url={tmp_path / 'stopped'}"]
        ),
        progress=False,
    )
    assert stopped["training"]["evaluations"][-1]["kl"] == kls[2]  # the same training up to there
    kept, _, _, _ = load_student(tmp_path / "guarded" / "student.pt")
    epoch1, _, _, _ = load_student(tmp_path / "stopped" / "student.pt")
    start, _, _, _ = load_student(tmp_path / "guarded" / "student_calibrated.pt")
    assert all(torch.equal(v, epoch1.state_dict()[k]) for k, v in kept.state_dict().items())
    assert not all(torch.equal(v, start.state_dict()[k]) for k, v in kept.state_dict().items())
    assert metrics["quant_top1"] == stopped["quant_top1"] and metrics["quant_top1"] != metrics["ptq_top1"]


# -- the guard never reads the test set ---------------------------------------------------------

#: The stage of every open of the watched file (``path``, a resolved path). Audit hooks cannot be
#: removed, so one is installed once per process and records only while ``path`` is set.
_WATCH: dict[str, Any] = {"path": None, "stage": "", "opens": []}
_HOOKED: list[bool] = []


def _audit(event: str, args: tuple) -> None:
    watched = _WATCH["path"]
    opened = args[0] if event == "open" and watched is not None and args else None
    if isinstance(opened, str | bytes | os.PathLike) and os.path.realpath(os.fsdecode(opened)) == watched:
        _WATCH["opens"].append(_WATCH["stage"])


def test_the_guard_and_the_selection_never_open_the_test_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guarded run (held-out split, augmented views, a middle epoch kept) on a copy of the test set:
    every open of that file is recorded with the stage it happened in. The input check opens it before
    training and the evaluation after; calibration, distillation, the guard's scoring and its choice
    never do."""
    import intraq_core.distill as distill_module
    from pipeline.run.executor import LocalExecutor

    test_set = tmp_path / "cifar10_test.npz"
    shutil.copyfile(Path(os.environ["INTRAQ_DATA_DIR"]) / "cifar10_test.npz", test_set)
    real_train = LocalExecutor.train

    def train(self: LocalExecutor, *args: Any, **kwargs: Any) -> Any:
        _WATCH["stage"] = "train"
        try:
            return real_train(self, *args, **kwargs)
        finally:
            _WATCH["stage"] = "after training"

    monkeypatch.setattr(LocalExecutor, "train", train)
    monkeypatch.setattr(distill_module, "lr_factor", _improve_then_destroy)
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED.append(True)
    _WATCH.update(path=os.path.realpath(test_set), stage="before training", opens=[])
    try:
        sets = [*MIDDLE, f"eval.data={test_set}", f"storage.url={tmp_path / 'run'}"]
        metrics = run_pipeline(load_run_config("smoke", sets), progress=False)
    finally:
        _WATCH["path"] = None
    assert metrics["training"]["selected_epoch"] == 1 and metrics["test_set"] == str(test_set)
    opens = _WATCH["opens"]
    assert "train" not in opens, opens
    assert "before training" in opens and "after training" in opens, opens  # the watch sees the reads
