"""Any classifier as the teacher, through ``run``: a user-defined VGG-style network (a module on the
path, random weights saved as a plain state_dict), a user's own ResNet-20 with the published CIFAR-10
checkpoint (a real teacher, so the accuracy means something), torchvision's mobilenet_v2 (ReLU6,
inverted residuals) and timm's resnet18 on the local executor; a user's MobileNetV2 module on the CLI's own
local Ray, where the actors and Train workers find the module only because it is shipped in the runtime
environment: the workers' environment does not have it on its path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from intraq_core.data import load_test_set
from intraq_core.student import load_student
from pipeline.cli.app import app
from pipeline.config import load_run_config
from pipeline.context import RunContext
from tests.pipeline.run_helpers import FP_TOP1_200, GENTLE_LR, MAX_MOVE, TINY

MODULE = "test_vgg_nets"
VGG = '''
import torch.nn as nn
import torch.nn.functional as F


class VGGish(nn.Module):
    """conv-BN-ReLU blocks with max pooling, a functional ReLU and a small MLP head."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width))
        self.head = nn.Sequential(nn.Linear(2 * width, 16), nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, x):
        x = F.max_pool2d(self.block1(x), 2)
        x = F.relu(self.block2(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build_net(num_classes=10, width=8):
    return VGGish(num_classes, width)


class Block(nn.Module):
    """The CIFAR ResNet block of He et al. (option-A shortcut: subsample, zero-pad the channels)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class ResNet20(nn.Module):
    """A user's own ResNet-20, written from the paper: the akamaster checkpoint's names fit it."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            stages.append(nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1), Block(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build_resnet20(num_classes=10):
    return ResNet20(num_classes)


def build_mobilenet(num_classes=10):
    """torchvision's mobilenet_v2 (ReLU6, inverted residuals, depthwise convs) as a user's own model."""
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(num_classes=num_classes, width_mult=0.5)
'''


@pytest.fixture(scope="module")
def user_code(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``test_vgg_nets.py`` in a directory of its own, and a random state_dict of its network."""
    root = tmp_path_factory.mktemp("user_code")
    (root / f"{MODULE}.py").write_text(textwrap.dedent(VGG))
    sys.path.insert(0, str(root))
    try:
        import importlib

        net = importlib.import_module(MODULE).build_net()
        torch.manual_seed(0)
        for m in net.modules():  # non-trivial BN statistics for the BN-statistics loss to match
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        torch.save(net.state_dict(), root / "net.pt")
        torch.save(importlib.import_module(MODULE).build_mobilenet().state_dict(), root / "mobilenet.pt")
        yield {"dir": root, "weights": root / "net.pt", "mobilenet": root / "mobilenet.pt"}
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(MODULE, None)


def _model_sets(kind: str, user_code: dict[str, Path] | Any) -> list[str]:
    if kind == "vgg":
        return [f"model.arch={MODULE}:build_net", f"model.weights={user_code['weights']}"]
    if kind == "mobilenet":
        return [f"model.arch={MODULE}:build_mobilenet", f"model.weights={user_code['mobilenet']}"]
    if kind == "resnet20":  # the published checkpoint (module.-prefixed keys) into the user's own class
        weights = Path(os.environ["INTRAQ_DATA_DIR"]) / "resnet20-12fca82f.th"
        return [f"model.arch={MODULE}:build_resnet20", f"model.weights={weights}", GENTLE_LR]
    return [f"model.arch={kind}", "model.weights=null"]


@torch.no_grad()
def _recomputed_top1(run: Path, models: dict[str, torch.nn.Module]) -> dict[str, float]:
    """Top-1 (%) of each model on the run's test images (its eval section), counted here."""
    cfg = load_run_config(run / "run.yaml")
    x, y = next(iter(load_test_set(cfg.eval, RunContext.create(cfg).model_cfg).batches(10_000)))
    return {key: 100.0 * int((m.eval()(x).argmax(1) == y).sum()) / len(y) for key, m in models.items()}


def _check_run(run: Path, arch: str) -> dict[str, Any]:
    """The run's students are rebuilt from the recorded arch, the final one moved, and the three
    accuracies in metrics.json are those of the teacher and of the two written students on the run's
    200 test images (a number of the wrong model, images or normalization differs)."""
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_images"] == 200
    final, model_cfg, _, _ = load_student(run / "student.pt")  # rebuilt from the recorded arch
    calibrated, _, _, _ = load_student(run / "student_calibrated.pt")
    assert model_cfg.arch == arch and model_cfg.image_size == 32 and model_cfg.num_classes == 10
    moved = [not torch.equal(v, calibrated.state_dict()[k]) for k, v in final.state_dict().items()]
    assert any(moved), "distillation left the student unchanged"
    teacher = RunContext.create(load_run_config(run / "run.yaml")).teacher()
    counted = _recomputed_top1(run, {"fp_top1": teacher, "ptq_top1": calibrated, "quant_top1": final})
    assert {key: metrics[key] for key in counted} == counted
    return metrics


@pytest.mark.parametrize("kind", ["vgg", "resnet20", "torchvision:mobilenet_v2", "timm:resnet18"])
def test_run_on_the_local_executor(kind: str, user_code: dict[str, Path], tmp_path: Path) -> None:
    if kind.startswith("timm:"):
        pytest.importorskip("timm")
    sets = [*TINY, *_model_sets(kind, user_code)]
    args = ["run", "-c", "smoke", "-q", "-o", str(tmp_path / "run")]
    for item in sets:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    arch = {"vgg": f"{MODULE}:build_net", "resnet20": f"{MODULE}:build_resnet20"}.get(kind, kind)
    metrics = _check_run(tmp_path / "run", arch)
    if kind == "resnet20":
        # The real teacher in the user's class: the published accuracy, a W4A4 student that keeps most
        # of it (82.0-89.0% over seeds 0-7 of this budget with the built-in ResNet-20, which gives the
        # same numbers as this class; chance is 10%), and training that stays as near it as its small
        # steps move a student (MAX_MOVE, derived in run_helpers).
        assert metrics["fp_top1"] == FP_TOP1_200
        assert 75.0 <= metrics["ptq_top1"] < metrics["fp_top1"]
        assert abs(metrics["quant_top1"] - metrics["ptq_top1"]) <= MAX_MOVE, metrics


RAY_TINY = (
    *(item for item in TINY if not item.startswith("executor=")),
    "executor=ray",
    "ray.generation_actors=2",
    "ray.train_workers=1",
)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_user_module_is_shipped_to_workers_of_a_ray_started_elsewhere(
    user_code: dict[str, Path], ray_cluster: dict[str, Any]
) -> None:
    """The session's Ray started before the user's module existed, so its workers cannot import it
    from their path; with the runtime env the generation actors and Train workers get, they can."""
    import ray

    from intraq_core.config import ModelConfig
    from pipeline.ray.user_code import with_user_code

    def build() -> str:
        import importlib

        return type(importlib.import_module(MODULE).build_net()).__name__

    remote = ray.remote(num_cpus=0.1)(build)
    with pytest.raises(ray.exceptions.RayTaskError, match=MODULE):
        ray.get(remote.remote(), timeout=60)  # not on the workers' path
    env = with_user_code(None, ModelConfig(arch=f"{MODULE}:build_net"), upload=True)
    assert env is not None and all(uri.startswith("gcs://") for uri in env["py_modules"])
    assert ray.get(remote.options(runtime_env=env).remote(), timeout=60) == "VGGish"


FORBIDDEN = ("core_worker", "Deprecat", "TrainingReport(", "BuildBackendWarning", "worker processes have been started")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_run_of_a_user_module_on_ray_keeps_the_terminal_quiet(user_code: dict[str, Path], tmp_path: Path) -> None:
    """``intraq-pipeline run -c smoke --set model.arch=my_models:build_mobilenet --set model.weights=PATH``
    on the CLI's own local Ray: the module is importable by the driver only (its directory is put on
    the driver's sys.path, not in the environment the Ray workers inherit), the terminal shows bars,
    the dashboard URL and results but no Ray internals, and those are in the run's log file. The
    network is a MobileNetV2 (ReLU6 sites, inverted residuals, per-channel ranges at its depthwise
    inputs) with saved random weights, so the actors and the Train worker build the driver's teacher
    (the shards' teacher hash agrees)."""
    run = tmp_path / "run"
    args = ["run", "-c", "smoke", "-o", str(run)]
    for item in (*RAY_TINY, *_model_sets("mobilenet", user_code)):
        args += ["--set", item]
    launcher = (
        f"import sys; sys.path.insert(0, {str(user_code['dir'])!r}); "
        f"sys.argv = ['intraq-pipeline', *{args!r}]; from pipeline.cli.app import main; main()"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # the project only, not the user's code
    proc = subprocess.run(
        [sys.executable, "-c", launcher],
        cwd=tmp_path,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 0, terminal
    for text in FORBIDDEN:
        assert text not in terminal, f"{text!r} reached the terminal:\n{terminal}"
    assert "Ray dashboard: http://127.0.0.1:" in terminal
    assert "calibrated" in proc.stdout and "metrics:" in proc.stdout
    _check_run(run, f"{MODULE}:build_mobilenet")
    logs = sorted((run / "logs").glob("run-*.log"))
    assert len(logs) == 1 and f"log: {logs[0]}" in proc.stdout
    text = logs[0].read_text()
    assert "(RayTrainWorker" in text and "TrainingReport(" in text  # routed to the file, not lost


# -- models the method cannot use: refused by the model check, before anything is written -----------

REFUSED = {
    "untraceable": ("torch.fx cannot trace its forward (TraceError:", "the quantized student is built from"),
    "raising": ("calling it with (num_classes=10) raised RuntimeError: cannot build the model", "fix the callable"),
    "forward_raises": ("its forward raised RuntimeError on a random batch [2, 3, 32, 32]",),
    "two_outputs": ("it returns a tuple (Tensor[2, 10], Tensor[2, 4])", "set model.output", "model.output=0"),
    "no_batchnorm": ("has no BatchNorm layer, but generate.method=intraq", "generate.method=gaussian"),
}


def _tree(root: Path) -> dict[str, tuple[bool, int]]:
    """Every file and directory under ``root``: relative path → (is a directory, mtime_ns)."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_mtime_ns) for p in root.rglob("*")}


# train synthesizes nothing, so it needs no BatchNorm.
COMMAND_CASES = [
    (c, n) for c in ("run", "generate", "train") for n in sorted(REFUSED) if (c, n) != ("train", "no_batchnorm")
]


@pytest.mark.parametrize(("command", "name"), COMMAND_CASES)
def test_an_unusable_model_is_refused_before_anything_is_written(command: str, name: str, tmp_path: Path) -> None:
    """One line, exit code 2, and the parent of the run location exactly as it was (no run location, no
    run.yaml, no log): the model check runs before the location is touched, also for ``train``."""
    (tmp_path / "neighbour.txt").write_text("another run's file\n")
    before = _tree(tmp_path)
    args = [command, "-c", "smoke", "-q", "-o", str(tmp_path / "run")]
    for item in (*TINY, f"model.arch=tests.odd_models:{name}", "model.weights=null", "model.image_size=32"):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for text in REFUSED[name]:
        assert text in lines[0], (text, lines[0])
    assert _tree(tmp_path) == before
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_an_untraceable_model_for_bits(cifar10_test_path: Path) -> None:
    args = ["evaluate", "--arch", "tests.odd_models:untraceable", "--set", "model.image_size=32", "--limit", "8"]
    args += ["--data", str(cifar10_test_path), "-q", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]
    assert CliRunner().invoke(app, args).exit_code == 0  # the float model needs no trace
    result = CliRunner().invoke(app, [*args, "--bits", "W4A4", "--calib", str(cifar10_test_path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: model check failed") and result.output.count("\n") == 1, result.output


def test_a_tuple_model_runs_with_model_output(tmp_path: Path) -> None:
    """``(logits, features)`` with ``model.output=0``: generated, quantized, distilled, evaluated, and the
    student reloads (its config records model.output) to the logits of the float model's shape."""
    run = tmp_path / "run"
    args = ["run", "-c", "smoke", "-q", "-o", str(run)]
    for item in (*TINY, "model.arch=tests.odd_models:two_outputs", "model.weights=null", "model.image_size=32"):
        args += ["--set", item]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and not run.exists(), refused.output
    result = CliRunner().invoke(app, [*args, "--set", "model.output=0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_images"] == 200 and metrics["num_images"] == 32
    student, model_cfg, _, _ = load_student(run / "student.pt")
    assert model_cfg.output == 0
    with torch.no_grad():
        assert student(torch.randn(3, 3, 32, 32)).shape == (3, 10)
