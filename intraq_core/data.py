"""Real labelled test sets: read, validated once, preprocessed by the model spec, normalized.

Sources (``EvalConfig.data``):
- a named asset (``cifar10-test``) or a ``.npz`` file with ``images`` (uint8, N×H×W×3) and
  ``labels`` — the project's canonical array format, loaded without pickle;
- ``torchvision:cifar10`` / ``torchvision:cifar100`` — downloaded by torchvision into
  ``EvalConfig.root`` when absent (users with internet);
- an ImageFolder directory (one sub-folder of images per class): labelled by the position of each
  folder's name in the class list ``EvalConfig.classes`` (a subset of the classes is fine), or,
  without a class list, in sorted folder order when it holds exactly the model's classes;
- a flat folder of images with a ground-truth file ``EvalConfig.labels`` (``<file> <class>``
  lines): the official ImageNet validation layout.

Every test set passes the same checks (:func:`validate_labels`, :func:`check_images`): labels
are 1-D integer class indices of the model (a trailing singleton dimension is squeezed, with a
warning), images are uint8 N×H×W×3 arrays. Arrays at the model's input size are used as they are
(already preprocessed); image files, and arrays of another size when the model spec resizes, are
resized (shorter side, ``ModelConfig.resize_size``) and centre-cropped to ``image_size``; an array
of another size for a spec without resize is refused, never resized silently (the first image is
read when the test set is opened, so such a mismatch fails then). Image files are decoded by
``EvalConfig.num_workers`` processes, the batches always in the same order.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from intraq_core.classes import load_class_list
from intraq_core.config import EvalConfig, ModelConfig
from intraq_core.errors import DatasetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "Preprocess",
    "TestSet",
    "check_images",
    "load_npz",
    "load_test_set",
    "read_ground_truth",
    "validate_labels",
]

#: Image files read from folders (case-insensitive), as torchvision's ImageFolder reads them.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Default number of decoding processes for image files: min(this, the CPUs this process may use).
MAX_DEFAULT_WORKERS = 4


@dataclass
class TestSet:
    """A labelled test set that yields normalized float batches (the same order every time)."""

    name: str
    num_samples: int
    num_classes: int | None  # the classes its labels index (the model's)
    _batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches(batch_size)


# --------------------------------------------------------------------------- validation


def validate_labels(labels: np.ndarray, *, num_images: int, num_classes: int | None, name: str) -> np.ndarray:
    """``labels`` as int64 class indices of shape (num_images,), or a one-line DatasetError.

    A trailing singleton dimension ((N, 1), as some exporters write) is squeezed with a warning;
    any other shape, a non-integer value, a negative index or one >= ``num_classes`` is refused.
    """
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        warnings.warn(f"{name}: labels of shape {labels.shape} squeezed to ({labels.shape[0]},)", stacklevel=2)
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DatasetError(f"{name}: labels must be a 1-D array of class indices, got shape {labels.shape}")
    if labels.shape[0] != num_images:
        raise DatasetError(f"{name}: {num_images} images but {labels.shape[0]} labels")
    if labels.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
        if bad.size:
            raise DatasetError(f"{name}: label {labels[bad[0]]} at index {bad[0]} is not an integer class index")
    elif labels.dtype.kind not in "iu":
        raise DatasetError(f"{name}: labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes if num_classes is not None else False))
    if bad.size:
        allowed = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
        where = f"the model predicts {num_classes} classes" if num_classes is not None else "indices are >= 0"
        raise DatasetError(
            f"{name}: label {labels[bad[0]]} at index {bad[0]} is not a class index ({allowed}: {where})"
        )
    return labels


def check_images(images: np.ndarray, name: str) -> None:
    """DatasetError unless ``images`` is a uint8 array of shape (N, H, W, 3)."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{name}: expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")


def _check_normalization(model_cfg: ModelConfig) -> tuple[tuple, tuple]:
    if model_cfg.mean is None or model_cfg.std is None:
        raise DatasetError("model normalization (mean/std) must be resolved before loading a test set")
    if model_cfg.image_size is None:
        raise DatasetError("model.image_size must be resolved before loading a test set")
    return model_cfg.mean, model_cfg.std


# --------------------------------------------------------------------------- preprocessing


