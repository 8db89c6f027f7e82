"""The Ray generation executor against the real teacher, with a tiny budget.

One plan for every test: 32 images in 4 shards of 8, 2 shards per round (so round 1 runs with
MDC centres from round 0), 5 iterations of the ``intraq`` method. The reference is the local
executor's dataset; every Ray run must reproduce its pixels, labels and features exactly.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import RunConfig, load_run_config
from pipeline.context import RunContext
from pipeline.errors import GenerationError
from pipeline.stages.generate import generate_local
from pipeline.storage.manifest import Manifest, validate_dataset
from pipeline.storage.shards import read_shard
from tests.pipeline.ray_fixtures import TerminalBars, terminal_bars

pytestmark = pytest.mark.ray

NUM_SHARDS = 4


def tiny_config(url: str, *extra: str) -> RunConfig:
    return load_run_config(
        None,
        [
            "model.weights=cifar10-resnet20",
            "generate.method=intraq",
            "generate.num_images=32",
            "generate.batch_size=8",
            "generate.iterations=5",
            "generate.shards_per_round=2",
            "device=cpu",
            "executor=ray",
            f"storage.url={url}",
            *extra,
        ],
    )


def dataset_arrays(cfg: RunConfig) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Shard index → (images, labels, features), read through the manifest."""
    storage = RunContext.create(cfg).dataset_storage
    manifest = Manifest.load(storage)
    assert manifest.complete and len(manifest.shards) == NUM_SHARDS
    assert validate_dataset(storage, manifest) == []
    out = {}
    for entry in manifest.shards:
        shard = read_shard(storage, entry.path)
        assert shard.features is not None
        out[entry.index] = (shard.images, shard.labels, shard.features)
    return out


