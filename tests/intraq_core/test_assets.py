"""Named assets: resolution from INTRAQ_DATA_DIR, checksums, metadata by hash, download path."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from intraq_core import assets
from intraq_core.assets import (
    Asset,
    AssetError,
    asset_metadata_for,
    cache_dir,
    list_assets,
    resolve_asset,
    sha256_file,
)
from intraq_core.config import IMAGENET_MEAN, IMAGENET_STD

TEACHER_SHA = "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"


@pytest.fixture
def empty_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No data dir hit, an empty download cache under tmp_path; returns the cache dir."""
    monkeypatch.setenv("INTRAQ_DATA_DIR", str(tmp_path / "no-data"))
    monkeypatch.setenv("INTRAQ_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _register(monkeypatch: pytest.MonkeyPatch, asset: Asset) -> Asset:
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)
    return asset


def test_registry_lists_the_shared_assets() -> None:
    assert {"cifar10-resnet20", "cifar10-test"} <= set(list_assets())
    teacher = assets.ASSETS["cifar10-resnet20"]
    assert teacher.filename == "resnet20-12fca82f.th"
    assert teacher.sha256 == TEACHER_SHA


def test_resolves_from_data_dir(data_dir: Path) -> None:
    assert resolve_asset("cifar10-resnet20") == data_dir / "resnet20-12fca82f.th"
    assert resolve_asset("cifar10-test") == data_dir / "cifar10_test.npz"


def test_existing_path_is_returned_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "w.th").write_bytes(b"x")
    assert resolve_asset("~/w.th") == tmp_path / "w.th"
    assert resolve_asset(tmp_path / "w.th") == tmp_path / "w.th"


