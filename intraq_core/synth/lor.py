"""Local Object Reinforcement (LOR): random resized crops of the images being optimized.

The reference applies torchvision's ``RandomResizedCrop`` (area U(eta, 1), aspect
3/4..4/3, bilinear, output = input size) then ``RandomHorizontalFlip`` to each image in a
Python loop. Here the per-image crop parameters are sampled with the same distribution
into tensors and applied to the whole batch as two batched matrix products whose
per-image interpolation matrices reproduce ``F.interpolate(crop, size, mode="bilinear",
align_corners=False)`` of each crop exactly (source coordinates clamped to the crop, as
interpolate clamps them), so the result equals the per-image loop (:func:`reference_lor`)
for the same parameters.
Optional rotation (supplementary Table 1, "L+R") is a second, batched affine resampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_ATTEMPTS = 10


@dataclass
class LorParams:
    """Per-image crop (pixels), flip and rotation parameters for a batch."""

    top: torch.Tensor  # [N] int64
    left: torch.Tensor  # [N] int64
    height: torch.Tensor  # [N] int64
    width: torch.Tensor  # [N] int64
    flip: torch.Tensor  # [N] bool
    angle: torch.Tensor  # [N] float32, degrees

    def __len__(self) -> int:
        return int(self.top.shape[0])

    def rows(self, start: int, stop: int) -> LorParams:
        """The parameters of images ``start:stop`` (a micro-batch gets the same crops as its images)."""
        fields = (self.top, self.left, self.height, self.width, self.flip, self.angle)
        return LorParams(*(t[start:stop] for t in fields))

    @staticmethod
    def cat(parts: list[LorParams]) -> LorParams:
        """The parameters of several batches one after the other (packed groups, each its own crops)."""
        names = ("top", "left", "height", "width", "flip", "angle")
        return LorParams(*(torch.cat([getattr(p, f) for p in parts]) for f in names))


def sample_lor_params(
    n: int,
    height: int,
    width: int,
    *,
    min_area: float,
    generator: torch.Generator,
    max_area: float = 1.0,
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    flip: bool = True,
    rotation: float = 0.0,
) -> LorParams:
    """Sample crop parameters for ``n`` images with torchvision's RandomResizedCrop law.

    Ten attempts per image (area U(min_area, max_area) of the image, log-uniform aspect ratio);
    the first attempt that fits is used, otherwise the centre-crop fallback of torchvision.
    ``flip`` draws a horizontal flip with probability 0.5, ``rotation`` an angle U(-r, r).
    """
    area = float(height * width)
    target = area * (min_area + (max_area - min_area) * torch.rand(n, _ATTEMPTS, generator=generator))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, _ATTEMPTS, generator=generator))
    w = torch.round(torch.sqrt(target * aspect)).to(torch.int64)
    h = torch.round(torch.sqrt(target / aspect)).to(torch.int64)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(ok.to(torch.int8), dim=1)
    any_ok = ok.any(dim=1)
    w_sel = w.gather(1, first[:, None]).squeeze(1)
    h_sel = h.gather(1, first[:, None]).squeeze(1)
    # torchvision's fallback: a centre crop of the whole image clamped to the ratio range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fb_h, fb_w = height, round(height * max(ratio))
    else:
        fb_w, fb_h = width, height
    w_sel = torch.where(any_ok, w_sel, torch.full_like(w_sel, fb_w))
    h_sel = torch.where(any_ok, h_sel, torch.full_like(h_sel, fb_h))
    u_top = torch.rand(n, generator=generator)
    u_left = torch.rand(n, generator=generator)
    top = torch.floor(u_top * (height - h_sel + 1).double()).to(torch.int64)
    left = torch.floor(u_left * (width - w_sel + 1).double()).to(torch.int64)
    top = torch.where(any_ok, top, (height - h_sel) // 2)
    left = torch.where(any_ok, left, (width - w_sel) // 2)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    angle = (torch.rand(n, generator=generator) * 2.0 - 1.0) * rotation
    return LorParams(top, left, h_sel, w_sel, flips, angle.float())


def interpolation_matrices(
    start: torch.Tensor, size: torch.Tensor, out: int, full: int, *, device, dtype
) -> torch.Tensor:
    """Per-image bilinear resampling matrices [N, out, full] along one axis.

    Row u holds the weights ``F.interpolate(..., mode="bilinear", align_corners=False)``
    gives to the input pixels when resizing the window [start, start+size) to ``out``
    pixels: source coordinate (u + 0.5) * size / out - 0.5, clamped to the window.
    """
    n = start.shape[0]
    start_f = start.to(device=device, dtype=torch.float64)[:, None]
    size_f = size.to(device=device, dtype=torch.float64)[:, None]
    dst = torch.arange(out, device=device, dtype=torch.float64)[None, :]
    src = start_f + (dst + 0.5) * size_f / out - 0.5
    src = torch.minimum(torch.maximum(src, start_f), start_f + size_f - 1.0)
    i0 = torch.floor(src)
    lam = src - i0
    i0 = i0.to(torch.int64)
    i1 = torch.minimum(i0 + 1, (start + size - 1).to(device)[:, None])
    mat = torch.zeros(n, out, full, device=device, dtype=torch.float64)
    mat.scatter_add_(2, i0[:, :, None], (1.0 - lam)[:, :, None])
    mat.scatter_add_(2, i1[:, :, None], lam[:, :, None])
    return mat.to(dtype)


def apply_lor(x: torch.Tensor, params: LorParams) -> torch.Tensor:
    """Crop-resize (and flip/rotate) every image of ``x`` [N,C,H,W] by its own parameters.

    Implemented as two batched matrix products with per-image interpolation matrices
    (rows reversed for flipped images): exact, differentiable with respect to ``x``
    (gradients reach only the pixels each crop used) and deterministic on every device,
    unlike ``grid_sample``'s atomic-add backward on GPUs.
    """
    n, _, height, width = x.shape
    if len(params) != n:
        raise ValueError(f"LOR parameters are for {len(params)} images, batch has {n}")
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    ay = interpolation_matrices(params.top, params.height, height, height, device=x.device, dtype=dtype)
    ax = interpolation_matrices(params.left, params.width, width, width, device=x.device, dtype=dtype)
    flip = params.flip.to(x.device)[:, None, None]
    ax = torch.where(flip, ax.flip(1), ax)
    out = torch.matmul(torch.matmul(ay[:, None].to(x.dtype), x), ax.transpose(1, 2)[:, None].to(x.dtype))
    if bool((params.angle != 0).any()):
        out = rotate_batch(out, params.angle)
    return out


def rotate_batch(x: torch.Tensor, angle_deg: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by its own angle (bilinear, zero fill)."""
    n, _, height, width = x.shape
    theta_rad = angle_deg.to(device=x.device, dtype=torch.float32) * (math.pi / 180.0)
    cos, sin = torch.cos(theta_rad), torch.sin(theta_rad)
    aspect = height / width
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * aspect
    theta[:, 1, 0] = sin / aspect
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta, [n, x.shape[1], height, width], align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def reference_lor(x: torch.Tensor, params: LorParams) -> torch.Tensor:
    """The reference's per-image loop (crop, bilinear resize, flip), for tests and benchmarks."""
    _, _, height, width = x.shape
    outs = []
    for k in range(x.shape[0]):
        t, left = int(params.top[k]), int(params.left[k])
        h, w = int(params.height[k]), int(params.width[k])
        crop = x[k : k + 1, :, t : t + h, left : left + w]
        img = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
        if bool(params.flip[k]):
            img = img.flip(3)
        outs.append(img)
    return torch.cat(outs, dim=0)
