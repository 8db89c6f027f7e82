"""What a run is, in the words of the comparison tables: its method, its protocol and its table.

:func:`run_method` names the method of a run config (the ``method`` of ``metrics.json``);
:func:`describe` spells out its protocol (how weights are rounded, where activation ranges come
from, which layers keep more bits, what data and distillation it used, what is reported);
:func:`comparison_tables` lists the benchmark tables (``benchmarks/results/``) that have a row for
it, the IntraQ supplementary's Table 1-3 and Fig. 1 among them. ``intraq-pipeline report`` shows
all three for every run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig

__all__ = [
    "METHODS",
    "RESULTS_DIR",
    "ComparisonTable",
    "comparison_tables",
    "describe",
    "generation_budget",
    "run_method",
]

#: Where the committed benchmark tables live in a source checkout.
RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"

#: Method key → (display name, one-line description).
METHODS: dict[str, tuple[str, str]] = {
    "intraq": ("IntraQ", "pixels optimized against the teacher: BNS + SIL + MDC + LOR (Zhong et al., CVPR 2022)"),
    "bns_ce": ("BNS+CE", "pixels optimized with BN statistics and hard-label CE (the ZeroQ/GDFQ-style loss)"),
    "adi": ("IntraQ with ADI", "IntraQ with MDC replaced by DeepInversion's teacher-student competition term"),
    "gaussian": ("Gaussian noise", "N(0, 1) images, no optimization (a floor)"),
    "custom": ("custom synthesis", "pixel optimization with the loss weights given in the config"),
    "gdfq": ("GDFQ", "a conditional generator trained against the teacher with CE + BNS (Xu et al., ECCV 2020)"),
    "qimera": (
        "Qimera",
        "GDFQ's generator with boundary-supporting samples (superposed class embeddings, soft targets) and a "
        "disentanglement mapping layer (Choi et al., NeurIPS 2021)",
    ),
    "squant": (
        "SQuant",
        "data-free rounding (element/kernel/channel flips, CASE) and BN-based activation ranges, no image "
        "(Guo et al., ICLR 2022)",
    ),
    "real": ("real data", "real labelled images instead of synthetic ones (the upper bound)"),
}


def run_method(cfg: RunConfig) -> str:
    """The run's method key: ``squant`` alone, ``squant+<generation method>`` when SQuant starts a
    distillation on synthetic images, else the generation method."""
    if cfg.quant.method == "squant":
        return "squant" if not cfg.needs_synthetic_data() else f"squant+{cfg.generate.method}"
    return cfg.generate.method


def method_name(key: str) -> str:
    """Display name of a method key (``squant+intraq`` → ``SQuant + IntraQ distillation``)."""
    if key.startswith("squant+"):
        return f"SQuant + {METHODS.get(key[7:], (key[7:], ''))[0]} distillation"
    return METHODS.get(key, (key, ""))[0]


def generation_budget(cfg: RunConfig) -> dict[str, Any]:
    """Images and optimization steps of the data the run uses (zeros when it uses none)."""
    g = cfg.generate
    if not cfg.needs_synthetic_data():
        return {"num_images": 0, "gen_iterations": 0, "generator_iterations": 0}
    if g.uses_generator:
        return {"num_images": g.num_images, "gen_iterations": 0, "generator_iterations": g.generator_iterations}
    return {"num_images": g.num_images, "gen_iterations": g.iterations if g.optimizes else 0, "generator_iterations": 0}


def describe(cfg: RunConfig) -> dict[str, Any]:
    """The run's method and protocol: ``{"method", "name", "summary", "protocol": [lines]}``."""
    key = run_method(cfg)
    q, g, d = cfg.quant, cfg.generate, cfg.distill
    lines: list[str] = []
    grid = "symmetric ±max|w|" if q.weight_symmetric else "asymmetric min/max"
    if q.method == "squant":
        stages = "+".join(s for s, on in (("E", True), ("K", q.squant_kernel), ("C", q.squant_channel)) if on)
        rounding = f"SQuant-{stages} flips (CASE)"
    else:
        rounding = "round to nearest"
    lines.append(f"Weights: {q.w_bits}-bit per output channel, {grid} grid, {rounding}.")
    if q.method == "squant":
        sigma = (
            f"s = {q.squant_act_sigma}" if q.squant_act_sigma is not None else "s = 12 at ≤4 bits, 14 at 5-6, 25 at 7-8"
        )
        ranges = (
            f"SQuant's BN-based rule on {q.squant_act_images} BN-statistics samples ([0, s·σ₊], {sigma}, "
            "capped at the sample maximum below 6 bits); no image"
        )
    else:
        ranges = f"EMA of min/max over {q.calibration_batches} batches of {d.batch_size} synthetic images, then frozen"
    lines.append(f"Activations: {q.a_bits}-bit per tensor after every ReLU; ranges: {ranges}.")
    first = q.first_layer_bits if q.first_layer_bits is not None else q.w_bits
    last = q.last_layer_bits if q.last_layer_bits is not None else q.w_bits
    last_in = q.last_input_bits if q.last_input_bits is not None else q.a_bits
    lines.append(
        f"Layer exceptions: first-layer weights {first} bits, last-layer weights {last} bits, last-layer input "
        f"{last_in} bits" + (" (SQuant's protocol)" if q.last_input_bits == 8 else "") + "; network input "
        f"{'quantized at ' + str(q.input_bits) + ' bits' if q.quantize_input else 'not quantized'}; residual "
        f"additions {'quantized' if q.quantize_residual else 'not quantized'}."
    )
    budget = generation_budget(cfg)
    if not cfg.needs_synthetic_data():
        lines.append("Data: none (no image is generated or read).")
    elif cfg.dataset is not None:
        lines.append(f"Data: the synthetic dataset of {cfg.dataset}.")
    elif g.uses_generator:
        extra = ""
        if g.method == "qimera":
            extra = (
                f"; {g.qimera_mix_prob:.0%} boundary-supporting batches/images of {g.qimera_mix_classes} classes, "
                f"mapping layer {'on' if g.qimera_mapping else 'off'}"
            )
        lines.append(
            f"Data: {g.num_images} images sampled from a conditional generator trained for "
            f"{g.generator_iterations} iterations of {g.generator_batch_size} images (CE + "
            f"{g.weights()['bns']:g}·BNS{extra}); generator then frozen."
        )
    elif g.optimizes:
        lines.append(
            f"Data: {g.num_images} synthetic images, {budget['gen_iterations']} Adam iterations per batch of "
            f"{min(g.batch_size, g.num_images)}; loss weights {g.weights()}, LOR {'on' if g.lor_enabled() else 'off'}"
            + (f" (flip {'on' if g.lor_flip else 'off'}, rotation ±{g.lor_rotation:g}°)" if g.lor_enabled() else "")
            + (", pixels clipped to the image range" if g.clip_pixels else "")
            + "."
        )
    else:
        lines.append(f"Data: {g.num_images} Gaussian-noise images.")
    if d.epochs == 0:
        lines.append("Distillation: none (the quantized student is the final model).")
    else:
        lines.append(
            f"Distillation: {d.epochs} epochs at batch {d.batch_size}, KD α {d.kd_alpha:g} T {d.kd_temperature:g} + "
            f"CE {d.ce_weight:g}, lr {d.lr:g} {d.schedule}, BN {d.bn}."
        )
    limit = f"the first {cfg.eval.limit}" if cfg.eval.limit else "all"
    lines.append(f"Reported: top-1 of the FINAL model on {limit} images of {cfg.eval.data}; seed {cfg.seed}.")
    summary = " + ".join(
        METHODS.get(part, (part, part))[1] if i == 0 else f"distillation on {METHODS.get(part, (part, part))[0]} images"
        for i, part in enumerate(key.split("+"))
    )
    return {"method": key, "name": method_name(key), "summary": summary[:1].upper() + summary[1:], "protocol": lines}