class Preprocess:
    """The model spec's preprocessing of one PIL image: resize the shorter side, centre-crop, uint8 CHW.

    ``resize`` None: no resize; the image must already be ``size`` × ``size``. Picklable, so that
    decoding processes can run it.
    """

    def __init__(self, size: int, resize: int | None, interpolation: str = "bilinear") -> None:
        self.size, self.resize, self.interpolation = size, resize, interpolation

    @classmethod
    def of(cls, model_cfg: ModelConfig) -> Preprocess:
        assert model_cfg.image_size is not None
        return cls(model_cfg.image_size, model_cfg.resize_size, model_cfg.resize_interpolation)

    def describe(self) -> str:
        if self.resize is None:
            return f"no resize (images must be {self.size}x{self.size})"
        return f"shorter side resized to {self.resize} ({self.interpolation}), centre crop {self.size}"

    def __call__(self, image, name: str) -> torch.Tensor:  # image: PIL.Image.Image
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        image = image.convert("RGB")
        if self.resize is not None:
            image = TF.resize(image, self.resize, interpolation=InterpolationMode(self.interpolation))
            image = TF.center_crop(image, [self.size, self.size])
        elif image.size != (self.size, self.size):
            w, h = image.size
            raise DatasetError(
                f"{name}: a {w}x{h} image, but the model takes {self.size}x{self.size} and its preprocessing does "
                "not resize (set model.resize or model.crop_pct to resize and centre-crop)"
            )
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 N×3×H×W -> float ``(x / 255 - mean) / std``."""
    x = x.float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


class _Images(torch.utils.data.Dataset):
    """Images (file paths or an N×H×W×3 array) through a :class:`Preprocess`; a failure is a message.

    A decoding process cannot raise a one-line error (the DataLoader wraps it in a traceback), so
    an unreadable or misfit image comes back as a string and the main process raises it.
    """

    def __init__(self, images: Sequence[str] | np.ndarray, labels: np.ndarray, preprocess: Preprocess) -> None:
        self.images, self.labels, self.preprocess = images, labels, preprocess

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | str:
        from PIL import Image

        item = self.images[i]
        name = item if isinstance(item, str) else f"image {i}"
        try:
            if isinstance(item, str):
                with Image.open(item) as image:
                    x = self.preprocess(image, name)
            else:
                x = self.preprocess(Image.fromarray(item), name)
        except DatasetError as exc:
            return str(exc)
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            return f"{name}: cannot read the image ({exc})"
        return x, int(self.labels[i])


def _collate(items: list[tuple[torch.Tensor, int] | str]) -> tuple[torch.Tensor, torch.Tensor] | str:
    for item in items:
        if isinstance(item, str):
            return item
    xs = torch.stack([x for x, _ in items])  # type: ignore[misc]
    ys = torch.tensor([y for _, y in items], dtype=torch.int64)  # type: ignore[misc]
    return xs, ys


def default_num_workers() -> int:
    """min(4, the CPUs this process may use): the decoding processes when ``eval.num_workers`` is unset."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(MAX_DEFAULT_WORKERS, cpus)


def _decoded_test_set(
    name: str,
    images: Sequence[str] | np.ndarray,
    labels: np.ndarray,
    num_classes: int | None,
    model_cfg: ModelConfig,
    num_workers: int | None,
) -> TestSet:
    mean, std = _check_normalization(model_cfg)
    dataset = _Images(images, labels, Preprocess.of(model_cfg))
    workers = default_num_workers() if num_workers is None else num_workers
    # The first image now, so that a test set the spec cannot read (another size and no resize, not
    # an image format) fails when it is opened, not after a run's training.
    first = dataset[0] if len(dataset) else None
    if isinstance(first, str):
        raise DatasetError(first)

    def gen(batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A map-style dataset without shuffling: the batches come back in index order, whatever
        # the number of processes decoding them.
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate
        )
        for batch in loader:
            if isinstance(batch, str):
                raise DatasetError(batch)
            x, y = batch
            yield _normalize(x, mean, std), y

    return TestSet(name, len(labels), num_classes, gen)


