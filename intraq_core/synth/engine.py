"""The synthesis engine: optimize one batch of pixels against the frozen teacher.

One call of :meth:`Synthesizer.synthesize` is one batch of the reference (Adam on the
pixels, plateau schedule, LOR on a coin flip per iteration, weighted BNS/CE/SIL/MDC/ADI
terms). Orchestration (label plans, shards, rounds of MDC centres) lives above it.

Engineering differences from the reference loop, none of which changes the method:
the teacher's weights do not require gradients (only pixel gradients are computed),
BN statistics are read in one pass with ``torch.var_mean``, LOR is batched, the batch can
be channels-last, and bf16 autocast (on GPUs and on CPUs with native bf16 dot products:
:func:`check_amp`) and ``torch.compile`` are available.

Micro-batches (``generate.micro_batch_size``) bound the memory of a large batch (256 images
of 224x224) without changing its loss. The BN-statistics loss couples all images of the batch
through the per-channel mean and variance of every BN input, so each Adam step takes two
passes over the micro-batches:

1. without gradients: per BN layer l the channel sums S1_l = sum x and S2_l = sum x^2 over the
   whole batch (N, H, W). The loss is then a function of these leaves (mu = S1/n,
   var = S2/n - mu^2, :func:`intraq_core.synth.losses.bns_loss` as in the one-pass path) and
   autograd gives g1_l = dL/dS1_l and g2_l = dL/dS2_l.
2. with gradients, per micro-batch: the surrogate sum_l <g1_l, sum_mb x_l> + <g2_l, sum_mb x_l^2>
   (whose gradient at each BN input is g1 + 2 g2 x = dL/dx of the whole-batch loss) plus the
   micro-batch's share of the per-image terms (CE and SIL as sums over the batch / n, MDC with
   the whole batch's denominator, which depends on the labels only).

The pixel gradients of the micro-batches are concatenated and Adam takes one step: the same
step as the one-pass path up to float32 reduction order. LOR draws its crops for the whole batch
once and each micro-batch takes its images' crops. ADI is refused with micro-batches: its
quantized student sets activation ranges from the whole batch, another coupling of images.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from intraq_core.config import SynthConfig
from intraq_core.errors import ModelError
from intraq_core.models.introspect import FeatureTap, bn_layers
from intraq_core.synth import losses
from intraq_core.synth.bn_stats import BNStats
from intraq_core.synth.lor import LorParams, apply_lor, sample_lor_params

ProgressFn = Callable[[int, int, dict[str, float]], None]

TERM_NAMES = ("bns_mean", "bns_var", "ce", "sil", "mdc_lower", "mdc_upper", "adi")


@dataclass
class SynthResult:
    """A finished batch: clean images (teacher's normalized space) and what was measured."""

    images: torch.Tensor  # [N, C, H, W] float32, CPU
    labels: torch.Tensor  # [N] int64
    seeds: torch.Tensor  # [N] int64, per-image seed of the initial noise
    features: torch.Tensor  # [N, D] float32 teacher features of the clean images (MDC feature)
    history: dict[str, list[float]] = field(default_factory=dict)  # per-iteration term values
    final: dict[str, float] = field(default_factory=dict)  # term values at the last iteration
    seconds: float = 0.0
    iterations: int = 0

    @property
    def image_iterations_per_s(self) -> float:
        if self.seconds <= 0:
            return 0.0
        return self.images.shape[0] * max(self.iterations, 1) / self.seconds


def check_teacher(teacher: nn.Module, cfg: SynthConfig) -> None:
    """ModelError (one line) when the synthesis method needs BN statistics the teacher lacks.

    The BN-statistics loss matches the batch statistics of every BatchNorm input to the layer's
    running statistics: without a BatchNorm layer there is nothing to match.
    """
    if cfg.weights()["bns"] > 0 and not bn_layers(teacher):
        raise ModelError(
            f"the teacher ({type(teacher).__name__}) has no BatchNorm layer, but generate.method={cfg.method} "
            "uses the BN-statistics loss, which needs the running statistics of BN layers; use a teacher with "
            "BatchNorm, or a method without that loss (generate.method=gaussian, or generate.bns_weight=0)"
        )


def check_compiler(cfg: SynthConfig, device: torch.device) -> None:
    """ValueError (one line) when ``generate.compile`` on a CPU finds no C++ compiler.

    Inductor builds its CPU kernels with the system's C++ compiler when the loop first runs:
    without one, the run would fail minutes later inside the compiler. Checked where the
    synthesizer is built (the actor's own machine for the Ray executor).
    """
    if not cfg.compile or device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: let torch.compile report it
        return
    try:
        get_cpp_compiler()
    except Exception as exc:
        raise ValueError(
            "generate.compile=true on a CPU needs a C++ compiler (torch.compile's Inductor builds its kernels "
            f"with it) and none was found ({type(exc).__name__}): install g++ or clang, or set CXX, or set "
            "generate.compile=false"
        ) from None


#: CPU feature flags of native bf16 dot products: x86 AVX512-BF16 and AMX, Arm BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``) from ``cpuinfo``; empty where unreadable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def check_amp(cfg: SynthConfig, device: torch.device, flags: frozenset[str] | None = None) -> None:
    """ValueError (one line) when ``generate.amp=bf16`` on a CPU without native bf16 dot products.

    Without them torch emulates bf16 through float32 conversions: on a 2-core AVX2 machine a
    ResNet-20 forward/backward at 32x32 took 8.5 s instead of 0.45-0.62 s (benchmarks/results/
    gen_speed.md), so the option would make the loop ~15x slower, not faster. ``flags``: the CPU's
    (default :func:`cpu_flags`, read where the synthesizer is built: the actor's own machine).
    """
    if cfg.amp != "bf16" or device.type != "cpu":
        return
    have = cpu_flags() if flags is None else flags
    if NATIVE_BF16_FLAGS & have:
        return
    raise ValueError(
        "generate.amp=bf16 on this CPU would make synthesis ~15x slower, not faster: it has no native bf16 dot "
        f"products (none of {', '.join(sorted(NATIVE_BF16_FLAGS))} among its flags); set generate.amp=off"
    )


def initial_noise(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """N(0, 1) images, each drawn from its own seed (independent of batching)."""
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    for k, s in enumerate(seeds.tolist()):
        gen = torch.Generator().manual_seed(int(s))
        out[k] = torch.randn(shape, generator=gen)
    return out


class Synthesizer:
    """Optimizes batches of synthetic images for a frozen teacher.

    The teacher is deep-copied, put in eval mode and frozen; hooks on its BN layers and on
    its MDC feature layer are attached once and reused for every batch.
    """

    def __init__(
        self,
        teacher: nn.Module,
        cfg: SynthConfig,
        *,
        image_shape: tuple[int, int, int],
        num_classes: int,
        device: str | torch.device = "cpu",
        normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.weights = cfg.weights()
        self.bounds: tuple[torch.Tensor, torch.Tensor] | None = None
        if cfg.clip_pixels:
            if normalization is None:
                raise ValueError("generate.clip_pixels needs the model's normalization (mean, std)")
            mean = torch.tensor(normalization[0], dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(normalization[1], dtype=torch.float32).view(1, -1, 1, 1)
            self.bounds = ((0.0 - mean) / std, (1.0 - mean) / std)
        self.lor = cfg.lor_enabled()
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False).to(self.device)
        self.teacher = self.teacher.to(memory_format=self.memory_format)
        check_teacher(self.teacher, cfg)
        self.bn = BNStats(self.teacher)
        layer = None if cfg.mdc_feature == "penultimate" else cfg.mdc_feature
        self.tap = FeatureTap(self.teacher, layer)
        self.student: nn.Module | None = None
        if self.weights["adi"] > 0:
            self.student = self._make_adi_student(teacher)
        self._forward = self.teacher
        check_compiler(cfg, self.device)
        check_amp(cfg, self.device)
        if cfg.compile:
            self._forward = torch.compile(self.teacher)

    def _make_adi_student(self, teacher: nn.Module) -> nn.Module:
        from intraq_core.config import QuantConfig
        from intraq_core.quant import quantize, set_act_mode

        student = quantize(teacher, QuantConfig(w_bits=self.cfg.adi_bits, a_bits=self.cfg.adi_bits))
        set_act_mode(student, "dynamic")
        return student.eval().requires_grad_(False).to(self.device).to(memory_format=self.memory_format)

    def active_terms(self) -> list[str]:
        """Names of the loss terms with a non-zero weight."""
        w = self.weights
        names = []
        if w["bns"] > 0:
            names += ["bns_mean", "bns_var"]
        if w["ce"] > 0:
            names.append("ce")
        if w["sil"] > 0:
            names.append("sil")
        if w["mdc"] > 0:
            names += ["mdc_lower", "mdc_upper"]
        if w["adi"] > 0:
            names.append("adi")
        return names

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Teacher MDC features [N, D] of clean images (no augmentation, no gradients)."""
        outs = []
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(self.device).contiguous(memory_format=self.memory_format)
            self.bn.clear()
            self.teacher(x)
            outs.append(self.tap.features.float().cpu())
        self.bn.clear()
        return torch.cat(outs)

    def synthesize(
        self,
        labels: torch.Tensor,
        seeds: torch.Tensor,
        batch_seed: int,
        centres: tuple[torch.Tensor, torch.Tensor] | None = None,
        progress: ProgressFn | None = None,
    ) -> SynthResult:
        """Synthesize one batch: images for ``labels``, initial noise from per-image ``seeds``.

        ``batch_seed`` drives LOR and SIL randomness; ``centres`` = (class centres [K, D],
        has_centre [K]) of earlier images, used by MDC (None: MDC inactive).
        """
        return self.synthesize_groups([(labels, seeds, batch_seed)], centres, progress)[0]

    def synthesize_groups(
        self,
        groups: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
        centres: tuple[torch.Tensor, torch.Tensor] | None = None,
        progress: ProgressFn | None = None,
    ) -> list[SynthResult]:
        """Synthesize several batches ``(labels, seeds, batch_seed)`` of one size in ONE forward/backward.

        Packed groups (``generate.groups_per_pass``): the groups' images go through the teacher as
        one batch, but every loss term is computed per group (BN statistics of the group's images
        alone, its own SIL targets, LOR coin and crops, MDC denominator) and the loss summed over
        groups, so each group's pixel gradient is the one its own batch would get. Each group keeps
        its own Adam and plateau schedule (the schedule follows the group's loss). Each result
        equals :meth:`synthesize` of that group alone up to float32 reduction order; ``progress``
        gets the mean of the groups' totals. Fills a GPU that one 32x32 batch leaves launch-bound.
        """
        cfg = self.cfg
        count = len(groups)
        if count == 0:
            return []
        n = int(groups[0][0].shape[0])
        if any(int(g[0].shape[0]) != n for g in groups):
            raise ValueError(f"packed groups need one size, got {[int(g[0].shape[0]) for g in groups]}")
        if count > 1 and (self.student is not None or (cfg.micro_batch_size is not None and cfg.micro_batch_size < n)):
            raise ValueError("packed groups cannot be combined with ADI or micro-batches")
        labels = [g[0].to(torch.int64) for g in groups]
        seeds = [g[1] for g in groups]
        start_time = time.perf_counter()
        x0s = [initial_noise(s, self.image_shape) for s in seeds]
        if self.bounds is not None:
            x0s = [torch.maximum(torch.minimum(x0, self.bounds[1]), self.bounds[0]) for x0 in x0s]
        feature_batch = min(512, cfg.micro_batch_size or 512)
        if not cfg.optimizes or cfg.iterations == 0:
            feats = [self.features(x0, batch_size=feature_batch) for x0 in x0s]
            seconds = (time.perf_counter() - start_time) / count
            return [
                SynthResult(x0, lab.cpu(), s.cpu(), f, {}, {}, seconds, 0)
                for x0, lab, s, f in zip(x0s, labels, seeds, feats, strict=True)
            ]

        gens = [torch.Generator().manual_seed(int(g[2])) for g in groups]
        sil_t = torch.cat([losses.sil_targets(n, cfg.sil_epsilon, cfg.sil_fraction, gen) for gen in gens])
        sil_t = sil_t.to(self.device)
        y = torch.cat(labels).to(self.device)
        if centres is not None:
            c_feats, c_mask = centres[0].to(self.device), centres[1].to(self.device)
        else:
            c_feats, c_mask = None, None

        xs = [x0.to(self.device).contiguous(memory_format=self.memory_format).requires_grad_(True) for x0 in x0s]
        del x0s  # copies when channels-last: one batch of pixels less held during the optimization
        bounds = None if self.bounds is None else (self.bounds[0].to(self.device), self.bounds[1].to(self.device))
        opts = [torch.optim.Adam([x], lr=cfg.lr) for x in xs]
        scheds = [
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
            )
            for opt in opts
        ]
        names = self.active_terms()
        w = self.weights
        record = torch.zeros(count, cfg.iterations, len(names) + 1, device=self.device)
        micro = cfg.micro_batch_size is not None and cfg.micro_batch_size < n
        mdc_denom = losses.mdc_denominator(y, c_mask) if micro and c_mask is not None else None
        _, height, width = self.image_shape
        for it in range(cfg.iterations):
            params: list[LorParams | None] = []
            for gen in gens:  # each group draws its coin and crops from its own generator, as alone
                p = None
                if self.lor and float(torch.rand(1, generator=gen)) < cfg.lor_prob:
                    p = sample_lor_params(
                        n,
                        height,
                        width,
                        min_area=cfg.lor_min_area,
                        generator=gen,
                        flip=cfg.lor_flip,
                        rotation=cfg.lor_rotation,
                    )
                params.append(p)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            if micro:
                terms = self._micro_batch_step(xs[0], params[0], y, sil_t, c_feats, c_mask, mdc_denom)
            else:
                terms = self._batch_step(xs, params, y, sil_t, c_feats, c_mask)
            total = sum(w[_weight_key(k)] * v for k, v in terms.items())
            totals = total.reshape(-1).tolist() if isinstance(total, torch.Tensor) else [float(total)] * count
            for g in range(count):
                opts[g].step()
                if bounds is not None:
                    with torch.no_grad():
                        xs[g].copy_(torch.maximum(torch.minimum(xs[g], bounds[1]), bounds[0]))
                scheds[g].step(totals[g])
            with torch.no_grad():
                if names:
                    record[:, it, :-1] = torch.stack([terms[k].detach().float() for k in names], dim=-1)
                for g in range(count):
                    record[g, it, -1] = totals[g]
            if progress is not None:
                progress(it + 1, cfg.iterations, {"total": sum(totals) / count})
        self.bn.clear()
        seconds = (time.perf_counter() - start_time) / count
        results = []
        for g in range(count):
            images = xs[g].detach().contiguous().float().cpu()
            feats = self.features(images, batch_size=feature_batch)
            rec = record[g].cpu()
            history = {k: rec[:, j].tolist() for j, k in enumerate([*names, "total"])}
            final = {k: v[-1] for k, v in history.items()}
            results.append(
                SynthResult(images, labels[g].cpu(), seeds[g].cpu(), feats, history, final, seconds, cfg.iterations)
            )
        return results

    def _input(self, x: torch.Tensor, params: LorParams | None, start: int = 0) -> torch.Tensor:
        """The teacher's input for images ``x`` (images ``start:`` of the batch): LOR'd when
        ``params`` (drawn for the whole batch) are given, in the synthesizer's memory format."""
        if params is not None:
            x = apply_lor(x, params.rows(start, start + x.shape[0]))
        return x.contiguous(memory_format=self.memory_format)

    def _packed_input(self, xs: Sequence[torch.Tensor], params: Sequence[LorParams | None]) -> torch.Tensor:
        """The teacher's input for packed groups: each group's images, LOR'd by its own ``params``
        (the LOR'd groups in one batched call), concatenated in group order."""
        if len(xs) == 1:
            return self._input(xs[0], params[0])
        lor = [g for g, p in enumerate(params) if p is not None]
        pieces = list(xs)
        if lor:
            both = apply_lor(torch.cat([xs[g] for g in lor]), LorParams.cat([params[g] for g in lor]))  # type: ignore[misc]
            for g, part in zip(lor, both.split(xs[0].shape[0]), strict=True):
                pieces[g] = part
        return torch.cat(pieces).contiguous(memory_format=self.memory_format)

    def _teacher_forward(self, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher logits (BN hooks fire) and, with ADI, the quantized student's logits."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp == "bf16"):
            logits = self._forward(inp)
            student_logits = self.student(inp) if self.student is not None else None
        return logits, student_logits

    def _image_terms(
        self,
        logits: torch.Tensor,
        student_logits: torch.Tensor | None,
        y: torch.Tensor,
        sil_t: torch.Tensor,
        c_feats: torch.Tensor | None,
        c_mask: torch.Tensor | None,
        *,
        share: float | None = None,
        mdc_denom: torch.Tensor | None = None,
        groups: int = 1,
    ) -> dict[str, torch.Tensor]:
        """CE, SIL, MDC (and ADI) of these images; with ``share`` = micro-batch size / batch size
        and ``mdc_denom`` (the batch's), the micro-batch's part of the whole batch's terms; with
        ``groups`` > 1, each of that many packed groups' own terms (``[groups]`` tensors)."""
        cfg, w = self.cfg, self.weights
        terms: dict[str, torch.Tensor] = {}
        if w["ce"] > 0:
            terms["ce"] = losses.ce_loss(logits, y, groups)
        if w["sil"] > 0:
            terms["sil"] = losses.sil_loss(logits, y, sil_t, groups)
        if share is not None:  # batch means = sums of micro-batch means weighted by their share
            terms = {k: v * share for k, v in terms.items()}
        if w["mdc"] > 0:
            if c_feats is None or c_mask is None:
                zero = losses.group_sum(logits.float(), groups) * 0.0
                terms["mdc_lower"], terms["mdc_upper"] = zero, zero
            else:
                terms["mdc_lower"], terms["mdc_upper"] = losses.mdc_loss(
                    self.tap.features,
                    y,
                    c_feats,
                    c_mask,
                    cfg.mdc_lower,
                    cfg.mdc_upper,
                    denominator=mdc_denom,
                    groups=groups,
                )
        if student_logits is not None:
            terms["adi"] = losses.adi_loss(logits, student_logits)
        return terms

    def _batch_step(
        self,
        xs: Sequence[torch.Tensor],
        params: Sequence[LorParams | None],
        y: torch.Tensor,
        sil_t: torch.Tensor,
        c_feats: torch.Tensor | None,
        c_mask: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Set each group's ``x.grad`` (``xs``: one leaf per packed group, usually one) to the gradient
        of its batch's loss, all in one pass; returns the term values (``[groups]`` with several)."""
        w = self.weights
        groups = len(xs)
        self.bn.clear()
        self.bn.groups = groups
        try:
            logits, student_logits = self._teacher_forward(self._packed_input(xs, params))
            terms: dict[str, torch.Tensor] = {}
            if w["bns"] > 0:
                terms["bns_mean"], terms["bns_var"] = losses.bns_loss(
                    self.bn.means, self.bn.vars, self.bn.running_means, self.bn.running_vars
                )
            terms.update(self._image_terms(logits, student_logits, y, sil_t, c_feats, c_mask, groups=groups))
        finally:
            self.bn.groups = 1
        total = sum(w[_weight_key(k)] * v for k, v in terms.items())
        assert isinstance(total, torch.Tensor)
        # Groups' losses are summed: each group's pixels get exactly the gradient of its own loss.
        (total if groups == 1 else total.sum()).backward()
        self.bn.clear()
        return {k: v.detach() for k, v in terms.items()}

    def _micro_batch_step(
        self,
        x: torch.Tensor,
        params: LorParams | None,
        y: torch.Tensor,
        sil_t: torch.Tensor,
        c_feats: torch.Tensor | None,
        c_mask: torch.Tensor | None,
        mdc_denom: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Set ``x.grad`` to the gradient of the whole batch's loss, one micro-batch at a time.

        Two passes (module docstring): BN channel sums of the batch without gradients, then
        per micro-batch the BN gradient terms plus the micro-batch's part of the per-image
        terms. Returns the batch's (detached) term values.
        """
        n, size, w = x.shape[0], int(self.cfg.micro_batch_size or x.shape[0]), self.weights
        spans = [(a, min(a + size, n)) for a in range(0, n, size)]
        terms: dict[str, torch.Tensor] = {}
        grad = torch.empty_like(x)
        try:
            if w["bns"] > 0:
                self.bn.start_sums()
                with torch.no_grad():
                    for a, b in spans:
                        self._teacher_forward(self._input(x[a:b], params, a))
                terms["bns_mean"], terms["bns_var"] = self.bn.sums_loss(w["bns"])
            self.bn.start_inject()
            for a, b in spans:
                xm = x.detach()[a:b].requires_grad_(True)
                self.bn.injected.clear()
                logits, _ = self._teacher_forward(self._input(xm, params, a))
                part = self._image_terms(
                    logits, None, y[a:b], sil_t[a:b], c_feats, c_mask, share=(b - a) / n, mdc_denom=mdc_denom
                )
                loss = sum((w[_weight_key(k)] * v for k, v in part.items()), start=sum(self.bn.injected))
                if isinstance(loss, torch.Tensor) and loss.requires_grad:
                    loss.backward()
                    grad[a:b] = xm.grad
                else:
                    grad[a:b] = 0.0
                for k, v in part.items():
                    terms[k] = terms[k] + v.detach() if k in terms else v.detach()
        finally:
            self.bn.stop()
        x.grad = grad
        return terms

    def close(self) -> None:
        """Remove the hooks from the (copied) teacher."""
        self.bn.remove()
        self.tap.remove()


def _weight_key(term: str) -> str:
    return term.split("_")[0]
