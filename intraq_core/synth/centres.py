"""Class centres of teacher features of finished synthetic images (targets of MDC)."""

from __future__ import annotations

import numpy as np
import torch


class ClassCentres:
    """Running per-class sums of features; the centre of a class is the plain mean.

    Sums are kept in float64 and updated in a caller-fixed order, so that the same images
    give bit-identical centres however the work was split across processes.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        self.num_classes = num_classes
        self.dim = dim
        self.sums = np.zeros((num_classes, dim), dtype=np.float64)
        self.counts = np.zeros(num_classes, dtype=np.int64)

    def update(self, features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        """Add features [N, D] of images with the given labels [N]."""
        f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else features
        y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
        f = np.asarray(f, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        if f.ndim != 2 or f.shape[1] != self.dim or f.shape[0] != y.shape[0]:
            raise ValueError(f"expected features [N, {self.dim}] and labels [N], got {f.shape} and {y.shape}")
        for c in np.unique(y):
            sel = y == c
            self.sums[c] += f[sel].sum(axis=0)
            self.counts[c] += int(sel.sum())

    def snapshot(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(centres [K, D] float32, has_centre [K] bool) as of now."""
        has = self.counts > 0
        centres = np.zeros_like(self.sums)
        centres[has] = self.sums[has] / self.counts[has, None]
        return (
            torch.from_numpy(centres.astype(np.float32)).to(device),
            torch.from_numpy(has).to(device),
        )

    def state(self) -> dict[str, np.ndarray]:
        """Plain arrays, for transport between processes (no pickle of objects needed)."""
        return {"sums": self.sums.copy(), "counts": self.counts.copy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> ClassCentres:
        sums = np.asarray(state["sums"], dtype=np.float64)
        out = cls(sums.shape[0], sums.shape[1])
        out.sums[:] = sums
        out.counts[:] = np.asarray(state["counts"], dtype=np.int64)
        return out
