"""Distillation on Ray Train (``pipeline.ray_train``) against the real teacher, tiny budget.

One synthetic dataset for the module (``generate_local``, real CIFAR-10 ResNet-20 teacher):
128 images x 8 iterations in 2 shards, a quarter held out (~32-39 images, so agreement moves in
steps of ~3 points rather than ~8). Training: W4A4, 2 epochs x 3 steps of 16 images per
worker (each worker's split then yields its 3 batches in one pass of the stream: one Ray Data
execution per epoch), lr 1e-4 (stable: lr 1e-3 on this little data collapses the student
towards chance, which would hide the differences these tests look for).

Three ``TorchTrainer.fit()`` calls in all (~20 s fixed cost each):

* 2 workers whose group fails once at the start of epoch 1 (``INTRAQ_TEST_FAIL_ONCE``) with
  ``max_failures=1``: training resumes from the epoch-0 checkpoint (the history's ``attempt``
  column shows epoch 0 from attempt 1 and epoch 1 from attempt 2, and no epoch twice);
* 1 worker through ``train_stage`` with ``max_failures=0``: the first fit fails at epoch 1,
  ``train_stage(resume=True)`` continues from epoch 1 instead of restarting (2 fits).

The 1- and 2-worker students are then compared with each other and with the local executor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from intraq_core.distill import Distiller
from intraq_core.student import build_student, load_student
from pipeline.config import RunConfig, load_run_config
from pipeline.context import RunContext
from pipeline.evaluate import evaluate_model
from pipeline.generate import dataset_storage, generate_local
from pipeline.ray_train import (
    FAIL_ONCE_ENV,
    STATE_FILE,
    _read_rows,
    _shard_indices,
    load_train_state,
    restore_train_state,
    train_ray,
    train_run_name,
    train_state,
)
from pipeline.shards import Manifest
from pipeline.train import (
    CALIBRATED_PATH,
    STUDENT_PATH,
    TRAIN_HISTORY_PATH,
    TrainOutcome,
    calibration_batches,
    calibration_positions,
    holdout_mask,
    load_dataset,
    train_local,
)

EPOCHS = 2
TEST_IMAGES = 500
# Test top-1 (%) on the same 500 test images may differ by this much between the 1-worker,
# 2-worker and local students. All start from the identical calibrated student (~80%) and take
# 6 small-lr steps that move it by ~3 points; they differ only in batch composition (stream
# order, local shuffle) and, for 2 workers, a 2x effective batch. The binomial standard error of
# one 500-image accuracy is ~1.8 points; 6 points is > 3 SE of the difference. A real fault
# (DDP not averaging, a state not restored, labels or pixels scrambled by the reshape) drags the
# student to 10-40% (the collapse seen at lr 1e-3), far outside this band.
TOP1_TOLERANCE = 6.0
# Held-out agreement (%) is measured on only ~32-39 images (one image = ~2.6 points) and is
# much noisier than test top-1: observed spreads between the three students reach ~13 points.
# The binomial standard error of the difference of two such agreements (p ~ 0.75, n ~ 39) is
# ~10 points; allow 2 SE. The calibrated agreement, by contrast, must match exactly.
AGREEMENT_TOLERANCE = 20.0


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """This process's torch work (driver-side calibration, evaluation, the local reference) on
    one thread, like the Ray workers: on a busy 2-core box two OpenMP threads made a small
    training step ~60x slower (5 s instead of 0.08 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_config(url: str, dataset: str, *extra: str) -> RunConfig:
    return load_run_config(
        None,
        [
            "model.weights=cifar10-resnet20",
            "generate.num_images=128",
            "generate.batch_size=64",
            "generate.iterations=8",
            "generate.shards_per_round=2",
            "quant.w_bits=4",
            "quant.a_bits=4",
            "quant.calibration_batches=2",
            f"distill.epochs={EPOCHS}",
            "distill.batch_size=16",
            "distill.iterations_per_epoch=3",
            "distill.lr=1e-4",
            "distill.holdout_fraction=0.25",
            f"eval.limit={TEST_IMAGES}",
            "device=cpu",
            "executor=ray",
            f"dataset={dataset}",
            f"storage.url={url}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def dataset_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The module's synthetic dataset (a run location with ``data/``), made by the local executor."""
    root = str(tmp_path_factory.mktemp("dataset") / "run")
    cfg = train_config(root, root).model_copy(update={"dataset": None, "executor": "local"})
    generate_local(RunContext.create(cfg), progress=False)
    return root


def student_top1(cfg: RunConfig, storage_url: str) -> float:
    """Test top-1 (%) of the run's final student on the first ``TEST_IMAGES`` test images."""
    ctx = RunContext.create(cfg)
    student, _, _, _ = load_student(Path(storage_url) / STUDENT_PATH)
    return evaluate_model(student, ctx.model_cfg, cfg.eval)["top1"]


@pytest.fixture(scope="module")
def local_outcome(dataset_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainOutcome, float]:
    """The local executor on the same data and config: the reference of both Ray runs."""
    url = str(tmp_path_factory.mktemp("local") / "run")
    cfg = train_config(url, dataset_url, "executor=local")
    ctx = RunContext.create(cfg)
    outcome = train_local(ctx, Manifest.load(dataset_storage(ctx)), progress=False)
    return outcome, student_top1(cfg, url)


@pytest.fixture(scope="module")
def two_workers(ray_cluster: Any, dataset_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """2 Train workers; the group fails once at the start of epoch 1 and must resume."""
    base = tmp_path_factory.mktemp("two")
    url, marker = str(base / "run"), base / "failed-once"
    cfg = train_config(url, dataset_url, "ray.train_workers=2", "ray.cpus_per_train_worker=1", "ray.max_failures=1")
    ctx = RunContext.create(cfg)
    mp = pytest.MonkeyPatch()
    mp.setenv(FAIL_ONCE_ENV, f"1:{marker}")
    try:
        outcome = train_ray(ctx, Manifest.load(dataset_storage(ctx)), progress=False)
    finally:
        mp.undo()
    return {"cfg": cfg, "url": url, "outcome": outcome, "marker": marker, "top1": student_top1(cfg, url)}


@pytest.fixture(scope="module")
def one_worker_resumed(ray_cluster: Any, dataset_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """1 Train worker via ``train_stage``: the fit fails at epoch 1, then ``--resume`` finishes it."""
    from ray.train import TrainingFailedError

    from pipeline.run import train_stage

    base = tmp_path_factory.mktemp("one")
    url, marker = str(base / "run"), base / "failed-once"
    cfg = train_config(url, dataset_url, "ray.train_workers=1", "ray.max_failures=0")
    mp = pytest.MonkeyPatch()
    mp.setenv(FAIL_ONCE_ENV, f"1:{marker}")
    try:
        with pytest.raises(TrainingFailedError):
            train_stage(cfg, progress=False)
    finally:
        mp.undo()
    kept = [p for p in (Path(url) / "ray_train" / train_run_name(cfg)).glob("checkpoint_*") if p.is_dir()]
    metrics = train_stage(cfg, resume=True, progress=False)
    history = json.loads((Path(url) / TRAIN_HISTORY_PATH).read_text())
    return {"cfg": cfg, "url": url, "metrics": metrics, "history": history, "marker": marker, "kept": kept}


@pytest.mark.timeout(300)
def test_driver_reads_the_local_calibration_batches(dataset_url: str, tmp_path: Path) -> None:
    """The Ray driver calibrates on exactly the local executor's batches, reading only those rows."""
    cfg = train_config(str(tmp_path / "run"), dataset_url)
    ctx = RunContext.create(cfg)
    storage = dataset_storage(ctx)
    manifest = Manifest.load(storage)
    images, _, indices = load_dataset(ctx, manifest)
    per_shard = _shard_indices(storage, manifest)
    assert np.array_equal(np.concatenate(per_shard), indices)
    hold = holdout_mask(indices, cfg.seed, cfg.distill.holdout_fraction)
    train_rows = np.flatnonzero(~hold)
    want = calibration_batches(images[~hold], ctx)
    for batch, positions in zip(want, calibration_positions(len(train_rows), ctx), strict=True):
        got = _read_rows(storage, manifest, per_shard, train_rows[positions.numpy()])
        assert torch.equal(got, batch)
    assert torch.equal(_read_rows(storage, manifest, per_shard, np.flatnonzero(hold)), images[hold])


def test_checkpoint_state_is_weights_only_and_resumes_exactly(tmp_path: Path) -> None:
    """A worker checkpoint loads with weights_only=True and continues training bit for bit."""
    from intraq_core.config import DistillConfig, ModelConfig, QuantConfig
    from intraq_core.models import create_model
    from intraq_core.quant import calibrate

    torch.manual_seed(0)
    teacher = create_model(ModelConfig(arch="cifar_resnet20", num_classes=10)).eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))  # small: this is about state, not quality

    def fresh() -> Distiller:
        student = build_student(teacher, QuantConfig(calibration_batches=1))
        torch.manual_seed(1)
        calibrate(student, [torch.randn(4, 3, 16, 16)])
        return Distiller(student, teacher, DistillConfig(epochs=2, batch_size=4), steps_per_epoch=2, seed=3)

    a = fresh()
    a.step(x, y)
    torch.save(train_state(a, 0, [{"epoch": 0, "loss": 1.0}], 1), tmp_path / STATE_FILE)
    state = load_train_state(tmp_path / STATE_FILE)  # weights_only=True inside
    assert state["epoch"] == 0 and state["history"] == [{"epoch": 0, "loss": 1.0}]
    b = fresh()
    restore_train_state(b, state)
    sa, sb = a.step(x, y), b.step(x, y)
    assert (sa.loss, sa.lr) == (sb.loss, sb.lr)
    for (ka, va), (kb, vb) in zip(a.student.state_dict().items(), b.student.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_too_many_train_cpus_fail_fast(ray_cluster: Any, dataset_url: str, tmp_path: Path) -> None:
    """Workers that would leave no CPU to Ray Data's readers are refused before anything starts."""
    cfg = train_config(str(tmp_path / "run"), dataset_url, "ray.train_workers=4", "ray.cpus_per_train_worker=1")
    ctx = RunContext.create(cfg)
    with pytest.raises(ValueError, match="training would hang"):
        train_ray(ctx, Manifest.load(dataset_storage(ctx)), progress=False)
    assert not (tmp_path / "run" / CALIBRATED_PATH).exists()


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_two_workers_resume_after_a_worker_failure(two_workers: dict[str, Any]) -> None:
    outcome: TrainOutcome = two_workers["outcome"]
    url = Path(two_workers["url"])
    assert two_workers["marker"].exists(), "the failure hook did not fire"
    assert [row["epoch"] for row in outcome.history] == list(range(EPOCHS))
    assert [row["attempt"] for row in outcome.history] == [1, 2], "epoch 1 must run after a resume"
    assert all(row["workers"] == 2 for row in outcome.history)
    assert json.loads((url / TRAIN_HISTORY_PATH).read_text()) == outcome.history
    for name in (CALIBRATED_PATH, STUDENT_PATH):
        load_student(url / name)  # weights-only loadable
    assert outcome.num_train + outcome.num_holdout == 128 and outcome.num_holdout > 0
    assert outcome.agreement_calibrated is not None and outcome.agreement_final is not None


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_resume_continues_from_the_last_epoch(one_worker_resumed: dict[str, Any]) -> None:
    history = one_worker_resumed["history"]
    assert one_worker_resumed["marker"].exists()
    assert len(one_worker_resumed["kept"]) == 1, "the failed fit should leave the epoch-0 checkpoint"
    assert [row["epoch"] for row in history] == list(range(EPOCHS))
    assert [row["attempt"] for row in history] == [1, 2], "the resumed fit restarted from scratch"
    metrics = one_worker_resumed["metrics"]
    assert metrics["executor"] == "ray" and metrics["test_images"] == TEST_IMAGES
    assert metrics["training"]["final_epoch"]["epoch"] == EPOCHS - 1
    assert (Path(one_worker_resumed["url"]) / "metrics.json").exists()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_one_and_two_workers_reach_the_same_student(
    one_worker_resumed: dict[str, Any],
    two_workers: dict[str, Any],
    local_outcome: tuple[TrainOutcome, float],
) -> None:
    local, local_top1 = local_outcome
    two: TrainOutcome = two_workers["outcome"]
    one = one_worker_resumed["metrics"]
    one_top1, two_top1 = one["quant_top1"], two_workers["top1"]
    # Calibration is deterministic and reads the same images: identical before distillation.
    assert one["training"]["holdout_agreement_calibrated"] == local.agreement_calibrated
    assert two.agreement_calibrated == local.agreement_calibrated
    assert abs(one_top1 - two_top1) <= TOP1_TOLERANCE, (one_top1, two_top1)
    assert abs(one_top1 - local_top1) <= TOP1_TOLERANCE, (one_top1, local_top1)
    assert abs(two_top1 - local_top1) <= TOP1_TOLERANCE, (two_top1, local_top1)
    agree = [
        one["training"]["holdout_agreement_final"]["agreement"],
        two.agreement_final["agreement"],  # type: ignore[index]
        local.agreement_final["agreement"],  # type: ignore[index]
    ]
    assert max(agree) - min(agree) <= AGREEMENT_TOLERANCE, agree


@pytest.mark.timeout(180)
def test_train_command_on_the_runs_own_dataset(tmp_path: Path) -> None:
    """``generate`` then ``train`` at one location: trains on its data; retraining needs --overwrite,
    which keeps the dataset (local executor and Gaussian images: this is about the stage's wiring)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    run = tmp_path / "run"
    common = ["-c", "smoke", "-o", str(run), "-q", "--set", "executor=local"]
    for item in (
        "generate.method=gaussian",
        "generate.num_images=32",
        "generate.batch_size=16",
        "distill.epochs=1",
        "distill.batch_size=16",
        "quant.calibration_batches=1",
        "eval.limit=100",
    ):
        common += ["--set", item]
    runner = CliRunner()
    assert runner.invoke(app, ["generate", *common]).exit_code == 0
    first = runner.invoke(app, ["train", *common])
    assert first.exit_code == 0, first.output
    assert "distilled" in first.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_images"] == 32 and metrics["method"] == "gaussian"
    again = runner.invoke(app, ["train", *common])
    assert again.exit_code == 2 and "already holds a trained student" in again.output
    manifest_before = (run / "data" / "manifest.json").read_bytes()
    redo = runner.invoke(app, ["train", *common, "--overwrite"])
    assert redo.exit_code == 0, redo.output
    assert (run / "data" / "manifest.json").read_bytes() == manifest_before
    assert (run / STUDENT_PATH).exists()
