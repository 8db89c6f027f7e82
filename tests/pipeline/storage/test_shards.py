"""Parquet shards and the manifest: round trips, plain-Parquet readability, corruption detection."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.storage.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    pyarrow_dataset_source,
    read_all,
    shard_paths,
    validate_dataset,
)
from pipeline.storage.shards import ShardError, ShardInfo, read_shard, shard_path, validate_shard, write_shard
from pipeline.storage.store import Storage

pytestmark = pytest.mark.timeout(60)

SHAPE = (3, 8, 8)
NUM_CLASSES = 10
MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.247, 0.2435, 0.2616]


def _batch(shard: int, n: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(shard)
    images = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    labels = np.arange(n, dtype=np.int64) % NUM_CLASSES
    seeds = rng.integers(0, 2**31, size=n, dtype=np.int64)
    indices = np.arange(shard * n, (shard + 1) * n, dtype=np.int64)
    return images, labels, seeds, indices


def _meta(shard: int, **over: Any) -> dict[str, Any]:
    meta = {
        "round": shard // 2,
        "config_hash": "cfg-abc123",
        "teacher_sha256": "f" * 64,
        "mean": MEAN,
        "std": STD,
        "num_classes": NUM_CLASSES,
        "final_losses": {"bns": 0.5, "ce": 0.01},
        "seed": 1000 + shard,
    }
    meta.update(over)
    return meta


def _write(storage: Storage, shard: int, n: int = 6) -> ShardInfo:
    return write_shard(storage, shard, *_batch(shard, n), _meta(shard))


def _manifest(planned: int = 3) -> Manifest:
    return Manifest(
        config_hash="cfg-abc123",
        num_shards_planned=planned,
        image_shape=list(SHAPE),
        num_classes=NUM_CLASSES,
        mean=MEAN,
        std=STD,
    )


def _expected() -> dict[str, Any]:
    return {"config_hash": "cfg-abc123", "image_shape": list(SHAPE), "num_classes": NUM_CLASSES}


# -- round trips ----------------------------------------------------------------------------------


def test_shard_round_trip(any_storage: Storage) -> None:
    images, labels, seeds, indices = _batch(3)
    info = write_shard(any_storage, 3, images, labels, seeds, indices, _meta(3))
    assert info.path == shard_path(3) == "shards/shard-00003.parquet"
    data = any_storage.read_bytes(info.path)
    assert info.rows == 6 and info.bytes == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
    assert any_storage.ls("shards") == ["shards/shard-00003.parquet"]  # no temp file left
    got_images, got_labels, got_seeds, got_indices, meta = read_shard(any_storage, info.path)
    assert got_images.dtype == np.float32 and got_images.shape == (6, *SHAPE)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(got_seeds, seeds)
    np.testing.assert_array_equal(got_indices, indices)
    assert meta["format"] == "intraq-shard/1" and meta["shard"] == 3 and meta["round"] == 1
    assert meta["image_shape"] == list(SHAPE) and meta["num_classes"] == NUM_CLASSES
    assert meta["final_losses"] == {"bns": 0.5, "ce": 0.01} and meta["seed"] == 1003
    validate_shard(any_storage, info, _expected())
    shard = read_shard(any_storage, info.path)
    assert shard.images is shard[0] and shard.meta is shard[4] and shard.features is None
    np.testing.assert_array_equal(shard.seeds, seeds)


def test_optional_feature_column_round_trips(any_storage: Storage) -> None:
    images, labels, seeds, indices = _batch(0)
    features = np.random.default_rng(1).normal(size=(6, 16)).astype(np.float32)
    info = write_shard(any_storage, 0, images, labels, seeds, indices, _meta(0), features=features)
    shard = read_shard(any_storage, info.path)
    np.testing.assert_array_equal(shard.features, features)
    np.testing.assert_array_equal(shard.images, images)
    assert shard.meta["feature_dim"] == 16
    clone = pickle.loads(pickle.dumps(shard))  # e.g. returned from a Ray task
    np.testing.assert_array_equal(clone.features, features)
    assert clone.meta == shard.meta and len(clone) == 5
    validate_shard(any_storage, info, _expected())
    with pytest.raises(ShardError, match="features must be"):
        write_shard(any_storage, 0, images, labels, seeds, indices, _meta(0), features=features[:3])
    features[1, 2] = np.inf
    with pytest.raises(ShardError, match="features contain NaN or Inf"):
        write_shard(any_storage, 0, images, labels, seeds, indices, _meta(0), features=features)


def test_plain_pyarrow_reads_a_shard_with_its_metadata(tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path))
    info = _write(storage, 0)
    table = pq.read_table(storage.join(info.path))
    assert table.schema.names == ["image", "label", "seed", "index"]
    assert table.schema.field("image").type == pa.list_(pa.float32(), int(np.prod(SHAPE)))
    assert all(table.schema.field(c).type == pa.int64() for c in ("label", "seed", "index"))
    meta = json.loads(table.schema.metadata[b"intraq"])
    assert meta["format"] == "intraq-shard/1" and meta["mean"] == MEAN and meta["std"] == STD
    assert json.loads(pq.read_schema(storage.join(info.path)).metadata[b"intraq"])["shard"] == 0
    first = np.asarray(table.column("image")[0].as_py(), dtype=np.float32).reshape(SHAPE)
    np.testing.assert_array_equal(first, _batch(0)[0][0])


def test_pyarrow_dataset_reads_manifest_shards_like_ray_data(any_storage: Storage) -> None:
    """``ray.data.read_parquet(paths, filesystem=fs)`` goes through pyarrow.dataset with these."""
    manifest = _manifest(planned=2)
    for i in range(2):
        manifest.add_shard(_write(any_storage, i), round=0)
    any_storage.write_bytes_atomic(shard_path(7), b"orphan from a crashed writer")
    manifest.save(any_storage)
    fs, paths = pyarrow_dataset_source(any_storage, manifest)
    table = pads.dataset(paths, filesystem=fs, format="parquet").to_table()
    assert table.num_rows == 12
    assert sorted(table.column("index").to_pylist()) == list(range(12))
    flat = table.column("image").combine_chunks().flatten().to_numpy()
    assert flat.shape == (12 * int(np.prod(SHAPE)),)


def test_manifest_round_trip_and_visibility(any_storage: Storage) -> None:
    manifest = _manifest(planned=3)
    assert manifest.missing() == [0, 1, 2] and not manifest.is_complete()
    for i in (2, 0):
        manifest.add_shard(_write(any_storage, i), round=i // 2)
    manifest.save(any_storage)
    # shard 1 written but not recorded (a crash between the shard and the manifest): invisible.
    _write(any_storage, 1)
    loaded = Manifest.load(any_storage)
    assert loaded == manifest and not loaded.complete
    assert loaded.missing() == [1] and loaded.missing([0, 2]) == []
    assert shard_paths(loaded) == [shard_path(0), shard_path(2)]
    images, labels = read_all(any_storage, loaded)
    assert images.shape == (12, *SHAPE)
    np.testing.assert_array_equal(images[:6], _batch(0)[0])
    np.testing.assert_array_equal(images[6:], _batch(2)[0])
    assert labels.dtype == np.int64 and len(labels) == 12
    # Re-adding an index replaces its record; completing the plan flips ``complete`` on save.
    loaded.add_shard(_write(any_storage, 1), round=0)
    loaded.add_shard(_write(any_storage, 1), round=0)
    loaded.save(any_storage)
    final = Manifest.load(any_storage)
    assert final.complete and final.is_complete() and [s.index for s in final.shards] == [0, 1, 2]
    assert final.rows == 18
    assert any_storage.read_json(MANIFEST_NAME)["format"] == "intraq-manifest/1"
    assert validate_dataset(any_storage, final, _expected()) == []


def test_manifest_is_written_last_and_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage.from_url(str(tmp_path))
    writes: list[str] = []
    original = storage.write_bytes_atomic

    def recording(rel: str, data: bytes) -> None:
        writes.append(rel)
        original(rel, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", recording)
    manifest = _manifest(planned=2)
    for i in range(2):
        manifest.add_shard(_write(storage, i))
    manifest.save(storage)
    assert writes == [shard_path(0), shard_path(1), MANIFEST_NAME]
    # A crash while replacing the manifest leaves the previous one intact and no temp file.
    manifest.add_shard(_write(storage, 1), round=5)
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(ValueError, match="I/O error"):
        manifest.save(storage)
    monkeypatch.undo()
    assert [s.round for s in Manifest.load(storage).shards] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, "shards"]


def test_invalid_manifest_is_reported(tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        Manifest.load(storage)
    storage.write_json_atomic(MANIFEST_NAME, {"format": "something-else/9", "shards": []})
    with pytest.raises(ManifestError, match=r"manifest\.json is not a valid intraq manifest"):
        Manifest.load(storage)


# -- write-time checks ----------------------------------------------------------------------------


def test_write_shard_refuses_bad_input(tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path))
    images, labels, seeds, indices = _batch(0)
    nan_images = images.copy()
    nan_images[2, 1, 3, 3] = np.nan
    with pytest.raises(ShardError, match="shard 4: images contain NaN"):
        write_shard(storage, 4, nan_images, labels, seeds, indices, _meta(4))
    with pytest.raises(ShardError, match=r"\[N, C, H, W\]"):
        write_shard(storage, 4, images[0], labels, seeds, indices, _meta(4))
    with pytest.raises(ShardError, match="labels must have shape"):
        write_shard(storage, 4, images, labels[:-1], seeds, indices, _meta(4))
    with pytest.raises(ShardError, match="labels outside"):
        write_shard(storage, 4, images, labels + NUM_CLASSES, seeds, indices, _meta(4))
    with pytest.raises(ShardError, match=r"missing.*config_hash"):
        meta = _meta(4)
        del meta["config_hash"]
        write_shard(storage, 4, images, labels, seeds, indices, meta)
    with pytest.raises(ShardError, match="final_losses"):
        write_shard(storage, 4, images, labels, seeds, indices, _meta(4, final_losses={"bns": float("inf")}))
    assert not storage.exists("shards")


# -- corruption detection -------------------------------------------------------------------------


def _raw_shard(storage: Storage, shard: int, table: pa.Table) -> ShardInfo:
    """Write a table as a shard file bypassing write_shard's checks; return a matching record."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    storage.write_bytes_atomic(shard_path(shard), data)
    return ShardInfo(shard, shard_path(shard), table.num_rows, hashlib.sha256(data).hexdigest(), len(data))


