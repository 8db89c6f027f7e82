"""The generator stage of gdfq / qimera: checkpointed in the dataset, resumed after a kill, on both executors.

One tiny plan: 16 images in 2 shards, a Qimera generator trained for 6 iterations of 8 images with a
checkpoint every 2. The local executor's uninterrupted dataset is the reference; an interrupted
local run and a Ray run whose training actor is SIGKILLed must reproduce it byte for byte.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import RunConfig, load_run_config
from pipeline.context import KILL_AT_ENV, RunContext
from pipeline.stages.generate import generate_local
from pipeline.stages.generator_training import GENERATOR_STATE, GeneratorStateError, load_generator_state
from pipeline.storage.manifest import Manifest, validate_dataset
from pipeline.storage.shards import read_shard
from tests.pipeline.ray_fixtures import terminal_bars


def tiny(url: Path | str, *extra: str) -> RunConfig:
    return load_run_config(
        None,
        [
            "model.weights=cifar10-resnet20",
            "generate.method=qimera",
            "generate.num_images=16",
            "generate.batch_size=8",
            "generate.shards_per_round=1",
            "generate.generator_iterations=6",
            "generate.generator_batch_size=8",
            "generate.generator_checkpoint_every=2",
            "device=cpu",
            "executor=local",
            f"storage.url={url}",
            *extra,
        ],
    )


def state_of(cfg: RunConfig) -> dict:
    raw = RunContext.create(cfg).dataset_storage.read_bytes(GENERATOR_STATE)
    return torch.load(io.BytesIO(raw), weights_only=True)


def shards_of(cfg: RunConfig) -> dict[int, tuple[bytes, bytes, bytes]]:
    storage = RunContext.create(cfg).dataset_storage
    manifest = Manifest.load(storage)
    assert manifest.is_complete() and validate_dataset(storage, manifest) == []
    out = {}
    for entry in manifest.shards:
        shard = read_shard(storage, entry.path)
        assert shard.meta["method"] == "qimera"
        out[entry.index] = (shard.images.tobytes(), shard.labels.tobytes(), shard.features.tobytes())
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    """An uninterrupted local generation (one thread, like the actors)."""
    cfg = tiny(tmp_path_factory.mktemp("gen-ref") / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, stats = generate_local(RunContext.create(cfg), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert stats.shards_done == 2
    return cfg


def test_generation_writes_the_generator_checkpoint_and_its_history(reference: RunConfig) -> None:
    state = state_of(reference)
    assert state["done"] and state["iteration"] == 6
    assert state["config_hash"] == reference.dataset_hash()
    storage = RunContext.create(reference).dataset_storage
    meta = read_shard(storage, Manifest.load(storage).shards[0].path).meta
    # The shards record the generator's training curve as their loss history.
    assert meta["loss_history"]["iteration"] == [0, 5]
    assert meta["final_losses"]["total"] == pytest.approx(state["history"]["total"][-1])
    assert 0.0 <= meta["final_losses"]["boundary_fraction"] <= 1.0
    # Running again does no work: the shards are listed and the generator is finished.
    _, stats = generate_local(RunContext.create(reference), progress=False)
    assert stats.shards_done == 0


def test_a_killed_local_run_resumes_generator_training_from_its_checkpoint(
    reference: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.stages.generator_training as stage

    cfg = tiny(tmp_path / "run")

    def crash(point: str, index: int) -> None:
        if (point, index) == ("generator", 4):
            raise RuntimeError("killed after the checkpoint of iteration 4")

    monkeypatch.setattr(stage, "kill_point", crash)
    with pytest.raises(RuntimeError, match="killed"):
        generate_local(RunContext.create(cfg), progress=False)
    assert state_of(cfg)["iteration"] == 4 and not state_of(cfg)["done"]
    assert not Manifest.exists(RunContext.create(cfg).dataset_storage)  # no shard before the generator
    monkeypatch.undo()
    generate_local(RunContext.create(cfg), progress=False)
    want, got = state_of(reference), state_of(cfg)
    assert got["history"] == want["history"]
    for key, value in want["generator"].items():
        assert torch.equal(got["generator"][key], value), key
    assert shards_of(cfg) == shards_of(reference)


def test_a_foreign_or_damaged_checkpoint(reference: RunConfig, tmp_path: Path) -> None:
    other = tiny(tmp_path / "run", "generate.generator_iterations=7")
    ctx = RunContext.create(other)
    storage = ctx.dataset_storage
    theirs = RunContext.create(reference).dataset_storage.read_bytes(GENERATOR_STATE)
    storage.write_bytes_atomic(GENERATOR_STATE, theirs)
    with pytest.raises(GeneratorStateError, match="another config"):
        load_generator_state(ctx, storage)
    storage.write_bytes_atomic(GENERATOR_STATE, b"not a checkpoint")
    assert load_generator_state(ctx, storage) is None  # unreadable: trained again


@pytest.mark.ray
def test_ray_trains_in_an_actor_that_resumes_after_being_killed(
    reference: RunConfig,
    ray_cluster: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from pipeline.ray.generate import generate_ray

    cfg = tiny(tmp_path / "run", "executor=ray", "ray.generation_actors=1")
    monkeypatch.setenv(KILL_AT_ENV, "generator:4")  # forwarded to the training actor, which SIGKILLs itself
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.generator_training"), terminal_bars() as bars:
        generate_ray(RunContext.create(cfg), progress=True)
        bars.wait(lambda b: any(s["closed"] for s in b.named("train generator")))
    assert "generator training actor died" in caplog.text  # it was killed, and replaced
    # The replacement actor's bar reached the driver's terminal and closed at the last of 6 iterations.
    (bar,) = [s for s in bars.named("train generator") if s["closed"]]
    assert (bar["x"], bar["total"]) == (6, 6)
    got, want = state_of(cfg), state_of(reference)
    assert got["iteration"] == 6 and got["history"] == want["history"]
    for key, value in want["generator"].items():
        assert torch.equal(got["generator"][key], value), key
    assert shards_of(cfg) == shards_of(reference)
    images = np.frombuffer(shards_of(cfg)[0][0], dtype=np.float32)
    assert np.isfinite(images).all() and images.std() > 0.1
