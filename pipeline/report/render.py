"""Run report: what the synthetic images look like, how each stage went, how accurate the result is.

:func:`build_report` reads one run (and optionally others to compare with) through
:class:`~pipeline.storage.store.Storage` and writes into ``<run>/report/``:

* ``report.html``: one self-contained file, every plot embedded as a base64 ``data:`` URI, plus a
  tiny inline script that checks every image decoded (it sets ``data-images-total`` /
  ``data-images-ok`` on ``<body>``, which headless browsers and the tests read);
* ``report.md`` and the PNG plots it references (for GitHub, wikis, notebooks);
* ``report.json``: the numbers behind the tables.

Contents: (a) a grid of synthetic images per class (de-normalized with the run's mean/std);
(b) per-term generation loss curves (from the ``loss_history`` in each shard's metadata) and
distillation curves (``train_history.json``); (c) PCA and t-SNE projections of the teacher's
penultimate features of the synthetic images (and of real test images), one row per run — with
``--compare`` runs side by side, the paper's "MDC vs ADI" figure; (d) intra-class diversity of
those features next to real test images; (e) the accuracy and timing table from ``metrics.json``;
(f) every run's method and protocol (how weights are rounded, where activation ranges come from,
which layers keep more bits, its data and distillation; :mod:`pipeline.report.methods`) and the benchmark
tables it is a row of (the committed ``benchmarks/results`` table, when this is a source checkout).
A run that uses no images (SQuant without distillation) has no image or feature sections.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.storage.store import Storage

if TYPE_CHECKING:
    from pipeline.config import RunConfig

log = logging.getLogger(__name__)

__all__ = [
    "PAPER_DIVERSITY",
    "REPORT_DIR",
    "ReportResult",
    "RunData",
    "build_report",
    "diversity",
    "load_run",
]

REPORT_DIR = "report"
GRID_PER_CLASS = 8
GRID_MAX_CLASSES = 10
EMBED_MAX_POINTS = 1000
DEFAULT_REAL_IMAGES = 2000
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: Mean pairwise intra-class cosine distance of ResNet-20 CIFAR-10 features reported by the IntraQ paper.
PAPER_DIVERSITY = {"real images": 0.44, "IntraQ": 0.42, "ZeroQ-style (BNS + CE)": 0.17}
TERM_ORDER = ("bns_mean", "bns_var", "ce", "sil", "mdc_lower", "mdc_upper", "adi", "total")
DISTILL_TERMS = (
    ("loss", "distillation loss (total)"),
    ("kd", "KD term"),
    ("ce", "CE term"),
    ("agreement", "train-batch agreement with teacher"),
)


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


@dataclass
class ReportResult:
    """Where the report went and the numbers it shows."""

    url: str
    html_url: str
    files: list[str]
    stats: dict[str, Any]


# -- loading ---------------------------------------------------------------------------------------


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
    from pipeline.stages.generate import dataset_storage
    from pipeline.storage.shards import Manifest, read_shard

    storage = Storage.from_url(url)
    try:
        raw = storage.read_bytes("run.yaml")
    except FileNotFoundError:
        raise FileNotFoundError(f"{storage.url} holds no run (run.yaml is missing)") from None
    cfg = RunConfig.model_validate(yaml.safe_load(raw))
    if not cfg.needs_synthetic_data():
        return _run_without_images(storage, cfg, label)
    data = dataset_storage(RunContext(cfg, storage))
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


# -- statistics ------------------------------------------------------------------------------------


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


# -- plots -----------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    """Render a figure to PNG bytes and close it."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _class_names(run: RunData) -> list[str]:
    text = f"{run.cfg.eval.data} {run.cfg.model.weights or ''}".lower()
    if run.num_classes == 10 and "cifar10" in text.replace("-", "").replace("_", ""):
        return list(CIFAR10_CLASSES)
    return [f"class {k}" for k in range(run.num_classes)]