def _array_test_set(
    name: str, images: np.ndarray, labels: np.ndarray, num_classes: int | None, model_cfg: ModelConfig, cfg: EvalConfig
) -> TestSet:
    """Arrays at the model's input size as they are; of another size only when the spec resizes."""
    mean, std = _check_normalization(model_cfg)
    check_images(images, name)
    labels = validate_labels(labels, num_images=images.shape[0], num_classes=num_classes, name=name)
    images, labels = _limit(images, cfg.limit), _limit(labels, cfg.limit)
    size = model_cfg.image_size
    h, w = images.shape[1:3]
    if (h, w) != (size, size):
        pre = Preprocess.of(model_cfg)
        if pre.resize is None:
            raise DatasetError(
                f"{name}: images are {h}x{w}, but the model takes {size}x{size} (model.image_size) and its "
                "preprocessing does not resize: store them at that size, or set model.resize / model.crop_pct"
            )
        warnings.warn(f"{name}: {h}x{w} arrays preprocessed by the model spec: {pre.describe()}", stacklevel=3)
        return _decoded_test_set(name, images, labels, num_classes, model_cfg, cfg.num_workers)

    def gen(batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, images.shape[0], batch_size):
            x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)
            yield _normalize(x, mean, std), torch.from_numpy(labels[start : start + batch_size])

    return TestSet(name, int(images.shape[0]), num_classes, gen)


def _limit(values, limit: int | None):
    return values if limit is None else values[:limit]


# --------------------------------------------------------------------------- sources


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) arrays of a test-set ``.npz`` (no pickle allowed), not yet validated."""
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


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _image_files(root: Path) -> list[str]:
    """Paths (relative to ``root``, sorted) of the image files under ``root``, hidden folders skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        out.extend((rel / f).as_posix() for f in sorted(filenames) if _is_image(f))
    return sorted(out)


def _image_folder(
    path: Path, classes: list[str] | None, classes_spec: str | None, num_classes: int | None
) -> tuple[list[str], np.ndarray, int]:
    """Files, labels and class count of an ImageFolder tree (one sub-folder per class)."""
    folders = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        loose = any(_is_image(f.name) for f in path.iterdir() if f.is_file())
        hint = (
            ": for a flat folder of images (the official validation layout) give the ground truth with "
            "eval.labels=<file of '<file name> <class>' lines>"
            if loose
            else ""
        )
        raise DatasetError(f"{path}: no class sub-folders{hint}")
    if classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise DatasetError(
                f"{path}: class folder '{unknown[0]}' is not in the class list eval.classes={classes_spec} "
                f"({len(unknown)} such folder(s) of {len(folders)})"
            )
        label_of = index
        k = len(classes)
    else:
        if num_classes is not None and len(folders) != num_classes:
            raise DatasetError(
                f"{path} has {len(folders)} class folders but the model predicts {num_classes} classes: to label a "
                "subset, set eval.classes to the model's class list (imagenet1k, or a file with one class id a line)"
            )
        label_of = {f: i for i, f in enumerate(folders)}
        k = len(folders)
    files: list[str] = []
    labels: list[int] = []
    for folder in folders:
        names = _image_files(path / folder)
        files.extend(str(path / folder / n) for n in names)
        labels.extend([label_of[folder]] * len(names))
    return files, np.asarray(labels, dtype=np.int64), k


