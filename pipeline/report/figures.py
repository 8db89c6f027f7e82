"""The report's figures as PNG bytes (matplotlib, headless): image grids, loss curves, projections, diversity."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from pipeline.report.data import EMBED_MAX_POINTS, RunData, _class_names, _subsample, project

GRID_MAX_CLASSES = 10

__all__ = [
    "denormalize",
    "image_mosaic",
    "plot_distillation",
    "plot_diversity",
    "plot_embeddings",
    "plot_generation_losses",
    "plot_image_grid",
]


TERM_ORDER = ("bns_mean", "bns_var", "ce", "sil", "mdc_lower", "mdc_upper", "adi", "total")


DISTILL_TERMS = (
    ("loss", "distillation loss (total)"),
    ("kd", "KD term"),
    ("ce", "CE term"),
    ("agreement", "train-batch agreement with teacher"),
)


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