def assert_same_dataset(got: dict[int, Any], want: dict[int, Any]) -> None:
    assert sorted(got) == sorted(want)
    for index in want:
        for a, b, what in zip(got[index], want[index], ("images", "labels", "features"), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, (index, what)
            assert a.tobytes() == b.tobytes(), f"shard {index}: {what} differ"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset made by the local executor (the ground truth the Ray executor must reproduce)."""
    root = tmp_path_factory.mktemp("local") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the actors; results do not depend on it, speed on a busy box does
    try:
        generate_local(RunContext.create(tiny_config(str(root), "executor=local")), progress=False)
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def reference(local_run: Path) -> dict[int, Any]:
    return dataset_arrays(tiny_config(str(local_run)))


@pytest.mark.timeout(120)
def test_two_actors_give_the_local_dataset(
    ray_cluster: dict[str, Any], reference: dict[int, Any], tmp_path: Path
) -> None:
    """Two actors (one shard each per round) reproduce the local executor bit for bit.

    One actor doing every shard is checked against the same reference by the S3 and the
    actor-death tests below, so 1 actor == 2 actors == local.
    """
    from pipeline.ray.generate import generate_ray

    cfg = tiny_config(str(tmp_path / "run"), "ray.generation_actors=2")

    def actors_done(bars: TerminalBars) -> bool:
        states = bars.named("intraq-generator-")
        return len(states) == 2 and all(s["closed"] for s in states)

    with terminal_bars() as bars:
        manifest, stats = generate_ray(RunContext.create(cfg), progress=True)
        bars.wait(actors_done)
    # The terminal: the driver's bar of shards, and each actor's own bar of its shards' iterations
    # (4 shards x 5 iterations between the two), every bar closed full.
    (shards,) = bars.named("generate")
    assert (shards["x"], shards["total"], shards["closed"]) == (NUM_SHARDS, NUM_SHARDS, True)
    actors = bars.named("intraq-generator-")
    assert len(actors) == 2 and all(s["closed"] and s["x"] == s["total"] > 0 for s in actors), actors
    assert sum(s["total"] for s in actors) == NUM_SHARDS * 5
    assert stats.shards_done == NUM_SHARDS
    assert stats.image_iterations == 32 * 5
    assert [s.round for s in manifest.shards] == [0, 0, 1, 1]
    assert_same_dataset(dataset_arrays(cfg), reference)


@pytest.mark.timeout(120)
def test_packed_shards_give_the_local_dataset(
    ray_cluster: dict[str, Any], reference: dict[int, Any], tmp_path: Path
) -> None:
    """One actor given packs of 2 shards (generate.groups_per_pass=2, one pass per round) writes the
    local dataset's shards, up to float32 reduction order (rtol 1e-5, see the engine's packed test)."""
    from pipeline.ray.generate import generate_ray

    cfg = tiny_config(str(tmp_path / "run"), "ray.generation_actors=1", "generate.groups_per_pass=2")
    manifest, stats = generate_ray(RunContext.create(cfg), progress=False)
    assert stats.shards_done == NUM_SHARDS and manifest.complete
    got = dataset_arrays(cfg)
    assert sorted(got) == sorted(reference)
    for index, arrays in reference.items():
        for a, b in zip(got[index], arrays, strict=True):
            torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(120)
def test_resume_finishes_the_rest_and_rerun_does_no_work(
    ray_cluster: dict[str, Any],
    local_run: Path,
    reference: dict[int, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pipeline.ray.generate as rg

    # A run that crashed after three shards (made by the local executor: same dataset hash),
    # with a stray unlisted file of the fourth shard left by the crashed writer.
    shutil.copytree(local_run, tmp_path / "run")
    cfg = tiny_config(str(tmp_path / "run"), "ray.generation_actors=2")
    ctx = RunContext.create(cfg)
    storage = ctx.dataset_storage
    manifest = Manifest.load(storage)
    manifest.shards = [s for s in manifest.shards if s.index != 3]
    manifest.save(storage)
    shard_dir = tmp_path / "run" / "data" / "shards"
    (shard_dir / "shard-00003.parquet").write_bytes(b"partial")
    mtimes = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}

    manifest, stats = rg.generate_ray(ctx, progress=False)
    assert stats.shards_done == 1
    assert manifest.complete
    after = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    assert {k for k in after if after[k] != mtimes[k]} == {"shard-00003.parquet"}
    assert_same_dataset(dataset_arrays(cfg), reference)

    # Finished: nothing to dispatch, no actor may even be created, no file is touched.
    class NoActors:
        def options(self, **_: Any) -> Any:
            raise AssertionError("a finished generation must not create actors")

    monkeypatch.setattr(rg, "_RemoteGenerator", NoActors())
    mtimes = after
    manifest, stats = rg.generate_ray(ctx, progress=False)
    assert stats.shards_done == 0 and manifest.complete
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()} == mtimes


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_generates_into_loopback_s3(
    ray_cluster: dict[str, Any], reference: dict[int, Any], s3_bucket: str, s3_endpoint: str
) -> None:
    import s3fs

    from pipeline.ray.generate import generate_ray

    cfg = tiny_config(f"{s3_bucket}/run", "ray.generation_actors=1")
    _, stats = generate_ray(RunContext.create(cfg), progress=False)
    assert stats.shards_done == NUM_SHARDS
    assert_same_dataset(dataset_arrays(cfg), reference)

    # Any Parquet reader can read the shards: plain pyarrow through s3fs.
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint, "region_name": "us-east-1"})
    bucket = s3_bucket.removeprefix("s3://")
    files = sorted(fs.ls(f"{bucket}/run/data/shards"))
    assert [f.rsplit("/", 1)[-1] for f in files] == [f"shard-{i:05d}.parquet" for i in range(NUM_SHARDS)]
    for i, path in enumerate(files):
        table = pq.read_table(path, filesystem=fs)
        images = np.asarray(table.column("image").to_pylist(), dtype=np.float32)
        assert images.reshape(reference[i][0].shape).tobytes() == reference[i][0].tobytes()
        assert table.column("label").to_pylist() == reference[i][1].tolist()


@pytest.mark.timeout(120)
def test_actor_dying_mid_shard_is_replaced(
    ray_cluster: dict[str, Any],
    reference: dict[int, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pipeline.ray.generate import FAULT_ENV, generate_ray

    marker = tmp_path / "actor-exited"
    monkeypatch.setenv(FAULT_ENV, str(marker))
    cfg = tiny_config(str(tmp_path / "run"), "ray.generation_actors=1")
    with caplog.at_level(logging.WARNING, logger="pipeline.ray.generate"):
        manifest, stats = generate_ray(RunContext.create(cfg), progress=False)
    assert marker.exists(), "the test hook did not kill an actor"
    assert "generator actor died" in caplog.text
    assert stats.shards_done == NUM_SHARDS and manifest.complete
    assert_same_dataset(dataset_arrays(cfg), reference)


@pytest.mark.timeout(120)
def test_too_many_actor_deaths_fail_without_listing_the_shard(
    ray_cluster: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.ray.generate import FAULT_ENV, generate_ray

    monkeypatch.setenv(FAULT_ENV, str(tmp_path / "actor-exited"))
    cfg = tiny_config(str(tmp_path / "run"), "ray.generation_actors=1", "ray.max_failures=0")
    with pytest.raises(GenerationError, match=r"shard 0: its generator actor died 1 times"):
        generate_ray(RunContext.create(cfg), progress=False)
    storage = RunContext.create(cfg).dataset_storage
    assert not Manifest.exists(storage) or Manifest.load(storage).shards == []
    # The driver killed its actors on the way out (ray.kill is asynchronous: allow a moment).
    import ray

    deadline = time.monotonic() + 15
    while True:
        left = [n for n in ray.util.list_named_actors() if n.startswith("intraq-generator")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert left == []


@pytest.mark.timeout(60)
def test_shards_done_metric_is_exported(ray_cluster: dict[str, Any]) -> None:
    """The driver's shard counter (recorded by the generation tests, and here) reaches Prometheus."""
    import ray

    from pipeline.ray import metrics

    metrics.SHARDS_DONE.inc(run="metrics-test")
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + 40
    body = ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        if "ray_intraq_shards_done_total" in body:
            break
        time.sleep(2)
    lines = [line for line in body.splitlines() if line.startswith("ray_intraq_shards_done_total")]
    assert lines and float(lines[0].rsplit(" ", 1)[-1]) >= 1