def _good_table(storage: Storage, shard: int) -> pa.Table:
    info = _write(storage, shard)
    return pq.read_table(pa.BufferReader(storage.read_bytes(info.path)))


def _corrupt(kind: str, storage: Storage, shard: int) -> tuple[ShardInfo, dict[str, Any]]:
    """Produce shard ``shard`` corrupted in one way; returns its record and the expectations."""
    expected = _expected()
    info = _write(storage, shard)
    data = storage.read_bytes(info.path)
    if kind == "truncated":
        storage.write_bytes_atomic(info.path, data[: len(data) // 2])
    elif kind == "garbage":
        storage.write_bytes_atomic(info.path, b"\x00" * len(data))
    elif kind == "missing":
        storage.delete(info.path)
    elif kind == "checksum":
        # Same size, still valid Parquet and finite: one pixel value changed in place.
        pixel = _batch(shard)[0].reshape(-1)[5].tobytes()
        assert data.count(pixel) == 1
        storage.write_bytes_atomic(info.path, data.replace(pixel, np.float32(0.125).tobytes()))
    elif kind == "wrong_schema":
        table = _good_table(storage, shard)
        table = table.set_column(1, "label", table.column("label").cast(pa.int32()))
        info = _raw_shard(storage, shard, table)
    elif kind == "missing_column":
        info = _raw_shard(storage, shard, _good_table(storage, shard).drop_columns(["seed"]))
    elif kind == "wrong_shape":
        expected["image_shape"] = [3, 16, 16]
    elif kind == "nan":
        table = _good_table(storage, shard)
        flat = table.column("image").combine_chunks().flatten().to_numpy().copy()
        flat[10] = np.nan
        size = int(np.prod(SHAPE))
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), size)
        info = _raw_shard(storage, shard, table.set_column(0, table.schema.field("image"), column))
    elif kind == "nan_feature":
        images, labels, seeds, indices = _batch(shard)
        features = np.ones((len(labels), 4), dtype=np.float32)
        info = write_shard(storage, shard, images, labels, seeds, indices, _meta(shard), features=features)
        table = pq.read_table(pa.BufferReader(storage.read_bytes(info.path)))
        features[3, 1] = np.nan
        column = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), 4)
        info = _raw_shard(storage, shard, table.set_column(4, table.schema.field("feature"), column))
    elif kind == "rows":
        info = replace(info, rows=info.rows + 1)
    elif kind == "config_hash":
        expected["config_hash"] = "cfg-other"
    elif kind == "other_shard":
        storage.write_bytes_atomic(shard_path(shard + 1), data)
        info = replace(info, index=shard + 1, path=shard_path(shard + 1))
    elif kind == "no_metadata":
        info = _raw_shard(storage, shard, _good_table(storage, shard).replace_schema_metadata(None))
    else:
        raise AssertionError(kind)
    return info, expected