def test_sha_mismatch_in_data_dir(teacher_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytearray(teacher_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / teacher_path.name).write_bytes(bytes(data))
    monkeypatch.setenv("INTRAQ_DATA_DIR", str(tmp_path))
    with pytest.raises(AssetError, match=r"sha256 mismatch for asset 'cifar10-resnet20'"):
        resolve_asset("cifar10-resnet20")


def test_unknown_name_lists_known_assets() -> None:
    with pytest.raises(AssetError) as info:
        resolve_asset("cifar10-resnt20")
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg
    assert "did you mean 'cifar10-resnet20'" in msg
    assert "cifar10-test" in msg


def test_missing_path_error(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match=r"file not found"):
        resolve_asset(str(tmp_path / "nope" / "model.th"))


def test_sha256_file_matches_hashlib_and_tracks_changes(tmp_path: Path) -> None:
    f = tmp_path / "blob.bin"
    f.write_bytes(b"a" * 3_000_000)
    assert sha256_file(f) == hashlib.sha256(b"a" * 3_000_000).hexdigest()
    f.write_bytes(b"b" * 10)
    os.utime(f, ns=(1, 1))
    assert sha256_file(f) == hashlib.sha256(b"b" * 10).hexdigest()


def test_metadata_by_name_and_by_hash(teacher_path: Path, tmp_path: Path) -> None:
    meta = asset_metadata_for("cifar10-resnet20")
    assert meta is not None
    assert meta["arch"] == "cifar_resnet20" and meta["shortcut"] == "A" and meta["num_classes"] == 10
    assert meta["mean"] == IMAGENET_MEAN and meta["std"] == IMAGENET_STD
    meta["mean"] = None  # a copy: the registry is untouched
    assert asset_metadata_for("cifar10-resnet20")["mean"] == IMAGENET_MEAN

    copy = tmp_path / "renamed-teacher.pt"
    shutil.copyfile(teacher_path, copy)
    assert asset_metadata_for(copy)["arch"] == "cifar_resnet20"
    assert asset_metadata_for(str(teacher_path))["image_size"] == 32

    other = tmp_path / "other.pt"
    other.write_bytes(b"not an asset")
    assert asset_metadata_for(other) is None
    assert asset_metadata_for(tmp_path / "absent.pt") is None
    assert asset_metadata_for(None) is None


def test_download_once_from_file_url(
    empty_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src" / "blob.bin"
    src.parent.mkdir()
    payload = bytes(range(256)) * 200
    src.write_bytes(payload)
    _register(
        monkeypatch,
        Asset("test-blob", "blob.bin", hashlib.sha256(payload).hexdigest(), src.resolve().as_uri()),
    )
    assert cache_dir() == empty_env
    path = resolve_asset("test-blob")
    assert path == empty_env / "blob.bin"
    assert path.read_bytes() == payload
    assert sorted(p.name for p in empty_env.iterdir()) == ["blob.bin"]
    src.unlink()  # a second resolution uses the cache, no download
    assert resolve_asset("test-blob") == path


def test_download_checksum_failure_leaves_nothing(empty_env: Path, tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "blob.bin"
    src.write_bytes(b"tampered")
    _register(monkeypatch, Asset("test-blob", "blob.bin", "0" * 64, src.resolve().as_uri()))
    with pytest.raises(AssetError, match=r"sha256 mismatch"):
        resolve_asset("test-blob")
    assert list(empty_env.iterdir()) == []


def test_download_failure_is_a_clear_error(empty_env: Path, tmp_path: Path, monkeypatch) -> None:
    url = (tmp_path / "missing.bin").resolve().as_uri()
    _register(monkeypatch, Asset("test-blob", "blob.bin", "0" * 64, url))
    with pytest.raises(AssetError, match=r"could not download asset 'test-blob'.*INTRAQ_DATA_DIR"):
        resolve_asset("test-blob")
    assert list(empty_env.iterdir()) == []


def test_cached_file_is_verified(empty_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, Asset("test-blob", "blob.bin", "0" * 64, "file:///nonexistent"))
    empty_env.mkdir()
    (empty_env / "blob.bin").write_bytes(b"corrupt")
    with pytest.raises(AssetError, match=r"sha256 mismatch"):
        resolve_asset("test-blob")


@pytest.fixture(scope="module")
def cifar_arrays(cifar10_test_path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(cifar10_test_path) as d:
        return d["images"], d["labels"]


class _FakeCIFAR10:
    """Stands in for torchvision.datasets.CIFAR10 (no network): serves given arrays."""

    images: np.ndarray
    labels: np.ndarray

    def __init__(self, root: str, train: bool, download: bool) -> None:
        assert not train and download and Path(root).is_dir()
        self.data = self.images
        self.targets = self.labels.tolist()


def test_cifar10_test_converted_download_verified_by_array_hashes(
    empty_env: Path, cifar_arrays, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    images, labels = cifar_arrays
    fake = type("Fake", (_FakeCIFAR10,), {"images": images, "labels": labels})
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake)
    path = resolve_asset("cifar10-test")
    assert path == empty_env / "cifar10_test.npz"
    assert sorted(p.name for p in empty_env.iterdir()) == ["cifar10_test.npz"]
    with np.load(path) as d:
        assert d["images"].dtype == np.uint8 and d["images"].shape == (10000, 32, 32, 3)
        assert d["labels"].dtype == np.int64 and np.array_equal(d["labels"], labels)
    assert resolve_asset("cifar10-test") == path


def test_converted_npz_in_data_dir_verified_by_array_hashes(
    tmp_path: Path, cifar_arrays, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = cifar_arrays
    np.savez(tmp_path / "cifar10_test.npz", images=images, labels=labels)  # other bytes, same arrays
    assert sha256_file(tmp_path / "cifar10_test.npz") != assets.ASSETS["cifar10-test"].sha256
    monkeypatch.setenv("INTRAQ_DATA_DIR", str(tmp_path))
    assert resolve_asset("cifar10-test") == tmp_path / "cifar10_test.npz"

    np.savez(tmp_path / "cifar10_test.npz", images=images[::-1], labels=labels)
    os.utime(tmp_path / "cifar10_test.npz", ns=(1, 1))
    with pytest.raises(AssetError, match=r"sha256 mismatch for asset 'cifar10-test'"):
        resolve_asset("cifar10-test")


def test_cifar10_test_conversion_rejects_wrong_arrays(
    empty_env: Path, cifar_arrays, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    images, labels = cifar_arrays
    bad_labels = labels.copy()
    bad_labels[0] = (bad_labels[0] + 1) % 10
    fake = type("Fake", (_FakeCIFAR10,), {"images": images, "labels": bad_labels})
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake)
    with pytest.raises(AssetError, match=r"do not match the registered hashes"):
        resolve_asset("cifar10-test")
    assert list(empty_env.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "filename", "arch", "shortcut"),
    [
        ("cifar10-resnet32", "resnet32-d509ac18.th", "cifar_resnet32", "A"),
        ("cifar10-resnet20-chenyaofo", "chenyaofo_cifar10_resnet20-eb80202b.pth", "cifar_resnet20", "B"),
    ],
)
def test_more_shared_teachers_resolve_and_verify(name: str, filename: str, arch: str, shortcut: str) -> None:
    path = resolve_asset(name)  # from INTRAQ_DATA_DIR (the shared data), checked by sha256
    assert path.name == filename
    assert sha256_file(path) == assets.ASSETS[name].sha256
    meta = assets.ASSETS[name].metadata
    assert meta["arch"] == arch and meta["shortcut"] == shortcut and assets.ASSETS[name].url.startswith("https://")


def test_a_resaved_weights_file_is_verified_by_its_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other file bytes, same tensors: accepted by ``state_dict_sha256``; a file torch cannot read: refused."""
    import torch

    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2])}
    _register(
        monkeypatch,
        Asset(
            name="test-weights",
            filename="w.pt",
            sha256="0" * 64,
            url="file:///nowhere",
            state_dict_sha256=assets.state_dict_sha256(state),
        ),
    )
    monkeypatch.setenv("INTRAQ_DATA_DIR", str(tmp_path))
    torch.save(state, tmp_path / "w.pt")
    assert resolve_asset("test-weights") == tmp_path / "w.pt"
    (tmp_path / "w.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(AssetError, match="sha256 mismatch for asset 'test-weights'"):
        resolve_asset("test-weights")
