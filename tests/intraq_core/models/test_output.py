"""``model.output``: a model returning a tuple/list/dict is wrapped so that everything sees its logits.

The wrapper must trace with torch.fx (the student is built from the traced graph), load a user's
weights file written for the bare model, and checkpoints the project writes (students, float
models) must rebuild to the same network.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import fx

from intraq_core.config import ModelConfig, QuantConfig
from intraq_core.errors import ModelError
from intraq_core.models import (
    SelectOutput,
    create_model,
    model_from_checkpoint,
    read_model_checkpoint,
    resolve_model_config,
    save_model_checkpoint,
)
from intraq_core.models.output import select_output
from intraq_core.quant import calibrate_ranges
from intraq_core.student import build_student, load_student, save_student
from tests.odd_models import TinyNet

SPEC = {"image_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def _cfg(name: str, **extra: object) -> ModelConfig:
    return ModelConfig(arch=f"tests.odd_models:{name}", **SPEC, **extra)


def test_tuple_and_dict_outputs_are_reduced_to_the_logits() -> None:
    x = torch.randn(3, 3, 32, 32)
    pair = create_model(_cfg("two_outputs", output=0))
    assert isinstance(pair, SelectOutput) and not pair.training
    logits, features = pair.model(x)
    torch.testing.assert_close(pair(x), logits)
    assert features.shape == (3, 4)
    second = create_model(_cfg("two_outputs", output=-1))  # negative indices count from the end
    torch.testing.assert_close(second(x), features)
    named = create_model(_cfg("dict_outputs", output="logits"))
    torch.testing.assert_close(named(x), named.model(x)["logits"])
    assert not isinstance(create_model(_cfg("tiny")), SelectOutput)  # no model.output: the model as built


def test_an_output_that_does_not_fit_is_one_clear_error() -> None:
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ModelError, match=r"model.output=0 is set, but the model returns a single Tensor\[2, 10\]"):
        create_model(_cfg("tiny", output=0))(x)
    with pytest.raises(ModelError, match=r"model.output=2 is not an index of the tuple \(Tensor\[2, 10\], Tensor"):
        create_model(_cfg("two_outputs", output=2))(x)
    with pytest.raises(ModelError, match=r"model.output='logit' is not a key of the dict \{'features'"):
        create_model(_cfg("dict_outputs", output="logit"))(x)
    with pytest.raises(ModelError, match=r"model.output='logits' is not an index"):
        select_output((x, x), "logits")


def test_the_wrapper_traces_and_quantizes_to_the_same_logits() -> None:
    wrapped = create_model(_cfg("two_outputs", output=0))
    x = torch.randn(4, 3, 32, 32)
    graph = fx.symbolic_trace(wrapped)
    torch.testing.assert_close(graph(x), wrapped(x))
    student = build_student(wrapped, QuantConfig(w_bits=8, a_bits=8)).eval()
    with torch.no_grad():
        out = student(x)
    assert out.shape == (4, 10)
    # 8-bit fake quantization of this tiny net stays close to the float logits.
    torch.testing.assert_close(out, wrapped(x), atol=0.05, rtol=0.0)


def test_a_weights_file_of_the_bare_model_loads_into_the_wrapped_one(tmp_path: Path) -> None:
    bare = TinyNet()
    with torch.no_grad():
        for p in bare.parameters():
            p.normal_()
    torch.save(bare.state_dict(), tmp_path / "bare.pt")
    wrapped = create_model(_cfg("two_outputs", output=0, weights=str(tmp_path / "bare.pt")))
    assert list(wrapped.state_dict()) == [f"model.{k}" for k in bare.state_dict()]
    for key, value in bare.state_dict().items():
        torch.testing.assert_close(wrapped.state_dict()[f"model.{key}"], value)


def test_checkpoints_written_by_the_project_reload(tmp_path: Path) -> None:
    cfg = _cfg("dict_outputs", output="logits")
    teacher = create_model(cfg)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(4, 3, 32, 32)

    # A float model: the file holds the bare model's weights and records model.output.
    save_model_checkpoint(tmp_path / "float.pt", teacher, cfg)
    payload = read_model_checkpoint(tmp_path / "float.pt")
    assert payload["model_config"]["output"] == "logits"
    assert set(payload["state_dict"]) == set(teacher.model.state_dict())
    again = model_from_checkpoint(tmp_path / "float.pt")
    assert isinstance(again, SelectOutput)
    torch.testing.assert_close(again(x), teacher(x))

    # A student: rebuilt as create_model -> quantize -> load_state_dict.
    quant = QuantConfig(w_bits=4, a_bits=4)
    student = build_student(teacher, quant).eval()
    calibrate_ranges(student, [x])  # and freeze the ranges, as saved students are
    save_student(tmp_path / "student.pt", student, resolve_model_config(cfg), quant)
    loaded, loaded_cfg, _, _ = load_student(tmp_path / "student.pt")
    assert loaded_cfg.output == "logits"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x))
