"""Synthetic-image shards as plain Parquet files: the schema, writing, reading and validating one shard.

A shard is ``shards/shard-{index:05d}.parquet`` with one row per image:

* ``image``: ``fixed_size_list<float32>[C*H*W]`` (or ``<halffloat>`` for shards written with
  ``store_dtype="float16"``, Parquet's Float16 type), the image in the teacher's normalized input
  space, row-major CHW (Ray Data reads it as a ``[B, C*H*W]`` tensor). Every reader here returns
  float32 whatever the stored dtype; the shard's metadata and the manifest record the dtype;
* ``label``, ``seed``, ``index``: int64 (class, per-image seed, global image index);
* optionally ``feature``: ``fixed_size_list<float32>[D]``, the teacher's penultimate feature of
  each image (what later rounds need for their class centres, so they need not re-run the teacher).

The schema metadata key ``b"intraq"`` holds a JSON object (format, shard, round, config hash,
teacher hash, mean/std, image shape, number of classes, feature size, store dtype, final losses,
shard seed)
so a shard is self-describing. No pickle is used anywhere: every file is Parquet or JSON.

A shard becomes visible only once ``manifest.json`` lists it (:mod:`pipeline.storage.manifest`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage.store import Storage

__all__ = [
    "SHARD_FORMAT",
    "ShardData",
    "ShardError",
    "ShardInfo",
    "read_examples",
    "read_rows",
    "read_shard",
    "row_bytes",
    "row_group_rows",
    "shard_path",
    "stored_dtype",
    "validate_shard",
    "write_shard",
]

SHARD_FORMAT = "intraq-shard/1"
METADATA_KEY = b"intraq"
COLUMNS = ("image", "label", "seed", "index")
FEATURE_COLUMN = "feature"
ROW_GROUP_SIZE = 1024
#: Row groups are kept at most this large in memory (Arrow bytes of all columns of their rows), so
#: a reader that needs a few rows (the Ray driver's calibration images) or a Ray Data read task
#: never has to hold more than this of one shard. A 3x224x224 row with a 256-d feature is
#: 603,160 bytes in float32 (222 rows a group) and 302,104 in float16 (444 rows a group).
ROW_GROUP_MAX_BYTES = 128 * 1024 * 1024
#: Pixel dtypes a shard can store (``generate.store_dtype``), with their Arrow types.
STORE_DTYPES: dict[str, pa.DataType] = {"float32": pa.float32(), "float16": pa.float16()}

#: Keys a caller must put in ``meta`` for :func:`write_shard`.
REQUIRED_META = ("round", "config_hash", "teacher_sha256", "mean", "std", "num_classes", "seed")
#: Keys of ``expected`` that :func:`validate_shard` compares with the shard's metadata.
EXPECTED_KEYS = ("config_hash", "teacher_sha256", "image_shape", "num_classes", "mean", "std", "store_dtype")


class ShardError(ValueError):
    """A shard is missing, unreadable or does not match what the run expects."""

    def __init__(self, message: str, shard: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.shard = shard
        self.path = path


@dataclass(frozen=True)
class ShardInfo:
    """Where a written shard is and what it must look like: the manifest's record of it."""

    index: int
    path: str
    rows: int
    sha256: str
    bytes: int


class _ShardRecord(Protocol):
    index: int
    path: str
    rows: int
    sha256: str
    bytes: int


