"""Named assets (pretrained teacher weights, real test sets) resolved to local files.

A name such as ``cifar10-resnet20`` is resolved, in order, to

1. ``$INTRAQ_DATA_DIR/<file>`` when that variable is set and the file exists (offline
   machines and CI point it at the shared data folder);
2. ``$INTRAQ_CACHE_DIR/<file>`` (default ``~/.cache/intraq-pipeline/<file>``), downloaded
   there once from the asset's public source when absent.

Every file is checked against the registered sha256 before it is used (once per process
per file version), so a corrupted or substituted file is never silently loaded. Files that
are produced by conversion (the CIFAR-10 test set is converted from the official tarball
into ``.npz``) cannot be byte-identical, so they are checked by the sha256 of their arrays.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import os
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from intraq_core.config import IMAGENET_MEAN, IMAGENET_STD
from intraq_core.errors import AssetError, CheckpointError

__all__ = [
    "ASSETS",
    "Asset",
    "AssetError",
    "asset_metadata_for",
    "cache_dir",
    "list_assets",
    "register_asset",
    "resolve_asset",
    "sha256_file",
    "state_dict_sha256",
]

_CHUNK = 1 << 20


Fetcher = Callable[["Asset", Path], None]


@dataclass(frozen=True)
class Asset:
    """A named file with its checksum, public source and metadata.

    ``fetch(asset, dest)`` writes the file to ``dest`` (a temporary path; the caller
    verifies and renames it). When None, ``url`` is downloaded as is. ``array_sha256``
    maps array names of an ``.npz`` to the sha256 of ``array.tobytes()``; it is used to
    verify a file whose bytes legitimately differ from the registered ones (a re-conversion).
    ``state_dict_sha256`` does the same for a converted weights file: the sha256 of its tensors
    (:func:`state_dict_sha256`), whatever torch version serialized them.
    """

    name: str
    filename: str
    sha256: str
    url: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    array_sha256: Mapping[str, str] | None = None
    fetch: Fetcher | None = None
    state_dict_sha256: str | None = None


ASSETS: dict[str, Asset] = {}

_lock = threading.Lock()
_hash_cache: dict[tuple[str, int, int], str] = {}
_verified: set[tuple[str, int, int, str]] = set()


def register_asset(asset: Asset) -> Asset:
    """Add (or replace) a named asset in the registry and return it."""
    ASSETS[asset.name] = asset
    return asset


def list_assets() -> list[str]:
    """Names of all registered assets, sorted."""
    return sorted(ASSETS)


def cache_dir() -> Path:
    """Download cache: ``$INTRAQ_CACHE_DIR`` or ``~/.cache/intraq-pipeline``."""
    env = os.environ.get("INTRAQ_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/intraq-pipeline").expanduser()


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks; cached per (path, size, mtime)."""
    p = Path(path)
    key = _file_key(p)
    with _lock:
        cached = _hash_cache.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        _hash_cache[key] = digest
    return digest


def _npz_array_hashes(path: Path, names: list[str]) -> dict[str, str] | None:
    """sha256 of ``tobytes()`` of the named arrays of an ``.npz``; None if unreadable."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {n: hashlib.sha256(data[n].tobytes()).hexdigest() for n in names}
    except (OSError, ValueError, KeyError):
        return None


def state_dict_sha256(state: Mapping[str, Any]) -> str:
    """sha256 over a state dict's sorted keys, dtypes, shapes and tensor bytes (not its file)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _state_dict_hash(path: Path) -> str | None:
    from intraq_core.torchfile import safe_load

    try:
        state = safe_load(path)
    except CheckpointError:  # any unreadable file simply fails verification
        return None
    return state_dict_sha256(state) if isinstance(state, dict) else None


def _verify(asset: Asset, path: Path) -> None:
    """Raise AssetError unless ``path`` holds the asset (file hash, else array hashes)."""
    key = (*_file_key(path), asset.name)
    with _lock:
        if key in _verified:
            return
    digest = sha256_file(path)
    ok = digest == asset.sha256
    if not ok and asset.array_sha256:
        arrays = _npz_array_hashes(path, list(asset.array_sha256))
        ok = arrays == dict(asset.array_sha256)
    if not ok and asset.state_dict_sha256:
        ok = _state_dict_hash(path) == asset.state_dict_sha256
    if not ok:
        raise AssetError(
            f"sha256 mismatch for asset '{asset.name}' at {path}: got {digest}, expected {asset.sha256}; "
            "the file is corrupted or not this asset (delete it or fix INTRAQ_DATA_DIR)"
        )
    with _lock:
        _verified.add(key)


