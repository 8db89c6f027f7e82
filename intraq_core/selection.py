"""Distillation that watches itself: data-free checkpoints of the student and the rule that picks one.

Distillation on synthetic images can destroy a good starting model (a too-large learning rate,
hard labels the quantized student cannot fit, activation ranges it cannot recover from). The
:class:`Selector` measures the student against the frozen teacher on images it never trains on
— the held-out split of the synthetic images and, when given, a *probe set* of synthetic images
of another kind — at the start (the calibrated or reconstructed student), every ``every`` epochs
and at the end, keeps a copy of the best state, and puts it back at the end if the final student
is worse. The test set is never involved.

The held-out images are scored as they are and in ``views`` augmented views each (the training
augmentation, re-seeded at every evaluation so every candidate sees the same views):
distillation trains on augmented images, and a reconstructed start already matches the teacher
on the plain held-out images almost perfectly (KL ~0.002 at W4A4), so the plain images alone
cannot tell a useful fine-tuning from noise.

Every executor runs it: :func:`intraq_core.distill.train_epochs` consults it at the
``distill.eval_every`` cadence. Data-parallel workers each score their own held-out images and
sum the counts (``reduce``), so all of them take the same decision and keep the same state.

Rule (``RULE``): the lowest mean KL(teacher ‖ student) on the held-out synthetic images and their
views (the probe set's when there is no held-out split); the latest candidate wins ties. KL is continuous,
so it ranks students even when top-1 agreement saturates at 100% on easy synthetic images, and
it is the held-out value of what distillation minimizes. The probe set vetoes: a candidate whose
probe agreement is below half the best probe agreement seen has collapsed away from the
synthetic images' distribution (e.g. a student distilled on noise that agrees with the teacher on
held-out noise) and is not eligible. The probe is not the score: measured on the shared CIFAR-10
ResNet-20 at W3A3, distillation that lifts test accuracy 87.0 → 88.0% lowers held-out KL
(0.31 → 0.24) but raises probe KL (0.86 → 0.97) — BN-statistics-only probe images are ambiguous,
unlike real test images.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from intraq_core.evaluate import agreement_from_sums, agreement_sums

__all__ = ["RULE", "RULE_FINAL", "Selection", "Selector"]

RULE = (
    "min KL(teacher||student) on held-out synthetic images and augmented views of them (probe KL without a "
    "held-out split); candidates: start, every N epochs, final; ties -> latest; vetoed if probe agreement < half "
    "the best seen"
)
#: The rule of ``distill.select: final`` (the scores are still recorded).
RULE_FINAL = "final student (distill.select=final); scores recorded, not used"
#: A candidate whose probe agreement falls below this fraction of the best one seen is not eligible.
PROBE_VETO = 0.5


@dataclass
class Selection:
    """What the selector saw and chose (written into ``metrics.json`` / ``train_history.json``)."""

    selected_epoch: int | None
    """Epoch of the kept student (``None``: the starting model, before any distillation)."""
    final_epoch: int | None
    kept_final: bool
    rule: str = RULE
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "selected_epoch": self.selected_epoch,
            "selection_rule": self.rule,
            "kept_final": self.kept_final,
            "final_epoch": self.final_epoch,
            "evaluations": self.evaluations,
        }

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> Selection:
        """The selection a :meth:`summary` describes (e.g. one reported by a Ray Train worker)."""
        return cls(
            summary["selected_epoch"],
            summary["final_epoch"],
            bool(summary["kept_final"]),
            summary["selection_rule"],
            list(summary["evaluations"]),
        )

    @property
    def message(self) -> str:
        """One line for the terminal: what was kept and why."""
        if self.kept_final:
            return "final student kept (best by the data-free signals)"
        best = next(e for e in self.evaluations if e["epoch"] == self.selected_epoch)
        last = self.evaluations[-1]
        where = "the starting student" if self.selected_epoch is None else f"epoch {self.selected_epoch + 1}"
        return (
            f"final student is worse by the data-free signals (held-out KL {last['kl']:.4f}, agreement "
            f"{last['agreement']:.1f}%) than {where} (KL {best['kl']:.4f}, agreement {best['agreement']:.1f}%): "
            f"kept {where}"
        )


class Selector:
    """Evaluate the student at the start, every ``every`` epochs and at the end; keep the best.

    Use :meth:`start` before training, :meth:`consider` after an evaluated epoch (or
    :meth:`on_epoch` after every epoch, which applies the ``every`` cadence), and :meth:`finish`
    after the last epoch: it loads the best state back into the student (``keep="best"``) and
    returns the :class:`Selection`.

    ``holdout`` is a tensor, or a callable returning an iterable of batches (images streamed
    from storage at each evaluation). ``reduce`` sums a float64 tensor over data-parallel
    workers (each scores its own held-out images); the probe set is not reduced (every worker
    holds all of it).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> teacher = nn.Linear(4, 3).eval()
        >>> student = nn.Linear(4, 3)
        >>> held_out = torch.randn(16, 4)
        >>> sel = Selector(teacher, held_out, every=1)
        >>> sel.start(student)
        >>> with torch.no_grad():
        ...     _ = student.weight.copy_(teacher.weight)  # "training" makes it perfect
        ...     _ = student.bias.copy_(teacher.bias)
        >>> sel.on_epoch(0, student)
        >>> with torch.no_grad():
        ...     _ = student.weight.mul_(-1)  # then ruins it
        >>> sel.finish(student, final_epoch=1).selected_epoch
        0
    """

    def __init__(
        self,
        teacher: nn.Module,
        holdout: torch.Tensor | Callable[[], Iterable[torch.Tensor]] | None,
        probe: torch.Tensor | None = None,
        *,
        every: int = 10,
        device: str | torch.device = "cpu",
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        views: int = 0,
        seed: int = 0,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        batch_size: int = 500,
    ) -> None:
        if isinstance(holdout, torch.Tensor) and holdout.shape[0] == 0:
            holdout = None
        if probe is not None and probe.shape[0] == 0:
            probe = None
        if holdout is None and probe is None:
            raise ValueError("the selector needs held-out or probe images")
        self.teacher = teacher
        self.holdout = holdout
        self.probe = probe
        self.every = max(1, int(every))
        self.device = device
        self.augment = augment if views > 0 else None
        self.views = int(views) if augment is not None else 0
        self.seed = int(seed)
        self.reduce = reduce
        self.batch_size = int(batch_size)
        self.evaluations: list[dict[str, Any]] = []
        #: The last :meth:`finish`'s result.
        self.selection: Selection | None = None
        self._best: tuple[float, int | None, dict[str, torch.Tensor], bool] | None = None

    def _held_out_batches(self) -> Iterable[torch.Tensor]:
        if isinstance(self.holdout, torch.Tensor):
            return self.holdout.split(self.batch_size)
        return self.holdout() if self.holdout is not None else ()

    def _score(self, student: nn.Module, batches: Iterable[torch.Tensor], *, views: bool, reduce: bool) -> dict:
        sums = torch.zeros(3, dtype=torch.float64)
        gen = torch.Generator().manual_seed(self.seed)  # the same views for every candidate
        for x in batches:
            sums += agreement_sums(student, self.teacher, x, batch_size=self.batch_size, device=self.device)
            if views and self.augment is not None:
                for _ in range(self.views):
                    v = self.augment(x, gen)
                    sums += agreement_sums(student, self.teacher, v, batch_size=self.batch_size, device=self.device)
        if reduce and self.reduce is not None:
            sums = self.reduce(sums)
        return agreement_from_sums(sums)

    def evaluate(self, student: nn.Module) -> dict[str, Any]:
        """Agreement and KL on each watched set; ``kl``/``agreement`` of the scored set."""
        was_training = student.training
        row: dict[str, Any] = {}
        if self.holdout is not None:
            row["holdout"] = self._score(student, self._held_out_batches(), views=True, reduce=True)
        if self.probe is not None:
            row["probe"] = self._score(student, self.probe.split(self.batch_size), views=False, reduce=False)
        student.train(was_training)
        scored = row["holdout"] if "holdout" in row else row["probe"]
        row["kl"] = scored["kl"]
        row["agreement"] = scored["agreement"]
        return row

    def _vetoed(self, row: dict[str, Any]) -> bool:
        if "probe" not in row:
            return False
        best = max(e["probe"]["agreement"] for e in self.evaluations)
        return row["probe"]["agreement"] < PROBE_VETO * best

    def consider(self, student: nn.Module, epoch: int | None) -> dict[str, float]:
        """Score the student after ``epoch`` (None: the start), keep its state if it is the best.

        Returns the flat scores a history row records: ``agreement``/``kl`` of the scored set and
        ``probe_agreement``/``probe_kl`` when there is a probe set.
        """
        row = self.evaluate(student)
        row["epoch"] = epoch
        self.evaluations.append(row)
        row["vetoed"] = self._vetoed(row)
        best_vetoed = self._best is not None and self._best[3]
        better = self._best is None or row["kl"] <= self._best[0]
        if (better and not row["vetoed"]) or (best_vetoed and not row["vetoed"]) or (better and best_vetoed):
            state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            self._best = (row["kl"], epoch, state, row["vetoed"])
        flat = {"agreement": float(row["agreement"]), "kl": float(row["kl"])}
        if "probe" in row:
            flat["probe_agreement"] = float(row["probe"]["agreement"])
            flat["probe_kl"] = float(row["probe"]["kl"])
        return flat

    @property
    def started(self) -> bool:
        """Whether the starting student was scored (a resumed selector has been)."""
        return bool(self.evaluations)

    def start(self, student: nn.Module) -> None:
        """Score the starting student (calibrated or reconstructed)."""
        self.consider(student, None)

    def on_epoch(self, epoch: int, student: nn.Module, last_epoch: int | None = None) -> None:
        """Score the student after ``epoch`` (0-based) every ``every`` epochs; the last is left to finish."""
        if (epoch + 1) % self.every == 0 and epoch != last_epoch:
            self.consider(student, epoch)

    def state(self) -> dict[str, Any]:
        """Resumable state (tensors and plain types only)."""
        best = None
        if self._best is not None:
            best = {"kl": self._best[0], "epoch": self._best[1], "state": self._best[2], "vetoed": self._best[3]}
        return {"evaluations": copy.deepcopy(self.evaluations), "best": best}

    def load_state(self, state: dict[str, Any]) -> None:
        self.evaluations = copy.deepcopy(state["evaluations"])
        best = state["best"]
        self._best = (
            None if best is None else (float(best["kl"]), best["epoch"], best["state"], bool(best.get("vetoed")))
        )

    def finish(self, student: nn.Module, final_epoch: int | None, keep: str = "best") -> Selection:
        """Score the final student (unless already scored), say what was best and, with
        ``keep="best"``, load the best state into ``student``; ``keep="final"`` leaves it as is."""
        if keep not in ("best", "final"):
            raise ValueError(f"keep must be 'best' or 'final', not {keep!r}")
        if not self.evaluations or self.evaluations[-1]["epoch"] != final_epoch:
            self.consider(student, final_epoch)
        assert self._best is not None
        _, epoch, state, _ = self._best
        if keep == "final":
            self.selection = Selection(final_epoch, final_epoch, True, RULE_FINAL, list(self.evaluations))
            return self.selection
        kept_final = epoch == final_epoch
        if not kept_final:
            student.load_state_dict(state)
        self.selection = Selection(epoch, final_epoch, kept_final, RULE, list(self.evaluations))
        return self.selection
