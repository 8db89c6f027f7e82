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
images and ``distill.watch_views`` augmented views of each: :func:`pipeline.stages.holdout.make_selector`);
each row's own held-out images differ from row to row. On plain synthetic images alone the
reconstructed start already agrees with the teacher almost everywhere (85% on the shared ImageNet
model, where distillation then lifts test top-1 10 → 16% while plain agreement falls to 52%), so
plain agreement does not rank these students.

Example::

    python -m benchmarks.runs_table --title "ImageNet MobileNetV1 x0.25, CPU budget" \\
        --dataset-run /work/inet/data-s0 W4A4=/work/inet/w4a4-s0 W8A8=/work/inet/w8a8-s0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _load(location: str) -> dict[str, Any]:
    return json.loads((Path(location) / "metrics.json").read_text())


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


def probe_images(probe: Path) -> Any:
    """The probe dataset's images (read once for every row)."""
    import torch

    from pipeline.storage.manifest import Manifest, read_all
    from pipeline.storage.store import Storage

    data = Storage.from_url(str(probe / "data"))
    return torch.from_numpy(read_all(data, Manifest.load(data))[0])


def probe_signal(location: str, metrics: dict[str, Any], probe: Path, images: Any) -> str:
    """``start → kept`` teacher agreement % (mean KL) of a run's two students on the probe's ``images``."""
    from intraq_core.student import load_student
    from pipeline.config import RUN_CONFIG_PATH, load_run_config
    from pipeline.context import RunContext
    from pipeline.stages.holdout import make_selector

    run = Path(location)
    if Path(str(metrics.get("dataset", ""))).resolve() == (probe / "data").resolve():
        raise SystemExit(f"{location} trained on the probe dataset {probe}: choose a dataset no row used")
    ctx = RunContext.create(load_run_config(run / RUN_CONFIG_PATH))
    teacher = ctx.teacher()  # the run's own weights
    cells = []
    for name in ("student_calibrated.pt", "student.pt"):
        selector = make_selector(ctx, teacher, images)  # the run's own selector, the probe images as held-out
        assert selector is not None
        a = selector.evaluate(load_student(run / name)[0])["holdout"]
        cells.append(f"{a['agreement']:.1f} ({a['kl']:.3f})")
    return f"{cells[0]} → {cells[1]}"


def table(rows: list[tuple[str, dict[str, Any]]], generate_s: float | None, probe: dict[str, str] | None = None) -> str:
    lines = [
        "| run | data | protocol | FP | start (reconstructed) | kept | drop from FP | kept epoch | "
        "held-out agreement, start → kept | quantization map | reconstruct + calibrate s | distill s | evaluate s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: |",
    ]
    if probe is not None:
        lines[0] = lines[0].replace(" | quantization map", " | probe agreement (KL), start → kept | quantization map")
        lines[1] += " --- |"
    for label, m in rows:
        q = m.get("quantization") or {}
        training = m.get("training") or {}
        if m.get("epochs") == 0:
            kept = "– (no distillation)"
        elif training.get("kept_final") is False:
            epoch = training.get("selected_epoch")
            kept = "start" if epoch is None else f"epoch {epoch + 1}"
        else:
            kept = "final"
        s = m["seconds"]
        lines.append(
            f"| {label} | {_data_cell(m)} | {q.get('protocol', '?')} | {m['fp_top1']:.2f} | {m['ptq_top1']:.2f} | "
            f"{m['quant_top1']:.2f} | "
            f"{m['fp_top1'] - m['quant_top1']:.2f} | {kept} | {_agreement_cell(m)} | "
            + (f"{probe[label]} | " if probe is not None else "")
            + f"{_map_cell(q) if q else '?'} | "
            f"{s.get('calibrate', 0):.0f} | {s.get('distill', 0):.0f} | {s.get('evaluate', 0):.0f} |"
        )
    if generate_s is not None:
        lines += ["", f"Generation (shared by every row): {generate_s:.0f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=LOCATION of finished runs")
    ap.add_argument("--dataset-run", default=None, help="location of the generate run (its seconds)")
    ap.add_argument("--title", default="Runs")
    ap.add_argument("--probe", default=None, help="generate run location of a dataset no row trained on")
    args = ap.parse_args()
    rows = []
    probe = {} if args.probe else None
    images = probe_images(Path(args.probe)) if args.probe else None
    for item in args.runs:
        label, _, location = item.partition("=")
        rows.append((label, _load(location)))
        if probe is not None:
            probe[label] = probe_signal(location, rows[-1][1], Path(args.probe), images)
    generate_s = None
    if args.dataset_run is not None:
        path = Path(args.dataset_run) / "metrics.json"
        if path.is_file():
            generate_s = json.loads(path.read_text()).get("seconds", {}).get("generate")
    print(f"# {args.title}\n")
    print(table(rows, generate_s, probe))
    if args.probe:
        print(f"Probe: the {args.probe} dataset (no row trained on it), teacher agreement % and mean KL.")


if __name__ == "__main__":
    main()