def _download_url(url: str, dest: Path) -> None:
    """Stream ``url`` into ``dest`` with a progress bar (any scheme urllib supports)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))


def _fetch(asset: Asset, dest: Path) -> None:
    """Obtain the asset into the cache: temp file, verify, atomic rename; no partial file left."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{asset.filename}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            if asset.fetch is not None:
                asset.fetch(asset, tmp)
            else:
                _download_url(asset.url, tmp)
        except AssetError:
            raise
        except Exception as exc:
            raise AssetError(
                f"could not download asset '{asset.name}' from {asset.url}: {exc}; "
                f"without internet, set INTRAQ_DATA_DIR to a folder holding {asset.filename}"
            ) from exc
        _verify(asset, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.startswith(("~", ".")) or bool(Path(text).suffix)


def resolve_asset(name_or_path: str | os.PathLike[str]) -> Path:
    """Local, verified file for an asset name, or the given path if it exists (a relative path that
    does not exist here is also looked for under ``$INTRAQ_DATA_DIR``).

    Raises AssetError for a missing path, an unknown name or a checksum mismatch.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path
    asset = ASSETS.get(text)
    data_dir = os.environ.get("INTRAQ_DATA_DIR")
    if asset is None and data_dir and not path.is_absolute() and (Path(data_dir).expanduser() / path).exists():
        # A relative path that is not here may name something in the shared data folder
        # (``imagenet/val1300``): configs stay valid on every machine that sets INTRAQ_DATA_DIR.
        return Path(data_dir).expanduser() / path
    if asset is None:
        if _looks_like_path(text):
            raise AssetError(f"file not found: {path}")
        close = difflib.get_close_matches(text, list_assets(), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise AssetError(f"unknown asset '{text}' and no such file; {hint}known assets: {', '.join(list_assets())}")
    if data_dir:
        candidate = Path(data_dir).expanduser() / asset.filename
        if candidate.is_file():
            _verify(asset, candidate)
            return candidate
    cached = cache_dir() / asset.filename
    if not cached.is_file():
        _fetch(asset, cached)
    _verify(asset, cached)
    return cached


def asset_metadata_for(path_or_name: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """Metadata of a named asset, or of a file whose sha256 is a registered asset's; else None.

    This lets a plain ``--weights path/to/resnet20-12fca82f.th`` know its normalization.
    """
    if path_or_name is None:
        return None
    text = os.fspath(path_or_name)
    asset = ASSETS.get(text)
    if asset is None:
        path = Path(text).expanduser()
        if not path.is_file():
            return None
        by_sha = {a.sha256: a for a in ASSETS.values()}
        asset = by_sha.get(sha256_file(path))
        if asset is None:
            return None
    return copy.deepcopy(dict(asset.metadata))


def _fetch_cifar10_test(asset: Asset, dest: Path) -> None:
    """Download the official CIFAR-10 tarball via torchvision (md5-checked) and write the npz."""
    import numpy as np
    import torchvision

    with tempfile.TemporaryDirectory(dir=dest.parent) as root:
        ds = torchvision.datasets.CIFAR10(root, train=False, download=True)
        images = np.ascontiguousarray(ds.data, dtype=np.uint8)
        labels = np.asarray(ds.targets, dtype=np.int64)
    if images.shape != (10000, 32, 32, 3) or labels.shape != (10000,):
        raise AssetError(f"unexpected CIFAR-10 test arrays: images {images.shape}, labels {labels.shape}")
    got = {
        "images": hashlib.sha256(images.tobytes()).hexdigest(),
        "labels": hashlib.sha256(labels.tobytes()).hexdigest(),
    }
    if asset.array_sha256 is not None and got != dict(asset.array_sha256):
        raise AssetError(f"CIFAR-10 test arrays do not match the registered hashes: {got}")
    with open(dest, "wb") as f:
        np.savez_compressed(f, images=images, labels=labels)


def _fetch_retinaface_mobilenet(asset: Asset, dest: Path) -> None:
    """Download the RetinaFace MobileNet0.25 ImageNet pretrain and keep its plain state dict.

    The published file is a training checkpoint (``state_dict`` under ``module.`` keys, plus
    ``epoch``/``best_acc1``); it is read weights-only, the prefix is removed, and the tensors
    are checked against the registered ``state_dict_sha256`` before the file is kept.
    """
    import torch

    from intraq_core.torchfile import safe_load

    raw = dest.with_suffix(".download")
    try:
        _download_url(asset.url, raw)
        payload = safe_load(raw, what=asset.url)
    finally:
        raw.unlink(missing_ok=True)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise AssetError(f"{asset.url}: no state_dict in the downloaded checkpoint")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if state_dict_sha256(state) != asset.state_dict_sha256:
        raise AssetError(f"{asset.url}: the downloaded weights are not the registered ones (tensor sha256 differs)")
    torch.save(state, dest)


register_asset(
    Asset(
        name="imagenet-mobilenetv1-025",
        filename="imagenet/mobilenetv1_025_imagenet.pth",
        sha256="e7651026b4439e5d78e1f0ba85b5702f4d05c1e8f4026a0342fe4be15d8e3f9c",
        url=(
            "https://github.com/bubbliiiing/retinaface-pytorch/raw/e28a11c31bbc596983576378230cb4d0988162d8/"
            "model_data/mobilenetV1X0.25_pretrain.tar"
        ),
        metadata={
            "kind": "weights",
            "arch": "mobilenet_v1_025",
            "num_classes": 1000,
            "image_size": 224,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        },
        description=(
            "ImageNet-1k MobileNetV1 x0.25 with LeakyReLU(0.1) (RetinaFace-MobileNet0.25 backbone pretrain, "
            "biubug6/Pytorch_Retinaface; 46.58% top-1 on the ImageNet validation set as its authors report)"
        ),
        state_dict_sha256="ee4ddf2128859a7d400042a159b6ead59729cd69268a31b2ccca5662270468c1",
        fetch=_fetch_retinaface_mobilenet,
    )
)

register_asset(
    Asset(
        name="cifar10-resnet20",
        filename="resnet20-12fca82f.th",
        sha256="12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
        url=("https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet20-12fca82f.th"),
        metadata={
            "kind": "weights",
            "arch": "cifar_resnet20",
            "num_classes": 10,
            "shortcut": "A",
            "image_size": 32,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        },
        description="akamaster CIFAR-10 ResNet-20 (91.73% top-1; trained with ImageNet normalization)",
    )
)

register_asset(
    Asset(
        name="cifar10-resnet32",
        filename="resnet32-d509ac18.th",
        sha256="d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850",
        url=("https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet32-d509ac18.th"),
        metadata={
            "kind": "weights",
            "arch": "cifar_resnet32",
            "num_classes": 10,
            "shortcut": "A",
            "image_size": 32,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        },
        description="akamaster CIFAR-10 ResNet-32 (92.63% top-1; trained with ImageNet normalization)",
    )
)

register_asset(
    Asset(
        name="cifar10-resnet20-chenyaofo",
        filename="chenyaofo_cifar10_resnet20-eb80202b.pth",
        sha256="eb80202b9fc54073b36fa88baeed99801c2afe3375e5d4b757145b44f7395f05",
        url=("https://github.com/robtad/DANS/raw/e0f876e613add351e409cf6aae9bb4061ec9c5a2/models/cifar10_resnet20.pth"),
        metadata={
            "kind": "weights",
            "arch": "cifar_resnet20",
            "num_classes": 10,
            "shortcut": "B",
            "image_size": 32,
            "mean": (0.4914, 0.4822, 0.4465),
            "std": (0.2023, 0.1994, 0.2010),
        },
        description=(
            "chenyaofo/pytorch-cifar-models CIFAR-10 ResNet-20 (option-B shortcuts, head fc, 92.60% top-1; "
            "CIFAR normalization with std 0.2023/0.1994/0.2010), as re-saved in robtad/DANS"
        ),
    )
)

register_asset(
    Asset(
        name="cifar10-test",
        filename="cifar10_test.npz",
        sha256="f0af87a8a9f49a2afa5273786cb6887e59c1d2469a75111296c8135b01d9b8ed",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        metadata={
            "kind": "dataset",
            "format": "npz",
            "num_classes": 10,
            "num_images": 10000,
            "image_size": 32,
        },
        description="CIFAR-10 test set, canonical order (images uint8 NHWC, labels int64)",
        array_sha256={
            "images": "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04",
            "labels": "cbb7365de8ed11f05cc4c3a1e7f78144127c5e851efd83762fb18202461230bb",
        },
        fetch=_fetch_cifar10_test,
    )
)
