"""Real labelled test sets, normalized the way the model expects.

Supported sources (``EvalConfig.data``):
- a named asset (``cifar10-test``) or a ``.npz`` file with ``images`` (uint8, N×H×W×3)
  and ``labels`` — the project's canonical CIFAR format, loaded without pickle;
- ``torchvision:cifar10`` / ``torchvision:cifar100`` — downloaded by torchvision into
  ``EvalConfig.root`` when absent (users with internet);
- an ImageFolder directory (one sub-folder per class, ImageNet-style validation set),
  resized and centre-cropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from intraq_core.config import EvalConfig, ModelConfig
from intraq_core.errors import DatasetError


@dataclass
class TestSet:
    """A labelled test set that yields normalized float batches."""

    name: str
    num_samples: int
    num_classes: int
    _batches: object  # a callable (batch_size) -> iterator of (x, y)
    exact_classes: bool = False  # num_classes is the dataset's declared class count

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches(batch_size)  # type: ignore[operator]


def _normalize_uint8_nhwc(images: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def _array_test_set(name: str, images: np.ndarray, labels: np.ndarray, model_cfg: ModelConfig) -> TestSet:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{name}: expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{name}: {images.shape[0]} images but {labels.shape[0]} labels")
    labels = labels.astype(np.int64)
    mean, std = model_cfg.mean, model_cfg.std
    if mean is None or std is None:
        raise DatasetError("model normalization (mean/std) must be resolved before loading a test set")

    def gen(batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, images.shape[0], batch_size):
            x = _normalize_uint8_nhwc(images[start : start + batch_size], mean, std)
            yield x, torch.from_numpy(labels[start : start + batch_size])

    num_classes = int(labels.max()) + 1 if labels.size else 0
    return TestSet(name, int(images.shape[0]), num_classes, gen)


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 NHWC, labels int64) of a test-set ``.npz`` (no pickle allowed)."""
    try:
        with np.load(path, allow_pickle=False) as d:
            if "images" not in d or "labels" not in d:
                raise DatasetError(f"{path}: an .npz test set needs arrays 'images' and 'labels', has {list(d)}")
            return d["images"], d["labels"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{path}: cannot read as .npz test set ({exc})") from exc


def _torchvision_cifar(kind: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[kind]
    root_dir = Path(root or Path.home() / ".cache" / "intraq-pipeline" / "torchvision").expanduser()
    # torchvision verifies the tarball's md5 before reading it.
    ds = cls(str(root_dir), train=False, download=True)
    return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)


def _image_folder(path: Path, cfg: EvalConfig, model_cfg: ModelConfig) -> TestSet:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    size = model_cfg.image_size or 224
    crop = cfg.crop or size
    resize = cfg.resize or round(crop * 256 / 224)
    tf = T.Compose(
        [
            T.Resize(resize),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(model_cfg.mean, model_cfg.std),
        ]
    )
    ds = ImageFolder(str(path), transform=tf)
    if len(ds) == 0:
        raise DatasetError(f"{path}: no images found in the ImageFolder directory")
    n = len(ds) if cfg.limit is None else min(len(ds), cfg.limit)

    def gen(batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        subset = torch.utils.data.Subset(ds, range(n))
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=cfg.num_workers)
        yield from loader

    return TestSet(str(path), n, len(ds.classes), gen, exact_classes=True)


def load_test_set(cfg: EvalConfig, model_cfg: ModelConfig) -> TestSet:
    """Open the test set named by ``cfg.data`` and check it fits the model's classes."""
    from intraq_core.assets import AssetError, resolve_asset

    source = cfg.data
    if source.startswith("torchvision:"):
        kind = source.split(":", 1)[1].lower()
        if kind not in ("cifar10", "cifar100"):
            raise DatasetError(f"unknown torchvision test set '{kind}' (choose cifar10 or cifar100)")
        images, labels = _torchvision_cifar(kind, cfg.root)
        ts = _array_test_set(source, *_limit(images, labels, cfg.limit), model_cfg)
        ts.num_classes, ts.exact_classes = (10 if kind == "cifar10" else 100), True
    else:
        try:
            path = resolve_asset(source)
        except AssetError as exc:
            raise DatasetError(str(exc)) from exc
        if path.is_dir():
            ts = _image_folder(path, cfg, model_cfg)
        elif path.suffix == ".npz":
            images, labels = load_npz(path)
            ts = _array_test_set(str(path), *_limit(images, labels, cfg.limit), model_cfg)
        else:
            raise DatasetError(
                f"{path}: unsupported test set (use an .npz file, an ImageFolder directory or torchvision:cifar10)"
            )
    k = model_cfg.num_classes
    if k is not None and (ts.num_classes > k or (ts.exact_classes and ts.num_classes != k)):
        raise DatasetError(f"test set {ts.name} has {ts.num_classes} classes but the model predicts {k}")
    return ts


def _limit(images: np.ndarray, labels: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    if limit is None:
        return images, labels
    return images[:limit], labels[:limit]
