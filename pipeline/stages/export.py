"""``intraq-pipeline export``: a run's student → an exported file at the run location, verified.

The export formats themselves (ONNX with explicit Q/DQ, TorchScript, ``torch.export``) are plain
PyTorch and live in :mod:`intraq_core.deploy`; this module reads the run's student, writes through
:class:`pipeline.storage.store.Storage` (local paths, ``s3://``) and checks the export on real test images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from intraq_core.config import EvalConfig
from intraq_core.deploy import (
    DEFAULT_NAMES,
    EXPORT_DIR,
    FORMATS,
    MIN_AGREEMENT,
    compare_logits,
    example_input,
    export_bytes,
    export_program,
    export_torchscript,
    load_verification_images,
    reference_logits,
    run_exported,
    verify_export,
)
from intraq_core.deploy_onnx import export_onnx, lower_fake_quant, onnx_metadata, onnx_qdq_sites
from intraq_core.deploy_qdq import QDQSite
from intraq_core.errors import ExportError

__all__ = [
    "DEFAULT_NAMES",
    "EXPORT_DIR",
    "FORMATS",
    "ExportError",
    "ExportResult",
    "QDQSite",
    "compare_logits",
    "export_bytes",
    "export_onnx",
    "export_program",
    "export_run",
    "export_torchscript",
    "load_verification_images",
    "lower_fake_quant",
    "onnx_qdq_sites",
    "reference_logits",
    "run_exported",
]


@dataclass
class ExportResult:
    """What :func:`export_run` wrote and how well the export reproduces the student."""

    format: str
    url: str
    bytes: int
    sites: list[QDQSite] = field(default_factory=list)
    verification: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (for the CLI's ``--json`` and for logs)."""
        out = asdict(self)
        out["weight_sites"] = sum(s.kind == "weight" for s in self.sites)
        out["activation_sites"] = sum(s.kind == "activation" for s in self.sites)
        out.pop("sites")
        return out


# -- the run-level command -----------------------------------------------------------------------


def _write(url: str, data: bytes) -> str:
    """Write ``data`` to a file URL/path through Storage (atomic); returns the full URL."""
    from pipeline.storage.store import Storage

    parent, _, name = url.rstrip("/").rpartition("/")
    if not name:
        raise ExportError(f"--output must name a file, got {url!r}")
    storage = Storage.from_url(parent or ".")
    storage.write_bytes_atomic(name, data)
    return storage.join(name)


def _run_eval_config(run_storage: Any) -> EvalConfig:
    """The run's eval config (from run.yaml), or the default test set if the run has none."""
    import yaml

    from pipeline.config import RunConfig

    try:
        raw = run_storage.read_bytes("run.yaml")
    except FileNotFoundError:
        return EvalConfig()
    return RunConfig.model_validate(yaml.safe_load(raw)).eval


def export_run(
    run: str,
    fmt: str = "onnx",
    output: str | None = None,
    *,
    stage: str = "final",
    verify_images: int = 1000,
    data: str | None = None,
    min_agreement: float = MIN_AGREEMENT,
) -> ExportResult:
    """Export the student of the run at ``run`` (path or URL) and verify it on real test images.

    ``stage`` picks ``student.pt`` (``final``) or ``student_calibrated.pt`` (``calibrated``).
    The file goes to ``output`` (path or URL) or ``<run>/export/<default name>``. Verification
    compares the export with the eager student on the first ``verify_images`` images of the
    run's test set (or ``data``); agreement below ``min_agreement`` % raises ExportError (the
    file is written first, so it can be inspected). ``verify_images=0`` skips verification.
    """
    from intraq_core.student import load_student
    from pipeline.storage.store import Storage

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    checkpoint = {"final": "student.pt", "calibrated": "student_calibrated.pt"}.get(stage)
    if checkpoint is None:
        raise ExportError(f"unknown stage {stage!r}; choose final or calibrated")
    storage = Storage.from_url(run)
    try:
        raw = storage.read_bytes(checkpoint)
    except FileNotFoundError:
        raise FileNotFoundError(f"{storage.join(checkpoint)} does not exist (has the run finished?)") from None
    student, model_cfg, quant_cfg, _ = load_student(raw)
    blob, sites = export_bytes(
        student, fmt, example_input(model_cfg), metadata=onnx_metadata(model_cfg, quant_cfg, stage)
    )
    if output is None:
        target = storage.child(EXPORT_DIR)
        target.write_bytes_atomic(DEFAULT_NAMES[fmt], blob)
        url = target.join(DEFAULT_NAMES[fmt])
    else:
        url = _write(output, blob)
    result = ExportResult(fmt, url, len(blob), sites)
    if verify_images > 0:
        eval_cfg = _run_eval_config(storage)
        if data is not None:
            eval_cfg = eval_cfg.model_copy(update={"data": data})
        images, labels = load_verification_images(eval_cfg, model_cfg, verify_images)
        result.verification = verify_export(fmt, blob, student, images, labels)
        result.verification["test_set"] = eval_cfg.data
        if result.verification["agreement"] < min_agreement:
            raise ExportError(
                f"{url}: top-1 agreement with the PyTorch student is "
                f"{result.verification['agreement']:.2f}% < {min_agreement}% "
                f"(max |logit diff| {result.verification['max_abs_diff']:.3g})"
            )
    return result
