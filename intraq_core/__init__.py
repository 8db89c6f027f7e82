"""IntraQ data-free quantization, in plain PyTorch (no Ray).

The public Python API (see the README's "Python API" section): bring a pretrained classifier,
no data, and get an evaluated, exported low-bit student::

    import intraq_core as iq

    cfg = iq.ModelConfig(arch="cifar_resnet20", weights="cifar10-resnet20")  # or any BN-equipped nn.Module
    teacher, spec = iq.create_model(cfg), iq.input_spec(cfg)
    data = iq.synthesize(teacher, spec, iq.SynthConfig(num_images=512, iterations=200))
    student = iq.quantize(teacher, iq.QuantConfig(w_bits=4, a_bits=4))
    iq.calibrate(student, data)
    iq.distill_student(student, teacher, data, iq.DistillConfig(epochs=10))
    print(iq.accuracy(student, spec, "cifar10-test"))
    iq.export(student, spec, "student.onnx")

Names are loaded on first use, so ``import intraq_core`` (and its leaf modules, such as
:mod:`intraq_core.errors`) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name → module that defines it
_EXPORTS: dict[str, str] = {
    # configs
    "ModelConfig": "intraq_core.config",
    "QuantConfig": "intraq_core.config",
    "ReconstructConfig": "intraq_core.config",
    "SynthConfig": "intraq_core.config",
    "DistillConfig": "intraq_core.config",
    "EvalConfig": "intraq_core.config",
    # models
    "create_model": "intraq_core.models.registry",
    "list_models": "intraq_core.models.registry",
    "register_model": "intraq_core.models.registry",
    "resolve_model_config": "intraq_core.models.registry",
    "load_weights": "intraq_core.models.checkpoint",
    "safe_load": "intraq_core.torchfile",
    "check_model": "intraq_core.preflight",
    "reuse_freed_memory": "intraq_core.memory",
    # the steps
    "InputSpec": "intraq_core.api",
    "SyntheticData": "intraq_core.api",
    "input_spec": "intraq_core.api",
    "synthesize": "intraq_core.api",
    "quantize": "intraq_core.quant.api",
    "act_quantizers": "intraq_core.quant.layers",
    "calibrate": "intraq_core.api",
    "distill_student": "intraq_core.api",
    "accuracy": "intraq_core.api",
    "agreement": "intraq_core.evaluate",
    "export": "intraq_core.api",
    "save_student": "intraq_core.student",
    "load_student": "intraq_core.student",
    # errors
    "CheckpointError": "intraq_core.errors",
    "CheckpointMismatchError": "intraq_core.errors",
    "DatasetError": "intraq_core.errors",
    "DivergenceError": "intraq_core.errors",
    "ModelError": "intraq_core.errors",
    "UnknownModelError": "intraq_core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'intraq_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
