"""The teacher through the object store (``pipeline.ray.teacher``): built and checksummed once, on the driver.

The receivers (a generation actor, a Train worker) must neither resolve the model config, nor
build the network, nor checksum it again: each test makes those raise in the receiving code.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from ray import cloudpickle

import pipeline.context as context_module
import pipeline.ray.train_worker as train_worker
from pipeline.config import RunConfig, load_run_config
from pipeline.context import RunContext, state_dict_sha256
from pipeline.ray.teacher import received_teacher, share_teacher
from pipeline.stages.plan import make_plan
from pipeline.storage.shards import read_shard


def config(url: Path) -> RunConfig:
    return load_run_config(
        None,
        [
            "model.weights=cifar10-resnet20",
            "generate.num_images=8",
            "generate.batch_size=8",
            "generate.iterations=2",
            "device=cpu",
            f"storage.url={url}",
        ],
    )


def forbid_rebuilding(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, resolving the model config, building the teacher or checksumming weights raise."""

    def refused(*_: Any, **__: Any) -> Any:
        raise AssertionError("the receiver rebuilt or re-checked the teacher")

    for name in ("resolve_model_config", "create_model", "state_dict_sha256"):
        monkeypatch.setattr(context_module, name, refused)
    monkeypatch.setattr(train_worker, "state_dict_sha256", refused)


def test_a_generation_actor_uses_the_drivers_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The actor's synthesizer runs on the driver's teacher and its shard records the driver's checksum."""
    from pipeline.ray.generate import GeneratorActor

    cfg = config(tmp_path / "run")
    driver = RunContext.create(cfg)
    built = driver.built_teacher()
    assert built.sha256 == state_dict_sha256(driver.teacher())
    payload = cloudpickle.loads(cloudpickle.dumps(built))  # what Ray hands the actor (a copy through the store)
    forbid_rebuilding(monkeypatch)
    actor = GeneratorActor(cfg, "intraq-generator-0", 1.0, None, payload)
    task = make_plan(cfg, driver.num_classes)[0]
    torch.set_num_threads(1)
    (outcome,) = actor.run([task], None)
    shard = read_shard(driver.dataset_storage, outcome.info.path)
    assert shard.meta["teacher_sha256"] == built.sha256
    copy = actor.ctx.teacher()
    assert copy is not built.model and not copy.training
    for (k, a), (_, b) in zip(copy.state_dict().items(), built.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_train_workers_receive_the_teacher_through_the_object_store(
    ray_cluster: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Train worker's context holds the driver's teacher: the same weights, config and checksum, and
    no checksum of its own (a wrong one in the config is not even looked at)."""
    from pipeline.ray.train import worker_config

    cfg = config(tmp_path / "run")
    driver = RunContext.create(cfg)
    ref = share_teacher(driver)
    assert ref is not None
    want = driver.teacher().state_dict()
    loop_config = {
        "run_config": worker_config(cfg, driver.storage),
        "storage": driver.storage.config.model_dump(mode="json"),
        "teacher": ref,
        "teacher_sha256": "not-the-teachers-checksum",
    }
    forbid_rebuilding(monkeypatch)
    ctx = train_worker.worker_context(loop_config)
    teacher = train_worker.worker_teacher(ctx, loop_config, 0)
    assert ctx.teacher_sha256 == driver.teacher_sha256 and ctx.model_cfg == driver.model_cfg
    for (k, a), (_, b) in zip(teacher.state_dict().items(), want.items(), strict=True):
        assert torch.equal(a, b), k


class _Locked(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)
        self.lock = threading.Lock()  # cannot be pickled


def test_a_teacher_that_cannot_be_pickled_is_built_by_each_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not shared (None, with a warning): each process builds its own, and Train workers check it."""
    ctx = RunContext.create(config(tmp_path / "run"))
    with caplog.at_level("WARNING", logger="pipeline.ray.teacher"):
        assert share_teacher(ctx, _Locked()) is None
    assert "cannot be pickled" in caplog.text
    assert received_teacher(None) is None
    fresh = RunContext.create(config(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="different teacher than the driver"):
        train_worker.worker_teacher(fresh, {"teacher_sha256": "0" * 64}, 1)
    train_worker.worker_teacher(fresh, {"teacher_sha256": fresh.teacher_sha256}, 1)
