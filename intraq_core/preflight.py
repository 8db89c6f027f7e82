"""The model check before any work: can the method use this classifier at all?

A user's model can fail the method in ways only running it shows: its forward raises, returns a
tuple such as ``(logits, features)`` or a tensor of the wrong shape, ``torch.fx`` cannot trace it
(the quantized student is built from the traced graph), or it has no BatchNorm layer although the
synthesis loss matches BN statistics. Found by the stage that needs it, each costs everything
before that stage (for an untraceable model: the whole synthetic dataset). :func:`check_model`
runs each of those steps once, on a batch of 2 random images: about 0.15 s for the CIFAR
ResNet-20 or an ImageNet MobileNet, 1 s for a ResNet-50 at 224 px, on one CPU thread.

Every failure is a :class:`~intraq_core.errors.ModelError` with a one-line message: what failed,
the model's ``arch``, the first line of the underlying error, and what to change.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn

from intraq_core.config import ModelConfig, QuantConfig, SynthConfig
from intraq_core.errors import ModelError, first_line
from intraq_core.models.introspect import FeatureTap
from intraq_core.models.output import SelectOutput, describe_output, suggest_output

__all__ = ["CHECK_BATCH", "check_model"]

#: Images in the check's batch (random, seeded; 2 so that batch-dependent code is exercised).
CHECK_BATCH = 2
_INPUT_SEED = 0
_TRACE_FIX = (
    "remove Python control flow that depends on tensor values from the forward (an if/while on a tensor, "
    ".item(), a loop over a tensor), or move that code into a function decorated with torch.fx.wrap"
)

_TRACED_FIX = (
    "the student runs the torch.fx graph traced from the forward, in which what the forward decided at trace "
    "time (on shapes, self.training, isinstance checks) is fixed: make the forward independent of those"
)


def _failure(arch: str, text: str) -> ModelError:
    return ModelError(f"model check failed for model.arch={arch!r}: {text}")


def _on_device(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model``'s tensors are on ``device`` (``cuda`` matches ``cuda:0``; no tensors: yes)."""
    for tensor in (*model.parameters(), *model.buffers()):
        where = tensor.device
        return where.type == device.type and device.index in (None, where.index)
    return True


def _logits_problem(out: Any, model_cfg: ModelConfig, batch: int) -> str | None:
    """Why ``out`` is not a ``[batch, num_classes]`` float logits tensor (None when it is)."""
    num_classes = model_cfg.num_classes
    assert num_classes is not None
    output = model_cfg.output
    if isinstance(out, (tuple, list, Mapping)):
        key = suggest_output(out, batch, num_classes)
        kind = "key" if isinstance(out, Mapping) else "index"
        if output is None:
            return (
                f"it returns a {describe_output(out)}, not a logits tensor; set model.output to the {kind} of "
                f"its logits (e.g. model.output={key})"
            )
        return (
            f"model.output={output!r} selects a {describe_output(out)}, not a logits tensor; set model.output "
            f"to the {kind} of the logits"
        )
    if not isinstance(out, Tensor):
        return (
            f"it returns a {describe_output(out)}, not a logits tensor; its forward must return the "
            f"[N, {num_classes}] logits"
        )
    if not out.is_floating_point():
        return f"it returns a {describe_output(out)}; logits must be a floating-point tensor"
    if tuple(out.shape) != (batch, num_classes):
        which = " (or model.output to the element that holds them)" if output is not None else ""
        return (
            f"it returns a {describe_output(out)}, not logits of shape [{batch}, {num_classes}] "
            f"(model.num_classes={num_classes}); set model.num_classes to the number of classes it predicts"
            f"{which}, or make its forward return [N, num_classes] logits"
        )
    return None


def _forward_failure(arch: str, who: str, x: Tensor, exc: Exception, fix: str) -> ModelError:
    if isinstance(exc, ModelError):  # model.output does not fit what the model returns: the message says so
        return _failure(arch, first_line(exc))
    return _failure(
        arch, f"{who} raised {type(exc).__name__} on a random batch {list(x.shape)}: {first_line(exc)}; {fix}"
    )


def _feature_failure(arch: str, synth: SynthConfig, exc: Exception) -> ModelError:
    layer = synth.mdc_feature
    if layer == "penultimate":
        fix = (
            "the penultimate feature is the input of the last nn.Linear the forward runs: give the model an "
            "nn.Linear classifier, or set generate.mdc_feature to the name of one of its modules"
        )
    else:
        fix = "set generate.mdc_feature to the name of one of its modules (or penultimate)"
    return _failure(
        arch,
        f"the teacher feature that synthesis records (generate.mdc_feature={layer}) cannot be captured "
        f"({first_line(exc)}); {fix}",
    )


