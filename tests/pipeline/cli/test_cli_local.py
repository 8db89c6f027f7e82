"""The CLI end to end on the real teacher, single-process executor (the Ray path has its own tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app

runner = CliRunner()


def test_evaluate_prints_the_published_accuracy(teacher_path: Path) -> None:
    # The real console entry point in a fresh process, as a user runs it.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli.app",
            "evaluate",
            "--arch",
            "cifar_resnet20",
            "--weights",
            str(teacher_path),
            "--data",
            "cifar10-test",
            "--json",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert json.loads(out.stdout) == {"top1": 91.73, "n": 10000}


def test_evaluate_another_lineage_without_naming_its_shortcut(data_dir: Path) -> None:
    # chenyaofo's ResNet-20: option-B shortcuts named `downsample`, head `fc`, CIFAR normalization.
    # The shortcut option is read off the checkpoint's keys; the normalization is the model spec's.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli.app",
            "evaluate",
            "--arch",
            "cifar_resnet20",
            "--weights",
            str(data_dir / "chenyaofo_cifar10_resnet20-eb80202b.pth"),
            "--data",
            "cifar10-test",
            "--set",
            "model.mean=[0.4914,0.4822,0.4465]",
            "--set",
            "model.std=[0.2023,0.1994,0.2010]",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "top-1 92.60% on 10000 images"


@pytest.mark.slow
def test_smoke_run_local_executor(tmp_path: Path) -> None:
    res = runner.invoke(app, ["run", "-c", "smoke", "-q", "--set", "executor=local", "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    for key in (
        "fp_top1",
        "quant_top1",
        "ptq_top1",
        "w_bits",
        "a_bits",
        "method",
        "num_images",
        "gen_iterations",
        "epochs",
        "seed",
        "seconds",
    ):
        assert key in metrics
    assert metrics["fp_top1"] > 90.0  # the real teacher on the first 1,000 test images
    assert metrics["num_images"] == 64 and metrics["w_bits"] == 4
    assert set(metrics["seconds"]) >= {"generate", "distill", "evaluate"}
    # Every calibrated activation tensor ranked by what it costs alone, most costly first.
    ranked = metrics["training"]["activation_sensitivity"]
    assert len(ranked) == metrics["quantization"]["activations"]["quantized"]
    assert [r["kl"] for r in ranked] == sorted((r["kl"] for r in ranked), reverse=True) and ranked[0]["kl"] > 0
    assert {r["bits"] for r in ranked} == {4}
    # Same config and seed → same metrics.
    again = runner.invoke(app, ["run", "-c", "smoke", "-q", "--set", "executor=local", "-o", str(tmp_path / "r2")])
    assert again.exit_code == 0, again.output
    metrics2 = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    for key in ("ptq_top1", "quant_top1", "training", "generation"):
        if key == "generation":
            assert metrics2[key]["final_losses_mean"] == metrics[key]["final_losses_mean"]
        else:
            assert metrics2[key] == metrics[key]
    # The location now holds a run: a second run without --resume/--overwrite is refused.
    clash = runner.invoke(app, ["run", "-c", "smoke", "-q", "--set", "executor=local", "-o", str(tmp_path / "r")])
    assert clash.exit_code == 2
    assert "--resume" in clash.output


def test_unknown_key_is_one_line_exit_2(tmp_path: Path) -> None:
    res = runner.invoke(app, ["run", "-c", "smoke", "--set", "generate.iterashuns=3", "-o", str(tmp_path)])
    assert res.exit_code == 2
    assert "did you mean 'generate.iterations'" in res.output
    assert "Traceback" not in res.output


def _class_folders(root: Path, layout: dict[str, list[str]]) -> None:
    """32x32 PNGs (seeded) in one sub-folder per class id."""
    import numpy as np
    from PIL import Image

    for i, (class_id, names) in enumerate(sorted(layout.items())):
        (root / class_id).mkdir(parents=True)
        for j, name in enumerate(names):
            pixels = np.random.default_rng(10 * i + j).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / class_id / name)


def test_evaluate_classes_and_labels_options(tmp_path: Path) -> None:
    """--classes labels a subset of the classes by the class list; --labels reads a flat folder's ground truth.

    The model is cifar_resnet20 with its seeded random initialization, which predicts class 4 for
    each of these random images: with images of classes 4, 4 and 7, top-1 is 2/3 when every image
    gets its class' index (sorted folder order, 0 and 1, would score 0).
    """
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"c{k} class number {k}\n" for k in range(10)))
    _class_folders(tmp_path / "subset", {"c4": ["a.png", "b.png"], "c7": ["c.png"]})
    base = ["evaluate", "--arch", "cifar_resnet20", "--json", "-q", "--workers", "0"]

    refused = runner.invoke(app, [*base, "--data", str(tmp_path / "subset")])
    assert refused.exit_code == 2 and "set eval.classes" in refused.output and "Traceback" not in refused.output
    by_list = runner.invoke(app, [*base, "--data", str(tmp_path / "subset"), "--classes", str(classes)])
    assert by_list.exit_code == 0, by_list.output
    assert json.loads(by_list.output) == {"top1": 66.6667, "n": 3}

    # The same images, flat, with their ground truth as indices.
    flat = tmp_path / "flat"
    flat.mkdir()
    for class_dir in (tmp_path / "subset").iterdir():
        for image in class_dir.iterdir():
            (flat / image.name).symlink_to(image)
    (tmp_path / "gt.txt").write_text("a.png 4\nb.png 4\nc.png 7\n")
    by_labels = runner.invoke(app, [*base, "--data", str(flat), "--labels", str(tmp_path / "gt.txt")])
    assert by_labels.exit_code == 0, by_labels.output
    assert json.loads(by_labels.output) == {"top1": 66.6667, "n": 3}


def test_evaluate_a_saved_student_with_another_preprocessing(tmp_path: Path) -> None:
    """A student records its model spec (32x32, no resize); --set model.resize=… still overrides it."""
    import numpy as np
    import torch
    from PIL import Image

    from intraq_core.config import ModelConfig, QuantConfig
    from intraq_core.models import create_model, resolve_model_config
    from intraq_core.quant import calibrate_ranges
    from intraq_core.student import build_student, student_checkpoint_bytes

    model_cfg = resolve_model_config(ModelConfig(arch="cifar_resnet20"))
    student = build_student(create_model(model_cfg), QuantConfig(w_bits=4, a_bits=4))
    calibrate_ranges(student, [torch.randn(8, 3, 32, 32)])
    path = tmp_path / "student.pt"
    path.write_bytes(student_checkpoint_bytes(student, model_cfg, QuantConfig(w_bits=4, a_bits=4)))
    for k in range(10):
        (tmp_path / "data" / f"{k}").mkdir(parents=True)
        pixels = np.random.default_rng(k).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "data" / f"{k}" / "x.png")
    base = ["evaluate", "--weights", str(path), "--data", str(tmp_path / "data"), "--json", "-q", "--workers", "0"]
    as_saved = runner.invoke(app, base)
    assert as_saved.exit_code == 2 and "a 40x40 image, but the model takes 32x32" in as_saved.output
    resized = runner.invoke(app, [*base, "--set", "model.resize=40"])
    assert resized.exit_code == 0, resized.output
    assert json.loads(resized.output)["n"] == 10


def test_show_quant_prints_the_map_without_running_anything(tmp_path: Path, data_dir: Path) -> None:
    res = runner.invoke(app, ["show-quant", "--weights", "cifar10-resnet20", "--set", "quant.last_input_bits=8"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "cifar_resnet20: W4A4, last layer input 8-bit (activations at weight-layer inputs)"
    assert lines[1].startswith("weights: 20 layer(s) quantized (20 at 4-bit), 0 left float; activations: 19 tensor")
    assert "  conv1 (W4): input image (float: quant.quantize_input=false)" in lines
    assert "  linear (W4): input act_quant.layer3_2_relu2 (8-bit, unsigned)" in lines
    as_json = runner.invoke(app, ["show-quant", "--weights", "cifar10-resnet20", "--json"])
    assert json.loads(as_json.output)["activations"]["quantized"] == 19


def test_show_quant_names_the_weights_architecture_and_keeps_a_named_tensor_at_its_own_bits() -> None:
    stem = "act_quant.stage1_0_2"  # MobileNetV1's 8-channel stem output, read by the first depthwise conv
    res = runner.invoke(
        app, ["show-quant", "--weights", "imagenet-mobilenetv1-025", "--set", f"quant.act_bits={{{stem}: 8}}"]
    )
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == f"mobilenet_v1_025: W4A4, {stem} 8-bit (activations at weight-layer inputs)"
    assert "activations: 27 tensor(s) quantized (26 at 4-bit, 1 at 8-bit;" in lines[1]
    assert f"  stage1.1.0 (W4): input {stem} (8-bit, signed, per channel ×8)" in lines
    typo = runner.invoke(
        app, ["show-quant", "--weights", "imagenet-mobilenetv1-025", "--set", "quant.act_bits={stem: 8}"]
    )
    assert typo.exit_code == 2 and len(typo.output.strip().splitlines()) == 1, typo.output
    assert (
        f"quant.act_bits names stem, which MobileNetV1 does not have; its activation quantizers: {stem}, "
        in typo.output
    )


def test_activation_bits_with_nothing_to_quantize_are_one_line_exit_2(tmp_path: Path) -> None:
    spec = ["model.image_size=32", "model.mean=0.5,0.5,0.5", "model.std=0.25,0.25,0.25"]
    sets = [arg for item in spec for arg in ("--set", item)]
    res = runner.invoke(app, ["show-quant", "--arch", "tests.odd_models:linear_only", *sets])
    assert res.exit_code == 2
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert "quant.a_bits=4 but no activation of Sequential can be quantized" in res.output
