"""generate.store_dtype through the generation stage: float16 shards are the float32 ones rounded,
the manifest records the dtype, and a dataset stored in another dtype is refused, never mixed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import RunConfig, load_run_config
from pipeline.context import RunContext
from pipeline.errors import GenerationError
from pipeline.stages.generate import generate_local, store_dtype
from pipeline.storage.manifest import Manifest, read_all, validate_dataset
from pipeline.storage.shards import read_shard

pytestmark = pytest.mark.timeout(120)


def tiny(url: Path, *extra: str) -> RunConfig:
    return load_run_config(
        "smoke",
        [
            "executor=local",
            "device=cpu",
            "generate.num_images=8",
            "generate.batch_size=4",
            "generate.iterations=2",
            "generate.shards_per_round=1",
            f"storage.url={url}",
            *extra,
        ],
    )


def generate(cfg: RunConfig) -> tuple[Manifest, np.ndarray, np.ndarray]:
    ctx = RunContext.create(cfg)
    manifest, _ = generate_local(ctx, progress=False)
    storage = ctx.dataset_storage
    assert validate_dataset(storage, manifest) == []
    return manifest, *read_all(storage, manifest)


def test_auto_is_float16_from_128_px_and_not_part_of_the_hash(tmp_path: Path) -> None:
    cifar = tiny(tmp_path)
    assert store_dtype(RunContext.create(cifar)) == "float32"
    big = load_run_config("smoke", ["model.image_size=128"])
    assert store_dtype(RunContext.create(big)) == "float16"
    assert store_dtype(RunContext.create(load_run_config("smoke", ["model.image_size=127"]))) == "float32"
    assert store_dtype(RunContext.create(tiny(tmp_path, "generate.store_dtype=float16"))) == "float16"
    # Neither the storage nor micro-batching changes the dataset hash (every earlier hash stays).
    for extra in ("generate.store_dtype=float16", "generate.store_dtype=float32", "generate.micro_batch_size=2"):
        assert tiny(tmp_path, extra).dataset_hash() == cifar.dataset_hash()


def test_float16_dataset_is_the_float32_one_rounded_and_is_never_mixed(tmp_path: Path) -> None:
    m32, x32, y32 = generate(tiny(tmp_path / "f32"))
    cfg16 = tiny(tmp_path / "f16", "generate.store_dtype=float16")
    m16, x16, y16 = generate(cfg16)
    assert (m32.store_dtype, m16.store_dtype) == ("float32", "float16")
    assert x16.dtype == np.float32
    np.testing.assert_array_equal(y16, y32)
    np.testing.assert_array_equal(x16, x32.astype(np.float16).astype(np.float32))
    storage = RunContext.create(cfg16).dataset_storage
    assert read_shard(storage, m16.shards[0].path).meta["store_dtype"] == "float16"
    # Continuing the float32 dataset with float16 storage (same dataset hash) is refused.
    with pytest.raises(GenerationError, match="stored in float32, this run stores float16"):
        generate_local(RunContext.create(tiny(tmp_path / "f32", "generate.store_dtype=float16")), progress=False)