@dataclass(frozen=True)
class ComparisonTable:
    """A benchmark table a run can be a row of."""

    key: str
    title: str
    stem: str  # results file: benchmarks/results/<stem>-<budget>.md
    command: str
    row: Callable[[RunConfig], str | None]  # the run's row label, None if the table has none for it

    def results(self, budget: str = "cpu") -> Path:
        return RESULTS_DIR / f"{self.stem}-{budget}.md"


def _pixel_method(cfg: RunConfig) -> bool:
    return cfg.quant.method == "minmax" and not cfg.generate.uses_generator and cfg.generate.method != "gaussian"


def _methods_row(cfg: RunConfig) -> str | None:
    key = run_method(cfg)
    if key in ("squant", "qimera", "gdfq", "intraq", "bns_ce") or key.startswith("squant+"):
        return method_name(key)
    return None


def _lor_row(cfg: RunConfig) -> str | None:
    g = cfg.generate
    if cfg.quant.method != "minmax" or g.method != "intraq" or not g.lor_enabled():
        return None
    return "L" + ("+R" if g.lor_rotation > 0 else "") + ("+F" if g.lor_flip else "")


def _data_row(cfg: RunConfig) -> str | None:
    g = cfg.generate
    return f"{g.num_images} images" if cfg.quant.method == "minmax" and g.method == "intraq" else None


def _mdc_adi_row(cfg: RunConfig) -> str | None:
    if cfg.quant.method != "minmax":
        return None
    return {"intraq": "MDC", "adi": "ADI", "bns_ce": "none (BNS+CE)"}.get(cfg.generate.method)


def _ablation_row(cfg: RunConfig) -> str | None:
    return method_name(cfg.generate.method) if _pixel_method(cfg) or cfg.generate.method == "gaussian" else None


TABLES: tuple[ComparisonTable, ...] = (
    ComparisonTable(
        "methods",
        "Data-free methods at W4A4: real data, GDFQ, Qimera, SQuant, IntraQ (IntraQ supplementary Table 3)",
        "study-methods",
        "python -m benchmarks.studies methods --budget cpu --seeds 0 1",
        _methods_row,
    ),
    ComparisonTable(
        "lor",
        "LOR with flip and rotation (IntraQ supplementary Table 1)",
        "study-lor",
        "python -m benchmarks.studies lor --budget cpu --seeds 0 1",
        _lor_row,
    ),
    ComparisonTable(
        "data",
        "Amount of synthetic data (IntraQ supplementary Table 2)",
        "study-data",
        "python -m benchmarks.studies data --budget cpu --seeds 0 1",
        _data_row,
    ),
    ComparisonTable(
        "mdc_adi",
        "MDC vs ADI as the diversity term (IntraQ supplementary Section 1, Fig. 1)",
        "study-mdc_adi",
        "python -m benchmarks.studies mdc_adi --budget cpu",
        _mdc_adi_row,
    ),
    ComparisonTable(
        "ablation",
        "Ablation of the IntraQ components",
        "ablation",
        "python -m benchmarks.ablation --budget cpu --seeds 0 1",
        _ablation_row,
    ),
)


def comparison_tables(cfg: RunConfig) -> list[tuple[ComparisonTable, str]]:
    """The tables that have a row for this run's method, with the run's row label in each."""
    out = []
    for table in TABLES:
        label = table.row(cfg)
        if label is not None:
            out.append((table, label))
    return out