def row_group_rows(bytes_per_row: int) -> int:
    """Rows per Parquet row group: :data:`ROW_GROUP_SIZE`, fewer for large images (:data:`ROW_GROUP_MAX_BYTES`)."""
    return max(1, min(ROW_GROUP_SIZE, ROW_GROUP_MAX_BYTES // max(1, bytes_per_row)))


def row_bytes(image_size: int, store_dtype: str = "float32", feature_dim: int | None = None) -> int:
    """Arrow bytes of one shard row: the image (``image_size`` values), the feature, three int64s."""
    pixel = STORE_DTYPES[store_dtype].byte_width
    return image_size * pixel + 4 * (feature_dim or 0) + 8 * (len(COLUMNS) - 1)


def shard_path(index: int) -> str:
    """Relative path of shard ``index`` below the run root."""
    return f"shards/shard-{index:05d}.parquet"


def _schema(size: int, feature_dim: int | None, store_dtype: str) -> pa.Schema:
    fields = [
        pa.field("image", pa.list_(STORE_DTYPES[store_dtype], size), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
    ]
    if feature_dim is not None:
        fields.append(pa.field(FEATURE_COLUMN, pa.list_(pa.float32(), feature_dim), nullable=False))
    return pa.schema(fields)


class ShardData(tuple[Any, ...]):
    """A read shard. Unpacks as ``(images, labels, seeds, indices, meta)``; also has attributes.

    ``features`` (``[N, D]`` float32) is None for shards written without features.
    """

    features: np.ndarray | None

    def __new__(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        seeds: np.ndarray,
        indices: np.ndarray,
        meta: dict[str, Any],
        features: np.ndarray | None = None,
    ) -> ShardData:
        obj = super().__new__(cls, (images, labels, seeds, indices, meta))
        obj.features = features
        return obj

    def __getnewargs__(self) -> tuple[Any, ...]:  # type: ignore[override]
        """Arguments that rebuild the shard on unpickling (e.g. when returned by a Ray task)."""
        return (*self, self.features)

    @property
    def images(self) -> np.ndarray:
        """``[N, C, H, W]`` float32 in the teacher's normalized input space (whatever the stored dtype)."""
        return self[0]

    @property
    def labels(self) -> np.ndarray:
        """``[N]`` int64 class labels."""
        return self[1]

    @property
    def seeds(self) -> np.ndarray:
        """``[N]`` int64 per-image seeds."""
        return self[2]

    @property
    def indices(self) -> np.ndarray:
        """``[N]`` int64 global image indices."""
        return self[3]

    @property
    def meta(self) -> dict[str, Any]:
        """The shard's ``intraq`` metadata."""
        return self[4]


def _as_int64(name: str, values: Any, n: int, shard: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ShardError(f"shard {shard}: {name} must have shape ({n},), got {arr.shape}", shard)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ShardError(f"shard {shard}: {name} must be integers, got dtype {arr.dtype}", shard)
    return arr.astype(np.int64, copy=False)


def _float_list(name: str, values: Any, shard: int) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ShardError(f"shard {shard}: meta {name} has non-finite values {out}", shard)
    return out


def write_shard(
    storage: Storage,
    shard_index: int,
    images: np.ndarray,
    labels: Any,
    seeds: Any,
    indices: Any,
    meta: dict[str, Any],
    features: np.ndarray | None = None,
    store_dtype: str = "float32",
) -> ShardInfo:
    """Write one shard atomically and return its :class:`ShardInfo` (size and sha256 of the file).

    ``images`` is ``[N, C, H, W]`` float32 in the teacher's normalized space, stored as
    ``store_dtype`` (``float32`` or ``float16``); ``meta`` must hold ``REQUIRED_META``
    (``final_losses`` is optional; extra JSON-able keys are kept); ``features`` (``[N, D]``) adds
    the optional ``feature`` column. Non-finite pixels (also pixels beyond float16's range when
    storing float16), features or losses are refused here, so a diverged synthesis never
    produces a shard.
    """
    if store_dtype not in STORE_DTYPES:
        raise ShardError(f"shard {shard_index}: store_dtype {store_dtype!r}, expected one of {list(STORE_DTYPES)}")
    images = np.asarray(images)
    if images.ndim != 4:
        raise ShardError(f"shard {shard_index}: images must be [N, C, H, W], got shape {images.shape}", shard_index)
    if not np.issubdtype(images.dtype, np.floating):
        raise ShardError(f"shard {shard_index}: images must be floating point, got {images.dtype}", shard_index)
    images = np.ascontiguousarray(images, dtype=np.float32)
    n, c, h, w = images.shape
    if not np.isfinite(images).all():
        raise ShardError(f"shard {shard_index}: images contain NaN or Inf; refusing to write", shard_index)
    with np.errstate(over="ignore"):  # beyond float16's range: inf, refused just below
        stored = images.astype(np.float16) if store_dtype == "float16" else images
    if store_dtype == "float16" and not np.isfinite(stored).all():
        big = float(np.abs(images).max())
        raise ShardError(
            f"shard {shard_index}: pixel magnitude {big:.4g} exceeds float16's range (65504); "
            "store it with generate.store_dtype=float32",
            shard_index,
        )
    labels_a = _as_int64("labels", labels, n, shard_index)
    seeds_a = _as_int64("seeds", seeds, n, shard_index)
    indices_a = _as_int64("indices", indices, n, shard_index)
    feats: np.ndarray | None = None
    if features is not None:
        feats = np.ascontiguousarray(np.asarray(features), dtype=np.float32)
        if feats.ndim != 2 or feats.shape[0] != n or feats.shape[1] < 1:
            raise ShardError(f"shard {shard_index}: features must be [{n}, D], got {feats.shape}", shard_index)
        if not np.isfinite(feats).all():
            raise ShardError(f"shard {shard_index}: features contain NaN or Inf; refusing to write", shard_index)

    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ShardError(f"shard {shard_index}: meta is missing {missing}", shard_index)
    if "shard" in meta and meta["shard"] != shard_index:
        raise ShardError(f"shard {shard_index}: meta says shard {meta['shard']}", shard_index)
    if "image_shape" in meta and list(meta["image_shape"]) != [c, h, w]:
        raise ShardError(
            f"shard {shard_index}: meta image_shape {meta['image_shape']} != images {[c, h, w]}", shard_index
        )
    num_classes = int(meta["num_classes"])
    if n and (labels_a.min() < 0 or labels_a.max() >= num_classes):
        raise ShardError(f"shard {shard_index}: labels outside [0, {num_classes})", shard_index)
    losses = meta.get("final_losses") or {}
    full_meta = {
        **meta,
        "format": SHARD_FORMAT,
        "shard": int(shard_index),
        "round": int(meta["round"]),
        "config_hash": str(meta["config_hash"]),
        "mean": _float_list("mean", meta["mean"], shard_index),
        "std": _float_list("std", meta["std"], shard_index),
        "image_shape": [c, h, w],
        "num_classes": num_classes,
        "feature_dim": None if feats is None else int(feats.shape[1]),
        "store_dtype": store_dtype,
        "final_losses": dict(zip(losses, _float_list("final_losses", losses.values(), shard_index), strict=True)),
    }
    try:
        meta_json = json.dumps(full_meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ShardError(f"shard {shard_index}: meta is not JSON-serializable: {exc}", shard_index) from exc

    size = c * h * w
    image_col = pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1), type=STORE_DTYPES[store_dtype]), size)
    columns = [image_col, pa.array(labels_a), pa.array(seeds_a), pa.array(indices_a)]
    if feats is not None:
        flat_feats = pa.array(feats.reshape(-1), type=pa.float32())
        columns.append(pa.FixedSizeListArray.from_arrays(flat_feats, feats.shape[1]))
    feature_dim = None if feats is None else int(feats.shape[1])
    schema = _schema(size, feature_dim, store_dtype)
    table = pa.Table.from_arrays(columns, schema=schema.with_metadata({METADATA_KEY: meta_json.encode("utf-8")}))
    buf = io.BytesIO()
    rows = row_group_rows(row_bytes(size, store_dtype, feature_dim))
    pq.write_table(table, buf, row_group_size=rows, compression="snappy")
    data = buf.getvalue()
    rel = shard_path(shard_index)
    storage.write_bytes_atomic(rel, data)
    return ShardInfo(index=int(shard_index), path=rel, rows=n, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def _shard_meta(table_or_schema: pa.Table | pa.Schema, name: str, shard: int | None) -> dict[str, Any]:
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ShardError(f"{name}: no '{METADATA_KEY.decode()}' metadata; not an intraq shard", shard, name)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{name}: metadata is not valid JSON: {exc}", shard, name) from exc
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise ShardError(f"{name}: metadata format {fmt!r}, expected {SHARD_FORMAT!r}", shard, name)
    return meta


def _check_schema(table: pa.Table, name: str, shard: int | None) -> None:
    names = tuple(table.schema.names)
    if names not in (COLUMNS, (*COLUMNS, FEATURE_COLUMN)):
        raise ShardError(
            f"{name}: columns {list(names)}, expected {list(COLUMNS)} (+ optional '{FEATURE_COLUMN}')",
            shard,
            name,
        )
    for col in ("image", FEATURE_COLUMN)[: 1 + (FEATURE_COLUMN in names)]:
        col_type = table.schema.field(col).type
        allowed = STORE_DTYPES.values() if col == "image" else (pa.float32(),)
        if not (pa.types.is_fixed_size_list(col_type) and col_type.value_type in allowed):
            want = "float32 or halffloat" if col == "image" else "float32"
            raise ShardError(
                f"{name}: column '{col}' has type {col_type}, expected fixed_size_list<{want}>", shard, name
            )
    for col in ("label", "seed", "index"):
        if table.schema.field(col).type != pa.int64():
            raise ShardError(
                f"{name}: column '{col}' has type {table.schema.field(col).type}, expected int64", shard, name
            )
    for col in names:
        if table.column(col).null_count:
            raise ShardError(f"{name}: column '{col}' has null values", shard, name)


def _decode(table: pa.Table, meta: dict[str, Any], name: str, shard: int | None) -> ShardData:
    shape = [int(v) for v in meta.get("image_shape", [])]
    image_type = table.schema.field("image").type
    if len(shape) != 3 or math.prod(shape) != image_type.list_size:
        raise ShardError(
            f"{name}: metadata image_shape {shape} does not match the image column size {image_type.list_size}",
            shard,
            name,
        )
    images = _fixed_list_to_numpy(table, "image").reshape(len(table), *shape)
    features = None
    if FEATURE_COLUMN in table.schema.names:
        dim = table.schema.field(FEATURE_COLUMN).type.list_size
        features = _fixed_list_to_numpy(table, FEATURE_COLUMN).reshape(len(table), dim)
    labels = table.column("label").to_numpy()
    seeds = table.column("seed").to_numpy()
    indices = table.column("index").to_numpy()
    return ShardData(images, labels, seeds, indices, meta, features)


def stored_dtype(schema: pa.Schema) -> str:
    """The pixel dtype a shard stores (``float32`` or ``float16``), read off its image column."""
    value_type = schema.field("image").type.value_type
    return next(name for name, t in STORE_DTYPES.items() if t == value_type)


def _fixed_list_to_numpy(table: pa.Table, column: str) -> np.ndarray:
    """The values of a fixed-size-list float column as one flat float32 array (float16 widened)."""
    flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat, dtype=np.float32)


def _parse(data: bytes, name: str, shard: int | None) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ShardError(f"{name}: unreadable Parquet ({type(exc).__name__}: {exc})", shard, name) from exc


def read_shard(storage: Storage, path: str) -> ShardData:
    """Read a shard: ``(images [N,C,H,W] float32, labels, seeds, indices, meta)`` (+ ``.features``).

    Raises FileNotFoundError if absent and ShardError if it is not a readable intraq shard.
    """
    name = storage.join(path)
    data = storage.read_bytes(path)
    table = _parse(data, name, None)
    _check_schema(table, name, None)
    meta = _shard_meta(table, name, None)
    return _decode(table, meta, name, None)


def validate_shard(storage: Storage, info: _ShardRecord, expected: dict[str, Any] | None = None) -> None:
    """Check a shard against its manifest record and the run's expectations; ShardError if bad.

    Detects a missing, truncated or unreadable file, wrong columns or types, metadata of another
    shard or run (``config_hash``, ``teacher_sha256``), a wrong image shape, pixels stored in
    another dtype than ``expected["store_dtype"]`` (read off the image column), a row-count or
    checksum mismatch, labels out of range, and NaN/Inf values. ``expected`` may hold any of
    ``EXPECTED_KEYS``.
    """
    expected = dict(expected or {})
    unknown = sorted(set(expected) - set(EXPECTED_KEYS))
    if unknown:
        raise ValueError(f"unknown expected keys {unknown}; valid: {list(EXPECTED_KEYS)}")
    shard = int(info.index)
    name = f"shard {shard} ({storage.join(info.path)})"

    def fail(reason: str) -> ShardError:
        return ShardError(f"{name}: {reason}", shard, info.path)

    try:
        data = storage.read_bytes(info.path)
    except FileNotFoundError as exc:
        raise fail("file is missing") from exc
    if len(data) != info.bytes:
        what = "truncated" if len(data) < info.bytes else "larger than recorded"
        raise fail(f"file is {what}: {len(data)} bytes, manifest says {info.bytes}")
    try:
        table = _parse(data, name, shard)
        _check_schema(table, name, shard)
        meta = _shard_meta(table, name, shard)
    except ShardError as exc:
        raise fail(str(exc).removeprefix(f"{name}: ")) from exc
    if meta.get("shard") != shard:
        raise fail(f"metadata says shard {meta.get('shard')}")
    for key in EXPECTED_KEYS:
        if key not in expected:
            continue
        want, got = expected[key], meta.get(key)
        if key == "store_dtype":
            got = stored_dtype(table.schema)  # the column is the truth (shards before the key: float32)
        if key in ("image_shape", "mean", "std"):
            same = got is not None and [float(v) for v in got] == [float(v) for v in want]
        else:
            same = got == want
        if not same:
            raise fail(f"{key} is {got!r}, expected {want!r}")
    if table.num_rows != info.rows:
        raise fail(f"{table.num_rows} rows, manifest says {info.rows}")
    try:
        decoded = _decode(table, meta, name, shard)
    except ShardError as exc:
        raise fail(str(exc).removeprefix(f"{name}: ")) from exc
    for what, values in (("image", decoded.images), ("feature", decoded.features)):
        if values is not None and not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).reshape(len(values), -1).any(axis=1).sum())
            raise fail(f"{bad} {what}(s) contain NaN or Inf")
    labels = decoded.labels
    num_classes = meta.get("num_classes")
    if isinstance(num_classes, int) and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise fail(f"labels outside [0, {num_classes})")
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        raise fail(f"checksum mismatch: sha256 {digest[:16]}..., manifest says {info.sha256[:16]}...")


