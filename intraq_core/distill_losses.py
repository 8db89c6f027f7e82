"""The terms of the distillation loss and the augmentation of a training batch.

Knowledge distillation (:func:`kd_loss`, Hinton's T²-scaled KL), SynQ's difficulty-gated cross-entropy
(:func:`gated_cross_entropy`) and low-pass filter (:func:`lowpass_filter`), the Grad-CAM maps of the
attention alignment (:class:`LastFeatureMap`, :func:`grad_cam`), and the random resized crop + flip of
stored images (:func:`augment_batch`). :class:`intraq_core.distill.Distiller` combines them in one step.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from intraq_core.config import DistillConfig
from intraq_core.synth.lor import apply_lor, sample_lor_params

__all__ = ["LastFeatureMap", "augment_batch", "gated_cross_entropy", "grad_cam", "kd_loss", "lowpass_filter"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), batch mean (Hinton's scaling)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def augment_batch(x: torch.Tensor, cfg: DistillConfig, generator: torch.Generator) -> torch.Tensor:
    """On-the-fly RandomResizedCrop(scale = crop_scale) + horizontal flip of stored images."""
    lo, hi = cfg.crop_scale
    if lo >= 1.0 and not cfg.flip:
        return x
    _, _, height, width = x.shape
    params = sample_lor_params(x.shape[0], height, width, min_area=lo, max_area=hi, generator=generator, flip=cfg.flip)
    return apply_lor(x, params)


def gated_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, difficulty_below: float | None
) -> torch.Tensor:
    """Hard-label CE, averaged over the batch; with ``difficulty_below`` = τ only images whose
    difficulty ``1 - p_teacher(label)`` is below τ contribute (SynQ's gate)."""
    ce = F.cross_entropy(student_logits.float(), labels, reduction="none")
    if difficulty_below is not None:
        p_label = F.softmax(teacher_logits.float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
        ce = ce * ((1.0 - p_label) < difficulty_below).float()
    return ce.mean()


def lowpass_filter(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Gaussian low-pass filter in the frequency domain (SynQ): ``H = exp(-D² / (2·cutoff²))``,
    D the distance to the centre of the shifted spectrum, per image and channel."""
    _, _, height, width = x.shape
    ys = torch.arange(height, device=x.device, dtype=torch.float32) - height // 2
    xs = torch.arange(width, device=x.device, dtype=torch.float32) - width // 2
    d2 = ys.view(-1, 1) ** 2 + xs.view(1, -1) ** 2
    h = torch.exp(-d2 / (2.0 * cutoff**2))
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float(), dim=(-2, -1)), dim=(-2, -1)) * h
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)), dim=(-2, -1)).real.to(x.dtype)


class LastFeatureMap:
    """Captures the last spatial (4-D, more than 1×1) module output of each forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        leaves = [m for m in model.modules() if not list(m.children())]
        self._handles = [m.register_forward_hook(self._hook) for m in leaves]
        self._handles.append(model.register_forward_pre_hook(self._reset))

    def _reset(self, *_: object) -> None:
        self.value = None

    def _hook(self, _m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
            self.value = out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def grad_cam(feature: torch.Tensor, logits: torch.Tensor, classes: torch.Tensor, *, keep_graph: bool) -> torch.Tensor:
    """Grad-CAM maps [N, H, W] of ``classes``, min-max normalized per image.

    Channel weights are the spatial means of ``∂score/∂feature`` (detached); the map stays
    differentiable in ``feature`` when ``keep_graph`` (the student's side of the alignment).
    """
    score = logits.gather(1, classes.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(score, feature, retain_graph=keep_graph, create_graph=False)
    weights = grad.detach().mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * feature).sum(1))
    flat = cam.flatten(1)
    lo, hi = flat.min(1, keepdim=True)[0], flat.max(1, keepdim=True)[0]
    return ((flat - lo) / (hi - lo).clamp(min=1e-8)).view_as(cam)