def _teacher_forward(model: nn.Module, x: Tensor, arch: str, synth: SynthConfig | None, fix: str) -> Any:
    """The model's output on ``x``; with ``synth``, captured by the feature tap synthesis uses (one forward)."""
    tap = None
    if synth is not None:
        try:
            tap = FeatureTap(model, synth.mdc_feature)
        except ValueError as exc:  # no nn.Linear, or no such module
            raise _feature_failure(arch, synth, exc) from exc
    try:
        return model(x)
    except Exception as exc:
        if tap is not None:  # the tap's failure (no nn.Linear ran), or the forward's own? Run it without.
            tap.remove()
            try:
                model(x)
            except Exception:
                pass
            else:
                raise _feature_failure(arch, synth, exc) from exc  # type: ignore[arg-type]
        raise _forward_failure(arch, "its forward", x, exc, fix) from exc
    finally:
        if tap is not None:
            tap.remove()


def _student_failure(teacher: nn.Module, quant: QuantConfig, arch: str, exc: Exception) -> ModelError:
    """Why the student could not be built: the model is not traceable, or something else (told as is)."""
    try:
        fx.symbolic_trace(teacher)
    except Exception as trace_exc:
        return _failure(
            arch,
            f"torch.fx cannot trace its forward ({type(trace_exc).__name__}: {first_line(trace_exc)}); the "
            f"quantized student is built from the traced graph: {_TRACE_FIX}",
        )
    return _failure(
        arch,
        f"building the quantized student (W{quant.w_bits}A{quant.a_bits}) failed with {type(exc).__name__}: "
        f"{first_line(exc)}",
    )


def check_model(
    teacher: nn.Module,
    model_cfg: ModelConfig,
    quant: QuantConfig | None = None,
    synth: SynthConfig | None = None,
    *,
    device: torch.device | str = "cpu",
) -> None:
    """Run every step the method takes with ``teacher`` once, on :data:`CHECK_BATCH` random images.

    ``model_cfg`` is the resolved config (:func:`~intraq_core.models.resolve_model_config`):
    its ``image_size`` sizes the batch, its ``num_classes`` the expected logits. Checked, on
    ``device``: with ``synth``, that the model has BatchNorm layers when the synthesis loss
    needs BN statistics and that the feature synthesis records (``synth.mdc_feature``) can be
    read; that the forward returns ``[N, num_classes]`` float logits (a tuple/list/dict needs
    ``model.output``); with ``quant``, that ``torch.fx`` traces the model and the quantized
    student (:func:`~intraq_core.student.build_student`) runs and returns such logits too.

    ``teacher`` is left as it was (its training flags; it is copied when it must move to
    ``device``), and so is torch's global random state. Raises :class:`ModelError` (one line).
    """
    from intraq_core.student import build_student
    from intraq_core.synth.engine import check_teacher

    if model_cfg.num_classes is None or model_cfg.image_size is None:
        raise ValueError("check_model needs a resolved model config (see resolve_model_config)")
    arch, size = model_cfg.arch, model_cfg.image_size
    device = torch.device(device)
    if synth is not None:
        try:
            check_teacher(teacher.model if isinstance(teacher, SelectOutput) else teacher, synth)
        except ModelError as exc:
            raise _failure(arch, first_line(exc)) from exc
    model = teacher if _on_device(teacher, device) else copy.deepcopy(teacher).to(device)
    modes = {m: m.training for m in model.modules()}
    x = torch.randn((CHECK_BATCH, 3, size, size), generator=torch.Generator().manual_seed(_INPUT_SEED)).to(device)
    forward_fix = (
        f"its forward must take a batch of normalized [N, 3, {size}, {size}] images (set model.image_size if it "
        "expects another size) and return the logits"
    )
    rng_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    try:
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
            model.eval()
            out = _teacher_forward(model, x, arch, synth, forward_fix)
            problem = _logits_problem(out, model_cfg, CHECK_BATCH)
            if problem is not None:
                raise _failure(arch, problem)
            if quant is not None:
                try:
                    student = build_student(model, quant).eval()
                except Exception as exc:
                    raise _student_failure(model, quant, arch, exc) from exc
                try:
                    out = student(x)
                except Exception as exc:
                    raise _forward_failure(arch, "the quantized student's forward", x, exc, _TRACED_FIX) from exc
                problem = _logits_problem(out, model_cfg, CHECK_BATCH)
                if problem is not None:
                    raise _failure(arch, f"the quantized student: {problem}")
    finally:
        for module, mode in modes.items():
            module.training = mode
