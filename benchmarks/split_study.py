"""The budget split: one synthesis budget (images x iterations) spent as few images with many
iterations or many images with few, for IntraQ's and BNS+CE synthesis, beside the data-free
signals that choose without the test set, and the data-free choice of the shipped split
(``python -m benchmarks.studies split``)."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.crossprobe import other_method, read_signal
from benchmarks.harness import BUDGETS, Bench, Row, fmt, provenance, same_run_notes

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


#: The split the shipped CPU configs synthesize (the incumbent of :func:`split_choice`).
SHIPPED_SPLIT = "split_bns_ce_1280x150"


def split_signals(
    bench: Bench, cells: dict[tuple[str, str], list[dict[str, Any]]], cross: dict[str, dict[str, Any]]
) -> dict[tuple[str, str], dict[str, list[float]]]:
    """Per (row, bits): the test top-1 and the data-free signals of each seed's kept model, from
    the study's ``cells`` and its cross held-out scores ``cross`` (by cell name)."""
    method_of = {name: bench.config(row, 0).generate.method for name, row in bench.rows.items()}
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for (name, bits), rs in cells.items():
        if name not in bench.rows:
            continue
        xs = [c for r in rs if (c := cross.get(f"{name}-{bits}-s{r['seed']}"))]
        kept = [k for c in xs if (k := other_method(c["kept"], method_of[name], method_of))]
        out[(name, bits)] = {
            "top1": [r["top1_all"] for r in rs],
            "start": [r["calibrated_top1_all"] for r in rs],
            "probe": [r["probe_agreement"] for r in rs if r.get("probe_agreement") is not None],
            "holdout": [r["holdout_agreement_final"]["agreement"] for r in rs if r.get("holdout_agreement_final")],
            "cross_kl": [k["kl"] for k in kept],
            "cross_agreement": [k["agreement"] for k in kept],
        }
    return out


def _beats(challenger: list[float], incumbent: list[float], higher_is_better: bool) -> bool:
    """Whether the challenger's mean is better than the incumbent's by more than the larger seed
    standard deviation of the two (both need two seeds or more: :func:`split_choice` says so)."""
    spread = max(statistics.stdev(challenger), statistics.stdev(incumbent))
    diff = statistics.mean(challenger) - statistics.mean(incumbent)
    return (diff if higher_is_better else -diff) > spread


def data_choice(signals: dict[str, dict[str, list[float]]], incumbent: str, labels: dict[str, str]) -> str:
    """The data-free choice between the ``incumbent`` synthetic data and challengers (declared
    before the last seed-1 cells of the budget split ran; the ImageNet method choice applies it too).

    ``signals``: per setting, the kept models' probe agreement (``probe``, one value per seed),
    cross held-out KL (``cross_kl``) and, optionally, a tie-break probe's agreement
    (``tiebreak``). The incumbent changes only for a challenger that BOTH data-free signals
    prefer by more than their seed spread — higher probe agreement and lower cross held-out KL;
    among several, the lowest cross held-out KL. A change of the shipped data needs independent
    signals to agree (as the distillation guard's probe veto does); alone, each has a known bias:
    the probe images share IntraQ's LOR, and a student trained on BNS+CE's 128 images agrees
    closely with the teacher on IntraQ's easy images. When the two prefer opposite sides, the
    tie-break decides with them (agreement on a probe made by a synthesis neither side trains on,
    BN statistics alone; declared in ``imagenet-mobilenetv1-cpu.md`` before it ran): the
    challenger wins when two of the three signals prefer it. A signal with fewer than two seeds on
    either side has no spread yet: a challenger is judged once both signals have two seeds, or
    ruled out as soon as one signal with two seeds does not prefer it (and no tie-break does).

    >>> sig = {"old": {"probe": [70.0, 72.0], "cross_kl": [0.50, 0.52]},
    ...        "new": {"probe": [80.0, 81.0], "cross_kl": [0.30, 0.31]}}
    >>> data_choice(sig, "old", {"old": "1,280 x 150", "new": "256 x 750"})
    'change to 256 x 750 (two data-free signals prefer it beyond the seed spread).'
    """
    if incumbent not in signals:
        return f"{labels[incumbent]} (the incumbent) has no cell yet."
    base = signals[incumbent]
    names = {"probe": "probe agreement", "cross_kl": "cross held-out KL"}
    both, one, out, waiting = [], [], [], []
    for name, sig in signals.items():
        if name == incumbent:
            continue
        # per signal: True / False when both sides have two seeds, else None (no spread yet)
        verdicts = {
            key: _beats(sig[key], base[key], higher_is_better=key == "probe")
            if min(len(sig[key]), len(base[key])) >= 2
            else None
            for key in names
        }
        judged = [k for k, v in verdicts.items() if v is not None]
        tie = sig.get("tiebreak", []), base.get("tiebreak", [])
        # the tie-break's verdict (None: not given with two seeds each side)
        tiebreak = _beats(*tie, higher_is_better=True) if min(len(tie[0]), len(tie[1])) >= 2 else None
        if len(judged) == 2 and all(verdicts.values()):
            both.append((statistics.mean(sig["cross_kl"]), name))
        elif len(judged) == 2 and any(verdicts.values()):
            only = next(k for k, v in verdicts.items() if v)
            if tiebreak:
                both.append((statistics.mean(sig["cross_kl"]), name))
            else:
                why = "the tie-break probe does not prefer it" if tiebreak is False else "no tie-break probe"
                one.append(f"{labels[name]} by {names[only]} only ({why})")
        elif False in verdicts.values() and len(judged) == 1 and not tiebreak:
            # one signal that does not prefer it settles it, unless the tie-break could still carry it
            lacking = next(k for k in names if k not in judged)
            out.append(f"{labels[name]} ({names[judged[0]]} does not prefer it; {names[lacking]} has one seed)")
        elif len(judged) < 2:
            waiting.append(labels[name])
    notes = f" Preferred by one signal only: {'; '.join(sorted(one))}." if one else ""
    notes += f" Ruled out by one signal before the other has two seeds: {'; '.join(sorted(out))}." if out else ""
    notes += f" Not judged yet (one seed): {'; '.join(sorted(waiting))}." if waiting else ""
    if both:
        return f"change to {labels[min(both)[1]]} (two data-free signals prefer it beyond the seed spread).{notes}"
    return f"keep {labels[incumbent]} (no challenger is preferred by two signals).{notes}"


