"""The local executor's resumable distillation loop and its per-epoch checkpoint (``pipeline.stages.train_state``).

The end-to-end kill-and-resume of a whole run is in ``test_faults.py``; here, on a random
teacher and 16x16 noise (this is about state, not quality): the loop is ``intraq_core``'s
``distill`` bit for bit, a checkpoint loads with ``weights_only=True`` and resuming from it ends
where the uninterrupted loop ends, and a checkpoint of another training is ignored.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch

from intraq_core.config import DistillConfig, ModelConfig, QuantConfig
from intraq_core.distill import distill
from intraq_core.models import create_model
from intraq_core.quant import calibrate_ranges
from intraq_core.student import build_student
from pipeline.config import RunConfig
from pipeline.context import RunContext
from pipeline.stages.train_state import TRAIN_STATE_PATH, load_train_state, train_state_bytes
from pipeline.storage.store import Storage

pytestmark = pytest.mark.timeout(120)

CFG = DistillConfig(epochs=3, batch_size=4, iterations_per_epoch=2)
SEED = 5


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    teacher = create_model(ModelConfig(arch="cifar_resnet20", num_classes=10)).eval()
    return teacher, torch.randn(12, 3, 16, 16), torch.randint(0, 10, (12,))


def _student(teacher: torch.nn.Module) -> torch.nn.Module:
    student = build_student(teacher, QuantConfig(calibration_batches=1))
    torch.manual_seed(1)
    calibrate_ranges(student, [torch.randn(4, 3, 16, 16)])
    return student


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpointed_distillation_resumes_exactly(setup: tuple) -> None:
    teacher, x, y = setup
    reference = _student(teacher)
    want = distill(reference, teacher, x, y, CFG, seed=SEED, progress=False).epochs

    saved: dict[int, bytes] = {}
    student = _student(teacher)
    got = distill(
        student,
        teacher,
        x,
        y,
        CFG,
        seed=SEED,
        progress=False,
        on_epoch=lambda epoch, distiller, rows: saved.setdefault(epoch, train_state_bytes({}, epoch, rows, distiller)),
    ).epochs
    assert got == want and _same(student, reference)
    assert sorted(saved) == [0, 1, 2]

    for epoch in (0, 1):  # a run killed after this epoch, resumed from its checkpoint
        state = torch.load(io.BytesIO(saved[epoch]), map_location="cpu", weights_only=True)
        assert state["epoch"] == epoch and len(state["history"]) == epoch + 1
        resumed = _student(teacher)
        assert distill(resumed, teacher, x, y, CFG, seed=SEED, progress=False, start=state).epochs == want
        assert _same(resumed, reference), f"resuming after epoch {epoch} diverged"


def test_only_this_trainings_checkpoint_is_used(setup: tuple, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    teacher, x, y = setup
    ctx = RunContext(RunConfig(), Storage.from_url(str(tmp_path)))
    identity = {"config_hash": "abc", "dataset": "d1", "num_train": 12}
    assert load_train_state(ctx, identity) is None  # none yet

    student = _student(teacher)
    distill(
        student,
        teacher,
        x,
        y,
        CFG,
        seed=SEED,
        progress=False,
        on_epoch=lambda e, d, rows: ctx.storage.write_bytes_atomic(
            TRAIN_STATE_PATH, train_state_bytes(identity, e, rows, d)
        ),
    )
    state = load_train_state(ctx, identity)
    assert state is not None and state["epoch"] == CFG.epochs - 1
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.train_state"):
        assert load_train_state(ctx, {**identity, "dataset": "d2"}) is None  # another dataset
        assert "dataset differ" in caplog.text
        (tmp_path / TRAIN_STATE_PATH).write_bytes(b"not a checkpoint")
        assert load_train_state(ctx, identity) is None
        assert "unreadable" in caplog.text


def test_checkpoint_writer_writes_in_the_background_and_reports_failures(tmp_path: Path) -> None:
    from pipeline.stages.train_state import CheckpointWriter

    storage = Storage.from_url(str(tmp_path))
    with CheckpointWriter(storage) as writer:
        writer.submit("a.pt", b"first")
        writer.submit("a.pt", b"second")  # waits for the first, then replaces it
    assert (tmp_path / "a.pt").read_bytes() == b"second"

    class Broken(Storage):
        def write_bytes_atomic(self, rel: str, data: bytes) -> None:
            raise OSError("disk full")

    writer = CheckpointWriter(Broken(storage.config))
    writer.submit("b.pt", b"x")
    with pytest.raises(OSError, match="disk full"):
        writer.flush()
    writer.close()


def test_train_on_a_dataset_whose_run_yaml_comes_from_another_version(tmp_path: Path) -> None:
    """``train --dataset`` on a location whose ``run.yaml`` has a key this version does not know
    (renamed since) still trains, and takes the dataset's method and budget from its ``generate``."""
    import yaml

    from pipeline.config import load_run_config
    from pipeline.run.job import generate_stage, train_stage
    from tests.pipeline.run_helpers import TINY

    data = tmp_path / "data-run"
    generate_stage(load_run_config("smoke", [*TINY, "generate.method=bns_ce", f"storage.url={data}"]), progress=False)
    raw = yaml.safe_load((data / "run.yaml").read_text())
    raw["tune"]["grace_epochs"] = 2  # a key of an older version
    (data / "run.yaml").write_text(yaml.safe_dump(raw))
    # This run's own config says intraq: the metrics must name the dataset's method instead.
    cfg = load_run_config("smoke", [*TINY, "generate.method=intraq", f"storage.url={tmp_path / 'train'}"])
    metrics = train_stage(cfg, dataset=str(data), progress=False)
    assert metrics["method"].startswith("bns_ce") and metrics["num_images"] == 32
