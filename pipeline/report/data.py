"""A run as the report sees it: its config, metrics, histories, synthetic images, and the teacher's features of them.

Also the feature statistics drawn from those features: intra-class diversity and 2-D projections (PCA, t-SNE).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.storage.store import Storage

if TYPE_CHECKING:
    from pipeline.config import RunConfig

GRID_PER_CLASS = 8

EMBED_MAX_POINTS = 1000

__all__ = ["PAPER_DIVERSITY", "RunData", "diversity", "load_run", "project", "real_features", "teacher_features"]


DEFAULT_REAL_IMAGES = 2000


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


#: Mean pairwise intra-class cosine distance of ResNet-20 CIFAR-10 features reported by the IntraQ paper.
PAPER_DIVERSITY = {"real images": 0.44, "IntraQ": 0.42, "ZeroQ-style (BNS + CE)": 0.17}


@dataclass
class RunData:
    """What the report needs from one run location (images kept: a few per class only)."""

    url: str
    label: str
    cfg: RunConfig
    metrics: dict[str, Any] | None
    train_history: list[dict[str, float]] | None
    grid_images: dict[int, list[np.ndarray]]  # class → up to GRID_PER_CLASS images [C, H, W]
    labels: np.ndarray  # [N] every synthetic image
    features: np.ndarray | None  # [N, D] teacher features stored in the shards
    mean: list[float]
    std: list[float]
    num_classes: int
    loss_histories: list[dict[str, Any]] = field(default_factory=list)  # one per shard

    @property
    def method(self) -> str:
        """The run's method key (``metrics.json``, else derived from the config)."""
        from pipeline.report.methods import run_method

        return str((self.metrics or {}).get("method") or run_method(self.cfg))

    @property
    def has_images(self) -> bool:
        return self.labels.size > 0


def _read_json(storage: Storage, rel: str) -> Any | None:
    try:
        return json.loads(storage.read_bytes(rel))
    except FileNotFoundError:
        return None


