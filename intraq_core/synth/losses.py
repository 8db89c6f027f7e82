"""Loss terms of image synthesis: BNS, hard-label CE, SIL, MDC and DeepInversion's ADI.

Each function takes plain tensors and returns scalar tensors, so every term can be
tested against a hand-computed case and weighted independently by the engine.

``groups``: the batch is ``groups`` equal groups of consecutive images packed in one pass
(``generate.groups_per_pass``); each term is then a ``[groups]`` tensor, group g's value being the
term of its images alone, exactly as a separate batch of them would compute it. ``groups=1`` is
the plain batch (scalar terms, unchanged arithmetic).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def group_mean(values: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Mean of ``values`` (per image along dim 0): a scalar, or ``[groups]`` means of equal groups."""
    return values.mean() if groups == 1 else values.reshape(groups, -1).mean(1)


def group_sum(values: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Sum of ``values`` (per image along dim 0): a scalar, or ``[groups]`` sums of equal groups."""
    return values.sum() if groups == 1 else values.reshape(groups, -1).sum(1)


def bns_loss(
    means: Sequence[torch.Tensor],
    variances: Sequence[torch.Tensor],
    running_means: Sequence[torch.Tensor],
    running_vars: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-norm statistics loss, split into its mean and variance parts.

    For every BN layer l with batch statistics (mu_l, s2_l) of its *input* (per channel,
    biased variance) and running statistics (mu^_l, s2^_l):
    mean part = (1/L) sum_l mean_c (mu_l - mu^_l)^2, variance part likewise on s2
    (squared error on the variance, not the std, as in the reference).
    Statistics of packed groups (``[groups, C]`` each) give ``[groups]`` losses, one per group.
    """
    if not means:
        raise ValueError("bns_loss needs at least one BN layer")
    grouped = means[0].dim() == 2

    def err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sq = (a.float() - b.float()) ** 2
        return sq.mean(-1) if grouped else sq.mean()

    mean_terms = [err(m, rm) for m, rm in zip(means, running_means, strict=True)]
    var_terms = [err(v, rv) for v, rv in zip(variances, running_vars, strict=True)]
    if grouped:
        return torch.stack(mean_terms).mean(0), torch.stack(var_terms).mean(0)
    return torch.stack(mean_terms).mean(), torch.stack(var_terms).mean()


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Hard-label cross-entropy (the 'inception loss' of ZeroQ/GDFQ-style baselines)."""
    if groups == 1:
        return F.cross_entropy(logits.float(), labels)
    return group_mean(F.cross_entropy(logits.float(), labels, reduction="none"), groups)


def sil_targets(n: int, epsilon: float, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image target probabilities of the Soft Inception Loss.

    With probability ``fraction`` an image gets a soft target drawn from U(epsilon, 1),
    otherwise the hard target 1.0 (the reference draws these once per batch).
    """
    soft = torch.rand(n, generator=generator) < fraction
    values = epsilon + (1.0 - epsilon) * torch.rand(n, generator=generator)
    return torch.where(soft, values, torch.ones(n))


def sil_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Soft Inception Loss: mean_i (p_i[y_i] - t_i)^2 with p = softmax(logits).

    Only the target-class probability is penalized; the other classes are free, which
    lets images of one class differ in how confidently the teacher sees them.
    """
    probs = torch.softmax(logits.float(), dim=1)
    p_target = probs.gather(1, labels.view(-1, 1)).squeeze(1)
    return group_mean((p_target - targets.to(p_target.dtype)) ** 2, groups)


def cosine_distance_to_centres(features: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """d_i = 1 - cos(f_i, c_{y_i}), in [0, 2]."""
    return 1.0 - F.cosine_similarity(features.float(), centres[labels].float(), dim=1, eps=1e-8)


def mdc_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    centres: torch.Tensor,
    has_centre: torch.Tensor,
    lower: float,
    upper: float,
    denominator: torch.Tensor | float | None = None,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Marginal Distance Constraint, split into its lower and upper hinge.

    Images whose class has a centre (from earlier images) are pushed to a cosine distance
    d_i within [lower, upper] of it:
    lower part = sum_i m_i max(lower - d_i, 0) / (sum_i m_i + 1e-6), upper part likewise
    with max(d_i - upper, 0). Both are zero when no class has a centre yet.
    ``denominator`` replaces ``sum_i m_i + 1e-6`` (a micro-batch passes the whole batch's, so that
    the micro-batches' parts add up to the batch's loss; see :func:`mdc_denominator`).
    """
    mask = has_centre[labels].float()
    if not bool(has_centre.any()):
        zero = group_sum(features, groups) * 0.0
        return zero, zero
    dist = cosine_distance_to_centres(features, labels, centres)
    denom = mdc_denominator(labels, has_centre, groups) if denominator is None else denominator
    low = group_sum(mask * torch.clamp(lower - dist, min=0.0), groups) / denom
    up = group_sum(mask * torch.clamp(dist - upper, min=0.0), groups) / denom
    return low, up


def mdc_denominator(labels: torch.Tensor, has_centre: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``sum_i m_i + 1e-6`` of :func:`mdc_loss` for a batch (per group): it depends on the labels only."""
    return group_sum(has_centre[labels].float(), groups) + 1e-6


def adi_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """DeepInversion's Adaptive DeepInversion (competition) term.

    1 - clamp(JS, 0, 1) where JS is the Jensen-Shannon-style divergence of the
    temperature-softened teacher and student distributions, computed as in DeepInversion's
    implementation (probabilities clamped to [0.01, 0.99], batch-mean KL of each against
    the mixture). Minimizing it drives images to where the student disagrees.
    """
    p = torch.softmax(student_logits.float() / temperature, dim=1)
    q = torch.softmax(teacher_logits.float() / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p = p.clamp(0.01, 0.99)
    q = q.clamp(0.01, 0.99)
    kl_m_p = F.kl_div(torch.log(p), m, reduction="batchmean")
    kl_m_q = F.kl_div(torch.log(q), m, reduction="batchmean")
    js = 0.5 * kl_m_p + 0.5 * kl_m_q
    return 1.0 - js.clamp(0.0, 1.0)


def mean_intra_class_cosine_distance(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cosine distance between pairs of features of the same class (diversity statistic).

    Averaged over classes of the per-class mean over distinct pairs; classes with fewer
    than two samples are skipped. This is the statistic the paper reports (real 0.44).
    """
    feats = F.normalize(features.float(), dim=1)
    per_class = []
    for c in torch.unique(labels):
        f = feats[labels == c]
        n = f.shape[0]
        if n < 2:
            continue
        sim = f @ f.T
        total = sim.sum() - sim.diagonal().sum()
        per_class.append(1.0 - total / (n * (n - 1)))
    if not per_class:
        raise ValueError("need at least two samples of one class")
    return float(torch.stack(per_class).mean())


def mean_distance_to_class_centre(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cosine distance of features to their own class mean (what MDC's hinge sees).

    Classes with fewer than two samples are skipped (an image is its own centre).
    """
    feats = features.float()
    dists = []
    for c in torch.unique(labels):
        f = feats[labels == c]
        if f.shape[0] < 2:
            continue
        centre = f.mean(0, keepdim=True)
        dists.append(1.0 - F.cosine_similarity(f, centre.expand_as(f), dim=1))
    if not dists:
        raise ValueError("need at least two samples of one class")
    return float(torch.cat(dists).mean())
