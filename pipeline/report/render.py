"""Run report: what the synthetic images look like, how each stage went, how accurate the result is.

:func:`build_report` reads one run (and optionally others to compare with) through
:class:`~pipeline.storage.store.Storage` and writes into ``<run>/report/``:

* ``report.html``: one self-contained file, every plot embedded as a base64 ``data:`` URI, plus a
  tiny inline script that checks every image decoded (it sets ``data-images-total`` /
  ``data-images-ok`` on ``<body>``, which headless browsers and the tests read);
* ``report.md`` and the PNG plots it references (for GitHub, wikis, notebooks);
* ``report.json``: the numbers behind the tables.

Contents: (a) a grid of synthetic images per class (de-normalized with the run's mean/std);
(b) per-term generation loss curves (from the ``loss_history`` in each shard's metadata) and
distillation curves (``train_history.json``); (c) PCA and t-SNE projections of the teacher's
penultimate features of the synthetic images (and of real test images), one row per run — with
``--compare`` runs side by side, the paper's "MDC vs ADI" figure; (d) intra-class diversity of
those features next to real test images; (e) the accuracy and timing table from ``metrics.json``;
(f) every run's method and protocol (how weights are rounded, where activation ranges come from,
which layers keep more bits, its data and distillation; :mod:`pipeline.report.methods`) and the benchmark
tables it is a row of (the committed ``benchmarks/results`` table, when this is a source checkout).
A run that uses no images (SQuant without distillation) has no image or feature sections.
"""

from __future__ import annotations

import base64
import html
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.report.data import (
    DEFAULT_REAL_IMAGES,
    EMBED_MAX_POINTS,
    PAPER_DIVERSITY,
    RunData,
    _class_names,
    _ensure_features,
    diversity,
    load_run,
    real_features,
)
from pipeline.report.figures import (
    plot_distillation,
    plot_diversity,
    plot_embeddings,
    plot_generation_losses,
    plot_image_grid,
)
from pipeline.storage.store import Storage

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

__all__ = ["REPORT_DIR", "ReportResult", "build_report", "parse_markdown_table"]

REPORT_DIR = "report"


@dataclass
class ReportResult:
    """Where the report went and the numbers it shows."""

    url: str
    html_url: str
    files: list[str]
    stats: dict[str, Any]


# -- loading ---------------------------------------------------------------------------------------


# -- statistics ------------------------------------------------------------------------------------


# -- plots -----------------------------------------------------------------------------------------


# -- tables --------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


ACCURACY_COLUMNS = (
    ("run", "Run"),
    ("method_name", "Method"),
    ("bits", "Bits"),
    ("images", "Images"),
    ("gen_iterations", "Gen. iterations"),
    ("generator_iterations", "Generator iterations"),
    ("epochs", "Epochs"),
    ("fp_top1", "FP top-1 %"),
    ("ptq_top1", "Calibrated (PTQ) top-1 %"),
    ("quant_top1", "Final top-1 %"),
    ("test_images", "Test images"),
    ("s_generate", "Generate s"),
    ("s_calibrate", "Calibrate s"),
    ("s_distill", "Distil s"),
    ("s_evaluate", "Evaluate s"),
)


def accuracy_row(run: RunData) -> dict[str, Any]:
    """One row of the accuracy table; config values where the run has no metrics.json yet."""
    m = run.metrics or {}
    cfg = run.cfg
    seconds = m.get("seconds") or {}
    from pipeline.report.methods import generation_budget, method_name

    budget = generation_budget(cfg)
    return {
        "run": run.label,
        "method": run.method,
        "method_name": method_name(run.method),
        "bits": f"W{m.get('w_bits', cfg.quant.w_bits)}A{m.get('a_bits', cfg.quant.a_bits)}",
        "images": m.get("num_images", budget["num_images"]),
        "gen_iterations": m.get("gen_iterations", budget["gen_iterations"]),
        "generator_iterations": m.get("generator_iterations", budget["generator_iterations"]),
        "epochs": m.get("epochs", cfg.distill.epochs),
        "fp_top1": m.get("fp_top1"),
        "ptq_top1": m.get("ptq_top1"),
        "quant_top1": m.get("quant_top1"),
        "test_images": m.get("test_images"),
        "s_generate": seconds.get("generate"),
        "s_calibrate": seconds.get("calibrate"),
        "s_distill": seconds.get("distill"),
        "s_evaluate": seconds.get("evaluate"),
    }