def read_rows(storage: Storage, path: str, rows: np.ndarray, image_shape: Iterable[int]) -> np.ndarray:
    """Images at positions ``rows`` of a shard (``[len(rows), C, H, W]`` float32, in that order).

    Reads only the row groups that hold those rows (random access on object storage), so picking
    a few images out of a large shard does not read the shard (:func:`read_examples`).
    """
    return read_examples(storage, path, rows, image_shape)[0]


def read_examples(
    storage: Storage, path: str, rows: np.ndarray, image_shape: Iterable[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Images (``[len(rows), C, H, W]`` float32) and labels (int64) at positions ``rows`` of a shard, in that order.

    Reads only the ``image`` and ``label`` columns of the row groups that hold those rows.
    """
    rows = np.asarray(rows, dtype=np.int64)
    shape = tuple(int(v) for v in image_shape)
    if rows.size == 0:
        return np.zeros((0, *shape), dtype=np.float32), np.zeros(0, dtype=np.int64)
    with storage.open(path) as f:
        pf = pq.ParquetFile(f)
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        starts = np.cumsum([0, *sizes])
        if rows.min() < 0 or rows.max() >= starts[-1]:
            raise ShardError(f"{storage.join(path)}: rows outside [0, {starts[-1]})", None, path)
        group_of = np.searchsorted(starts, rows, side="right") - 1
        groups = np.unique(group_of)
        table = pf.read_row_groups([int(g) for g in groups], columns=["image", "label"])
    # Position of each wanted row inside the concatenation of the groups read.
    offset_in_read = np.cumsum([0, *[sizes[g] for g in groups]])[np.searchsorted(groups, group_of)]
    local = offset_in_read + rows - starts[group_of]
    picked = table.take(pa.array(local))
    images = _fixed_list_to_numpy(picked, "image").reshape(len(rows), *shape)
    return images, picked.column("label").to_numpy().astype(np.int64, copy=False)
