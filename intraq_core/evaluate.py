"""Accuracy on a real test set and data-free teacher–student agreement."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def top1(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
    total: int | None = None,
) -> dict[str, float]:
    """Top-1 accuracy (in %) and sample count over labelled batches, model in eval mode.

    Each batch's labels must be 1-D, one per prediction (ValueError otherwise).
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    correct = 0
    n = 0
    bar = tqdm(total=total, desc="evaluate", unit="img", disable=not progress, leave=False)
    try:
        for x, y in batches:
            pred = model(x.to(device)).argmax(1).cpu()
            if y.shape != pred.shape:
                # (N, 1) labels would broadcast against (N,) predictions into an N×N comparison.
                n_pred = pred.shape[0]
                raise ValueError(f"labels of shape {tuple(y.shape)} for {n_pred} predictions; expected ({n_pred},)")
            correct += int((pred == y).sum())
            n += int(y.shape[0])
            bar.update(int(y.shape[0]))
    finally:
        bar.close()
        model.train(was_training)
    if n == 0:
        raise ValueError("the test set is empty")
    accuracy = 100.0 * correct / n
    if not 0.0 <= accuracy <= 100.0:  # not an assert statement: it must hold under python -O too
        raise AssertionError(f"top-1 {accuracy}% is not a percentage ({correct} correct of {n})")
    return {"top1": accuracy, "n": n}


@torch.no_grad()
def agreement_sums(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """``[agreeing images, KL sum, images]`` (float64) of the student vs the teacher on ``images``.

    Sums, so that data-parallel workers can add theirs up before :func:`agreement_from_sums`.
    """
    student.eval()
    teacher.eval()
    agree = 0
    kl_sum = 0.0
    n = images.shape[0]
    for start in range(0, n, batch_size):
        x = images[start : start + batch_size].to(device)
        s = student(x).float()
        t = teacher(x).float()
        agree += int((s.argmax(1) == t.argmax(1)).sum())
        kl_sum += float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="sum", log_target=True))
    return torch.tensor([agree, kl_sum, n], dtype=torch.float64)


def agreement_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """``{"agreement": %, "kl": mean KL}`` from (possibly summed) :func:`agreement_sums`."""
    n = float(sums[2])
    if n == 0:
        raise ValueError("agreement needs at least one image")
    return {"agreement": 100.0 * float(sums[0]) / n, "kl": float(sums[1]) / n}


def agreement(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Data-free fidelity of the student: top-1 agreement (%) with the teacher and mean KL.

    Computed on images the student was not trained on (a held-out synthetic split), this
    is the objective used to pick recipes and hyper-parameters without touching test data.
    """
    if images.shape[0] == 0:
        raise ValueError("agreement needs at least one image")
    return agreement_from_sums(agreement_sums(student, teacher, images, batch_size=batch_size, device=device))
