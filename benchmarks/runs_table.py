"""A results table built from the ``metrics.json`` of finished runs (never typed by hand).

Each row is one run location (local path or URL the CLI wrote): its synthetic data (images ×
iterations, images per class when the dataset's manifest is readable), FP, calibrated (the start
of distillation: reconstruction PTQ) and kept top-1, the drop from FP, the data-free signal
(teacher agreement on the held-out synthetic images, at the start and for the kept model), the
protocol and the quantization map in numbers, and the seconds of each stage. The generation seconds come from the
dataset's own run (``--dataset-run``), since ``train --dataset`` reuses a dataset generated once.

``--probe DATASET`` adds a data-free signal that compares rows trained on different datasets: each
row's calibrated start and kept student scored on one synthetic dataset none of the rows trained
on, the way the run's selector scores its held-out images (teacher agreement and mean KL over the
images and ``distill.watch_views`` augmented views of each, the same views for every row:
:func:`benchmarks.crossprobe.score`); each row's own held-out images differ from row to row.
``--cross`` scores every row on the held-out images of the other rows' datasets instead (none
trained on by any row), those of the other synthesis methods when the rows use several: each
student on images unlike its own training data (a probe made by one synthesis method favours the
rows trained on that method's data); ``--pool`` adds the held-out images of datasets whose
students are not rows (other splits of a synthesis method) to that pool. ``--group`` averages the
rows of one setting over seeds (labels ``X, seed 0``, ``X, seed 1``, ...); ``--choose SETTING``
then applies the data-free choice of the budget split (:func:`benchmarks.split_study.data_choice`:
a challenger replaces the incumbent ``SETTING`` only when both the probe agreement and the cross
held-out KL prefer it beyond their seed spread, or one of them and the ``--tiebreak`` probe,
made by a synthesis neither side trains on, when the two disagree).
On plain synthetic images alone the reconstructed start already agrees with the teacher almost
everywhere (85% on the shared ImageNet model, where distillation then lifts test top-1 10 → 16%
while plain agreement falls to 52%), so plain agreement does not rank these students.

Example::

    python -m benchmarks.runs_table --title "ImageNet MobileNetV1 x0.25, CPU budget" \\
        --dataset-run /work/inet/data-s0 W4A4=/work/inet/w4a4-s0 W8A8=/work/inet/w8a8-s0

A LOCATION ending in ``.json`` is a metrics file kept on its own (the copies committed beside a
table), enough for every column but ``--probe`` / ``--cross``, which score the run's students.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: The data-free signal columns' titles, by the key :func:`benchmarks.split_study.data_choice` reads.
SIGNAL_TITLES = {
    "probe": "probe agreement (KL), start → kept",
    "cross_kl": "cross held-out agreement (KL), start → kept",
    "tiebreak": "tie-break probe agreement (KL), start → kept",
}


def _load(location: str) -> dict[str, Any]:
    """The metrics of a run folder (its ``metrics.json``), or of a metrics file kept on its own
    (``LOCATION`` ending in ``.json``: the copies committed beside a results table)."""
    path = Path(location)
    if path.suffix != ".json":
        return json.loads((path / "metrics.json").read_text())
    # read without the dataset folder it names (gone on another machine): its rows are the same anywhere
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "dataset"}


def _map_cell(q: dict[str, Any]) -> str:
    w, a = q["weight_layers"], q["activations"]
    wb = ", ".join(f"{n}×{b}b" for b, n in w["bits"].items())
    ab = ", ".join(f"{n}×{b}b" for b, n in a["bits"].items())
    image = "image quantized" if a.get("image") else "image float"
    per_channel = f", {a['per_channel']} per channel at depthwise inputs" if a.get("per_channel") else ""
    return f"weights {wb} ({len(w['float'])} float); acts {ab} ({a['unsigned']} unsigned{per_channel}); {image}"


def _data_cell(m: dict[str, Any]) -> str:
    """``512 × 120 (0.51/class)``: the run's synthetic images, iterations and images per class."""
    n, iterations = m.get("num_images"), m.get("gen_iterations")
    if not n:
        return "none"
    cell = f"{n} × {iterations}" if iterations else f"{n} (not optimized)"
    manifest = Path(str(m.get("dataset", ""))) / "manifest.json"
    if manifest.is_file():
        classes = json.loads(manifest.read_text()).get("num_classes")
        if classes:
            cell += f" ({n / classes:.2g}/class)"
    return cell