def _class_colors(num_classes: int) -> Any:
    plt = _plt()
    if num_classes <= 10:
        return plt.get_cmap("tab10")
    if num_classes <= 20:
        return plt.get_cmap("tab20")
    return plt.get_cmap("turbo")


def _point_colors(cmap: Any, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """RGBA per point: the class's colour of a qualitative map, or a position on a continuous one."""
    if num_classes <= 20:
        return cmap(labels)
    return cmap(labels / max(num_classes - 1, 1))


def denormalize(image: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """A normalized ``[C, H, W]`` image as viewable ``[H, W, C]`` RGB in [0, 1] (clipped)."""
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    rgb = image.astype(np.float32) * s + m
    return np.clip(rgb, 0.0, 1.0).transpose(1, 2, 0)


def image_mosaic(run: RunData, classes: list[int], pad: int = 2) -> np.ndarray:
    """One ``[H, W, 3]`` image: a row of tiles per class, white padding, empty tiles white."""
    cols = max(len(run.grid_images[c]) for c in classes)
    h, w = run.grid_images[classes[0]][0].shape[1:]
    mosaic = np.ones((len(classes) * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.float32)
    for r, c in enumerate(classes):
        for k, image in enumerate(run.grid_images[c]):
            rgb = denormalize(image, run.mean, run.std)
            if rgb.shape[2] == 1:
                rgb = np.repeat(rgb, 3, axis=2)
            y0, x0 = pad + r * (h + pad), pad + k * (w + pad)
            mosaic[y0 : y0 + h, x0 : x0 + w] = rgb[:, :, :3]
    return mosaic


def plot_image_grid(run: RunData) -> bytes:
    """A row of synthetic images per class (the first ``GRID_MAX_CLASSES`` classes that have any)."""
    plt = _plt()
    classes = sorted(run.grid_images)[:GRID_MAX_CLASSES]
    names = _class_names(run)
    mosaic = image_mosaic(run, classes)
    height, width = mosaic.shape[:2]
    scale = min(9.0 / width, 9.0 / height) if max(height, width) > 900 else 0.03
    fig, ax = plt.subplots(figsize=(width * scale + 1.5, height * scale + 0.5))
    ax.imshow(mosaic, interpolation="nearest")
    row = height / len(classes)
    ax.set_yticks([row * (r + 0.5) for r in range(len(classes))])
    ax.set_yticklabels([names[c] for c in classes], fontsize=9)
    ax.set_xticks([])
    ax.tick_params(left=False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"{run.label}: synthetic images ({run.method})", fontsize=10)
    return _png(fig)


def _mean_history(run: RunData) -> tuple[list[int], dict[str, np.ndarray]] | None:
    """Per-term loss averaged over the run's shards (shards of another length are left out)."""
    if not run.loss_histories:
        return None
    steps = run.loss_histories[0]["iteration"]
    same = [h for h in run.loss_histories if h["iteration"] == steps]
    out: dict[str, np.ndarray] = {}
    for name in {k for h in same for k in h.get("terms", {})}:
        rows = [[np.nan if v is None else float(v) for v in h["terms"][name]] for h in same if name in h["terms"]]
        with np.errstate(all="ignore"):
            out[name] = np.nanmean(np.asarray(rows, dtype=np.float64), axis=0)
    return list(steps), out


def plot_generation_losses(runs: list[RunData]) -> bytes | None:
    """One panel per loss term, one line per run (mean over shards); None if no run recorded any."""
    plt = _plt()
    curves = {run.label: _mean_history(run) for run in runs}
    present = {label: c for label, c in curves.items() if c is not None}
    if not present:
        return None
    colors = {run.label: f"C{i % 10}" for i, run in enumerate(runs)}  # one colour per run everywhere
    names = {k for _, terms in present.values() for k in terms}
    terms = [t for t in TERM_ORDER if t in names] + sorted(names - set(TERM_ORDER))
    cols = min(3, len(terms))
    rows = (len(terms) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for i, term in enumerate(terms):
        ax = axes[i // cols][i % cols]
        positive = True
        for label, (steps, values) in present.items():
            if term in values:
                marker = "." if len(steps) < 30 else None
                ax.plot(steps, values[term], marker=marker, color=colors[label], label=label)
                finite = values[term][np.isfinite(values[term])]
                positive = positive and bool(finite.size) and bool((finite > 0).all())
        if positive:
            ax.set_yscale("log")
        ax.set_title(term, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for j in range(len(terms), rows * cols):
        axes[j // cols][j % cols].axis("off")
    handles = [plt.Line2D([], [], color=colors[label], marker=".", label=label) for label in present]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle("Image generation: loss terms (mean over shards)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    return _png(fig)


def plot_distillation(runs: list[RunData]) -> bytes | None:
    """Distillation loss, KD, CE and agreement per epoch, one line per run; None if no history."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    present = [r for r in runs if r.train_history]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(DISTILL_TERMS), figsize=(4.0 * len(DISTILL_TERMS), 3.0), squeeze=False)
    colors = {run.label: f"C{i % 10}" for i, run in enumerate(runs)}
    for ax, (key, title) in zip(axes[0], DISTILL_TERMS, strict=True):
        for run in present:
            rows = [row for row in run.train_history or [] if key in row]
            epochs = [int(row.get("epoch", i)) + 1 for i, row in enumerate(rows)]
            values = [float(row[key]) for row in rows]
            ax.plot(epochs, values, marker="o", markersize=3, color=colors[run.label], label=run.label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Quantization-aware distillation", fontsize=11)
    fig.tight_layout()
    return _png(fig)


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


def plot_embeddings(
    panels: list[tuple[str, np.ndarray, np.ndarray]],
    num_classes: int,
    class_names: list[str],
    *,
    tsne: bool,
    seed: int,
) -> bytes:
    """PCA (and t-SNE) of each feature set, one row per set, points coloured by class."""
    plt = _plt()
    methods = ["pca", "tsne"] if tsne else ["pca"]
    fig, axes = plt.subplots(len(panels), len(methods), figsize=(4.2 * len(methods), 3.8 * len(panels)), squeeze=False)
    cmap = _class_colors(num_classes)
    for r, (title, feats, labels) in enumerate(panels):
        idx = _subsample(feats.shape[0], EMBED_MAX_POINTS, seed)
        f, y = feats[idx], labels[idx]
        for c, method in enumerate(methods):
            ax = axes[r][c]
            xy = project(f, method, seed)
            if xy is None:
                ax.text(0.5, 0.5, "too few images", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.scatter(xy[:, 0], xy[:, 1], c=_point_colors(cmap, y, num_classes), s=8, alpha=0.8, linewidths=0)
            ax.set_title(f"{title} — {'PCA' if method == 'pca' else 't-SNE'} ({len(idx)} images)", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if num_classes <= 20:
        handles = [
            plt.Line2D([], [], marker="o", linestyle="", color=cmap(k), label=class_names[k])
            for k in range(num_classes)
        ]
        fig.legend(handles=handles, loc="lower center", ncol=min(num_classes, 5), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.04 + 0.02 * ((num_classes - 1) // 5), 1, 0.97))
    else:
        fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.suptitle("Teacher features of the images, coloured by class (L2-normalized)", fontsize=11)
    return _png(fig)


def plot_diversity(rows: list[dict[str, Any]]) -> bytes:
    """Grouped bars: pairwise intra-class cosine distance and distance to class centre per set."""
    import textwrap

    plt = _plt()
    labels = [textwrap.fill(str(r["set"]), 22) for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 * len(rows) + 1.5), 4.0))
    # A set without two images of one class has no value: an empty slot labelled n/a.
    pairwise = [r["pairwise"] if r["pairwise"] is not None else 0.0 for r in rows]
    to_centre = [r["to_centre"] if r["to_centre"] is not None else 0.0 for r in rows]
    pair = ax.bar(x - 0.2, pairwise, 0.4, label="pairwise intra-class cosine distance")
    centre = ax.bar(x + 0.2, to_centre, 0.4, label="cosine distance to class centre")
    for bars, key in ((pair, "pairwise"), (centre, "to_centre")):
        ax.bar_label(bars, [f"{r[key]:.3f}" if r[key] is not None else "n/a" for r in rows], fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("cosine distance")
    ax.set_ylim(0, 1.2 * max([*pairwise, *to_centre]) + 1e-6)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    ax.set_title("Intra-class diversity of teacher features", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# -- tables --------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


ACCURACY_COLUMNS = (
    ("run", "Run"),
    ("method_name", "Method"),
    ("bits", "Bits"),
    ("images", "Images"),
    ("gen_iterations", "Gen. iterations"),
    ("generator_iterations", "Generator iterations"),
    ("epochs", "Epochs"),
    ("fp_top1", "FP top-1 %"),
    ("ptq_top1", "Calibrated (PTQ) top-1 %"),
    ("quant_top1", "Final top-1 %"),
    ("test_images", "Test images"),
    ("s_generate", "Generate s"),
    ("s_calibrate", "Calibrate s"),
    ("s_distill", "Distil s"),
    ("s_evaluate", "Evaluate s"),
)


def accuracy_row(run: RunData) -> dict[str, Any]:
    """One row of the accuracy table; config values where the run has no metrics.json yet."""
    m = run.metrics or {}
    cfg = run.cfg
    seconds = m.get("seconds") or {}
    from pipeline.report.methods import generation_budget, method_name

    budget = generation_budget(cfg)
    return {
        "run": run.label,
        "method": run.method,
        "method_name": method_name(run.method),
        "bits": f"W{m.get('w_bits', cfg.quant.w_bits)}A{m.get('a_bits', cfg.quant.a_bits)}",
        "images": m.get("num_images", budget["num_images"]),
        "gen_iterations": m.get("gen_iterations", budget["gen_iterations"]),
        "generator_iterations": m.get("generator_iterations", budget["generator_iterations"]),
        "epochs": m.get("epochs", cfg.distill.epochs),
        "fp_top1": m.get("fp_top1"),
        "ptq_top1": m.get("ptq_top1"),
        "quant_top1": m.get("quant_top1"),
        "test_images": m.get("test_images"),
        "s_generate": seconds.get("generate"),
        "s_calibrate": seconds.get("calibrate"),
        "s_distill": seconds.get("distill"),
        "s_evaluate": seconds.get("evaluate"),
    }


DIVERSITY_COLUMNS = (
    ("set", "Images of"),
    ("images", "Images"),
    ("classes", "Classes"),
    ("pairwise", "Pairwise intra-class cosine distance"),
    ("to_centre", "Cosine distance to class centre"),
)


def _md_table(columns: tuple[tuple[str, str], ...], rows: list[dict[str, Any]], digits: int = 2) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_fmt(r.get(k), digits) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _html_table(columns: tuple[tuple[str, str], ...], rows: list[dict[str, Any]], digits: int = 2) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k), digits))}</td>" for k, _ in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# -- rendering -----------------------------------------------------------------------------------


@dataclass
class _Section:
    title: str
    text: str  # plain text (escaped in HTML)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    table: tuple[tuple[tuple[str, str], ...], list[dict[str, Any]], int] | None = None


IMAGE_CHECK_SCRIPT = """<script>
// Self-check: count images that decoded (naturalWidth > 0) once everything has loaded.
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-total", String(images.length));
  document.body.setAttribute("data-images-ok", String(ok));
  document.body.setAttribute("data-image-check", ok === images.length ? "ok" : "broken");
});
</script>"""

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222}h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}img{max-width:100%;height:auto}figcaption{font-size:.9em;color:#555}
.meta{color:#555;font-size:.9em}"""


def _render_markdown(title: str, meta: list[str], sections: list[_Section]) -> str:
    lines = [f"# {title}", "", *[f"- {m}" for m in meta], ""]
    for s in sections:
        lines += [f"## {s.title}", "", s.text, ""]
        if s.table is not None:
            lines += [_md_table(*s.table), ""]
        for name, caption in s.figures:
            lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def _render_html(title: str, meta: list[str], sections: list[_Section], pngs: dict[str, bytes]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<ul class="meta">' + "".join(f"<li>{html.escape(m)}</li>" for m in meta) + "</ul>",
    ]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        parts.append("".join(f"<p>{html.escape(p)}</p>" for p in s.text.split("\n\n")))
        if s.table is not None:
            parts.append(_html_table(*s.table))
        for name, caption in s.figures:
            data = base64.b64encode(pngs[name]).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    parts += [IMAGE_CHECK_SCRIPT, "</body></html>"]
    return "\n".join(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "run"


def _unique_labels(urls: list[str]) -> list[str]:
    labels: list[str] = []
    for url in urls:
        base = url.rstrip("/").rsplit("/", 1)[-1] or url
        label, k = base, 2
        while label in labels:
            label, k = f"{base} ({k})", k + 1
        labels.append(label)
    return labels


# -- the command ---------------------------------------------------------------------------------


def _feature_sections(
    runs: list[RunData],
    main: RunData,
    sections: list[_Section],
    pngs: dict[str, bytes],
    *,
    real_data: str | None,
    real_images: int,
    tsne: bool,
    seed: int,
) -> list[dict[str, Any]]:
    """The teacher-feature projections and the intra-class diversity table (runs with images)."""
    feature_sets: list[tuple[str, np.ndarray, np.ndarray]] = [
        (f"{r.label} ({r.method})", _ensure_features(r), r.labels) for r in runs
    ]
    real_name = None
    if real_images > 0:
        feats, labels, real_name = real_features(main, real_data, real_images)
        feature_sets.append((f"real test images ({real_name})", feats, labels))
    div_rows = []
    for title, feats, labels in feature_sets:
        row = {"set": title, **diversity(feats, labels)}
        div_rows.append(row)
    pngs["features.png"] = plot_embeddings(feature_sets, main.num_classes, _class_names(main), tsne=tsne, seed=seed)
    sections.append(
        _Section(
            "Teacher features",
            "Penultimate-layer (MDC feature) activations of the teacher, L2-normalized and projected "
            "to 2-D with PCA" + (" and t-SNE" if tsne else "") + f" (at most {EMBED_MAX_POINTS} "
            "images per set). Synthetic sets with more intra-class diversity spread like the real "
            "images; collapsed sets form tight per-class clusters.",
            [("features.png", "PCA / t-SNE of teacher features, one row per image set")],
        )
    )
    pngs["diversity.png"] = plot_diversity(div_rows)
    paper = ", ".join(f"{k} {v:.2f}" for k, v in PAPER_DIVERSITY.items())
    sections.append(
        _Section(
            "Intra-class diversity",
            "Pairwise intra-class cosine distance: for each class, the mean cosine distance "
            "1 - cos(f_i, f_j) over all distinct pairs of its images' teacher features, averaged "
            "over classes (intraq_core.synth.losses.mean_intra_class_cosine_distance). This is the "
            f"statistic the IntraQ paper reports for ResNet-20 on CIFAR-10: {paper}; absolute values "
            "depend on how features are extracted, so compare the sets within this report.\n\n"
            "Cosine distance to class centre: the mean of 1 - cos(f_i, c_y) with c_y the mean "
            "feature of the image's class in the same set (mean_distance_to_class_centre), the "
            "quantity MDC's margins act on. Real images: "
            + (f"the first {real_images} of {real_name}." if real_name else "not computed."),
            [("diversity.png", "Intra-class diversity of teacher features")],
            table=(DIVERSITY_COLUMNS, div_rows, 3),
        )
    )
    return div_rows


def parse_markdown_table(text: str) -> tuple[tuple[tuple[str, str], ...], list[dict[str, Any]]] | None:
    """The first Markdown table of ``text`` as (columns, rows); None if it has none."""
    lines = text.splitlines()
    for i in range(len(lines) - 1):
        if lines[i].lstrip().startswith("|") and re.fullmatch(r"\s*\|[\s:|-]+\|\s*", lines[i + 1]):
            block = [lines[i]]
            for line in lines[i + 2 :]:
                if not line.lstrip().startswith("|"):
                    break
                block.append(line)
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in block]
            columns = tuple((f"c{k}", title) for k, title in enumerate(cells[0]))
            rows = [{f"c{k}": value for k, value in enumerate(row)} for row in cells[1:]]
            return columns, rows
    return None


def method_and_tables(runs: list[RunData]) -> tuple[list[dict[str, Any]], list[_Section]]:
    """Each run's method and protocol, and a section per benchmark table a run is a row of."""
    from pipeline.report.methods import RESULTS_DIR, comparison_tables, describe

    rows: list[dict[str, Any]] = []
    parts: list[str] = []
    tables: dict[str, tuple[Any, list[tuple[RunData, str]]]] = {}
    for run in runs:
        info = describe(run.cfg)
        memberships = comparison_tables(run.cfg)
        rows.append({"run": run.label, **info, "tables": [{"table": t.key, "row": label} for t, label in memberships]})
        parts.append(f"{run.label}: {info['name']}. {info['summary']}.")
        parts += info["protocol"]
        for table, label in memberships:
            tables.setdefault(table.key, (table, []))[1].append((run, label))
    sections = [_Section("Method and protocol", "\n\n".join(parts))]
    for table, members in tables.values():
        files = sorted(RESULTS_DIR.glob(f"{table.stem}-*.md")) if RESULTS_DIR.is_dir() else []
        lines = []
        for run, label in members:
            m = run.metrics or {}
            top1 = (
                f"final top-1 {m['quant_top1']:.2f}% on {m.get('test_images')} test images" if m else "no metrics yet"
            )
            lines.append(f"{run.label} is the row '{label}' of this table ({top1}).")
        parsed = None
        if files:
            text = files[0].read_text()
            parsed = parse_markdown_table(text)
            budget = next((line for line in text.splitlines() if "Budget" in line), "")
            lines.append(
                f"The committed table: benchmarks/results/{files[0].name} ({table.command}). {budget}".strip()
                + " Its numbers come from the benchmark's own runs at its budget; compare a run with them only at "
                "the same budget."
            )
            if len(files) > 1:
                lines.append("Other budgets: " + ", ".join(f"benchmarks/results/{f.name}" for f in files[1:]) + ".")
        else:
            lines.append(
                f"This table is not in this installation yet (benchmarks/results/{table.stem}-<budget>.md); "
                f"`{table.command}` builds it."
            )
        sections.append(
            _Section(
                f"Comparison: {table.title}",
                "\n\n".join(lines),
                table=(parsed[0], parsed[1], 2) if parsed else None,
            )
        )
    return rows, sections


def build_report(
    run: str,
    compare: list[str] | None = None,
    *,
    real_data: str | None = None,
    real_images: int = DEFAULT_REAL_IMAGES,
    tsne: bool = True,
    seed: int = 0,
) -> ReportResult:
    """Write the report of the run at ``run`` (path or URL) into ``<run>/report/``.

    ``compare`` runs appear next to it in every plot and table. Real test images (the first
    ``real_images`` of ``real_data`` or of the run's eval set; 0 disables them) give the
    reference for the feature statistics and projections.
    """
    t0 = time.perf_counter()
    urls = [run, *(compare or [])]
    runs = [load_run(url, label) for url, label in zip(urls, _unique_labels(urls), strict=True)]
    main = runs[0]
    for other in runs[1:]:
        if other.cfg.model != main.cfg.model:
            log.warning("%s uses another teacher than %s; its features are not comparable", other.url, main.url)

    pngs: dict[str, bytes] = {}
    sections: list[_Section] = []

    # (e) accuracy table first: the headline.
    acc_rows = [accuracy_row(r) for r in runs]
    sections.append(
        _Section(
            "Accuracy",
            "Top-1 on the real test set: full-precision teacher (FP), the quantized student after "
            "activation-range calibration on synthetic images (Calibrated/PTQ; for SQuant, its data-free "
            "rounding and BN-based ranges), and after quantization-aware distillation (Final; equal to the "
            "calibrated student when there is no distillation). Seconds are wall-clock per stage.",
            table=(ACCURACY_COLUMNS, acc_rows, 2),
        )
    )

    # (f) method, protocol and the comparison tables each run belongs to.
    method_rows, method_sections = method_and_tables(runs)
    sections += method_sections

    with_images = [r for r in runs if r.has_images]
    without = [r.label for r in runs if not r.has_images]
    no_images_note = f"\n\n{', '.join(without)}: no synthetic images (the method uses none)." if without else ""

    # (a) image grids.
    grid_figs = []
    for r in with_images:
        name = f"samples-{_slug(r.label)}.png"
        pngs[name] = plot_image_grid(r)
        grid_figs.append((name, f"{r.label}: synthetic images per class ({r.method})"))
    sections.append(
        _Section(
            "Synthetic images",
            "A row per class, de-normalized with the run's mean/std and clipped to [0, 1]." + no_images_note,
            grid_figs,
        )
    )

    # (b) curves.
    curve_figs = []
    gen = plot_generation_losses(with_images)
    if gen is not None:
        pngs["generation-losses.png"] = gen
        curve_figs.append(("generation-losses.png", "Generation loss terms per iteration (mean over shards)"))
    dist = plot_distillation(runs)
    if dist is not None:
        pngs["distillation.png"] = dist
        curve_figs.append(("distillation.png", "Distillation statistics per epoch (train_history.json)"))
    missing = [r.label for r in with_images if not r.loss_histories and r.cfg.generate.optimizes]
    note = (
        "Generation curves come from the loss history stored in each shard's metadata "
        "(every 10th iteration and the last; for a generator method, the generator's training); "
        "distillation curves from train_history.json."
    )
    if missing:
        note += f"\n\nNo generation loss history recorded for: {', '.join(missing)} (older shards)."
    sections.append(_Section("Training curves", note, curve_figs))

    # (c) + (d) features.
    div_rows: list[dict[str, Any]] = []
    if with_images:
        div_rows = _feature_sections(
            with_images, main, sections, pngs, real_data=real_data, real_images=real_images, tsne=tsne, seed=seed
        )

    title = f"IntraQ run report: {main.label}"
    meta = [
        f"Run: {main.url}",
        f"Model: {main.cfg.model.arch} ({main.cfg.model.weights}), {main.num_classes} classes",
        f"Compared with: {', '.join(r.url for r in runs[1:])}" if len(runs) > 1 else "No comparison runs",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
    ]
    target = Storage.from_url(main.url).child(REPORT_DIR)
    files = []
    for name, data in pngs.items():
        target.write_bytes_atomic(name, data)
        files.append(name)
    stats = {
        "accuracy": acc_rows,
        "methods": method_rows,
        "diversity": div_rows,
        "paper_diversity": PAPER_DIVERSITY,
        "figures": list(pngs),
    }
    target.write_json_atomic("report.json", stats)
    target.write_bytes_atomic("report.md", _render_markdown(title, meta, sections).encode("utf-8"))
    target.write_bytes_atomic("report.html", _render_html(title, meta, sections, pngs).encode("utf-8"))
    files += ["report.json", "report.md", "report.html"]
    log.info("report written to %s in %.1f s", target.url, time.perf_counter() - t0)
    return ReportResult(target.url, target.join("report.html"), files, stats)
