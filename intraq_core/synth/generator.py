"""Generator-based synthesis: GDFQ's conditional generator and Qimera's boundary-supporting samples.

**GDFQ** (Xu et al., ECCV 2020): a conditional generator ``G(z, y)`` is trained against the frozen
teacher so that the teacher classifies its images as ``y`` (cross-entropy) and the statistics of
every BN layer's input match the layer's running statistics (BNS, weighted 0.1). Architecture (for
an ``H×W`` input): the class embedding times the latent ``z`` → Linear → ``128 × H/4 × W/4`` → BN
→ ×2 upsampling → conv 3×3 128→128, BN, LeakyReLU(0.2) → ×2 upsampling → conv 3×3 128→64, BN,
LeakyReLU(0.2) → conv 3×3 64→C → tanh → BN without affine parameters. The last BN standardizes
every channel, so the images live in the teacher's normalized input space (zero mean, unit
variance per channel, the range a standardized input has). (The reference's ``BatchNorm2d(c,
0.8)`` sets ε = 0.8; kept.)

**Qimera** (Choi et al., NeurIPS 2021) adds *boundary-supporting samples*: with probability
``qimera_mix_prob`` a training batch is made of superposed classes, each image mixing the
embeddings of ``qimera_mix_classes`` random classes with coefficients ``λ = softmax(N(0, I))``,
and its cross-entropy target is the soft label ``Σ λ_k·onehot(y_k)``. Its generator input is the
per-sample standardized ``embedding(y) + z`` (the reference's affine-free batch norm over the
embedding dimension), followed by the *disentanglement mapping* layer (a learned Linear) and, for
superposed samples, the ``λ``-weighted sum of the mapped embeddings: the superposition happens in
the mapped space, which the generator learns to make meaningful. ``qimera_mapping: false`` drops
the mapping (the reference's ``--no_DM`` switch; its CIFAR-10 script runs without it, its paper
with it).

How this differs from the papers, on purpose: GDFQ and Qimera train the generator *jointly* with
the quantized student for 400 epochs, the student seeing fresh samples every step (and, in Qimera,
boundary batches with soft targets). Here the generator is trained first, against the teacher
only (the same generator losses), then frozen; it samples the class-conditioned shards of the
plan, and the rest of the pipeline (Parquet shards, calibration, distillation from the teacher)
is unchanged. A Qimera shard contains boundary-supporting images in the same proportion as its
training batches: such an image mixes its plan label (the largest coefficient) with
``qimera_mix_classes - 1`` random classes; the shard stores the plan label (hard), and
distillation matches the teacher's soft output on it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from intraq_core.config import SynthConfig
from intraq_core.models.introspect import FeatureTap
from intraq_core.synth import losses
from intraq_core.synth.bn_stats import BNStats
from intraq_core.synth.engine import SynthResult

__all__ = [
    "GENERATOR_FORMAT",
    "ConditionalGenerator",
    "GeneratorSampler",
    "GeneratorTrainer",
    "build_generator",
]

GENERATOR_FORMAT = "intraq-generator/1"
TERMS = ("bns_mean", "bns_var", "ce", "total")
ProgressFn = Callable[[int, int, dict[str, float]], None]


class ConditionalGenerator(nn.Module):
    """GDFQ's conditional generator, with Qimera's embedding normalization and mapping layer.

    ``style="gdfq"``: input = embedding(y) ⊙ z. ``style="qimera"``: input = mapping(standardize(
    embedding(y) + z)) (``mapping`` optional), and ``forward`` accepts superposed classes.
    """

    def __init__(
        self,
        num_classes: int,
        latent_dim: int,
        image_shape: Sequence[int],
        *,
        style: str = "gdfq",
        mapping: bool = False,
    ) -> None:
        super().__init__()
        channels, height, width = (int(v) for v in image_shape)
        if height % 4 or width % 4:
            raise ValueError(f"the generator needs an image size divisible by 4, got {height}x{width}")
        if style not in ("gdfq", "qimera"):
            raise ValueError(f"unknown generator style {style!r}")
        self.style = style
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.init_size = (height // 4, width // 4)
        self.label_emb = nn.Embedding(num_classes, latent_dim)
        self.mapping = nn.Linear(latent_dim, latent_dim) if (style == "qimera" and mapping) else None
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size[0] * self.init_size[1])
        self.bn0 = nn.BatchNorm2d(128)
        self.conv1 = nn.Conv2d(128, 128, 3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(128, eps=0.8)
        self.conv2 = nn.Conv2d(128, 64, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(64, eps=0.8)
        self.conv3 = nn.Conv2d(64, channels, 3, stride=1, padding=1)
        self.bn_out = nn.BatchNorm2d(channels, affine=False)

    def _embed(self, z: Tensor, labels: Tensor) -> Tensor:
        if self.style == "gdfq":
            return self.label_emb(labels) * z
        e = self.label_emb(labels) + z
        e = F.layer_norm(e, (e.shape[-1],))  # per-sample standardization over the embedding
        return self.mapping(e) if self.mapping is not None else e

    def forward(self, z: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
        """Images for ``labels`` [B] with latents ``z`` [B, D]; or superposed classes: ``labels``
        [B, K], ``z`` [B, K, D] and mixing ``weights`` [B, K] (Qimera style only)."""
        if weights is None:
            x = self._embed(z, labels)
        else:
            if self.style != "qimera":
                raise ValueError("superposed classes need the qimera generator style")
            x = (self._embed(z, labels) * weights.unsqueeze(-1)).sum(dim=1)
        out = self.l1(x).view(x.shape[0], 128, *self.init_size)
        out = F.interpolate(self.bn0(out), scale_factor=2)
        out = F.leaky_relu(self.bn1(self.conv1(out)), 0.2)
        out = F.interpolate(out, scale_factor=2)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.2)
        return self.bn_out(torch.tanh(self.conv3(out)))


def build_generator(cfg: SynthConfig, num_classes: int, image_shape: Sequence[int], seed: int) -> ConditionalGenerator:
    """The run's generator, initialized from ``seed`` (without touching the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return ConditionalGenerator(
            num_classes,
            cfg.generator_latent_dim,
            image_shape,
            style="qimera" if cfg.method == "qimera" else "gdfq",
            mapping=cfg.qimera_mapping,
        )