def _agreement_cell(m: dict[str, Any]) -> str:
    """Teacher agreement on the held-out synthetic images: at the start → for the kept model."""
    training = m.get("training") or {}
    start = (training.get("holdout_agreement_calibrated") or {}).get("agreement")
    kept = (training.get("holdout_agreement_final") or {}).get("agreement")
    if start is None or kept is None:
        return "–"
    return f"{start:.1f} → {kept:.1f} ({training.get('num_holdout_images', '?')} images)"


def probe_pool(probe: Path) -> list[tuple[dict[str, Any], Any]]:
    """The probe dataset's images as a one-part pool (read once for every row)."""
    from benchmarks.crossprobe import dataset_images

    images = dataset_images(probe)
    return [({"dataset": str(probe), "images": int(images.shape[0])}, images)]


def _context(location: str) -> Any:
    from pipeline.config import RUN_CONFIG_PATH, load_run_config
    from pipeline.context import RunContext

    return RunContext.create(load_run_config(Path(location) / RUN_CONFIG_PATH))


def cross_pool(contexts: dict[str, Any]) -> list[tuple[dict[str, Any], Any]]:
    """The held-out images of every row's dataset (each dataset once): no row trained on any.
    ``contexts``: each row's run context by its location."""
    from benchmarks.crossprobe import holdout_part

    pool, seen = [], set()
    for location, ctx in contexts.items():
        key = (str(ctx.cfg.dataset or location).rstrip("/"), ctx.cfg.seed, ctx.cfg.distill.holdout_fraction)
        if key not in seen:
            seen.add(key)
            pool.append(holdout_part(ctx, {"dataset": key[0], "method": ctx.cfg.generate.method}))
    return pool


def unlike(location: str, ctx: Any, pool: list[tuple[dict[str, Any], Any]]) -> list[tuple[dict[str, Any], Any]]:
    """The parts of a cross pool unlike the run's own training data (the run at ``location``, its
    context ``ctx``): those of other synthesis methods when the pool has several
    (``recipe-choice-cpu.md`` §2's cross held-out signal), else those of the other datasets."""
    own = str(ctx.cfg.dataset or location).rstrip("/")
    if len({source["method"] for source, _ in pool}) > 1:
        return [(s, x) for s, x in pool if s["method"] != ctx.cfg.generate.method]
    return [(s, x) for s, x in pool if s["dataset"] != own]


def pool_signal(location: str, ctx: Any, pool: list[tuple[dict[str, Any], Any]]) -> dict[str, dict[str, Any]] | None:
    """Teacher agreement % and mean KL of the starting and kept student of the run at ``location``
    (its context ``ctx``) on ``pool`` (:func:`benchmarks.crossprobe.score`: the way its selector
    scores held-out images); None for an empty pool (every row trained on the one dataset:
    nothing is unlike its own)."""
    from benchmarks.crossprobe import score
    from intraq_core.student import load_student

    if not pool:
        return None
    teacher = ctx.teacher()  # the run's own weights
    return {
        key: score(load_student(Path(location) / name)[0], teacher, pool, ctx.cfg.distill, ctx.device)
        for key, name in (("start", "student_calibrated.pt"), ("kept", "student.pt"))
    }


def _signal_cell(sig: dict[str, dict[str, Any]] | None) -> str:
    if sig is None:
        return "–"
    return " → ".join(f"{sig[k]['agreement']:.1f} ({sig[k]['kl']:.3f})" for k in ("start", "kept"))