CORRUPTIONS = {
    "truncated": "truncated",
    "garbage": "unreadable Parquet",
    "missing": "file is missing",
    "checksum": "checksum mismatch",
    "wrong_schema": "column 'label' has type int32",
    "missing_column": "columns",
    "wrong_shape": "image_shape is",
    "nan": "1 image(s) contain NaN or Inf",
    "nan_feature": "1 feature(s) contain NaN or Inf",
    "rows": "6 rows, manifest says 7",
    "config_hash": "config_hash is 'cfg-abc123', expected 'cfg-other'",
    "other_shard": "metadata says shard 2",
    "no_metadata": "not an intraq shard",
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_every_corruption_is_detected_and_names_the_shard(kind: str, tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path))
    info, expected = _corrupt(kind, storage, 2)
    with pytest.raises(ShardError) as err:
        validate_shard(storage, info, expected)
    message = str(err.value)
    assert f"shard {info.index} ({storage.join(info.path)})" in message
    assert CORRUPTIONS[kind] in message
    assert err.value.shard == info.index and err.value.path == info.path


@pytest.mark.parametrize("kind", ["truncated", "checksum", "nan"])
def test_corruption_detected_on_every_backend(kind: str, any_storage: Storage) -> None:
    info, expected = _corrupt(kind, any_storage, 1)
    with pytest.raises(ShardError, match=re.escape(CORRUPTIONS[kind])):
        validate_shard(any_storage, info, expected)