def test_memory_storage_is_refused(tmp_path: Path) -> None:
    from pipeline.ray.generate import _generate

    cfg = tiny_config(f"memory://intraq-tests/{os.getpid()}/run")
    with pytest.raises(GenerationError, match="memory:// storage is private to one process"):
        _generate(RunContext.create(cfg), progress=False)


@pytest.mark.parametrize(
    ("overrides", "resources", "max_shards", "want"),
    [
        ([], {"CPU": 4.0}, 8, (4, 1.0, 0.0)),
        ([], {"CPU": 4.0}, 2, (2, 1.0, 0.0)),
        (["ray.cpus_per_actor=2"], {"CPU": 5.0}, 8, (2, 2.0, 0.0)),
        ([], {"CPU": 0.5}, 8, (1, 1.0, 0.0)),
        (["device=auto"], {"CPU": 32.0, "GPU": 4.0}, 8, (4, 1.0, 1.0)),
        (["device=auto", "ray.gpus_per_actor=0.5"], {"CPU": 32.0, "GPU": 2.0}, 8, (4, 1.0, 0.5)),
        (["device=cpu"], {"CPU": 8.0, "GPU": 4.0}, 8, (8, 1.0, 0.0)),
        (["device=auto", "ray.use_gpu='no'"], {"CPU": 8.0, "GPU": 4.0}, 8, (8, 1.0, 0.0)),
        (["ray.use_gpu='yes'"], {"CPU": 8.0}, 8, (1, 1.0, 1.0)),
        (["ray.generation_actors=3"], {"CPU": 1.0}, 8, (3, 1.0, 0.0)),
        (["ray.generation_actors=3"], {"CPU": 8.0}, 2, (2, 1.0, 0.0)),
    ],
)
def test_pool_spec(
    overrides: list[str], resources: dict[str, float], max_shards: int, want: tuple[int, float, float]
) -> None:
    from pipeline.ray.resources import pool_spec

    spec = pool_spec(tiny_config("/tmp/unused", *overrides), max_shards, resources)
    assert (spec.size, spec.num_cpus, spec.num_gpus) == want


def test_an_actor_optimizes_the_next_pack_while_it_writes_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two packs on one actor (as the driver sends them): the second optimizes while the first is
    written (the write of shard 0 waits for it), and every shard is the one a lone call writes."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import pipeline.ray.generate as generate_module
    from pipeline.ray.generate import GeneratorActor
    from pipeline.stages.plan import make_plan

    cfg = tiny_config(str(tmp_path / "run"))
    tasks = make_plan(cfg, 10)[:2]  # shards 0 and 1, both of round 0
    torch.set_num_threads(1)
    alone = GeneratorActor(tiny_config(str(tmp_path / "alone")), "alone", 1.0)
    want = [alone.run([task], None)[0].info.sha256 for task in tasks]

    optimizing = {0: threading.Event(), 1: threading.Event()}
    real_optimize, real_write = generate_module.optimize_shards, generate_module.write_shards

    def optimize(synth: Any, pack: list[Any], *args: Any, **kwargs: Any) -> Any:
        optimizing[pack[0].index].set()
        return real_optimize(synth, pack, *args, **kwargs)

    def write(ctx: Any, storage: Any, pack: list[Any], results: Any) -> Any:
        if pack[0].index == 0:
            assert optimizing[1].wait(timeout=20), "shard 1 did not optimize while shard 0 was written"
        return real_write(ctx, storage, pack, results)

    monkeypatch.setattr(generate_module, "optimize_shards", optimize)
    monkeypatch.setattr(generate_module, "write_shards", write)
    actor = GeneratorActor(cfg, "intraq-generator-0", 1.0)
    with ThreadPoolExecutor(2) as threads:  # what max_concurrency=PACKS_IN_FLIGHT gives the actor
        first = threads.submit(actor.run, [tasks[0]], None)
        assert optimizing[0].wait(timeout=20)
        second = threads.submit(actor.run, [tasks[1]], None)
        got = [first.result(timeout=60)[0].info.sha256, second.result(timeout=60)[0].info.sha256]
    assert got == want


def test_every_actor_gets_a_pack_before_any_gets_two() -> None:
    from pipeline.ray.generate import PACKS_IN_FLIGHT, _Pool

    pool = _Pool.__new__(_Pool)  # the dispatch rule alone, without actors
    pool.actors, pool.load = ["a", "b"], {"a": 0, "b": 0}
    order = []
    while (actor := pool.next_actor()) is not None:
        order.append(actor)
        pool.load[actor] += 1
    assert PACKS_IN_FLIGHT == 2 and order == ["a", "b", "a", "b"]
    pool.load["b"] -= 1  # b finished one: it takes the next
    assert pool.next_actor() == "b"