class GeneratorTrainer:
    """Trains a :class:`ConditionalGenerator` against a frozen teacher (CE + BNS; Qimera's mixing).

    Deterministic per seed: initialization, latents, labels and mixing come from seeded RNGs whose
    state is part of :meth:`state_dict`, so a run resumed from a checkpoint continues exactly.
    """

    def __init__(
        self,
        teacher: nn.Module,
        cfg: SynthConfig,
        *,
        num_classes: int,
        image_shape: Sequence[int],
        seed: int,
        device: str | torch.device = "cpu",
    ) -> None:
        if not cfg.uses_generator:
            raise ValueError(f"generate.method={cfg.method!r} does not train a generator")
        self.cfg = cfg
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.image_shape = tuple(int(v) for v in image_shape)
        self.weights = cfg.weights()
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False).to(self.device)
        self.bn = BNStats(self.teacher)
        self.generator = build_generator(cfg, num_classes, image_shape, seed).to(self.device).train()
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=cfg.generator_lr, betas=(0.5, 0.999))
        self.rng = torch.Generator().manual_seed(int(seed) ^ 0x5EED)
        self.iteration = 0
        self.history: dict[str, list[float]] = {k: [] for k in TERMS}

    def _batch(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Latents, labels, mixing weights (None: one class per image) and soft targets."""
        cfg, gen, n = self.cfg, self.rng, self.cfg.generator_batch_size
        d, c = cfg.generator_latent_dim, self.num_classes
        if cfg.method == "qimera" and float(torch.rand(1, generator=gen)) < cfg.qimera_mix_prob:
            k = cfg.qimera_mix_classes
            z = torch.randn(n, k, d, generator=gen)
            labels = torch.randint(0, c, (n, k), generator=gen)
            weights = torch.softmax(torch.randn(n, k, generator=gen), dim=1)
            target = torch.zeros(n, c).scatter_add_(1, labels, weights)
            return z, labels, weights, target
        z = torch.randn(n, d, generator=gen)
        labels = torch.randint(0, c, (n,), generator=gen)
        return z, labels, None, F.one_hot(labels, c).float()

    def step(self) -> dict[str, float]:
        """One Adam step of the generator; returns the loss terms."""
        z, labels, weights, target = self._batch()
        dev = self.device
        images = self.generator(z.to(dev), labels.to(dev), None if weights is None else weights.to(dev))
        self.bn.clear()
        logits = self.teacher(images)
        ce = -(target.to(dev) * torch.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
        bns_mean, bns_var = losses.bns_loss(self.bn.means, self.bn.vars, self.bn.running_means, self.bn.running_vars)
        total = self.weights["ce"] * ce + self.weights["bns"] * (bns_mean + bns_var)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.bn.clear()
        self.iteration += 1
        values = {"bns_mean": bns_mean, "bns_var": bns_var, "ce": ce, "total": total}
        out = {k: float(v.detach()) for k, v in values.items()}
        for k, v in out.items():
            self.history[k].append(v)
        return out

    def train(
        self,
        *,
        checkpoint_every: int | None = None,
        on_checkpoint: Callable[[GeneratorTrainer], None] | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        """Run the remaining iterations up to ``generate.generator_iterations``.

        ``on_checkpoint(self)`` is called every ``checkpoint_every`` iterations and at the end.
        """
        total = self.cfg.generator_iterations
        while self.iteration < total:
            losses_now = self.step()
            if progress is not None:
                progress(self.iteration, total, losses_now)
            last = self.iteration == total
            if on_checkpoint is not None and (last or (checkpoint_every and self.iteration % checkpoint_every == 0)):
                on_checkpoint(self)

    @property
    def done(self) -> bool:
        return self.iteration >= self.cfg.generator_iterations

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (tensors and plain types: weights-only loadable)."""
        return {
            "format": GENERATOR_FORMAT,
            "iteration": self.iteration,
            "done": self.done,
            "generator": {k: v.detach().cpu().clone() for k, v in self.generator.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),  # a snapshot, not the live moments
            "rng": self.rng.get_state(),
            "history": {k: list(v) for k, v in self.history.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != GENERATOR_FORMAT:
            raise ValueError("not a generator checkpoint (missing format 'intraq-generator/1')")
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.set_state(state["rng"])
        self.iteration = int(state["iteration"])
        self.history = {k: [float(v) for v in state["history"].get(k, [])] for k in TERMS}

    def close(self) -> None:
        self.bn.remove()


class GeneratorSampler:
    """Samples shard images from a trained generator (same interface as the pixel Synthesizer).

    :meth:`synthesize` draws every image's inputs from its own seed (latents, and for Qimera whether
    it is a boundary-supporting sample, its other classes and its mixing coefficients, the largest
    one on the plan label) and runs the generator on the shard as one batch with batch-statistics
    BatchNorm, as GDFQ and Qimera always run their generator (it is never used in eval mode there,
    and its running statistics lag far behind a short training); so a shard is a deterministic
    function of its labels and seeds. It returns the teacher's MDC-layer features with the images.
    """

    def __init__(
        self,
        teacher: nn.Module,
        cfg: SynthConfig,
        generator_state: dict[str, Any],
        *,
        image_shape: Sequence[int],
        num_classes: int,
        device: str | torch.device = "cpu",
    ) -> None:
        if not generator_state.get("done"):
            raise ValueError("the generator checkpoint is not finished training")
        self.cfg = cfg
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.generator = build_generator(cfg, num_classes, image_shape, 0)
        self.generator.load_state_dict(generator_state["generator"])
        # Train mode = batch statistics; the running statistics this updates are never read.
        self.generator = self.generator.to(self.device).train().requires_grad_(False)
        history = generator_state.get("history") or {}
        self.history = {k: [float(v) for v in history.get(k, [])] for k in TERMS if history.get(k)}
        self.final = {k: v[-1] for k, v in self.history.items()}
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False).to(self.device)
        layer = None if cfg.mdc_feature == "penultimate" else cfg.mdc_feature
        self.tap = FeatureTap(self.teacher, layer)

    def draw(self, labels: Tensor, seeds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-image latents ``[N, K, D]``, classes ``[N, K]`` and weights ``[N, K]`` (K = 1 for GDFQ)."""
        cfg = self.cfg
        k = cfg.qimera_mix_classes if cfg.method == "qimera" else 1
        d = cfg.generator_latent_dim
        zs, classes, weights = [], [], []
        for label, seed in zip(labels.tolist(), seeds.tolist(), strict=True):
            gen = torch.Generator().manual_seed(int(seed))
            zs.append(torch.randn(k, d, generator=gen))
            cls = torch.full((k,), int(label), dtype=torch.int64)
            w = torch.zeros(k)
            w[0] = 1.0
            if k > 1 and float(torch.rand(1, generator=gen)) < cfg.qimera_mix_prob:
                cls[1:] = torch.randint(0, self.num_classes, (k - 1,), generator=gen)
                w = torch.sort(torch.softmax(torch.randn(k, generator=gen), dim=0), descending=True).values
            classes.append(cls)
            weights.append(w)
        return torch.stack(zs), torch.stack(classes), torch.stack(weights)

    @torch.no_grad()
    def synthesize(
        self,
        labels: Tensor,
        seeds: Tensor,
        batch_seed: int,
        centres: Any = None,
        progress: ProgressFn | None = None,
    ) -> SynthResult:
        """Images for ``labels`` from per-image ``seeds`` (``batch_seed`` and ``centres`` unused)."""
        del batch_seed, centres
        t0 = time.perf_counter()
        z, classes, weights = self.draw(labels, seeds)
        dev = self.device
        if self.cfg.method == "qimera":
            images = self.generator(z.to(dev), classes.to(dev), weights.to(dev))
        else:
            images = self.generator(z[:, 0].to(dev), classes[:, 0].to(dev))
        self.teacher(images)
        assert self.tap.features is not None
        features = self.tap.features.float().cpu()
        final = dict(self.final)
        final["boundary_fraction"] = float((weights[:, 0] < 1.0).float().mean())
        if progress is not None:
            progress(1, 1, {"total": final.get("total", float("nan"))})
        return SynthResult(
            images.float().cpu().contiguous(),
            labels.to(torch.int64).cpu(),
            seeds.cpu(),
            features,
            {k: list(v) for k, v in self.history.items()},
            final,
            time.perf_counter() - t0,
            0,
        )

    def close(self) -> None:
        self.tap.remove()
