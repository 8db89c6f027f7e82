"""A run's method end to end: SQuant with no image (and as the start of distillation), the protocol
and comparison tables every run is described with, and the report of a run without images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from intraq_core.quant import act_quantizers, quantize, squant_, weight_quantized_layers
from intraq_core.seeding import PURPOSE_CALIBRATION, derive_seed
from intraq_core.student import load_student
from pipeline.cli.app import app
from pipeline.config import load_run_config
from pipeline.context import RunContext
from pipeline.report.methods import comparison_tables, describe, run_method
from pipeline.report.render import build_report, parse_markdown_table

SQUANT = ["quant.method=squant", "distill.epochs=0", "eval.limit=200", "device=cpu"]


@pytest.fixture(scope="module")
def squant_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """``intraq-pipeline run`` of SQuant alone (default executor: ray) on the smoke config."""
    url = tmp_path_factory.mktemp("squant") / "run"
    # generate.num_images=1: a plan that SQuant alone never generates.
    args = ["run", "-c", "smoke", "-o", str(url), "--set", "generate.num_images=1"]
    for item in SQUANT:
        args += ["--set", item]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "(no distillation)" in result.output
    assert "Ray dashboard" not in result.output  # nothing for Ray to do: it is not started
    return url


def test_squant_alone_generates_nothing_and_is_the_final_model(squant_run: Path) -> None:
    assert not (squant_run / "data").exists()
    metrics = json.loads((squant_run / "metrics.json").read_text())
    assert metrics["method"] == "squant"
    assert metrics["num_images"] == 0 and metrics["dataset_shards"] == 0 and metrics["epochs"] == 0
    assert metrics["ptq_top1"] == metrics["quant_top1"]
    assert metrics["quant_top1"] > 80.0  # W4A4 without a single image (FP: ~91.5 on these 200)
    student, _, quant_cfg, extra = load_student(squant_run / "student.pt")
    assert quant_cfg.method == "squant" and extra["stage"] == "final"
    # The checkpoint holds SQuant's hardened weights and its frozen BN-based ranges: rebuilding them
    # from the teacher with the run's seed gives the same model.
    cfg = load_run_config(squant_run / "run.yaml")
    ctx = RunContext.create(cfg)
    again = quantize(ctx.teacher(), cfg.quant).eval()
    squant_(
        again,
        cfg.quant,
        image_shape=ctx.image_shape,
        normalization=ctx.normalization,
        seed=derive_seed(cfg.seed, PURPOSE_CALIBRATION),
    )
    for name, layer in weight_quantized_layers(student).items():
        assert torch.equal(layer.weight_quant(layer.weight), layer.weight), name
        assert torch.equal(layer.weight, weight_quantized_layers(again)[name].weight), name
    theirs = act_quantizers(again)
    for name, quant in act_quantizers(student).items():
        assert quant.mode == "frozen"
        torch.testing.assert_close(torch.stack(quant.range()), torch.stack(theirs[name].range()))


def test_squant_starts_a_distillation_with_its_own_ranges(tmp_path: Path) -> None:
    from pipeline.run.job import run_pipeline

    cfg = load_run_config(
        "smoke",
        [
            "executor=local",
            "device=cpu",
            "quant.method=squant",
            "generate.num_images=20",
            "generate.batch_size=20",
            "generate.iterations=2",
            "distill.epochs=1",
            "distill.batch_size=8",
            "distill.select=final",  # one epoch cannot be ranked; this test is about the ranges
            "eval.limit=100",
            f"storage.url={tmp_path / 'run'}",
        ],
    )
    metrics = run_pipeline(cfg, progress=False)
    assert metrics["method"] == "squant+intraq" and metrics["num_images"] == 20
    calibrated, _, _, _ = load_student(tmp_path / "run" / "student_calibrated.pt")
    final, _, _, _ = load_student(tmp_path / "run" / "student.pt")
    # Calibration on the synthetic images did not replace SQuant's BN-based ranges.
    ctx = RunContext.create(cfg)
    ref = quantize(ctx.teacher(), cfg.quant).eval()
    report = squant_(
        ref,
        cfg.quant,
        image_shape=ctx.image_shape,
        normalization=ctx.normalization,
        seed=derive_seed(cfg.seed, PURPOSE_CALIBRATION),
    )
    for name, quant in act_quantizers(calibrated).items():
        lo, hi = report.act_ranges[name]
        torch.testing.assert_close(torch.stack(quant.range()), torch.tensor([lo, hi]), rtol=1e-6, atol=1e-6)
    # Distillation moved the hardened weights.
    moved = [
        not torch.equal(a.weight, b.weight)
        for a, b in zip(
            weight_quantized_layers(calibrated).values(), weight_quantized_layers(final).values(), strict=True
        )
    ]
    assert any(moved)


def test_every_method_is_described_with_its_protocol_and_tables() -> None:
    squant = load_run_config("smoke", [*SQUANT, "quant.last_input_bits=8"])
    info = describe(squant)
    text = "\n".join(info["protocol"])
    assert info["name"] == "SQuant" and run_method(squant) == "squant"
    assert "SQuant-E+K+C" in text and "last-layer input 8 bits (SQuant's protocol)" in text
    assert "Data: none" in text and "Distillation: none" in text
    assert [(t.key, row) for t, row in comparison_tables(squant)] == [("methods", "SQuant")]

    qimera = load_run_config("smoke", ["generate.method=qimera"])
    text = "\n".join(describe(qimera)["protocol"])
    assert "conditional generator trained for 20 iterations" in text and "boundary-supporting" in text
    assert [(t.key, row) for t, row in comparison_tables(qimera)] == [("methods", "Qimera")]

    intraq = load_run_config("smoke", [])
    rows = {t.key: row for t, row in comparison_tables(intraq)}
    assert rows == {"methods": "IntraQ", "lor": "L+F", "data": "64 images", "mdc_adi": "MDC", "ablation": "IntraQ"}
    rotated = load_run_config("smoke", ["generate.lor_flip=false", "generate.lor_rotation=15"])
    assert {t.key: row for t, row in comparison_tables(rotated)}["lor"] == "L+R"
    adi = load_run_config("smoke", ["generate.method=adi"])
    assert {t.key: row for t, row in comparison_tables(adi)} == {"mdc_adi": "ADI", "ablation": "IntraQ with ADI"}


def test_report_of_a_run_without_images_shows_method_protocol_and_table(
    squant_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.report.methods as methods

    results = tmp_path / "results"
    results.mkdir()
    (results / "study-methods-cpu.md").write_text(
        "# Data-free methods\n\nBudget (run-config overrides): `x=1`.\n\n"
        "| method | W4A4 top-1 | n |\n| --- | ---: | ---: |\n| SQuant | 88.31 | 1 |\n| IntraQ | 87.50 | 1 |\n"
    )
    monkeypatch.setattr(methods, "RESULTS_DIR", results)
    result = build_report(str(squant_run), real_images=0, tsne=False)
    md = (squant_run / "report" / "report.md").read_text()
    assert "## Method and protocol" in md and "SQuant-E+K+C" in md
    assert "## Comparison: Data-free methods at W4A4" in md
    assert "is the row 'SQuant' of this table" in md and "| SQuant | 88.31 | 1 |" in md
    assert "no synthetic images (the method uses none)" in md
    assert not list((squant_run / "report").glob("samples-*.png"))
    assert result.stats["methods"][0]["method"] == "squant"
    assert result.stats["accuracy"][0]["method"] == "squant"
    assert result.stats["accuracy"][0]["method_name"] == "SQuant"


def test_parse_markdown_table() -> None:
    text = "intro\n\n| a | b |\n| --- | ---: |\n| 1 | x |\n| 2 | y |\n\nafter | not a row"
    columns, rows = parse_markdown_table(text)
    assert [title for _, title in columns] == ["a", "b"]
    assert rows == [{"c0": "1", "c1": "x"}, {"c0": "2", "c1": "y"}]
    assert parse_markdown_table("no table here") is None