def read_ground_truth(path: str | Path, classes: list[str] | None) -> list[tuple[str, int | float]]:
    """``(file name, class index)`` pairs of a ground-truth file, in its order (not yet range-checked).

    Lines are ``<file name> <class>``; the class is a 0-based index in the model's order or, with
    a class list, a class id (``n01440764``). A file of bare indices (the ILSVRC devkit's
    ``ILSVRC2012_validation_ground_truth.txt``) is refused: its indices are the devkit's
    ILSVRC2012_IDs (1-based, in ``meta.mat``'s order, not the models' sorted-wnid order).
    """
    try:
        text = Path(path).expanduser().read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"eval.labels={str(path)!r}: cannot read the ground truth ({exc})") from exc
    index = {c: i for i, c in enumerate(classes)} if classes is not None else None
    out: list[tuple[str, int | float]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        where = f"{path}:{lineno}"
        if len(parts) == 1:
            raise DatasetError(
                f"{where}: '{line}' has no file name; lines must be '<file name> <class>' (the devkit's one-index-"
                "per-line file uses its own 1-based class order: convert it to '<file name> <wnid>' lines)"
            )
        name, token = parts
        try:
            value: int | float = int(token)
        except ValueError:
            try:
                value = float(token)  # refused below unless integral, with the other label checks
            except ValueError:
                if index is None:
                    raise DatasetError(
                        f"{where}: class '{token}' is not an index; set eval.classes to the model's class list to "
                        "use class ids"
                    ) from None
                if token not in index:
                    raise DatasetError(f"{where}: class '{token}' is not in the class list eval.classes") from None
                value = index[token]
        out.append((name, value))
    if not out:
        raise DatasetError(f"eval.labels={str(path)!r}: the ground-truth file lists no image")
    return out


def _labelled_folder(path: Path, labels_file: str, classes: list[str] | None) -> tuple[list[str], np.ndarray]:
    """Files and labels of a folder of images with a ground-truth file; every image has one label."""
    from intraq_core.assets import AssetError, resolve_asset

    try:
        labels_file = str(resolve_asset(labels_file))
    except AssetError as exc:
        raise DatasetError(f"eval.labels: {exc}") from exc
    pairs = read_ground_truth(labels_file, classes)
    names = [n for n, _ in pairs]
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise DatasetError(f"{labels_file}: '{n}' is listed twice")
        seen.add(n)
    present = set(_image_files(path))
    missing = [n for n in names if n not in present]
    if missing:
        raise DatasetError(f"{labels_file}: '{missing[0]}' is not an image file in {path} ({len(missing)} missing)")
    unlabelled = sorted(present - seen)
    if unlabelled:
        raise DatasetError(
            f"{path}: '{unlabelled[0]}' has no label in {labels_file} ({len(unlabelled)} unlabelled image(s))"
        )
    return [str(path / n) for n in names], np.asarray([v for _, v in pairs])


def _with_deprecated_overrides(cfg: EvalConfig, model_cfg: ModelConfig) -> ModelConfig:
    """``eval.resize`` / ``eval.crop`` (deprecated) as the ``model.resize`` / ``model.image_size`` they override."""
    update: dict[str, object] = {}
    if cfg.crop is not None:
        warnings.warn(
            "eval.crop is deprecated: set model.image_size (the crop is the model's input size)",
            FutureWarning,
            stacklevel=3,
        )
        update["image_size"] = cfg.crop
    if cfg.resize is not None:
        warnings.warn(
            "eval.resize is deprecated: set model.resize (the preprocessing is part of the model spec)",
            FutureWarning,
            stacklevel=3,
        )
        update.update(resize=cfg.resize, crop_pct=None)
    if not update:
        return model_cfg
    return ModelConfig.model_validate({**model_cfg.model_dump(), **update})


def load_test_set(cfg: EvalConfig, model_cfg: ModelConfig) -> TestSet:
    """Open the test set named by ``cfg.data``, validate it against the model and preprocess it as its spec says."""
    from intraq_core.assets import AssetError, resolve_asset

    model_cfg = _with_deprecated_overrides(cfg, model_cfg)
    _check_normalization(model_cfg)
    k = model_cfg.num_classes
    classes = load_class_list(cfg.classes) if cfg.classes is not None else None
    if classes is not None and k is not None and len(classes) != k:
        raise DatasetError(f"eval.classes={cfg.classes} lists {len(classes)} classes but the model predicts {k}")
    if k is None and classes is not None:
        k = len(classes)

    source = cfg.data
    if source.startswith("torchvision:"):
        kind = source.split(":", 1)[1].lower()
        if kind not in ("cifar10", "cifar100"):
            raise DatasetError(f"unknown torchvision test set '{kind}' (choose cifar10 or cifar100)")
        images, labels = _torchvision_cifar(kind, cfg.root)
        k = k if k is not None else (10 if kind == "cifar10" else 100)
        return _array_test_set(source, images, labels, k, model_cfg, cfg)
    try:
        path = resolve_asset(source)
    except AssetError as exc:
        raise DatasetError(str(exc)) from exc
    if cfg.labels is not None and not path.is_dir():
        raise DatasetError(f"eval.labels is the ground truth of a folder of images, but eval.data={source!r} is a file")
    if path.is_dir():
        if cfg.labels is not None:
            files, labels = _labelled_folder(path, cfg.labels, classes)
        else:
            files, labels, k = _image_folder(path, classes, cfg.classes, k)
        labels = validate_labels(labels, num_images=len(files), num_classes=k, name=str(cfg.labels or path))
        return _decoded_test_set(
            str(path), _limit(files, cfg.limit), _limit(labels, cfg.limit), k, model_cfg, cfg.num_workers
        )
    if path.suffix == ".npz":
        images, labels = load_npz(path)
        return _array_test_set(str(path), images, labels, k, model_cfg, cfg)
    raise DatasetError(
        f"{path}: unsupported test set (use an .npz file, an ImageFolder directory, a folder of images with "
        "eval.labels, or torchvision:cifar10)"
    )
