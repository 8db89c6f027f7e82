"""BatchNorm input statistics of the teacher, read by forward pre-hooks: what the BN-statistics loss compares
with the running statistics.

:func:`channel_stats` is the per-channel (biased variance, mean) with a fused backward; :class:`BNStats` hooks
every BN layer and either collects those statistics per forward, or (micro-batches, see
:mod:`intraq_core.synth.engine`) accumulates channel sums over several forwards and then injects the whole
batch's gradient into each micro-batch's pass.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from intraq_core.models.introspect import bn_layers
from intraq_core.synth import losses

__all__ = ["BNStats", "channel_stats", "channel_sums"]


class _ChannelStats(torch.autograd.Function):
    """Per-channel (biased variance, mean) of a [M, C] matrix (or [G, M, C]: per group), with a fused backward.

    One pass for the forward (E[x], E[x²]) and one elementwise pass for the backward,
    2-4x faster on CPU than ``torch.var_mean`` over (N, H, W), whose reduction and backward
    dominate the cost of the BNS loss. E[x²] - E[x]² loses nothing measurable in float32 for
    BN inputs (|mean| is not orders of magnitude above the std); it is clamped at 0.
    """

    @staticmethod
    def forward(ctx, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        mean = x2.mean(-2)
        var = ((x2 * x2).mean(-2) - mean * mean).clamp_(min=0.0)
        ctx.save_for_backward(x2, mean)
        return var, mean

    @staticmethod
    def backward(ctx, grad_var: torch.Tensor, grad_mean: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x2, mean = ctx.saved_tensors
        m = x2.shape[-2]
        # (x - mean) * (2 g_var / m) + g_mean / m, in place in one output buffer: the same
        # float32 operations in the same order (bit-identical) without two batch-sized temporaries.
        out = x2 - mean.unsqueeze(-2)
        out.mul_((2.0 * grad_var / m).unsqueeze(-2))
        return out.add_((grad_mean / m).unsqueeze(-2))


def channel_stats(x: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(biased variance, mean) per channel (dim 1) over all other dims, differentiable.

    ``groups`` > 1: the batch (dim 0) is that many equal groups of consecutive images and the
    statistics are per group, ``[groups, C]`` each (packed groups, ``generate.groups_per_pass``).
    """
    channels = x.shape[1]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        flat = x.permute(0, 2, 3, 1)
        return _ChannelStats.apply(flat.reshape(-1, channels) if groups == 1 else flat.reshape(groups, -1, channels))
    if x.dim() == 2:
        return _ChannelStats.apply(x if groups == 1 else x.reshape(groups, -1, channels))
    if groups == 1:
        dims = [d for d in range(x.dim()) if d != 1]
        return torch.var_mean(x, dim=dims, unbiased=False)
    packed = x.reshape(groups, -1, *x.shape[1:])
    dims = [d for d in range(packed.dim()) if d not in (0, 2)]
    return torch.var_mean(packed, dim=dims, unbiased=False)


