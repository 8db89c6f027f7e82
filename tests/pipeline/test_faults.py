"""Faults a run must survive, end to end on the real teacher (tiny budget, local executor).

Covered elsewhere (not repeated here): a generation actor killed mid-shard
(``test_ray_generate.py``), a Ray Train worker failing and training resuming from its epoch
checkpoint (``test_ray_train.py``), corrupt-shard detection of ``validate_shard`` itself
(``test_shards.py``). Here:

* the whole ``run`` process SIGKILLed during generation, then again during training:
  ``--resume`` finishes with the same dataset, student and metrics as an uninterrupted run;
* the S3 endpoint stops answering mid-run: bounded retries, one clear error, nothing
  half-written listed; after a restart ``--resume`` completes with the same result;
* a corrupted shard of each kind is refused before training, naming the shard and ``--repair``;
  ``--repair`` (``run``, ``generate``, ``train``) regenerates only the bad shards, byte-identical.

The reference is one uninterrupted in-process run of the same tiny config.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.config import load_run_config
from pipeline.context import KILL_AT_ENV
from pipeline.run.job import run_pipeline
from pipeline.storage.manifest import Manifest, validate_dataset
from pipeline.storage.store import Storage
from tests.pipeline.conftest import FAKE_SECRET, S3Server
from tests.pipeline.run_helpers import (
    NUM_SHARDS,
    TINY,
    assert_one_line_error,
    cli_args,
    read_json,
    results,
    run_cli,
    snapshot,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One uninterrupted run of the tiny config: (location, metrics)."""
    url = tmp_path_factory.mktemp("reference") / "run"
    metrics = run_pipeline(load_run_config("smoke", [*TINY, f"storage.url={url}"]), progress=False)
    return url, metrics


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the run process killed -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_killed_during_generation_then_training_resumes_to_the_same_result(
    reference: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    ref_url, ref_metrics = reference
    url = tmp_path / "run"

    # 1. SIGKILL right after shard 2's file is written, before the manifest lists it.
    first = run_cli(cli_args("run", str(url)), env={KILL_AT_ENV: "generate:2"})
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert [s["index"] for s in read_json(url / "data" / "manifest.json")["shards"]] == [0, 1]
    assert (url / "data" / "shards" / "shard-00002.parquet").exists()  # on disk, never listed
    assert (url / "LOCK").exists()  # the killed run could not release its lock
    assert not (url / "student_calibrated.pt").exists()

    # 2. --resume takes the dead run's lock over, finishes generation, is SIGKILLed at epoch 1.
    resume = ["--log-level", "INFO", *cli_args("run", str(url), flags=("--resume",))]
    second = run_cli(resume, env={KILL_AT_ENV: "train:1"})
    assert second.returncode == -signal.SIGKILL, second.stderr
    assert "taking over lock" in second.stderr and "is gone" in second.stderr
    assert (url / "data" / "manifest.json").read_bytes() == (ref_url / "data" / "manifest.json").read_bytes()
    state = torch.load(url / "train_state.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and len(state["history"]) == 1
    assert not (url / "student.pt").exists() and not (url / "metrics.json").exists()

    # 3. --resume continues after epoch 0 and ends exactly where the uninterrupted run ended.
    third = run_cli(resume)
    assert third.returncode == 0, third.stderr
    assert "resuming distillation after epoch 0" in third.stderr
    metrics = read_json(url / "metrics.json")
    assert results(metrics) == results(ref_metrics)
    assert metrics["generation"]["shards_generated"] == 0  # nothing regenerated in the last run
    assert (url / "train_history.json").read_text() == (ref_url / "train_history.json").read_text()
    for name in ("student_calibrated.pt", "student.pt"):
        assert _sha(url / name) == _sha(ref_url / name), name
    assert not (url / "LOCK").exists()


# -- the S3 endpoint stops answering --------------------------------------------------------------


@pytest.mark.timeout(180)
def test_s3_outage_mid_run_fails_cleanly_and_resume_completes(
    reference: tuple[Path, dict[str, Any]],
    s3_bucket: str,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pipeline.stages.generate as gen
    import pipeline.storage.lock as lock_module

    _, ref_metrics = reference
    url = f"{s3_bucket}/run"
    retry = ["storage.retries=2", "storage.retry_backoff_s=0.05"]
    # A short lease, so the lock the failed run cannot release (the store is down) expires quickly.
    monkeypatch.setattr(lock_module, "LOCK_TTL_S", 2.0)
    real_write = gen.write_shard

    def write_or_lose_endpoint(storage: Storage, index: int, *args: Any, **kwargs: Any) -> Any:
        if index == 2:
            s3_server.stop()  # mid-run: shards 0 and 1 are written and listed
        return real_write(storage, index, *args, **kwargs)

    monkeypatch.setattr(gen, "write_shard", write_or_lose_endpoint)
    t0 = time.monotonic()
    res = runner.invoke(app, cli_args("run", url, *retry))
    elapsed = time.monotonic() - t0
    line = assert_one_line_error(res.output, res.exit_code, "shard-00002.parquet", "failed after 3 attempts")
    assert s3_server.endpoint in line and FAKE_SECRET not in res.output
    assert elapsed < 60, f"bounded retries should fail fast, took {elapsed:.0f} s"

    s3_server.start()
    monkeypatch.setattr(gen, "write_shard", real_write)
    data = Storage.from_url(url).child("data")
    manifest = Manifest.load(data)
    assert [s.index for s in manifest.shards] == [0, 1]
    assert [e.shard for e in validate_dataset(data, manifest)] == [2, 3]  # only "planned, not listed"
    assert Storage.from_url(url).exists("LOCK")  # left behind by the failed run...
    time.sleep(2.2)  # ...until its lease ends

    done = runner.invoke(app, cli_args("run", url, *retry, flags=("--resume",)))
    assert done.exit_code == 0, done.output
    metrics = json.loads(Storage.from_url(url).read_bytes("metrics.json"))
    assert results(metrics) == results(ref_metrics)
    assert not Storage.from_url(url).exists("LOCK")


# -- corrupted shards -------------------------------------------------------------------------------


def _copy_dataset(reference_url: Path, dest: Path) -> Path:
    """A run location holding the reference's config and dataset only (as `generate` leaves it)."""
    dest.mkdir(parents=True)
    shutil.copy2(reference_url / "run.yaml", dest / "run.yaml")
    shutil.copytree(reference_url / "data", dest / "data")
    return dest


def _shard_file(url: Path, index: int) -> Path:
    return url / "data" / "shards" / f"shard-{index:05d}.parquet"


def _rewrite(url: Path, index: int, transform: Callable[[pa.Table], pa.Table]) -> None:
    """Replace shard ``index`` by ``transform(table)`` and record the new file in the manifest, so
    that size and checksum match and only the content check can catch it."""
    path = _shard_file(url, index)
    buf = io.BytesIO()
    pq.write_table(transform(pq.read_table(path)), buf)
    raw = buf.getvalue()
    path.write_bytes(raw)
    manifest = read_json(url / "data" / "manifest.json")
    for entry in manifest["shards"]:
        if entry["index"] == index:
            entry.update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    (url / "data" / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _with_images(table: pa.Table, flat: np.ndarray, size: int) -> pa.Table:
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), size)
    return table.set_column(0, pa.field("image", column.type, nullable=False), column)


def _smaller_images(table: pa.Table) -> pa.Table:
    flat = table.column("image").combine_chunks().flatten().to_numpy().reshape(len(table), 3, 32, 32)
    small = np.ascontiguousarray(flat[:, :, :16, :16]).reshape(-1)
    meta = json.loads(table.schema.metadata[b"intraq"])
    meta["image_shape"] = [3, 16, 16]
    out = _with_images(table, small, 3 * 16 * 16)
    return out.replace_schema_metadata({b"intraq": json.dumps(meta).encode()})


def _nan_pixel(table: pa.Table) -> pa.Table:
    flat = table.column("image").combine_chunks().flatten().to_numpy().copy()
    flat[1234] = np.nan
    return _with_images(table, flat, 3 * 32 * 32).replace_schema_metadata(table.schema.metadata)


def _int32_labels(table: pa.Table) -> pa.Table:
    labels = table.column("label").cast(pa.int32())
    return table.set_column(1, pa.field("label", pa.int32(), nullable=False), labels).replace_schema_metadata(
        table.schema.metadata
    )


def corrupt(url: Path, index: int, kind: str) -> None:
    path = _shard_file(url, index)
    if kind == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "checksum":  # same size, valid Parquet, finite values: one pixel changed
        raw = path.read_bytes()
        table = pq.read_table(path)
        pixel = np.float32(table.column("image")[0].values[100].as_py()).tobytes()
        assert raw.count(pixel) == 1
        path.write_bytes(raw.replace(pixel, np.float32(0.125).tobytes()))
    elif kind == "wrong_schema":
        _rewrite(url, index, _int32_labels)
    elif kind == "wrong_shape":
        _rewrite(url, index, _smaller_images)
    elif kind == "nan":
        _rewrite(url, index, _nan_pixel)
    else:
        raise AssertionError(kind)


CORRUPTIONS = {
    "truncated": "file is truncated",
    "wrong_schema": "column 'label' has type int32",
    "wrong_shape": "image_shape is [3, 16, 16], expected [3, 32, 32]",
    "nan": "1 image(s) contain NaN or Inf",
    "checksum": "checksum mismatch",
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_shard_is_refused_before_training_naming_the_shard(
    kind: str, reference: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    url = _copy_dataset(reference[0], tmp_path / "run")
    corrupt(url, 2, kind)
    data_before = snapshot(url / "data")
    res = runner.invoke(app, cli_args("run", str(url), flags=("--resume",)))
    line = assert_one_line_error(
        res.output, res.exit_code, "1 bad shard(s) [2]", f"shard 2 ({_shard_file(url, 2)})", CORRUPTIONS[kind]
    )
    assert "--repair" in line
    assert snapshot(url / "data") == data_before  # nothing rewritten
    assert not (url / "student_calibrated.pt").exists(), "training must not start on a bad dataset"


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("command", "bad"),
    [
        ("run", {1: "truncated", 3: "nan"}),  # a round-0 and a round-1 shard
        ("generate", {0: "wrong_schema"}),
        ("train", {2: "checksum"}),
    ],
)
def test_repair_regenerates_only_the_bad_shards_byte_identical(
    command: str, bad: dict[int, str], reference: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    ref_url, ref_metrics = reference
    url = _copy_dataset(ref_url, tmp_path / "run")
    for index, kind in bad.items():
        corrupt(url, index, kind)
    shards = url / "data" / "shards"
    good = {i: snapshot(shards)[_shard_file(url, i).name] for i in range(NUM_SHARDS) if i not in bad}
    res = runner.invoke(app, cli_args(command, str(url), flags=("--repair",)))
    assert res.exit_code == 0, res.output
    # Generation is deterministic per shard: the repaired dataset is the original, byte for byte.
    assert (url / "data" / "manifest.json").read_bytes() == (ref_url / "data" / "manifest.json").read_bytes()
    for index in range(NUM_SHARDS):
        assert _sha(_shard_file(url, index)) == _sha(_shard_file(ref_url, index)), index
    after = snapshot(shards)
    for index, record in good.items():
        assert after[_shard_file(url, index).name] == record, f"good shard {index} was rewritten"
    if command == "generate":
        return
    metrics = read_json(url / "metrics.json")
    assert results(metrics) == results(ref_metrics)
    repaired = metrics["repaired_shards"]
    assert repaired == sorted(bad)
