"""The IntraQ supplementary studies, reproduced on the shared CIFAR-10 ResNet-20 (W4A4).

- ``lor``: LOR with horizontal flip and rotation (supplementary Table 1: L, L+F, L+R, L+R+F);
- ``data``: the amount of synthetic data (Table 2: five sizes spanning 20x; the number of
  distillation steps is the same for every size, as the reference's fixed 200 iterations
  per epoch keeps it);
- ``real``: real data vs IntraQ vs BNS+CE at the same budget (Table 3's "Real data" row);
- ``mdc_adi``: MDC vs ADI as the diversity term: accuracy and the intra-class distance
  statistic (supplementary Section 1 and its figure; the feature projection plot is in the
  run report, ``intraq-pipeline report RUN --compare RUN2``);
- ``split``: one synthesis budget (images x iterations) split between few images with many
  iterations and many images with few, for IntraQ's and BNS+CE synthesis (W4A4 and W3A3);
- ``methods``: the data-free methods side by side (Table 3): real data, GDFQ, Qimera,
  SQuant (alone, with its 8-bit last-layer input protocol, and as the start of IntraQ
  distillation) and IntraQ, at W4A4 on one recipe and budget.

``real`` and ``mdc_adi`` read the ablation's cells (``benchmarks/ablation.py``) of the same
budget, so they cost nothing extra. Examples::

    python -m benchmarks.studies lor --budget cpu --seeds 0 1
    python -m benchmarks.studies data --budget cpu --seeds 0
    python -m benchmarks.studies real mdc_adi --budget cpu
    python -m benchmarks.studies methods --budget cpu --seeds 0 1
    python -m benchmarks.studies split --budget cpu --seeds 0 1 --bits W4A4 W3A3 --recipes shipped
    python -m benchmarks.studies methods --budget tiny --rows squant gdfq qimera --recipes default  # check
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.ablation import ROWS as ABLATION_ROWS
from benchmarks.harness import BUDGETS, RECIPES, REPO, Bench, Row, fmt, parse_bits, provenance

ROTATION_DEGREES = 15

LOR_ROWS = {
    r.name: r
    for r in [
        Row("lor_L", "L (LOR crop only)", settings=("generate.method=intraq", "generate.lor_flip=false")),
        Row("lor_LF", "L+F (crop + horizontal flip; the reference code's LOR)", settings=("generate.method=intraq",)),
        Row(
            "lor_LR",
            f"L+R (crop + rotation ±{ROTATION_DEGREES}°)",
            settings=("generate.method=intraq", "generate.lor_flip=false", f"generate.lor_rotation={ROTATION_DEGREES}"),
        ),
        Row(
            "lor_LRF",
            f"L+R+F (crop + rotation ±{ROTATION_DEGREES}° + flip)",
            settings=("generate.method=intraq", f"generate.lor_rotation={ROTATION_DEGREES}"),
        ),
    ]
}


#: Table 3 of the supplementary (ResNet-18 on ImageNet, W4A4: real data 67.89, Qimera 63.84,
#: SQuant 66.14, IntraQ 66.47; SQuant with an 8-bit last-layer input), on the shared ResNet-20.
METHOD_ROWS = {
    r.name: r
    for r in [
        Row("real_distill", "real data (distillation on real images; upper bound)", "real"),
        Row("gdfq", "GDFQ (conditional generator, CE + BNS)", settings=("generate.method=gdfq",)),
        Row(
            "qimera",
            "Qimera (GDFQ generator + boundary-supporting samples + mapping layer)",
            settings=("generate.method=qimera",),
        ),
        Row(
            "squant",
            "SQuant (no image: E+K+C rounding, BN-based ranges; all layers 4-bit)",
            "datafree",
            settings=("quant.method=squant", "distill.epochs=0"),
        ),
        Row(
            "squant_l8",
            "SQuant with its protocol: last-layer input 8-bit",
            "datafree",
            settings=("quant.method=squant", "distill.epochs=0", "quant.last_input_bits=8"),
        ),
        Row(
            "squant_intraq",
            "SQuant start + distillation on IntraQ images",
            settings=("generate.method=intraq", "quant.method=squant"),
            data_row="intraq",
        ),
        Row("intraq", "IntraQ (BNS+SIL+MDC+LOR)", settings=("generate.method=intraq",)),
    ]
}
#: The seed's ordering claims of Table 3 (row that should be higher, row that should be lower).
METHOD_CLAIMS = (
    ("intraq", "qimera", "IntraQ > Qimera"),
    ("intraq", "squant_l8", "IntraQ > SQuant (SQuant with its 8-bit last-layer input)"),
    ("squant_l8", "qimera", "SQuant > Qimera"),
    ("real_distill", "intraq", "real data > IntraQ"),
)


def methods_table(bench: Bench, command: str) -> str:
    """Table 3: every method's final W4A4 top-1, what it used, and whether the seed's claims hold."""
    cells = bench.cells()
    lines = [
        "# Data-free methods at W4A4 (supplementary Table 3)",
        "",
        f"Command: `{command}`. Budget `{bench.budget}`: `{' '.join(BUDGETS[bench.budget])}`.",
        "",
        f"Top-1 (%) of the FINAL W4A4 model on the real CIFAR-10 test set ({len(bench.test[1]):,} images; 'held-out': "
        "the test images no row trained or calibrated on), mean ± std over seeds (n). SQuant rows use no image at "
        "all; SQuant's own protocol keeps the last layer's input at 8 bits (as its paper states), the other rows "
        "quantize every activation at 4 bits. GDFQ and Qimera train their generator first and distil on a fixed set "
        "of its samples (the papers train generator and student jointly; see intraq_core/synth/generator.py).",
        "",
        "| method | W4A4 top-1 | held-out | before distillation | images | data-free probe agreement | recipe | n |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for name, row in bench.rows.items():
        rs = cells.get((name, "W4A4"), [])
        if not rs:
            continue
        images = "0" if row.kind == "datafree" else str(load_budget_images(bench.budget))
        lines.append(
            f"| {row.label} | {fmt([r['top1_all'] for r in rs])} | {fmt([r['top1_heldout'] for r in rs])} | "
            f"{fmt([r['calibrated_top1_all'] for r in rs])} | {images} | "
            f"{fmt([r['probe_agreement'] for r in rs if r.get('probe_agreement') is not None], 1)} | "
            f"{', '.join(sorted({r.get('recipe', '–') for r in rs}))} | {len(rs)} |"
        )
    lines += ["", "Claims of the seed (ResNet-18/ImageNet) at this budget, on the means:", ""]
    for high, low, claim in METHOD_CLAIMS:
        a, b = cells.get((high, "W4A4"), []), cells.get((low, "W4A4"), [])
        if not a or not b:
            lines.append(f"- {claim}: not run yet.")
            continue
        ma = sum(r["top1_all"] for r in a) / len(a)
        mb = sum(r["top1_all"] for r in b) / len(b)
        verdict = "held" if ma > mb else "not held"
        lines.append(f"- {claim}: {verdict} ({ma:.2f} vs {mb:.2f}, n = {len(a)}, {len(b)}).")
    lines += ["", provenance(cells)]
    return "\n".join(lines) + "\n"


def load_budget_images(budget: str) -> int:
    return int(dict(s.split("=", 1) for s in BUDGETS[budget])["generate.num_images"])


def data_rows(budget: str) -> dict[str, Row]:
    """Five dataset sizes spanning 20x around the budget's size, equal distillation steps."""
    base = {k: v for k, v in (s.split("=", 1) for s in BUDGETS[budget])}
    n = int(base["generate.num_images"])
    sizes = [max(n // 5, 20), n // 2, n, 2 * n, 4 * n]
    batch = int(base["distill.batch_size"])
    epochs = int(base["distill.epochs"])
    # Steps of the budget's own size (90% of the images train, the rest is held out).
    steps = max(1, int(0.9 * n) // batch) if int(0.9 * n) >= batch else 1
    rows = {}
    for size in sizes:
        rows[f"data_{size}"] = Row(
            f"data_{size}",
            f"{size} images",
            settings=(
                "generate.method=intraq",
                f"generate.num_images={size}",
                f"distill.iterations_per_epoch={steps}",
                f"distill.epochs={epochs}",
            ),
        )
    return rows


#: Image counts of the splits of one synthesis budget (the CPU budget's 1,280 x 150 = 192,000
#: image-iterations): 1,280 x 150, 640 x 300, 256 x 750, 128 x 1,500.
SPLIT_IMAGES = (1280, 640, 256, 128)
SPLIT_METHODS = {"intraq": "IntraQ (BNS+SIL+MDC+LOR)", "bns_ce": "BNS+CE"}


def split_rows(budget: str) -> dict[str, Row]:
    """The budget split: for each synthesis method, the same image x iteration budget spent as
    few images with many iterations or many images with few; every split gets the same number
    of distillation steps (those of the budget's own size)."""
    base = {k: v for k, v in (s.split("=", 1) for s in BUDGETS[budget])}
    n, iters = int(base["generate.num_images"]), int(base["generate.iterations"])
    batch = int(base["distill.batch_size"])
    steps = max(1, int(0.9 * n) // batch)
    total = n * iters
    rows = {}
    for method, label in SPLIT_METHODS.items():
        for images in SPLIT_IMAGES:
            images = max(20, images * n // SPLIT_IMAGES[0])
            its = max(1, total // images)
            rows[f"split_{method}_{images}x{its}"] = Row(
                f"split_{method}_{images}x{its}",
                f"{label}, {images} images x {its} iterations",
                settings=(
                    f"generate.method={method}",
                    f"generate.num_images={images}",
                    f"generate.batch_size={min(images, int(base['generate.batch_size']))}",
                    f"generate.iterations={its}",
                    f"distill.iterations_per_epoch={steps}",
                ),
            )
    return rows


def split_table(bench: Bench, command: str) -> str:
    """The budget split: data-free signals beside the test set, per method, split and bits."""
    cells = bench.cells()
    lines = [
        "# One synthesis budget, split between images and iterations",
        "",
        f"Command: `{command}`. Budget `{bench.budget}`: `{' '.join(BUDGETS[bench.budget])}`; each row overrides the "
        "number of images and iterations so that images x iterations stays constant.",
        "",
        "Top-1 (%) of the kept model on the real CIFAR-10 test set (10,000 images), mean ± std over seeds (n), beside "
        "the data-free signals that choose without the test set: agreement with the teacher on the shared probe set "
        "(BN-statistics-only images no row trains on) and on the row's own held-out synthetic images.",
        "",
        "| synthesis | bits | top-1 | before distillation | probe agreement | held-out agreement | n |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in bench.rows.items():
        for b in bench.bits:
            rs = cells.get((name, f"W{b[0]}A{b[1]}"), [])
            if not rs:
                continue
            agree = [r["holdout_agreement_final"]["agreement"] for r in rs if r.get("holdout_agreement_final")]
            probe = [r["probe_agreement"] for r in rs if r.get("probe_agreement") is not None]
            lines.append(
                f"| {row.label} | W{b[0]}A{b[1]} | {fmt([r['top1_all'] for r in rs])} | "
                f"{fmt([r['calibrated_top1_all'] for r in rs])} | {fmt(probe, 1)} | {fmt(agree)} | {len(rs)} |"
            )
    lines += ["", provenance(cells)]
    return "\n".join(lines) + "\n"


def simple_table(bench: Bench, title: str, note: str, command: str) -> str:
    cells = bench.cells()
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`. Budget `{bench.budget}`: `{' '.join(BUDGETS[bench.budget])}`.",
        "",
        note,
        "",
        "Top-1 (%) of the FINAL W4A4 model on the real CIFAR-10 test set (10,000 images), mean ± std over seeds (n).",
        "",
        "| setting | W4A4 top-1 | before distillation | held-out synthetic agreement | recipes chosen | n |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for name, row in bench.rows.items():
        rs = cells.get((name, "W4A4"), [])
        if not rs:
            continue
        agree = [r["holdout_agreement_final"]["agreement"] for r in rs if r.get("holdout_agreement_final")]
        lines.append(
            f"| {row.label} | {fmt([r['top1_all'] for r in rs])} | "
            f"{fmt([r['calibrated_top1_all'] for r in rs])} | {fmt(agree)} | "
            f"{', '.join(sorted({r.get('recipe', '–') for r in rs}))} | {len(rs)} |"
        )
    lines += ["", provenance(cells)]
    return "\n".join(lines) + "\n"


def real_table(ablation: Bench) -> str:
    cells = ablation.cells()
    lines = [
        "# Real data vs IntraQ vs BNS+CE at the same budget",
        "",
        f"From the ablation cells of budget `{ablation.budget}` (`python -m benchmarks.ablation --budget "
        f"{ablation.budget}`), rebuilt by `python -m benchmarks.studies real --budget {ablation.budget}`.",
        f"Budget (run-config overrides): `{' '.join(BUDGETS[ablation.budget])}`.",
        "Top-1 (%) of the FINAL model on the real CIFAR-10 test set. Real 'training' images come from the CIFAR-10 "
        "test set (no training set is shared), so the fair column is 'held-out': test images that no row trained or "
        "calibrated on.",
        "",
        "| data | bits | top-1 all | top-1 held-out | n |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name in ("real_distill", "intraq", "bns_ce"):
        for bits in ("W4A4", "W3A3"):
            rs = cells.get((name, bits), [])
            if rs:
                lines.append(
                    f"| {ABLATION_ROWS[name].label} | {bits} | {fmt([r['top1_all'] for r in rs])} | "
                    f"{fmt([r['top1_heldout'] for r in rs])} | {len(rs)} |"
                )
    lines += ["", provenance(cells)]
    return "\n".join(lines) + "\n"


def mdc_adi_table(ablation: Bench) -> str:
    cells = ablation.cells()
    lines = [
        "# MDC vs ADI as the diversity term",
        "",
        f"From the ablation cells of budget `{ablation.budget}`; rebuilt by `python -m benchmarks.studies mdc_adi "
        f"--budget {ablation.budget}`. Both rows are IntraQ (BNS + SIL + LOR) with the diversity term swapped.",
        f"Budget (run-config overrides): `{' '.join(BUDGETS[ablation.budget])}`. Top-1 (%) of the FINAL model on the "
        "real CIFAR-10 test set.",
        "Diversity: cosine distance of teacher penultimate features, pairwise within a class and to the class mean, "
        "for the synthetic set and for real held-out test images (the paper reports pairwise real 0.44, IntraQ 0.42, "
        "ZeroQ-style 0.17 with its own feature extraction; compare rows within this table).",
        "",
        "| diversity term | bits | top-1 | pairwise dist. synthetic | pairwise dist. real | "
        "dist. to centre synthetic | dist. to centre real | MDC hinge at end (lower, upper) | n |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for name, label in (("intraq", "MDC"), ("intraq_adi", "ADI"), ("bns_ce", "none (BNS+CE)")):
        for bits in ("W4A4", "W3A3"):
            rs = cells.get((name, bits), [])
            if not rs:
                continue
            ds = [r["dataset"] for r in rs]
            lows = [d["mdc_final_lower"] for d in ds if d.get("mdc_final_lower") is not None]
            ups = [d["mdc_final_upper"] for d in ds if d.get("mdc_final_upper") is not None]
            hinge = f"{sum(lows) / len(lows):.4f}, {sum(ups) / len(ups):.4f}" if lows else "–"
            lines.append(
                f"| {label} | {bits} | {fmt([r['top1_all'] for r in rs])} | "
                f"{fmt([d['pairwise_distance_synthetic'] for d in ds], 3)} | "
                f"{fmt([d['pairwise_distance_real'] for d in ds], 3)} | "
                f"{fmt([d['centre_distance_synthetic'] for d in ds], 3)} | "
                f"{fmt([d['centre_distance_real'] for d in ds], 3)} | "
                f"{hinge} | {len(rs)} |"
            )
    missing = [
        label
        for name, label in (("intraq", "MDC"), ("intraq_adi", "ADI"))
        if not any(cells.get((name, b)) for b in ("W4A4", "W3A3"))
    ]
    if missing:
        lines += [
            "",
            f"Not run yet at this budget: {', '.join(missing)} (see the ablation's notes); the comparison "
            "is incomplete until both rows exist.",
        ]
    lines += ["", provenance(cells)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description="IntraQ supplementary studies on CIFAR-10 ResNet-20")
    ap.add_argument("studies", nargs="+", choices=["lor", "data", "real", "mdc_adi", "methods", "split"])
    ap.add_argument("--rows", nargs="*", default=None, help="methods study: only these rows (default: all)")
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--workdir", default=str(REPO / "runs" / "benchmarks"))
    ap.add_argument("--results-root", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--table", action="store_true", help="only rebuild the tables")
    ap.add_argument("--bits", nargs="*", default=["W4A4"], help="split study: bit widths (default W4A4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.results_root)
    bits = parse_bits(["W4A4"])
    for study in args.studies:
        if study == "methods":
            results = root / f"study-methods-{args.budget}"
            bench = Bench(
                args.budget, METHOD_ROWS, Path(args.workdir), results, args.seeds, bits, args.force, args.recipes
            )
            if not args.table:
                bench.run(args.rows or list(METHOD_ROWS))
            seeds = " ".join(map(str, args.seeds))
            text = methods_table(bench, f"python -m benchmarks.studies methods --budget {args.budget} --seeds {seeds}")
        elif study == "split":
            rows = split_rows(args.budget)
            results = root / f"study-split-{args.budget}"
            bench = Bench(
                args.budget,
                rows,
                Path(args.workdir),
                results,
                args.seeds,
                parse_bits(args.bits),
                args.force,
                args.recipes,
            )
            if not args.table:
                bench.run(args.rows or list(rows))
            seeds = " ".join(map(str, args.seeds))
            bits_text = " ".join(args.bits)
            text = split_table(
                bench, f"python -m benchmarks.studies split --budget {args.budget} --seeds {seeds} --bits {bits_text}"
            )
        elif study in ("lor", "data"):
            rows = LOR_ROWS if study == "lor" else data_rows(args.budget)
            results = root / f"study-{study}-{args.budget}"
            bench = Bench(args.budget, rows, Path(args.workdir), results, args.seeds, bits, args.force, args.recipes)
            if not args.table:
                bench.run(list(rows))
            if study == "lor":
                title = "LOR with flip and rotation (supplementary Table 1)"
                note = (
                    "IntraQ at W4A4 with LOR variants. 'L+F' is what the reference code calls LOR (its "
                    "RandomResizedCrop is followed by RandomHorizontalFlip); 'L' drops the flip. Rotation angles are "
                    f"uniform in ±{ROTATION_DEGREES}° (the paper does not state its range)."
                )
            else:
                title = "Amount of synthetic data (supplementary Table 2)"
                note = (
                    "IntraQ at W4A4 with five dataset sizes (20x span); every size gets the same number of "
                    "distillation steps (fixed iterations per epoch), as the reference's 200 iterations per epoch do."
                )
            command = (
                f"python -m benchmarks.studies {study} --budget {args.budget} --seeds {' '.join(map(str, args.seeds))}"
            )
            text = simple_table(bench, title, note, command)
        else:
            ablation = Bench(args.budget, ABLATION_ROWS, Path(args.workdir), root / f"ablation-{args.budget}", [], bits)
            text = real_table(ablation) if study == "real" else mdc_adi_table(ablation)
            results = root / f"study-{study}-{args.budget}"
        results.parent.mkdir(parents=True, exist_ok=True)
        (results.parent / f"{results.name}.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