def test_validate_dataset_lists_every_problem(tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path))
    manifest = _manifest(planned=4)
    for i in range(3):
        manifest.add_shard(_write(storage, i))
    manifest.save(storage)
    assert [e.shard for e in validate_dataset(storage, manifest)] == [3]  # planned, never written
    data = storage.read_bytes(shard_path(1))
    storage.write_bytes_atomic(shard_path(1), data[:-10])
    errors = validate_dataset(storage, manifest)
    assert [e.shard for e in errors] == [1, 3]
    assert "truncated" in str(errors[0]) and "planned but not in the manifest" in str(errors[1])
    errors = validate_dataset(storage, manifest, {"config_hash": "cfg-other"})
    assert "manifest.json: config_hash" in str(errors[0])
    assert sum("config_hash" in str(e) for e in errors) == 3  # the manifest and both intact shards
    with pytest.raises(ValueError, match="unknown expected keys"):
        validate_shard(storage, manifest.shards[0], {"confighash": "x"})


def test_row_groups_stay_small_and_picking_rows_reads_only_their_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.storage.shards as shards

    assert shards.row_group_rows(shards.row_bytes(3 * 32 * 32, "float32", 64)) == shards.ROW_GROUP_SIZE  # CIFAR
    monkeypatch.setattr(shards, "ROW_GROUP_MAX_BYTES", 3 * shards.row_bytes(int(np.prod(SHAPE))))  # 3 rows a group
    storage = Storage.from_url(str(tmp_path))
    info = _write(storage, 0, n=10)
    assert pq.ParquetFile(tmp_path / info.path).metadata.num_row_groups == 4
    images = read_shard(storage, info.path).images
    rows = np.array([9, 0, 4, 4, 7])
    read: list[list[int]] = []
    real = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", lambda f, g, **k: read.append(list(g)) or real(f, g, **k))
    np.testing.assert_array_equal(shards.read_rows(storage, info.path, rows, SHAPE), images[rows])
    assert read == [[0, 1, 2, 3]]
    np.testing.assert_array_equal(shards.read_rows(storage, info.path, np.array([4, 5]), SHAPE), images[[4, 5]])
    assert read[-1] == [1]  # rows 4 and 5 are both in group 1: only it is read
    with pytest.raises(ShardError, match="rows outside"):
        shards.read_rows(storage, info.path, np.array([10]), SHAPE)


def test_row_groups_of_224px_rows_stay_within_128_mb() -> None:
    import pipeline.storage.shards as shards

    # A 3x224x224 row with a 256-d feature (MobileNetV1 x0.25): 150,528 pixels, 1,024 feature
    # bytes, 24 bytes of label/seed/index. 2^27 // 603,160 = 222; 2^27 // 302,104 = 444.
    assert shards.ROW_GROUP_MAX_BYTES == 2**27
    assert shards.row_bytes(150_528, "float32", 256) == 150_528 * 4 + 1_024 + 24 == 603_160
    assert shards.row_bytes(150_528, "float16", 256) == 150_528 * 2 + 1_024 + 24 == 302_104
    assert shards.row_group_rows(603_160) == 222 and 222 * 603_160 <= 2**27 < 223 * 603_160
    assert shards.row_group_rows(302_104) == 444 and 444 * 302_104 <= 2**27 < 445 * 302_104


# -- float16 storage --------------------------------------------------------------------------------