def split_choice(signals: dict[tuple[str, str], dict[str, list[float]]], bits: str, labels: dict[str, str]) -> str:
    """The data-free choice of a split for ``bits``: :func:`data_choice` with the shipped split
    (:data:`SHIPPED_SPLIT`) as the incumbent, on the cells of that bit width."""
    if (SHIPPED_SPLIT, bits) not in signals:
        return f"- {bits}: the shipped split has no cell yet."
    return f"- {bits}: " + data_choice({n: s for (n, b), s in signals.items() if b == bits}, SHIPPED_SPLIT, labels)


def split_table(bench: Bench, command: str) -> str:
    """The budget split: data-free signals beside the test set, per method, split and bits, and
    the data-free choice of the shipped split."""
    cells = bench.cells()
    payload = read_signal(bench.results)
    signals = split_signals(bench, cells, payload.get("cells", {}))
    lines = [
        "# One synthesis budget, split between images and iterations",
        "",
        f"Command: `{command}`. Budget `{bench.budget}`: `{' '.join(BUDGETS[bench.budget])}`; each row overrides the "
        "number of images and iterations so that images x iterations stays constant.",
        "",
        "Top-1 (%) of the kept model on the real CIFAR-10 test set (10,000 images), mean ± std over seeds (n), beside "
        "the data-free signals that choose without the test set: agreement with the teacher on the shared probe set "
        "(BN-statistics images with LOR that no row trains on), on the row's own held-out synthetic images, and the "
        "cross held-out KL (teacher || student; agreement in brackets; lower is better) on the held-out images of "
        "the OTHER synthesis method's rows (`benchmarks/crossprobe.py`; none trained on by any row).",
        "",
        "| synthesis | bits | top-1 | before distillation | probe agreement | held-out agreement | "
        "cross held-out KL (agreement) | n |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in bench.rows.items():
        for b in bench.bits:
            sig = signals.get((name, f"W{b[0]}A{b[1]}"))
            if sig is None:
                continue
            cross_cell = "–"
            if sig["cross_kl"]:
                cross_cell = f"{fmt(sig['cross_kl'], 3)} ({fmt(sig['cross_agreement'], 1)})"
            lines.append(
                f"| {row.label} | W{b[0]}A{b[1]} | {fmt(sig['top1'])} | {fmt(sig['start'])} | {fmt(sig['probe'], 1)} | "
                f"{fmt(sig['holdout'])} | {cross_cell} | {len(sig['top1'])} |"
            )
    if payload:
        pool = payload["pool"]
        seeds = sorted({p["seed"] for p in pool})
        lines += [
            "",
            f"Cross held-out pool: {sum(p['images'] for p in pool)} images, the held-out share of the {len(pool)} "
            f"datasets of seed(s) {', '.join(map(str, seeds))}; `python -m benchmarks.studies split --cross` "
            "recomputes it when more seeds are complete.",
        ]
    labels = {name: row.label for name, row in bench.rows.items()}
    lines += [
        "",
        "The data-free choice of the shipped split (`split_choice`: a change needs both signals beyond the seed "
        "spread; the test set is not read):",
        "",
        *(split_choice(signals, f"W{w}A{a}", labels) for w, a in bench.bits),
    ]
    lines += [*same_run_notes(cells), "", provenance(cells)]
    return "\n".join(lines) + "\n"
