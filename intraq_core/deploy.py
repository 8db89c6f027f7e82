"""Exporting a quantized student for deployment: ONNX with explicit Q/DQ, TorchScript, ``torch.export``;
and verifying an export against the eager student.

Plain PyTorch (plus ``onnx``/``onnxruntime`` for the ONNX format); the run-level command that
reads a run's student and writes the file to its location is :func:`pipeline.stages.export.export_run`.
The export copy of the student is :mod:`intraq_core.deploy_qdq`'s, the ONNX format
:mod:`intraq_core.deploy_onnx`'s.

The TorchScript export traces the frozen fake-quant student as it is. The ``torch.export``
(``.pt2``) program writes each quantizer with elementary ops at fixed parameters, because
``torch.export`` cannot trace PyTorch's fused fake-quant ops; both reproduce the student exactly.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from intraq_core.config import EvalConfig, ModelConfig
from intraq_core.deploy_onnx import INPUT_NAME, OUTPUT_NAME, export_onnx
from intraq_core.deploy_qdq import QDQSite, export_copy, frozen_copy
from intraq_core.errors import ExportError

__all__ = [
    "DEFAULT_NAMES",
    "EXPORT_DIR",
    "FORMATS",
    "MIN_AGREEMENT",
    "compare_logits",
    "example_input",
    "export_bytes",
    "export_program",
    "export_torchscript",
    "load_verification_images",
    "reference_logits",
    "run_exported",
    "verify_export",
]

FORMATS = ("onnx", "torchscript", "torch-export")
DEFAULT_NAMES = {
    "onnx": "student.onnx",
    "torchscript": "student.torchscript.pt",
    "torch-export": "student.pt2",
}
EXPORT_DIR = "export"
MIN_AGREEMENT = 99.5


def example_input(model_cfg: ModelConfig, batch: int = 2) -> torch.Tensor:
    """A zero batch of the model's input shape (what the exporters trace with)."""
    size = model_cfg.image_size or 32
    return torch.zeros(batch, 3, size, size)


# -- TorchScript and torch.export ---------------------------------------------------------------


def export_torchscript(student: nn.Module, example: torch.Tensor) -> bytes:
    """The frozen fake-quant student traced to TorchScript (``torch.jit.load``-able bytes)."""
    model = frozen_copy(student)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, (example,), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue()


def export_program(student: nn.Module, example: torch.Tensor) -> bytes:
    """The frozen fake-quant student as a ``torch.export`` program (``.pt2`` bytes), dynamic batch.

    Quantizers are written with elementary ops at fixed parameters (see ``_ExplicitFakeQuant``),
    so the program needs nothing from this project to load, run or compile.
    """
    model, _ = export_copy(student, explicit=True)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def export_bytes(
    student: nn.Module, fmt: str, example: torch.Tensor, *, metadata: dict[str, str] | None = None
) -> tuple[bytes, list[QDQSite]]:
    """Export ``student`` in ``fmt`` (one of :data:`FORMATS`); sites are listed for ONNX only."""
    if fmt == "onnx":
        return export_onnx(student, example, metadata=metadata)
    if fmt == "torchscript":
        return export_torchscript(student, example), []
    if fmt == "torch-export":
        return export_program(student, example), []
    raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


# -- verification ---------------------------------------------------------------------------


def run_exported(fmt: str, data: bytes, images: torch.Tensor, *, batch_size: int = 500) -> np.ndarray:
    """Logits of an exported model (ONNX Runtime on CPU, or the loaded TorchScript/.pt2) on images."""
    outs: list[np.ndarray] = []
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].numpy()
            outs.append(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
        return np.concatenate(outs)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still supported
            module: Any = torch.jit.load(io.BytesIO(data), map_location="cpu")
    elif fmt == "torch-export":
        module = torch.export.load(io.BytesIO(data)).module()
    else:
        raise ExportError(f"unknown export format {fmt!r}")
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            outs.append(module(images[start : start + batch_size]).numpy())
    return np.concatenate(outs)


@torch.no_grad()
def reference_logits(student: nn.Module, images: torch.Tensor, *, batch_size: int = 500) -> np.ndarray:
    """Logits of the eager fake-quant student (frozen ranges, eval mode, CPU)."""
    model = frozen_copy(student).cpu()
    return np.concatenate([model(images[s : s + batch_size]).numpy() for s in range(0, images.shape[0], batch_size)])


def compare_logits(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1 agreement (%) and logit differences of an export against the eager student.

    With ``labels``, also both top-1 accuracies (%). ``images_within_1e-4`` counts images whose
    logits all agree to 1e-4: a quantized network flips an activation level now and then when
    two runtimes sum a convolution in a different order, and such an image differs by a level
    downstream while every other image matches.
    """
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    per_image = diff.max(axis=1)
    out: dict[str, Any] = {
        "images": int(reference.shape[0]),
        "agreement": float(100.0 * np.mean(reference.argmax(1) == candidate.argmax(1))),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "images_within_1e-4": int((per_image <= 1e-4).sum()),
    }
    if labels is not None:
        out["reference_top1"] = float(100.0 * np.mean(reference.argmax(1) == labels))
        out["export_top1"] = float(100.0 * np.mean(candidate.argmax(1) == labels))
    return out


def verify_export(
    fmt: str,
    data: bytes,
    student: nn.Module,
    images: torch.Tensor,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Run the export and the eager student on the same images and compare (see compare_logits)."""
    return compare_logits(reference_logits(student, images), run_exported(fmt, data, images), labels)


def load_verification_images(eval_cfg: EvalConfig, model_cfg: ModelConfig, n: int) -> tuple[torch.Tensor, np.ndarray]:
    """The first ``n`` images (normalized) and labels of a real test set."""
    from intraq_core.data import load_test_set

    test_set = load_test_set(eval_cfg.model_copy(update={"limit": n}), model_cfg)
    xs, ys = [], []
    for x, y in test_set.batches(eval_cfg.batch_size):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs)[:n], torch.cat(ys)[:n].numpy()