#: float16 keeps 11 significant bits: round-to-nearest is within 2^-11 of a value (relative) for
#: normal numbers and within half the subnormal spacing 2^-24 (absolute) below 2^-14.
F16_RTOL, F16_ATOL = 2.0**-11, 2.0**-25


def test_float16_shard_round_trips_within_float16_precision(any_storage: Storage) -> None:
    from torch.testing import assert_close

    images, labels, seeds, indices = _batch(0, n=8)
    images[0, 0, 0, :4] = [1e-6, -3e-7, 65000.0, 0.0]  # subnormal, large, zero
    features = np.random.default_rng(2).normal(size=(8, 16)).astype(np.float32)
    info32 = write_shard(any_storage, 0, images, labels, seeds, indices, _meta(0), features=features)
    info16 = write_shard(
        any_storage, 1, images, labels, seeds, indices, _meta(1), features=features, store_dtype="float16"
    )
    shard = read_shard(any_storage, info16.path)
    assert shard.images.dtype == np.float32 and shard.images.shape == (8, *SHAPE)  # widened on read
    assert_close(shard.images, images, rtol=F16_RTOL, atol=F16_ATOL)
    np.testing.assert_array_equal(shard.images, images.astype(np.float16).astype(np.float32))  # plain rounding
    assert not np.array_equal(shard.images, images)
    np.testing.assert_array_equal(shard.features, features)  # features stay float32
    assert shard.meta["store_dtype"] == "float16"
    assert read_shard(any_storage, info32.path).meta["store_dtype"] == "float32"
    rows = np.array([5, 0])
    picked = shards_module().read_rows(any_storage, info16.path, rows, SHAPE)
    assert picked.dtype == np.float32
    np.testing.assert_array_equal(picked, shard.images[rows])
    validate_shard(any_storage, info16, {**_expected(), "store_dtype": "float16"})
    with pytest.raises(ShardError, match="store_dtype is 'float16', expected 'float32'"):
        validate_shard(any_storage, info16, {**_expected(), "store_dtype": "float32"})
    with pytest.raises(ShardError, match="store_dtype is 'float32', expected 'float16'"):
        validate_shard(any_storage, info32, {**_expected(), "store_dtype": "float16"})


def test_float16_refuses_pixels_beyond_its_range(tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path))
    images, labels, seeds, indices = _batch(0)
    images[2, 1, 3, 3] = 70000.0
    with pytest.raises(ShardError, match=r"exceeds float16's range \(65504\); store it with generate\.store"):
        write_shard(storage, 0, images, labels, seeds, indices, _meta(0), store_dtype="float16")
    with pytest.raises(ShardError, match="store_dtype 'bfloat16'"):
        write_shard(storage, 0, images, labels, seeds, indices, _meta(0), store_dtype="bfloat16")
    assert storage.ls("shards") == []


def test_manifest_records_the_store_dtype_and_another_dtype_is_a_problem(tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path))
    manifest = _manifest(planned=2).model_copy(update={"store_dtype": "float16"})
    manifest.add_shard(write_shard(storage, 0, *_batch(0), _meta(0), store_dtype="float16"))
    manifest.add_shard(_write(storage, 1))  # a float32 shard slipped into a float16 dataset
    manifest.save(storage)
    again = Manifest.load(storage)
    assert again.store_dtype == "float16"
    errors = validate_dataset(storage, again)
    assert [e.shard for e in errors] == [1] and "store_dtype is 'float32', expected 'float16'" in str(errors[0])
    # A manifest written before the key existed describes float32 shards.
    old = json.loads(storage.read_bytes(MANIFEST_NAME))
    del old["store_dtype"]
    storage.write_bytes_atomic(MANIFEST_NAME, json.dumps(old).encode())
    assert Manifest.load(storage).store_dtype == "float32"
    assert [e.shard for e in validate_dataset(storage, Manifest.load(storage))] == [0]


def test_a_shard_written_before_store_dtype_existed_is_float32(tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path))
    info = _write(storage, 0)
    table = pq.read_table(storage.join(info.path))
    meta = json.loads(table.schema.metadata[b"intraq"])
    del meta["store_dtype"]  # what every shard written before the key looked like
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({b"intraq": json.dumps(meta).encode()}), buf)
    storage.write_bytes_atomic(info.path, buf.getvalue())
    old = replace(info, bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    validate_shard(storage, old, {**_expected(), "store_dtype": "float32"})  # read off the image column
    with pytest.raises(ShardError, match="store_dtype is 'float32', expected 'float16'"):
        validate_shard(storage, old, {**_expected(), "store_dtype": "float16"})


def shards_module() -> Any:
    import pipeline.storage.shards

    return pipeline.storage.shards