def channel_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel (sum x, sum x^2) over all dims but 1, in float64, and the count summed over."""
    channels = x.shape[1]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        flat = x.permute(0, 2, 3, 1).reshape(-1, channels)
        return flat.sum(0).double(), (flat * flat).sum(0).double(), flat.shape[0]
    dims = [d for d in range(x.dim()) if d != 1]
    return x.sum(dims).double(), (x * x).sum(dims).double(), x.numel() // channels


class _InjectBNGrad(torch.autograd.Function):
    """A zero scalar whose gradient at ``x`` is that of ``sum_c g1_c sum x_c + g2_c sum x_c^2``.

    Added to a micro-batch's loss, it gives every BN input the gradient of the whole batch's
    BN-statistics loss (``g1``, ``g2``: that loss's derivatives by the channel sums). Its value
    is never used (the loss value comes from the first pass), so the forward computes nothing.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        ctx.save_for_backward(x, g1.view(shape), g2.view(shape))
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        x, g1, g2 = ctx.saved_tensors
        return grad * (g1 + 2.0 * g2 * x), None, None


class BNStats:
    """Forward pre-hooks on every BN layer, reading its input.

    Modes: ``stats`` (default) appends the per-channel mean and biased variance of each call,
    differentiable (``[groups, C]`` when the pass packs ``groups`` > 1 batches); ``sums``
    accumulates per-layer channel sums over several forwards (the first micro-batch pass);
    ``inject`` adds each layer's :class:`_InjectBNGrad` term (the second pass).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for _, m in bn_layers(model)]
        self.means: list[torch.Tensor] = []
        self.vars: list[torch.Tensor] = []
        self.mode = "stats"
        self.groups = 1
        self._sums: list[tuple[torch.Tensor, torch.Tensor, int] | None] = []
        self._grads: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.injected: list[torch.Tensor] = []
        self._handles = [
            m.register_forward_pre_hook(functools.partial(self._hook, i)) for i, m in enumerate(self.layers)
        ]
        self.running_means = [m.running_mean for m in self.layers]
        self.running_vars = [m.running_var for m in self.layers]

    def _hook(self, index: int, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].float()
        if self.mode == "stats":
            var, mean = channel_stats(x, self.groups)
            self.means.append(mean)
            self.vars.append(var)
        elif self.mode == "sums":
            s1, s2, count = channel_sums(x.detach())
            acc = self._sums[index]
            self._sums[index] = (s1, s2, count) if acc is None else (acc[0] + s1, acc[1] + s2, acc[2] + count)
        elif self.mode == "inject":
            grads = self._grads[index] if index < len(self._grads) else None
            if grads is not None:
                self.injected.append(_InjectBNGrad.apply(x, *grads))

    def start_sums(self) -> None:
        """Accumulate channel sums of every BN input from now on (call :meth:`sums_loss` after)."""
        self.clear()
        self.mode = "sums"
        self._sums = [None] * len(self.layers)

    def sums_loss(self, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The BN-statistics loss of the accumulated sums, and its gradients for :meth:`start_inject`.

        Returns (mean part, variance part) as :func:`losses.bns_loss` gives them for the whole
        batch; keeps ``weight`` times their sum's derivatives by S1 and S2 of every layer.
        """
        called = [i for i, acc in enumerate(self._sums) if acc is not None]
        if not called:
            raise ValueError("no BN layer ran in the first micro-batch pass")
        s1 = [self._sums[i][0].detach().requires_grad_(True) for i in called]  # type: ignore[index]
        s2 = [self._sums[i][1].detach().requires_grad_(True) for i in called]  # type: ignore[index]
        with torch.enable_grad():
            means, variances = [], []
            for i, a, b in zip(called, s1, s2, strict=True):
                n = float(self._sums[i][2])  # type: ignore[index]
                mean = a / n
                raw = b / n - mean * mean
                # Clamped at 0 like channel_stats, whose backward ignores the clamp: so does this one.
                variances.append(raw + (raw.clamp(min=0.0) - raw).detach())
                means.append(mean)
            mean_part, var_part = losses.bns_loss(
                means,
                variances,
                [self.running_means[i] for i in called],
                [self.running_vars[i] for i in called],
            )
            g = torch.autograd.grad(weight * (mean_part + var_part), [*s1, *s2])
        self._grads = [None] * len(self.layers)
        for k, i in enumerate(called):
            self._grads[i] = (g[k].float(), g[len(called) + k].float())
        self._sums = []
        self.mode = "stats"
        return mean_part.detach(), var_part.detach()

    def start_inject(self) -> None:
        """Add the gradient terms kept by :meth:`sums_loss` to every forward from now on."""
        self.injected.clear()
        self.mode = "inject"

    def clear(self) -> None:
        """Forget the statistics and gradient terms of the forwards so far (the mode stays)."""
        self.means.clear()
        self.vars.clear()
        self.injected.clear()

    def stop(self) -> None:
        """Back to the ``stats`` mode; forget sums and gradient terms."""
        self.clear()
        self.mode = "stats"
        self._sums = []
        self._grads = []

    def remove(self) -> None:
        """Remove the hooks from the teacher's BN layers."""
        for h in self._handles:
            h.remove()
