"""``manifest.json``: the list of completed shards that makes them visible, and what reads a dataset through it.

``manifest.json`` lists the completed shards (:mod:`pipeline.storage.shards`) with their sizes and
sha256 and is written last and atomically. Readers only see shards listed in the manifest; a file in
``shards/`` that is not listed (left by a crashed writer) is ignored and may be overwritten.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field

from pipeline.storage.shards import ShardError, ShardInfo, read_shard, shard_path, validate_shard
from pipeline.storage.store import Storage

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "Manifest",
    "ManifestError",
    "ManifestShard",
    "pyarrow_dataset_source",
    "read_all",
    "shard_paths",
    "validate_dataset",
]

MANIFEST_FORMAT = "intraq-manifest/1"
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """``manifest.json`` is unreadable or not an intraq manifest."""


class ManifestShard(BaseModel):
    """One completed shard as recorded in the manifest."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0)
    path: str
    rows: int = Field(ge=0)
    sha256: str
    bytes: int = Field(ge=0)
    round: int = Field(default=0, ge=0)


class Manifest(BaseModel):
    """The list of completed shards of a run; the only way readers find shards.

    Save it after the shards it lists are written (:meth:`save` is atomic), so a reader that
    sees an entry always finds the complete file. ``complete`` is recomputed on save.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["intraq-manifest/1"] = MANIFEST_FORMAT
    config_hash: str
    num_shards_planned: int = Field(ge=0)
    image_shape: list[int] = Field(min_length=3, max_length=3)
    num_classes: int = Field(ge=1)
    mean: list[float]
    std: list[float]
    #: How the shards store pixels (manifests written before the key existed: float32).
    store_dtype: Literal["float32", "float16"] = "float32"
    shards: list[ManifestShard] = Field(default_factory=list)
    complete: bool = False

    @classmethod
    def load(cls, storage: Storage, rel: str = MANIFEST_NAME) -> Manifest:
        """Read and validate the manifest; FileNotFoundError if absent, ManifestError if invalid."""
        raw = storage.read_bytes(rel)
        try:
            return cls.model_validate_json(raw)
        except ValueError as exc:
            first = str(exc).splitlines()
            summary = "; ".join(line.strip() for line in first[:4])
            raise ManifestError(f"{storage.join(rel)} is not a valid intraq manifest: {summary}") from exc

    @classmethod
    def exists(cls, storage: Storage, rel: str = MANIFEST_NAME) -> bool:
        """Whether a manifest has been written."""
        return storage.exists(rel)

    def save(self, storage: Storage, rel: str = MANIFEST_NAME) -> None:
        """Write the manifest atomically (after the shards it lists)."""
        self.shards.sort(key=lambda s: s.index)
        self.complete = self.is_complete()
        storage.write_json_atomic(rel, self.model_dump(mode="json"))

    def add_shard(self, info: ShardInfo, round: int = 0) -> None:
        """Record a written shard (replacing an earlier record of the same index)."""
        entry = ManifestShard(**asdict(info), round=round)
        self.shards = [s for s in self.shards if s.index != info.index] + [entry]
        self.shards.sort(key=lambda s: s.index)

    def shard(self, index: int) -> ManifestShard | None:
        """The record of shard ``index``, if present."""
        return next((s for s in self.shards if s.index == index), None)

    def missing(self, planned_indices: Iterable[int] | None = None) -> list[int]:
        """Planned shard indices (default ``range(num_shards_planned)``) not yet in the manifest."""
        planned = range(self.num_shards_planned) if planned_indices is None else planned_indices
        have = {s.index for s in self.shards}
        return sorted({int(i) for i in planned} - have)

    def is_complete(self) -> bool:
        """True when every planned shard is recorded."""
        return not self.missing()

    @property
    def rows(self) -> int:
        """Total number of images in the recorded shards."""
        return sum(s.rows for s in self.shards)


def validate_dataset(storage: Storage, manifest: Manifest, expected: dict[str, Any] | None = None) -> list[ShardError]:
    """Validate every shard of the manifest; returns the problems found (empty when all good).

    ``expected`` defaults to what the manifest records (config hash, image shape, number of
    classes, mean, std, store dtype); explicit values override. Planned shards absent from the manifest are
    reported too, each as a ShardError naming the shard.
    """
    given = dict(expected or {})
    recorded: dict[str, Any] = {
        "config_hash": manifest.config_hash,
        "image_shape": manifest.image_shape,
        "num_classes": manifest.num_classes,
        "mean": manifest.mean,
        "std": manifest.std,
        "store_dtype": manifest.store_dtype,
    }
    errors: list[ShardError] = []
    for key in ("config_hash", "image_shape", "num_classes", "store_dtype"):
        if key in given and recorded[key] != given[key]:
            errors.append(
                ShardError(f"{storage.join(MANIFEST_NAME)}: {key} is {recorded[key]!r}, expected {given[key]!r}")
            )
    want = {**recorded, **given}
    for entry in manifest.shards:
        try:
            validate_shard(storage, entry, want)
        except ShardError as exc:
            errors.append(exc)
    for index in manifest.missing():
        errors.append(
            ShardError(f"shard {index} ({storage.join(shard_path(index))}): planned but not in the manifest", index)
        )
    return errors


def shard_paths(manifest: Manifest) -> list[str]:
    """Relative paths of the shards listed in the manifest, in shard order."""
    return [s.path for s in sorted(manifest.shards, key=lambda s: s.index)]


def pyarrow_dataset_source(storage: Storage, manifest: Manifest) -> tuple[pafs.FileSystem, list[str]]:
    """``(filesystem, paths)`` for ``ray.data.read_parquet(paths, filesystem=fs)`` or pyarrow.dataset."""
    fs, _ = storage.pyarrow_filesystem()
    return fs, [storage.pyarrow_path(p) for p in shard_paths(manifest)]


def read_all(storage: Storage, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """All images and labels of the manifest's shards in one process (tests, reports, small runs)."""
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for path in shard_paths(manifest):
        shard = read_shard(storage, path)
        images.append(shard.images)
        labels.append(shard.labels)
    if not images:
        return np.zeros((0, *manifest.image_shape), dtype=np.float32), np.zeros((0,), dtype=np.int64)
    return np.concatenate(images), np.concatenate(labels)