def load_run(url: str, label: str | None = None) -> RunData:
    """Read the config, metrics, histories and synthetic dataset of the run at ``url``.

    Shards are read one at a time; all labels and features are kept, but only the first
    ``GRID_PER_CLASS`` images of each class, so a large (ImageNet-size) dataset fits in memory.
    """
    import yaml

    from pipeline.config import RunConfig
    from pipeline.context import RunContext
    from pipeline.storage.manifest import Manifest
    from pipeline.storage.shards import read_shard

    storage = Storage.from_url(url)
    try:
        raw = storage.read_bytes("run.yaml")
    except FileNotFoundError:
        raise FileNotFoundError(f"{storage.url} holds no run (run.yaml is missing)") from None
    cfg = RunConfig.model_validate(yaml.safe_load(raw))
    if not cfg.needs_synthetic_data():
        return _run_without_images(storage, cfg, label)
    data = RunContext(cfg, storage).dataset_storage
    try:
        manifest = Manifest.load(data)
    except FileNotFoundError:
        raise FileNotFoundError(f"{data.url} holds no synthetic dataset (manifest.json is missing)") from None
    grid: dict[int, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    features: list[np.ndarray] = []
    has_features = True
    histories: list[dict[str, Any]] = []
    for entry in manifest.shards:
        shard = read_shard(data, entry.path)
        labels.append(shard.labels)
        if shard.features is None:
            has_features = False
        else:
            features.append(shard.features)
        for image, lab in zip(shard.images, shard.labels, strict=True):
            kept = grid.setdefault(int(lab), [])
            if len(kept) < GRID_PER_CLASS:
                kept.append(np.array(image))
        history = shard.meta.get("loss_history")
        if isinstance(history, dict) and history.get("iteration"):
            histories.append(history)
    if not labels:
        raise ValueError(f"{data.url}: the synthetic dataset has no shards yet")
    return RunData(
        url=storage.url,
        label=label or storage.url.rstrip("/").rsplit("/", 1)[-1],
        cfg=cfg,
        metrics=_read_json(storage, "metrics.json"),
        train_history=_read_json(storage, "train_history.json"),
        grid_images=grid,
        labels=np.concatenate(labels),
        features=np.concatenate(features) if has_features and features else None,
        mean=list(manifest.mean),
        std=list(manifest.std),
        num_classes=manifest.num_classes,
        loss_histories=histories,
    )


def _run_without_images(storage: Storage, cfg: RunConfig, label: str | None) -> RunData:
    """A run that used no images (SQuant alone): metrics and config only."""
    from pipeline.context import RunContext

    model_cfg = RunContext(cfg, storage).model_cfg
    return RunData(
        url=storage.url,
        label=label or storage.url.rstrip("/").rsplit("/", 1)[-1],
        cfg=cfg,
        metrics=_read_json(storage, "metrics.json"),
        train_history=_read_json(storage, "train_history.json") or None,
        grid_images={},
        labels=np.zeros(0, dtype=np.int64),
        features=None,
        mean=list(model_cfg.mean or ()),
        std=list(model_cfg.std or ()),
        num_classes=int(model_cfg.num_classes or 0),
    )


def _teacher_and_tap_layer(run: RunData) -> tuple[Any, Any, str | None]:
    """The run's teacher (eval mode), its resolved model config and the MDC feature layer."""
    from intraq_core.models import create_model, resolve_model_config

    model_cfg = resolve_model_config(run.cfg.model)
    teacher = create_model(model_cfg).eval().requires_grad_(False)
    return teacher, model_cfg, run.cfg.generate.mdc_feature


def teacher_features(teacher: Any, layer: str | None, batches: Any) -> tuple[np.ndarray, np.ndarray]:
    """Teacher features (the MDC feature layer, penultimate by default) of labelled batches."""
    import torch

    from intraq_core.models.introspect import FeatureTap

    feats: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    with FeatureTap(teacher, layer) as tap, torch.no_grad():
        for x, y in batches:
            teacher(x)
            assert tap.features is not None
            feats.append(tap.features.float().cpu().numpy())
            labels.append(np.asarray(y))
    return np.concatenate(feats), np.concatenate(labels)


def real_features(run: RunData, data: str | None, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Teacher features and labels of the first ``n`` real test images, and the test set's name.

    The test set is ``data`` or the run's ``eval.data`` (same resize/crop settings).
    """
    from intraq_core.data import load_test_set

    teacher, model_cfg, layer = _teacher_and_tap_layer(run)
    update: dict[str, Any] = {"limit": n}
    if data is not None:
        update["data"] = data
    eval_cfg = run.cfg.eval.model_copy(update=update)
    test_set = load_test_set(eval_cfg, model_cfg)
    feats, labels = teacher_features(teacher, layer, test_set.batches(eval_cfg.batch_size))
    return feats, labels, eval_cfg.data


def _ensure_features(run: RunData) -> np.ndarray:
    """The run's synthetic features (every shard of this project stores them)."""
    if run.features is not None:
        return run.features
    raise ValueError(f"{run.url}: the shards have no 'feature' column; regenerate the dataset to report on it")


def diversity(features: np.ndarray, labels: np.ndarray) -> dict[str, float | int | None]:
    """Intra-class diversity of features (cosine geometry), over the classes with two images or more.

    ``pairwise``: mean over classes of the mean cosine distance between distinct pairs of the
    class (``mean_intra_class_cosine_distance``, the paper's statistic); ``to_centre``: mean
    cosine distance of each feature to its own class mean (what MDC's hinge constrains). Both
    are None when no class has two images (fewer synthetic images than classes).
    """
    import torch

    from intraq_core.synth.losses import mean_distance_to_class_centre, mean_intra_class_cosine_distance

    f = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    counts = torch.unique(y, return_counts=True)[1]
    repeated = bool((counts >= 2).any())
    return {
        "images": int(f.shape[0]),
        "classes": int(counts.numel()),
        "pairwise": mean_intra_class_cosine_distance(f, y) if repeated else None,
        "to_centre": mean_distance_to_class_centre(f, y) if repeated else None,
    }


def _class_names(run: RunData) -> list[str]:
    text = f"{run.cfg.eval.data} {run.cfg.model.weights or ''}".lower()
    if run.num_classes == 10 and "cifar10" in text.replace("-", "").replace("_", ""):
        return list(CIFAR10_CLASSES)
    return [f"class {k}" for k in range(run.num_classes)]


def _subsample(n: int, limit: int, seed: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def project(features: np.ndarray, method: str, seed: int) -> np.ndarray | None:
    """2-D PCA or t-SNE of L2-normalized features (cosine geometry); None if too few points."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = features.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = x.shape[0]
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x) if n >= 3 else None
    if n < 6:
        return None
    perplexity = float(min(30.0, (n - 1) / 3.0))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(x)
