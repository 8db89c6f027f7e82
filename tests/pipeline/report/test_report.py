"""The run report: every plot renders, the HTML is self-contained and opens in headless Chromium.

Two tiny real runs (real teacher, IntraQ and BNS+CE, a few iterations) are made once per module;
the report of the first, compared with the second, is built through the CLI.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.config import load_run_config
from pipeline.report.data import diversity
from pipeline.report.render import build_report
from pipeline.run.job import run_pipeline
from pipeline.storage.manifest import Manifest
from pipeline.storage.shards import read_shard
from pipeline.storage.store import Storage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("generation-losses.png", "distillation.png", "features.png", "diversity.png")
TINY = [
    "executor=local",
    "device=cpu",
    "generate.num_images=40",
    "generate.batch_size=20",
    "generate.iterations=12",
    "generate.shards_per_round=1",
    "quant.calibration_batches=1",
    "distill.epochs=2",
    "distill.batch_size=16",
    "eval.limit=100",
]


def _make_run(url: str, method: str) -> None:
    cfg = load_run_config("smoke", [*TINY, f"generate.method={method}", f"storage.url={url}"])
    run_pipeline(cfg, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, Path]:
    """(IntraQ run, BNS+CE run), both finished."""
    root = tmp_path_factory.mktemp("report-runs")
    main, other = root / "intraq", root / "bns_ce"
    _make_run(str(main), "intraq")
    _make_run(str(other), "bns_ce")
    return main, other


@pytest.fixture(scope="module")
def report_dir(runs: tuple[Path, Path]) -> Path:
    """The report of the IntraQ run compared with the BNS+CE run, made with the CLI."""
    main, other = runs
    result = CliRunner().invoke(
        app, ["report", str(main), "--compare", str(other), "--real-images", "300"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output
    return main / "report"


def _pngs(report_dir: Path) -> list[Path]:
    return sorted(report_dir.glob("*.png"))


def test_shards_record_a_subsampled_loss_history(runs: tuple[Path, Path]) -> None:
    storage = Storage.from_url(str(runs[0] / "data"))
    manifest = Manifest.load(storage)
    meta = read_shard(storage, manifest.shards[0].path).meta
    history = meta["loss_history"]
    assert history["iteration"] == [0, 10, 11]  # every 10th iteration and the last
    assert {"bns_mean", "bns_var", "sil", "mdc_lower", "mdc_upper", "total"} <= set(history["terms"])
    assert all(len(v) == 3 for v in history["terms"].values())
    assert history["terms"]["total"][-1] == pytest.approx(meta["final_losses"]["total"])


def test_every_plot_is_a_real_png(report_dir: Path) -> None:
    names = {p.name for p in _pngs(report_dir)}
    assert set(FIGURES) <= names
    assert {"samples-intraq.png", "samples-bns-ce.png"} <= names
    for path in _pngs(report_dir):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC), path.name
        assert len(data) > 5_000, f"{path.name} is suspiciously small ({len(data)} bytes)"
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100, path.name
        assert float(np.std(pixels[..., :3])) > 0.01, f"{path.name} is blank"


def test_markdown_and_html_reference_every_plot(report_dir: Path) -> None:
    pngs = _pngs(report_dir)
    md = (report_dir / "report.md").read_text()
    page = (report_dir / "report.html").read_text()
    for path in pngs:
        assert f"]({path.name})" in md
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == len(pngs)
    embedded = {base64.b64decode(s.removeprefix("data:image/png;base64,")) for s in sources}
    assert all(s.startswith("data:image/png;base64,") for s in sources)  # self-contained
    assert embedded == {p.read_bytes() for p in pngs}
    for text in ("Pairwise intra-class cosine distance", "Cosine distance to class centre", "0.44"):
        assert text in page
    for column in ("FP top-1 %", "Calibrated (PTQ) top-1 %", "Final top-1 %", "Generate s", "Distil s"):
        assert column in page and column in md


def test_report_numbers(report_dir: Path, runs: tuple[Path, Path]) -> None:
    import json

    stats = json.loads((report_dir / "report.json").read_text())
    sets = [row["set"] for row in stats["diversity"]]
    assert sets == ["intraq (intraq)", "bns_ce (bns_ce)", "real test images (cifar10-test)"]
    for row in stats["diversity"]:
        assert 0.0 < row["pairwise"] < 2.0 and 0.0 < row["to_centre"] < 2.0
        assert row["classes"] == 10
    assert stats["diversity"][2]["images"] == 300
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    first = stats["accuracy"][0]
    assert first["quant_top1"] == metrics["quant_top1"] and first["bits"] == "W4A4"
    assert [row["method"] for row in stats["accuracy"]] == ["intraq", "bns_ce"]


def test_diversity_statistics_by_hand() -> None:
    same = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]], dtype=np.float32)
    assert diversity(same, np.array([0, 0, 1, 1])) == pytest.approx(
        {"images": 4, "classes": 2, "pairwise": 0.0, "to_centre": 0.0}, abs=1e-6
    )
    orthogonal = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    stats = diversity(orthogonal, np.array([0, 0]))
    assert stats["pairwise"] == pytest.approx(1.0)
    assert stats["to_centre"] == pytest.approx(1.0 - np.sqrt(0.5))


def test_report_goes_through_storage(runs: tuple[Path, Path]) -> None:
    """A run on another backend (memory://) gets its report there; no real images, no t-SNE."""
    url = "memory://intraq-report-test/run"
    target = Storage.from_url(url)
    for path in runs[0].rglob("*"):
        if path.is_file() and "report" not in path.parts:
            target.write_bytes_atomic(path.relative_to(runs[0]).as_posix(), path.read_bytes())
    try:
        result = build_report(url, real_images=0, tsne=False)
        out = target.child("report")
        assert result.html_url == out.join("report.html")
        for name in ("report.html", "report.md", "report.json", "features.png", "samples-run.png"):
            assert out.read_bytes(name)
    finally:
        target.delete("", recursive=True)


# -- headless Chromium -----------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if found:
            return found
    pytest.skip("headless Chromium not found (apt-get install -y chromium; CI installs it)")


@pytest.fixture()
def dump_dom(tmp_path: Path) -> Iterator[Any]:
    """A function that loads a page in headless Chromium and returns its <body> attributes."""
    browser = _chromium()

    def dump(page: Path) -> dict[str, str]:
        """The <body> attributes of ``page`` after it loaded (and its inline script ran)."""
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--dump-dom",
            page.resolve().as_uri(),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
        body = re.search(r"<body([^>]*)>", out)
        assert body is not None, out[:500]
        return dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))

    yield dump


def test_html_opens_in_chromium_with_no_broken_image(report_dir: Path, dump_dom: Any, tmp_path: Path) -> None:
    expected = len(_pngs(report_dir))
    attrs = dump_dom(report_dir / "report.html")
    # The inline script ran (attributes present) and saw every figure, each decoded.
    assert attrs.get("data-images-total") == str(expected), attrs
    assert attrs.get("data-images-ok") == str(expected), attrs
    assert attrs.get("data-image-check") == "ok"

    # The check is not vacuous: a page with one corrupted image is reported broken.
    page = (report_dir / "report.html").read_text()
    start = page.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(page[:start] + "AAAA" + page[start + 64 :])
    attrs = dump_dom(broken)
    assert attrs.get("data-images-total") == str(expected)
    assert attrs.get("data-images-ok") == str(expected - 1)
    assert attrs.get("data-image-check") == "broken"