def table(
    rows: list[tuple[str, dict[str, Any]]],
    generate_s: float | None,
    signals: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> str:
    """The Markdown table; ``signals``: extra data-free columns (title -> row label -> scores)."""
    signals = signals or {}
    lines = [
        "| run | data | protocol | FP | start (reconstructed) | kept | drop from FP | kept epoch | "
        "held-out agreement, start → kept | quantization map | reconstruct + calibrate s | distill s | evaluate s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for title in signals:
        lines[0] = lines[0].replace(" | quantization map", f" | {title} | quantization map")
        lines[1] += " --- |"
    for label, m in rows:
        q = m.get("quantization") or {}
        kept = _kept_cell(m)
        s = m["seconds"]
        lines.append(
            f"| {label} | {_data_cell(m)} | {q.get('protocol', '?')} | {m['fp_top1']:.2f} | {m['ptq_top1']:.2f} | "
            f"{m['quant_top1']:.2f} | "
            f"{m['fp_top1'] - m['quant_top1']:.2f} | {kept} | {_agreement_cell(m)} | "
            + "".join(f"{_signal_cell(cells[label])} | " for cells in signals.values())
            + f"{_map_cell(q) if q else '?'} | "
            f"{s.get('calibrate', 0):.0f} | {s.get('distill', 0):.0f} | {s.get('evaluate', 0):.0f} |"
        )
    if generate_s is not None:
        lines += ["", f"Generation (shared by every row): {generate_s:.0f} s."]
    return "\n".join(lines) + "\n"


def _kept_cell(m: dict[str, Any]) -> str:
    """Which model the run kept: the final one, the start or an earlier epoch (the data-free guard)."""
    training = m.get("training") or {}
    if m.get("epochs") == 0:
        return "– (no distillation)"
    if training.get("kept_final") is False:
        epoch = training.get("selected_epoch")
        return "start" if epoch is None else f"epoch {epoch + 1}"
    return "final"


def _seedless(label: str) -> str:
    """A row label without its trailing ``, seed N`` (the rows of one setting at several seeds)."""
    head, sep, tail = label.rpartition(", seed ")
    return head if sep and tail.strip().isdigit() else label


def _own_holdout_cell(ms: list[dict[str, Any]]) -> str:
    """Teacher agreement % (mean KL) of the kept models on their own runs' held-out synthetic images,
    mean ± std over the runs (each run's held-out images differ: compare rows of one synthesis)."""
    from benchmarks.harness import fmt

    kept = [h for m in ms if (h := (m.get("training") or {}).get("holdout_agreement_final"))]
    if not kept:
        return "–"
    return f"{fmt([h['agreement'] for h in kept], 1)} ({fmt([h['kl'] for h in kept], 3)})"


def grouped_table(rows: list[tuple[str, dict[str, Any]]], signals: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One line per setting (labels equal but for ``, seed N``): mean ± std over its seeds."""
    from benchmarks.harness import fmt

    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for label, m in rows:
        groups.setdefault(_seedless(label), []).append((label, m))
    titles = [t.replace(", start → kept", ", kept") for t in signals]
    lines = [
        "| setting | data | protocol | n | FP | start (reconstructed) | kept | drop from FP | "
        "own held-out agreement (KL), kept | " + "".join(f"{t} | " for t in titles) + "kept epochs |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | " + "---: | " * len(titles) + "--- |",
    ]
    for name, members in groups.items():
        ms = [m for _, m in members]
        q = ms[0].get("quantization") or {}
        epochs = [_kept_cell(m) for m in ms]
        sig_cells = []
        for cells in signals.values():
            kept = [sig["kept"] for label, _ in members if (sig := cells[label]) is not None]
            sig_cells.append(f"{fmt([k['agreement'] for k in kept], 1)} ({fmt([k['kl'] for k in kept], 3)})")
        lines.append(
            f"| {name} | {_data_cell(ms[0])} | {q.get('protocol', '?')} | {len(ms)} | "
            f"{fmt([m['fp_top1'] for m in ms])} | {fmt([m['ptq_top1'] for m in ms])} | "
            f"{fmt([m['quant_top1'] for m in ms])} | "
            f"{fmt([m['fp_top1'] - m['quant_top1'] for m in ms])} | {_own_holdout_cell(ms)} | "
            + "".join(f"{c} | " for c in sig_cells)
            + f"{', '.join(epochs)} |"
        )
    return "\n".join(lines) + "\n"


def group_signals(
    rows: list[tuple[str, dict[str, Any]]], signals: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, dict[str, list[float]]]:
    """Per setting (rows grouped as :func:`grouped_table` does): the kept models' probe agreement
    (``probe``), cross held-out KL (``cross_kl``) and tie-break probe agreement (``tiebreak``),
    one value per seed, for :func:`benchmarks.split_study.data_choice`."""
    fields = {"probe": "agreement", "cross_kl": "kl", "tiebreak": "agreement"}
    out: dict[str, dict[str, list[float]]] = {}
    for label, _ in rows:
        setting = out.setdefault(_seedless(label), {k: [] for k in fields})
        for key, field in fields.items():
            if (sig := signals.get(SIGNAL_TITLES[key], {}).get(label)) is not None:
                setting[key].append(sig["kept"][field])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=LOCATION of finished runs")
    ap.add_argument("--dataset-run", default=None, help="location of the generate run (its seconds)")
    ap.add_argument("--title", default="Runs")
    ap.add_argument("--probe", default=None, help="generate run location of a dataset no row trained on")
    ap.add_argument(
        "--cross", action="store_true", help="score every row on the held-out images of the rows unlike its own"
    )
    ap.add_argument(
        "--group", action="store_true", help="one line per setting: rows labelled 'X, seed N' averaged over seeds"
    )
    ap.add_argument(
        "--pool",
        nargs="+",
        default=[],
        metavar="DATASET_RUN",
        help="generate runs whose held-out images join the --cross pool (settings with no student among the rows)",
    )
    ap.add_argument(
        "--choose",
        default=None,
        metavar="SETTING",
        help="with --group --probe --cross: the data-free choice against this incumbent setting (data_choice)",
    )
    ap.add_argument(
        "--tiebreak",
        default=None,
        metavar="DATASET_RUN",
        help="with --choose: a probe from a synthesis neither side trains on; decides when the two signals disagree",
    )
    args = ap.parse_args()
    runs = [item.partition("=")[::2] for item in args.runs]
    if args.tiebreak and args.choose is None:
        ap.error("--tiebreak is a signal of --choose's rule: give --choose")
    if args.pool and not args.cross:
        ap.error("--pool adds datasets to the --cross pool: give --cross")
    if args.choose is not None:
        if not (args.group and args.probe and args.cross):
            ap.error("--choose needs --group, --probe and --cross (the rule weighs both signals per setting)")
        if args.choose not in {_seedless(label) for label, _ in runs}:
            ap.error(f"--choose {args.choose!r} is not a setting of the rows (labels 'SETTING, seed N')")
    if args.probe or args.cross or args.tiebreak:
        files = [loc for _, loc in runs if loc.endswith(".json")]
        if files:
            ap.error(f"--probe / --cross score each run's students: give run folders, not metrics files ({files[0]})")
    rows = [(label, _load(location)) for label, location in runs]
    signals: dict[str, dict[str, dict[str, Any]]] = {}
    contexts = {loc: _context(loc) for _, loc in runs} if args.probe or args.cross or args.tiebreak else {}
    for key, given in (("probe", args.probe), ("tiebreak", args.tiebreak)):
        if given is None:
            continue
        probe = Path(given)
        for (_, m), (_, location) in zip(rows, runs, strict=True):
            if Path(str(m.get("dataset", ""))).resolve() == (probe / "data").resolve():
                raise SystemExit(f"{location} trained on the probe dataset {probe}: choose a dataset no row used")
        pool = probe_pool(probe)
        signals[SIGNAL_TITLES[key]] = {label: pool_signal(loc, contexts[loc], pool) for label, loc in runs}
    if args.cross:
        pool = cross_pool({**contexts, **{loc: _context(loc) for loc in args.pool}})
        signals[SIGNAL_TITLES["cross_kl"]] = {
            label: pool_signal(loc, contexts[loc], unlike(loc, contexts[loc], pool)) for label, loc in runs
        }
    generate_s = None
    if args.dataset_run is not None:
        path = Path(args.dataset_run) / "metrics.json"
        if path.is_file():
            generate_s = json.loads(path.read_text()).get("seconds", {}).get("generate")
    print(f"# {args.title}\n")
    print(grouped_table(rows, signals) if args.group else table(rows, generate_s, signals))
    if args.probe:
        print(f"Probe: the {args.probe} dataset (no row trained on it), teacher agreement % and mean KL.")
    if args.tiebreak:
        print(f"Tie-break probe: the {args.tiebreak} dataset (no row trained on it), teacher agreement % and mean KL.")
    if args.cross:
        print(
            f"Cross held-out: a pool of the held-out images of {len(pool)} datasets (those of the rows"
            + (f" and of the {len(args.pool)} generate runs given with --pool" if args.pool else "")
            + "); each row scored on the parts unlike its own (of the other synthesis methods when there are "
            "several, else the other datasets), teacher agreement % and mean KL."
        )
    if args.choose is not None:
        from benchmarks.split_study import data_choice

        settings = group_signals(rows, signals)
        verdict = data_choice(settings, args.choose, {name: name for name in settings})
        print(f"\nThe data-free choice (`data_choice`, incumbent {args.choose}): {verdict}")


if __name__ == "__main__":
    main()
