"""The IntraQ supplementary studies, reproduced on the shared CIFAR-10 ResNet-20 (W4A4).

- ``lor``: LOR with horizontal flip and rotation (supplementary Table 1: L, L+F, L+R, L+R+F);
- ``data``: the amount of synthetic data (Table 2: five sizes spanning 20x; the number of
  distillation steps is the same for every size, as the reference's fixed 200 iterations
  per epoch keeps it);
- ``real``: real data vs IntraQ vs BNS+CE at the same budget (Table 3's "Real data" row);
- ``mdc_adi``: MDC vs ADI as the diversity term: accuracy and the intra-class distance
  statistic (supplementary Section 1 and its figure: teacher features of both methods' images and
  of real test images, ``study-mdc_adi-<budget>.png``);
- ``split``: one synthesis budget (images x iterations) split between few images with many
  iterations and many images with few, for IntraQ's and BNS+CE synthesis (W4A4 and W3A3);
- ``methods``: the data-free methods side by side (Table 3): real data, GDFQ, Qimera,
  SQuant (alone, with its 8-bit last-layer input protocol, and as the start of IntraQ
  distillation), IntraQ and BNS+CE, at W4A4 on one recipe and budget, with the drop from FP.

``real`` and ``mdc_adi`` read the ablation's cells (``benchmarks/ablation.py``) of the same
budget, so they cost nothing extra; ``mdc_adi`` also draws the section's feature figure. Every
table judges the source document's claims on its cells (:func:`verdict`: held, not held, or not
separated by the seed spread). Before a study runs, the cells that another study already ran
with the same resolved config are taken in (``benchmarks/same_runs.py``; ``--link`` does only
that, for a worktree running at ``--at COMMIT``); ``split --cross`` adds the cross held-out
signal (``benchmarks/crossprobe.py``) and the table states the data-free choice of the shipped
split (:func:`split_choice`). ``--teacher resnet32`` runs a study on the shared ResNet-32.
Examples::

    python -m benchmarks.studies lor --budget cpu --seeds 0 1
    python -m benchmarks.studies data --budget cpu --seeds 0
    python -m benchmarks.studies real mdc_adi --budget cpu
    python -m benchmarks.studies methods --budget cpu --seeds 0 1
    python -m benchmarks.studies split --budget cpu --seeds 0 1 --bits W4A4 W3A3 --recipes shipped
    python -m benchmarks.studies methods --budget tiny --rows squant gdfq qimera --recipes default  # check
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from benchmarks.ablation import ROWS as ABLATION_ROWS
from benchmarks.claims import CLAIMS_HEADER, verdict
from benchmarks.crossprobe import write_signal
from benchmarks.harness import (
    BUDGETS,
    KEPT_MODEL,
    RECIPES,
    REPO,
    Bench,
    Row,
    dataset_features,
    fmt,
    git_commit,
    parse_bits,
    provenance,
    real_features,
    same_run_notes,
)
from benchmarks.same_runs import link_same_datasets, link_same_runs
from benchmarks.split_study import split_rows, split_table

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
        Row("bns_ce", "BNS+CE (the shipped configs' synthesis)", settings=("generate.method=bns_ce",)),
    ]
}
#: The seed's ordering claims of Table 3 (row that should be higher, row that should be lower).
METHOD_CLAIMS = (
    ("intraq", "qimera", "IntraQ > Qimera"),
    ("intraq", "squant_l8", "IntraQ > SQuant (SQuant with its 8-bit last-layer input)"),
    ("squant_l8", "qimera", "SQuant > Qimera"),
    ("real_distill", "intraq", "real data > IntraQ"),
    ("intraq", "bns_ce", "IntraQ's synthesis > BNS+CE synthesis (the main paper's ablation)"),
)
#: Table 1: "no increase from flip and rotation" over LOR alone (variant, L, claim).
LOR_CLAIMS = tuple(
    (name, "lor_L", f"{label} does not beat L", False)
    for name, label in (("lor_LF", "L+F"), ("lor_LR", "L+R"), ("lor_LRF", "L+R+F"))
)


def methods_table(bench: Bench, command: str) -> str:
    """Table 3: every method's kept W4A4 top-1 and its drop from FP, what it used, and whether the
    seed's claims hold."""
    cells = bench.cells()
    fp = bench.accuracy(bench.teacher())["top1_all"]
    lines = [
        "# Data-free methods at W4A4 (supplementary Table 3)",
        "",
        f"Command: `{command}`. Budget `{bench.budget}`: `{' '.join(BUDGETS[bench.budget])}`.",
        "",
        f"Top-1 (%) of the kept W4A4 model (the final one or the earlier epoch the data-free guard kept; never a "
        f"test-set choice) on the real CIFAR-10 test set ({len(bench.test[1]):,} images; 'held-out': the test images "
        f"no row trained or calibrated on), mean ± std over seeds (n); the teacher's FP top-1 is {fp:.2f}. 'Before "
        "distillation' is the start the distillation receives: for the synthetic and real rows of the shipped recipe, "
        "block-reconstruction PTQ alone on that row's images. SQuant rows use no image at all; SQuant's own protocol "
        "keeps the last layer's input at 8 bits (as its paper states), the other rows quantize every activation at 4 "
        "bits. GDFQ and Qimera train their generator first and distil on a fixed set of its samples (the papers train "
        "generator and student jointly; see intraq_core/synth/generator.py).",
        "",
        "| method | W4A4 top-1 | drop from FP | held-out | before distillation | images | data-free probe agreement | "
        "recipe | n |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for name, row in bench.rows.items():
        rs = cells.get((name, "W4A4"), [])
        if not rs:
            continue
        images = "0" if row.kind == "datafree" else str(load_budget_images(bench.budget))
        lines.append(
            f"| {row.label} | {fmt([r['top1_all'] for r in rs])} | {fmt([fp - r['top1_all'] for r in rs])} | "
            f"{fmt([r['top1_heldout'] for r in rs])} | {fmt([r['calibrated_top1_all'] for r in rs])} | {images} | "
            f"{fmt([r['probe_agreement'] for r in rs if r.get('probe_agreement') is not None], 1)} | "
            f"{', '.join(sorted({r.get('recipe', '–') for r in rs}))} | {len(rs)} |"
        )
    lines += ["", CLAIMS_HEADER, ""]
    for high, low, claim in METHOD_CLAIMS:
        lines.append(
            verdict(
                [r["top1_all"] for r in cells.get((high, "W4A4"), [])],
                [r["top1_all"] for r in cells.get((low, "W4A4"), [])],
                claim,
            )
        )
    lines += [*same_run_notes(cells), "", provenance(cells)]
    return "\n".join(lines) + "\n"


def load_budget_images(budget: str) -> int:
    return int(dict(s.split("=", 1) for s in BUDGETS[budget])["generate.num_images"])


def data_rows(budget: str) -> dict[str, Row]:
    """Five dataset sizes spanning 20x around the budget's size, equal distillation steps."""
    base = {k: v for k, v in (s.split("=", 1) for s in BUDGETS[budget])}
    n = int(base["generate.num_images"])
    sizes = [max(n // 5, 20), n // 2, n, 2 * n, 4 * n]
    batch = int(base["distill.batch_size"])
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
            ),
        )
    return rows


def simple_table(
    bench: Bench,
    title: str,
    note: str,
    command: str,
    claims: tuple[tuple[str, str, str, bool], ...] = (),
) -> str:
    """A W4A4 table of one study with the source document's ``claims`` (high row, low row, text,
    strict: see :func:`verdict`) judged on it."""
    cells = bench.cells()
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`. Budget `{bench.budget}`: `{' '.join(BUDGETS[bench.budget])}`.",
        "",
        note,
        "",
        "Top-1 (%) of the kept W4A4 model (the final one or the earlier epoch the data-free guard kept; never a "
        "test-set choice) on the real CIFAR-10 test set (10,000 images), mean ± std over seeds (n).",
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
    if claims:
        lines += ["", CLAIMS_HEADER, ""]
        for high, low, claim, strict in claims:
            lines.append(
                verdict(
                    [r["top1_all"] for r in cells.get((high, "W4A4"), [])],
                    [r["top1_all"] for r in cells.get((low, "W4A4"), [])],
                    claim,
                    strict=strict,
                )
            )
    lines += [*same_run_notes(cells), "", provenance(cells)]
    return "\n".join(lines) + "\n"


def data_claims(budget: str) -> tuple[tuple[str, str, str, bool], ...]:
    """Table 2: accuracy rises with the amount of synthetic data (each step, and end to end)."""
    sizes = [int(name.split("_")[1]) for name in data_rows(budget)]
    steps = tuple(
        (f"data_{b}", f"data_{a}", f"{b:,} images > {a:,} images", True) for a, b in itertools.pairwise(sizes)
    )
    return (*steps, (f"data_{sizes[-1]}", f"data_{sizes[0]}", f"{sizes[-1]:,} images > {sizes[0]:,} images", True))


def real_table(ablation: Bench) -> str:
    cells = ablation.cells()
    lines = [
        "# Real data vs IntraQ vs BNS+CE at the same budget",
        "",
        f"From the ablation cells of budget `{ablation.budget}` (`python -m benchmarks.ablation --budget "
        f"{ablation.budget}`), rebuilt by `python -m benchmarks.studies real --budget {ablation.budget}`.",
        f"Budget (run-config overrides): `{' '.join(BUDGETS[ablation.budget])}`.",
        f"Top-1 (%) of {KEPT_MODEL} on the real CIFAR-10 test set. Real 'training' images come from the CIFAR-10 "
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
    lines += [*same_run_notes(cells), "", provenance(cells)]
    return "\n".join(lines) + "\n"


def mdc_adi_table(ablation: Bench) -> str:
    cells = ablation.cells()
    lines = [
        "# MDC vs ADI as the diversity term",
        "",
        f"From the ablation cells of budget `{ablation.budget}`; rebuilt by `python -m benchmarks.studies mdc_adi "
        f"--budget {ablation.budget}`. Both rows are IntraQ (BNS + SIL + LOR) with the diversity term swapped.",
        f"Budget (run-config overrides): `{' '.join(BUDGETS[ablation.budget])}`. Top-1 (%) of {KEPT_MODEL} on the "
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
    mdc, adi = cells.get(("intraq", "W4A4"), []), cells.get(("intraq_adi", "W4A4"), [])
    lines += [
        "",
        CLAIMS_HEADER,
        "",
        verdict(
            [r["top1_all"] for r in mdc],
            [r["top1_all"] for r in adi],
            "MDC > ADI (W4A4 top-1; the document: 63.77 vs 54.97)",
        ),
        verdict(
            [r["dataset"]["pairwise_distance_synthetic"] for r in mdc],
            [r["dataset"]["pairwise_distance_synthetic"] for r in adi],
            "MDC's features scatter more than ADI's (pairwise intra-class distance, synthetic images)",
            digits=3,
        ),
    ]
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
    lines += [*same_run_notes(cells), "", provenance(cells)]
    return "\n".join(lines) + "\n"


#: Teachers a study can run on: the shared CIFAR-10 ResNet-20 (default) and ResNet-32. Another
#: teacher's cells, datasets and probe set go to a subfolder of its name under the results root
#: and the work folder.
TEACHERS: dict[str, tuple[str, ...]] = {
    "resnet20": (),
    "resnet32": ("model.arch=cifar_resnet32", "model.weights=cifar10-resnet32"),
}

#: Studies whose cells another study may contain (the run-once links of ``--link``), by name.
LINKED_STUDIES = ("split", "lor", "data", "methods", "ablation")


def study_rows(study: str, budget: str) -> dict[str, Row]:
    """The rows of a study that runs its own cells (``ablation``: ``benchmarks/ablation.py``'s)."""
    return {
        "split": split_rows,
        "lor": lambda _: LOR_ROWS,
        "data": data_rows,
        "methods": lambda _: METHOD_ROWS,
        "ablation": lambda _: ABLATION_ROWS,
    }[study](budget)


def results_folder(root: Path, study: str, budget: str) -> Path:
    """Where a study's cells are (one JSON per cell)."""
    return root / (f"ablation-{budget}" if study == "ablation" else f"study-{study}-{budget}")


def link(bench: Bench, root: Path, commit: str) -> None:
    """Take into ``bench`` every cell and dataset another study already ran at ``commit``
    (:mod:`benchmarks.same_runs`), so that running it computes only what is new."""
    sources = {results_folder(root, s, bench.budget): study_rows(s, bench.budget) for s in LINKED_STUDIES}
    every_row = {name: row for rows in sources.values() for name, row in rows.items()}
    for line in [*link_same_runs(bench, sources, commit), *link_same_datasets(bench, every_row)]:
        print(f"same run: {line}", flush=True)


def mdc_adi_figure(ablation: Bench, seeds: list[int]) -> bytes | None:
    """Section 1's figure: teacher features of MDC's and ADI's images (the ablation's ``intraq`` and
    ``intraq_adi`` datasets at the first of ``seeds`` where both are complete: a cell taken in from
    another study may have left its dataset elsewhere) beside real held-out test images, PCA,
    coloured by class; None until both datasets are complete at one seed."""
    rows = [ABLATION_ROWS["intraq"], ABLATION_ROWS["intraq_adi"]]
    seed = next((s for s in seeds if all(ablation.dataset_complete(r, s) for r in rows)), None)
    if seed is None:
        return None
    from pipeline.context import RunContext
    from pipeline.report.data import CIFAR10_CLASSES
    from pipeline.report.figures import plot_embeddings
    from pipeline.storage.manifest import Manifest

    panels = []
    for name, title in (("intraq", "MDC (IntraQ)"), ("intraq_adi", "ADI")):
        loc = ablation.data_location(ABLATION_ROWS[name], seed)
        ctx = RunContext.create(ablation.config(ABLATION_ROWS[name], seed, [f"storage.url={loc}"]))
        feats, labels, _ = dataset_features(ctx, Manifest.load(ctx.dataset_storage))
        panels.append((f"{title}, seed {seed}", feats.numpy(), labels.numpy()))
    real, labels = real_features(ctx, ablation.test, ablation.split)
    panels.append(("real held-out test images", real.numpy(), labels.numpy()))
    return plot_embeddings(panels, ctx.num_classes, list(CIFAR10_CLASSES), tsne=False, seed=seed)


def main() -> None:
    ap = argparse.ArgumentParser(description="IntraQ supplementary studies on CIFAR-10 ResNet-20")
    ap.add_argument("studies", nargs="+", choices=["lor", "data", "real", "mdc_adi", "methods", "split", "ablation"])
    ap.add_argument("--rows", nargs="*", default=None, help="methods and split studies: only these rows (default: all)")
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--workdir", default=str(REPO / "runs" / "benchmarks"))
    ap.add_argument("--results-root", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--table", action="store_true", help="only rebuild the tables")
    ap.add_argument("--bits", nargs="*", default=None, help="split and ablation: bit widths (default W4A4)")
    ap.add_argument(
        "--cross",
        action="store_true",
        help="split study: score the finished cells on every row's held-out images (benchmarks/crossprobe.py; the "
        "table reads each cell's score on the other synthesis method's images)",
    )
    ap.add_argument(
        "--link",
        action="store_true",
        help="only take in the cells and datasets other studies already ran (at --at), then stop; "
        "every run does this first at this checkout's commit",
    )
    ap.add_argument("--at", default=None, help="with --link: the commit the studies run at (default: this checkout's)")
    ap.add_argument("--teacher", choices=list(TEACHERS), default="resnet20", help="the CIFAR-10 teacher")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root, workdir = Path(args.results_root), Path(args.workdir)
    if args.teacher != "resnet20":
        root, workdir = root / args.teacher, workdir / args.teacher
    model = TEACHERS[args.teacher]
    commit = git_commit(args.at) if args.at else git_commit()
    if commit == "unknown":
        ap.error(f"--at {args.at}: not a commit of this checkout")
    if "ablation" in args.studies and not args.link:
        ap.error("ablation runs with python -m benchmarks.ablation; here it is only a --link target")
    if args.cross and args.studies != ["split"]:
        ap.error("--cross is for the split study (its rows split one budget between two synthesis methods)")
    for study in args.studies:
        if study in ("real", "mdc_adi"):
            if args.link:
                continue  # they run no cell of their own: they read the ablation's
            ablation = Bench(
                args.budget,
                ABLATION_ROWS,
                workdir,
                results_folder(root, "ablation", args.budget),
                [],
                parse_bits(["W4A4"]),
                model=model,
            )
            text = real_table(ablation) if study == "real" else mdc_adi_table(ablation)
            write_table(results_folder(root, study, args.budget), text)
            png = mdc_adi_figure(ablation, args.seeds) if study == "mdc_adi" else None
            if png is not None:
                path = root / f"study-mdc_adi-{args.budget}.png"
                path.write_bytes(png)
                print(f"figure: {path}")
            continue
        rows = study_rows(study, args.budget)
        bits = parse_bits((args.bits or ["W4A4"]) if study in ("split", "ablation") else ["W4A4"])
        results = results_folder(root, study, args.budget)
        bench = Bench(args.budget, rows, workdir, results, args.seeds, bits, args.force, args.recipes, model=model)
        if args.link or not args.table:
            link(bench, root, commit)
        if args.link:
            continue
        if not args.table:
            bench.run(args.rows if args.rows and study in ("methods", "split") else list(rows))
        if args.cross:
            write_signal(bench, args.seeds)
        seeds = " ".join(map(str, args.seeds))
        command = f"python -m benchmarks.studies {study} --budget {args.budget} --seeds {seeds}"
        if args.teacher != "resnet20":
            command += f" --teacher {args.teacher}"
        if args.recipes != list(RECIPES):
            command += f" --recipes {' '.join(args.recipes)}"
        if study == "methods":
            text = methods_table(bench, command)
        elif study == "split":
            text = split_table(bench, f"{command} --bits {' '.join(args.bits or ['W4A4'])}")
        elif study == "lor":
            note = (
                "IntraQ at W4A4 with LOR variants. 'L+F' is what the reference code calls LOR (its "
                "RandomResizedCrop is followed by RandomHorizontalFlip); 'L' drops the flip. Rotation angles are "
                f"uniform in ±{ROTATION_DEGREES}° (the paper does not state its range)."
            )
            text = simple_table(bench, "LOR with flip and rotation (supplementary Table 1)", note, command, LOR_CLAIMS)
        else:
            note = (
                "IntraQ at W4A4 with five dataset sizes (20x span); every size gets the same number of "
                "distillation steps (fixed iterations per epoch), as the reference's 200 iterations per epoch do."
            )
            text = simple_table(
                bench, "Amount of synthetic data (supplementary Table 2)", note, command, data_claims(args.budget)
            )
        write_table(results, text)


def write_table(results: Path, text: str) -> None:
    """The study's Markdown table beside its cells, and on the terminal."""
    results.parent.mkdir(parents=True, exist_ok=True)
    (results.parent / f"{results.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