DIVERSITY_COLUMNS = (
    ("set", "Images of"),
    ("images", "Images"),
    ("classes", "Classes"),
    ("pairwise", "Pairwise intra-class cosine distance"),
    ("to_centre", "Cosine distance to class centre"),
)


def _md_table(columns: tuple[tuple[str, str], ...], rows: list[dict[str, Any]], digits: int = 2) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_fmt(r.get(k), digits) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _html_table(columns: tuple[tuple[str, str], ...], rows: list[dict[str, Any]], digits: int = 2) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k), digits))}</td>" for k, _ in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# -- rendering -----------------------------------------------------------------------------------


@dataclass
class _Section:
    title: str
    text: str  # plain text (escaped in HTML)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    table: tuple[tuple[tuple[str, str], ...], list[dict[str, Any]], int] | None = None


IMAGE_CHECK_SCRIPT = """<script>
// Self-check: count images that decoded (naturalWidth > 0) once everything has loaded.
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-total", String(images.length));
  document.body.setAttribute("data-images-ok", String(ok));
  document.body.setAttribute("data-image-check", ok === images.length ? "ok" : "broken");
});
</script>"""

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222}h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}img{max-width:100%;height:auto}figcaption{font-size:.9em;color:#555}
.meta{color:#555;font-size:.9em}"""


def _render_markdown(title: str, meta: list[str], sections: list[_Section]) -> str:
    lines = [f"# {title}", "", *[f"- {m}" for m in meta], ""]
    for s in sections:
        lines += [f"## {s.title}", "", s.text, ""]
        if s.table is not None:
            lines += [_md_table(*s.table), ""]
        for name, caption in s.figures:
            lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def _render_html(title: str, meta: list[str], sections: list[_Section], pngs: dict[str, bytes]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<ul class="meta">' + "".join(f"<li>{html.escape(m)}</li>" for m in meta) + "</ul>",
    ]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        parts.append("".join(f"<p>{html.escape(p)}</p>" for p in s.text.split("\n\n")))
        if s.table is not None:
            parts.append(_html_table(*s.table))
        for name, caption in s.figures:
            data = base64.b64encode(pngs[name]).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    parts += [IMAGE_CHECK_SCRIPT, "</body></html>"]
    return "\n".join(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "run"


def _unique_labels(urls: list[str]) -> list[str]:
    labels: list[str] = []
    for url in urls:
        base = url.rstrip("/").rsplit("/", 1)[-1] or url
        label, k = base, 2
        while label in labels:
            label, k = f"{base} ({k})", k + 1
        labels.append(label)
    return labels


# -- the command ---------------------------------------------------------------------------------


def _feature_sections(
    runs: list[RunData],
    main: RunData,
    sections: list[_Section],
    pngs: dict[str, bytes],
    *,
    real_data: str | None,
    real_images: int,
    tsne: bool,
    seed: int,
) -> list[dict[str, Any]]:
    """The teacher-feature projections and the intra-class diversity table (runs with images)."""
    feature_sets: list[tuple[str, np.ndarray, np.ndarray]] = [
        (f"{r.label} ({r.method})", _ensure_features(r), r.labels) for r in runs
    ]
    real_name = None
    if real_images > 0:
        feats, labels, real_name = real_features(main, real_data, real_images)
        feature_sets.append((f"real test images ({real_name})", feats, labels))
    div_rows = []
    for title, feats, labels in feature_sets:
        row = {"set": title, **diversity(feats, labels)}
        div_rows.append(row)
    pngs["features.png"] = plot_embeddings(feature_sets, main.num_classes, _class_names(main), tsne=tsne, seed=seed)
    sections.append(
        _Section(
            "Teacher features",
            "Penultimate-layer (MDC feature) activations of the teacher, L2-normalized and projected "
            "to 2-D with PCA" + (" and t-SNE" if tsne else "") + f" (at most {EMBED_MAX_POINTS} "
            "images per set). Synthetic sets with more intra-class diversity spread like the real "
            "images; collapsed sets form tight per-class clusters.",
            [("features.png", "PCA / t-SNE of teacher features, one row per image set")],
        )
    )
    pngs["diversity.png"] = plot_diversity(div_rows)
    paper = ", ".join(f"{k} {v:.2f}" for k, v in PAPER_DIVERSITY.items())
    sections.append(
        _Section(
            "Intra-class diversity",
            "Pairwise intra-class cosine distance: for each class, the mean cosine distance "
            "1 - cos(f_i, f_j) over all distinct pairs of its images' teacher features, averaged "
            "over classes (intraq_core.synth.losses.mean_intra_class_cosine_distance). This is the "
            f"statistic the IntraQ paper reports for ResNet-20 on CIFAR-10: {paper}; absolute values "
            "depend on how features are extracted, so compare the sets within this report.\n\n"
            "Cosine distance to class centre: the mean of 1 - cos(f_i, c_y) with c_y the mean "
            "feature of the image's class in the same set (mean_distance_to_class_centre), the "
            "quantity MDC's margins act on. Real images: "
            + (f"the first {real_images} of {real_name}." if real_name else "not computed."),
            [("diversity.png", "Intra-class diversity of teacher features")],
            table=(DIVERSITY_COLUMNS, div_rows, 3),
        )
    )
    return div_rows


def parse_markdown_table(text: str) -> tuple[tuple[tuple[str, str], ...], list[dict[str, Any]]] | None:
    """The first Markdown table of ``text`` as (columns, rows); None if it has none."""
    lines = text.splitlines()
    for i in range(len(lines) - 1):
        if lines[i].lstrip().startswith("|") and re.fullmatch(r"\s*\|[\s:|-]+\|\s*", lines[i + 1]):
            block = [lines[i]]
            for line in lines[i + 2 :]:
                if not line.lstrip().startswith("|"):
                    break
                block.append(line)
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in block]
            columns = tuple((f"c{k}", title) for k, title in enumerate(cells[0]))
            rows = [{f"c{k}": value for k, value in enumerate(row)} for row in cells[1:]]
            return columns, rows
    return None


def method_and_tables(runs: list[RunData]) -> tuple[list[dict[str, Any]], list[_Section]]:
    """Each run's method and protocol, and a section per benchmark table a run is a row of."""
    from pipeline.report.methods import RESULTS_DIR, comparison_tables, describe

    rows: list[dict[str, Any]] = []
    parts: list[str] = []
    tables: dict[str, tuple[Any, list[tuple[RunData, str]]]] = {}
    for run in runs:
        info = describe(run.cfg)
        memberships = comparison_tables(run.cfg)
        rows.append({"run": run.label, **info, "tables": [{"table": t.key, "row": label} for t, label in memberships]})
        parts.append(f"{run.label}: {info['name']}. {info['summary']}.")
        parts += info["protocol"]
        for table, label in memberships:
            tables.setdefault(table.key, (table, []))[1].append((run, label))
    sections = [_Section("Method and protocol", "\n\n".join(parts))]
    for table, members in tables.values():
        files = sorted(RESULTS_DIR.glob(f"{table.stem}-*.md")) if RESULTS_DIR.is_dir() else []
        lines = []
        for run, label in members:
            m = run.metrics or {}
            top1 = (
                f"final top-1 {m['quant_top1']:.2f}% on {m.get('test_images')} test images" if m else "no metrics yet"
            )
            lines.append(f"{run.label} is the row '{label}' of this table ({top1}).")
        parsed = None
        if files:
            text = files[0].read_text()
            parsed = parse_markdown_table(text)
            budget = next((line for line in text.splitlines() if "Budget" in line), "")
            lines.append(
                f"The committed table: benchmarks/results/{files[0].name} ({table.command}). {budget}".strip()
                + " Its numbers come from the benchmark's own runs at its budget; compare a run with them only at "
                "the same budget."
            )
            if len(files) > 1:
                lines.append("Other budgets: " + ", ".join(f"benchmarks/results/{f.name}" for f in files[1:]) + ".")
        else:
            lines.append(
                f"This table is not in this installation yet (benchmarks/results/{table.stem}-<budget>.md); "
                f"`{table.command}` builds it."
            )
        sections.append(
            _Section(
                f"Comparison: {table.title}",
                "\n\n".join(lines),
                table=(parsed[0], parsed[1], 2) if parsed else None,
            )
        )
    return rows, sections


def build_report(
    run: str,
    compare: list[str] | None = None,
    *,
    real_data: str | None = None,
    real_images: int = DEFAULT_REAL_IMAGES,
    tsne: bool = True,
    seed: int = 0,
) -> ReportResult:
    """Write the report of the run at ``run`` (path or URL) into ``<run>/report/``.

    ``compare`` runs appear next to it in every plot and table. Real test images (the first
    ``real_images`` of ``real_data`` or of the run's eval set; 0 disables them) give the
    reference for the feature statistics and projections.
    """
    t0 = time.perf_counter()
    urls = [run, *(compare or [])]
    runs = [load_run(url, label) for url, label in zip(urls, _unique_labels(urls), strict=True)]
    main = runs[0]
    for other in runs[1:]:
        if other.cfg.model != main.cfg.model:
            log.warning("%s uses another teacher than %s; its features are not comparable", other.url, main.url)

    pngs: dict[str, bytes] = {}
    sections: list[_Section] = []

    # (e) accuracy table first: the headline.
    acc_rows = [accuracy_row(r) for r in runs]
    sections.append(
        _Section(
            "Accuracy",
            "Top-1 on the real test set: full-precision teacher (FP), the quantized student after "
            "activation-range calibration on synthetic images (Calibrated/PTQ; for SQuant, its data-free "
            "rounding and BN-based ranges), and after quantization-aware distillation (Final; equal to the "
            "calibrated student when there is no distillation). Seconds are wall-clock per stage.",
            table=(ACCURACY_COLUMNS, acc_rows, 2),
        )
    )

    # (f) method, protocol and the comparison tables each run belongs to.
    method_rows, method_sections = method_and_tables(runs)
    sections += method_sections

    with_images = [r for r in runs if r.has_images]
    without = [r.label for r in runs if not r.has_images]
    no_images_note = f"\n\n{', '.join(without)}: no synthetic images (the method uses none)." if without else ""

    # (a) image grids.
    grid_figs = []
    for r in with_images:
        name = f"samples-{_slug(r.label)}.png"
        pngs[name] = plot_image_grid(r)
        grid_figs.append((name, f"{r.label}: synthetic images per class ({r.method})"))
    sections.append(
        _Section(
            "Synthetic images",
            "A row per class, de-normalized with the run's mean/std and clipped to [0, 1]." + no_images_note,
            grid_figs,
        )
    )

    # (b) curves.
    curve_figs = []
    gen = plot_generation_losses(with_images)
    if gen is not None:
        pngs["generation-losses.png"] = gen
        curve_figs.append(("generation-losses.png", "Generation loss terms per iteration (mean over shards)"))
    dist = plot_distillation(runs)
    if dist is not None:
        pngs["distillation.png"] = dist
        curve_figs.append(("distillation.png", "Distillation statistics per epoch (train_history.json)"))
    missing = [r.label for r in with_images if not r.loss_histories and r.cfg.generate.optimizes]
    note = (
        "Generation curves come from the loss history stored in each shard's metadata "
        "(every 10th iteration and the last; for a generator method, the generator's training); "
        "distillation curves from train_history.json."
    )
    if missing:
        note += f"\n\nNo generation loss history recorded for: {', '.join(missing)} (older shards)."
    sections.append(_Section("Training curves", note, curve_figs))

    # (c) + (d) features.
    div_rows: list[dict[str, Any]] = []
    if with_images:
        div_rows = _feature_sections(
            with_images, main, sections, pngs, real_data=real_data, real_images=real_images, tsne=tsne, seed=seed
        )

    title = f"IntraQ run report: {main.label}"
    meta = [
        f"Run: {main.url}",
        f"Model: {main.cfg.model.arch} ({main.cfg.model.weights}), {main.num_classes} classes",
        f"Compared with: {', '.join(r.url for r in runs[1:])}" if len(runs) > 1 else "No comparison runs",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
    ]
    target = Storage.from_url(main.url).child(REPORT_DIR)
    files = []
    for name, data in pngs.items():
        target.write_bytes_atomic(name, data)
        files.append(name)
    stats = {
        "accuracy": acc_rows,
        "methods": method_rows,
        "diversity": div_rows,
        "paper_diversity": PAPER_DIVERSITY,
        "figures": list(pngs),
    }
    target.write_json_atomic("report.json", stats)
    target.write_bytes_atomic("report.md", _render_markdown(title, meta, sections).encode("utf-8"))
    target.write_bytes_atomic("report.html", _render_html(title, meta, sections, pngs).encode("utf-8"))
    files += ["report.json", "report.md", "report.html"]
    log.info("report written to %s in %.1f s", target.url, time.perf_counter() - t0)
    return ReportResult(target.url, target.join("report.html"), files, stats)
