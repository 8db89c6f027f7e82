"""The model check (``check_model``): every way a user's model fails the method is one line, found on
2 random images before any work; a usable model passes and is left as it was."""

from __future__ import annotations

import pytest
import torch

from intraq_core.config import ModelConfig, QuantConfig, SynthConfig
from intraq_core.errors import ModelError
from intraq_core.models import create_model, resolve_model_config
from intraq_core.preflight import check_model

SPEC = {"image_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "num_classes": 10}
QUANT = QuantConfig(w_bits=4, a_bits=4)
INTRAQ = SynthConfig()  # BN statistics + the penultimate feature


def _check(name: str, quant: QuantConfig | None = QUANT, synth: SynthConfig | None = INTRAQ, **extra: object) -> None:
    cfg = resolve_model_config(ModelConfig(arch=f"tests.odd_models:{name}", **SPEC, **extra))
    check_model(create_model(cfg), cfg, quant, synth)


def _refused(name: str, *expected: str, **kwargs: object) -> str:
    with pytest.raises(ModelError) as info:
        _check(name, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"model check failed for model.arch='tests.odd_models:{name}': "), message
    for text in expected:
        assert text in message, (text, message)
    return message


def test_an_untraceable_forward_is_refused_when_a_student_is_needed() -> None:
    _refused(
        "untraceable",
        "torch.fx cannot trace its forward (TraceError: symbolically traced variables cannot be used as inputs "
        "to control flow)",
        "the quantized student is built from the traced graph",
        "torch.fx.wrap",
    )
    _check("untraceable", quant=None)  # its eager forward is fine: only the student needs the trace


def test_a_forward_that_raises_names_the_first_line_of_its_error() -> None:
    message = _refused(
        "forward_raises",
        "its forward raised RuntimeError on a random batch [2, 3, 32, 32]: forward is not implemented for this input;",
        "model.image_size",
    )
    assert "second line" not in message


def test_several_outputs_need_model_output() -> None:
    _refused(
        "two_outputs",
        "it returns a tuple (Tensor[2, 10], Tensor[2, 4]), not a logits tensor",
        "set model.output to the index of its logits (e.g. model.output=0)",
    )
    _refused(
        "dict_outputs",
        "it returns a dict {'features': Tensor[2, 4], 'logits': Tensor[2, 10]}",
        "set model.output to the key of its logits (e.g. model.output=logits)",
    )
    _check("two_outputs", output=0)
    _check("dict_outputs", output="logits")
    _refused("two_outputs", "it returns a Tensor[2, 4] (float32), not logits of shape [2, 10]", output=1)
    _refused("tiny", "model.output=0 is set, but the model returns a single Tensor[2, 10]", output=0)


def test_logits_of_the_wrong_shape_are_refused() -> None:
    _refused("extra_dim", "it returns a Tensor[2, 1, 10] (float32), not logits of shape [2, 10]", "model.num_classes")


def test_batchnorm_is_needed_only_by_methods_that_match_bn_statistics() -> None:
    _refused("no_batchnorm", "has no BatchNorm layer, but generate.method=intraq", "generate.method=gaussian")
    _refused("no_batchnorm", "generate.method=gdfq", synth=SynthConfig(method="gdfq"))
    _check("no_batchnorm", synth=SynthConfig(method="gaussian"))
    _check("no_batchnorm", synth=SynthConfig(method="bns_ce", bns_weight=0.0))
    _check("no_batchnorm", synth=None)  # train and evaluate synthesize nothing


def test_the_feature_synthesis_records_must_be_there() -> None:
    _refused(
        "no_linear",
        "(generate.mdc_feature=penultimate) cannot be captured (Sequential has no nn.Linear classifier",
        "set generate.mdc_feature to the name of one of its modules",
    )
    _check("no_linear", synth=SynthConfig(mdc_feature="3"))  # the 1x1 conv classifier's output
    _refused("no_linear", "no module named 'conv' in Sequential", synth=SynthConfig(mdc_feature="conv"))


def test_a_usable_model_passes_and_is_left_as_it_was() -> None:
    """Training flags, weights, BN statistics and torch's global random state (this model draws from it)."""
    cfg = resolve_model_config(ModelConfig(arch="tests.odd_models:noisy", **SPEC))
    model = create_model(cfg).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_model(model, cfg, QUANT, INTRAQ)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0.0, atol=0.0)  # BN statistics included


def test_the_project_models_pass() -> None:
    cfg = resolve_model_config(ModelConfig(arch="cifar_resnet20"))
    check_model(create_model(cfg), cfg, QUANT, INTRAQ)
    with pytest.raises(ValueError, match="resolved model config"):
        check_model(create_model(cfg), ModelConfig(arch="cifar_resnet20"), QUANT)
