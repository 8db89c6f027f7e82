"""Bad input: one clear line, exit code 2, no traceback (unless --debug), nothing deleted or overwritten.

Every command is aimed at a location that already holds a run and, where the flag applies, is
given ``--overwrite``: a refused command must still leave every file of that location as it was
(same names, bytes and mtimes). Checks happen before Ray starts and before the location is
touched (:func:`pipeline.run.preflight`), so each case takes well under a second.

Also: Ray-wrapped errors (``RayTaskError``, Train's ``WorkerGroupError``/``ControllerError``)
and library storage errors (botocore) reach the same one-line path.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from pipeline import cli
from pipeline.cli import app
from pipeline.errors import InputError, explain
from pipeline.shards import Manifest
from pipeline.storage import Storage
from tests.pipeline.conftest import FAKE_SECRET, S3Server
from tests.pipeline.run_helpers import TINY, assert_one_line_error, cli_args, snapshot

pytestmark = pytest.mark.timeout(120)

runner = CliRunner()


class _Evil:
    """Unpickling this runs ``os.mkdir(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Bad inputs on disk: checkpoints, configs, a test set, a user module whose model has no BatchNorm."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / "nobn_nets.py").write_text(
        "import torch.nn as nn\n"
        "def mlp(num_classes=10):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8), nn.ReLU(), nn.Linear(8, num_classes))\n"
    )
    out = {"root": root, "marker": root / "pwned"}
    out["wrong_keys"] = root / "wrong-keys.pt"
    torch.save({"state_dict": {"not_a_layer.weight": torch.zeros(3)}}, out["wrong_keys"])
    out["evil"] = root / "evil.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": _Evil(out["marker"])}, out["evil"])
    out["test100"] = root / "test100.npz"  # labels 0..99 for a 10-class model
    np.savez(out["test100"], images=np.zeros((100, 32, 32, 3), np.uint8), labels=np.arange(100))
    out["malformed"] = root / "malformed.yaml"
    out["malformed"].write_text("name: x\n  seed: [1\n")
    out["typo"] = root / "typo.yaml"
    out["typo"].write_text("distill:\n  epoch: 3\n")
    out["cluster"] = root / "cluster.yaml"
    out["cluster"].write_text(
        "cluster_name: c\nprovider: {type: local, head_ip: 127.0.0.1, worker_ips: []}\nauth: {ssh_user: u}\nfoo: 1\n"
    )
    out["a_file"] = root / "a-file"
    out["a_file"].write_text("not a directory\n")
    sys.path.insert(0, str(root))
    try:
        yield out
    finally:
        sys.path.remove(str(root))


@pytest.fixture()
def existing(tmp_path: Path) -> Path:
    """A location that holds a (finished) run of the tiny config."""
    from pipeline.config import load_run_config

    url = tmp_path / "existing"
    (url / "data" / "shards").mkdir(parents=True)
    cfg = load_run_config("smoke", [*TINY, f"storage.url={url}"])
    (url / "run.yaml").write_text(cfg.to_yaml())
    manifest = Manifest(
        config_hash=cfg.dataset_hash(),
        num_shards_planned=0,
        image_shape=[3, 32, 32],
        num_classes=10,
        mean=[0.5] * 3,
        std=[0.25] * 3,
    )
    (url / "data" / "manifest.json").write_text(manifest.model_dump_json())
    (url / "data" / "shards" / "shard-00000.parquet").write_bytes(b"PAR1 not really\n")
    (url / "student.pt").write_bytes(os.urandom(64))
    (url / "metrics.json").write_text('{"quant_top1": 42.0}\n')
    return url


# (id, extra --set items, expected texts in the error line); every case also gets --overwrite.
CASES: list[tuple[str, list[str], list[str]]] = [
    ("teacher_missing", ["model.weights={root}/no-such-teacher.th"], ["cannot load the teacher", "file not found"]),
    (
        "checkpoint_does_not_fit",
        ["model.weights={wrong_keys}"],
        ["does not match CifarResNet", "missing key(s) [conv1.weight", "1 unexpected key(s) [not_a_layer.weight]"],
    ),
    ("checkpoint_needs_pickle", ["model.weights={evil}"], ["refused", "weights_only=True", "posix.mkdir"]),
    ("unknown_architecture", ["model.arch=resnet9000"], ["unknown model architecture 'resnet9000'", "did you mean"]),
    ("w_bits_above_8", ["quant.w_bits=9"], ["quant.w_bits", "less than or equal to 8"]),
    ("a_bits_below_2", ["quant.a_bits=1"], ["quant.a_bits", "greater than or equal to 2"]),
    (
        "micro_batches_with_adi",
        ["generate.micro_batch_size=8", "generate.method=adi"],
        ["generate.micro_batch_size cannot keep the ADI term exact", "adi_weight=0"],
    ),
    ("distill_lr_zero", ["distill.lr=0"], ["distill.lr", "greater than 0"]),
    ("generate_lr_negative", ["generate.lr=-0.5"], ["generate.lr", "greater than 0"]),
    ("distill_batch_size_zero", ["distill.batch_size=0"], ["distill.batch_size", "greater than or equal to 1"]),
    ("generate_batch_size_zero", ["generate.batch_size=0"], ["generate.batch_size", "greater than or equal to 2"]),
    ("generate_iterations_zero", ["generate.iterations=0"], ["generate.iterations", "greater than or equal to 1"]),
    (
        "distill_iterations_negative",
        ["distill.iterations_per_epoch=-3"],
        ["distill.iterations_per_epoch", "greater than or equal to 1"],
    ),
    ("distill_epochs_negative", ["distill.epochs=-1"], ["distill.epochs", "greater than or equal to 0"]),
    ("unknown_key", ["distill.epoch=3"], ["unknown key 'distill.epoch'", "did you mean 'distill.epochs'?"]),
    ("unknown_key_alias", ["distill.learning_rate=0.1"], ["did you mean 'distill.lr'?"]),
    (
        "test_set_classes",
        ["eval.data={test100}"],
        ["test100.npz: label 10 at index 10 is not a class index (0..9: the model predicts 10 classes)"],
    ),
    (
        "user_module_missing",
        ["model.arch=no_such_user_module:build"],
        ["cannot load the teacher", "no module named 'no_such_user_module'", "PYTHONPATH"],
    ),
    (
        "teacher_without_batchnorm",
        ["model.arch=nobn_nets:mlp", "model.weights=null"],
        ["has no BatchNorm layer", "generate.method=intraq", "generate.method=gaussian"],
    ),
]


def _applies(command: str, items: list[str]) -> bool:
    """generate never evaluates; train synthesizes nothing (no teacher BatchNorm needed)."""
    if command == "generate" and items[0].startswith("eval."):
        return False
    return not (command == "train" and items[0].startswith("model.arch=nobn"))  # train synthesizes nothing


@pytest.mark.parametrize(
    ("command", "items", "expected"),
    [(cmd, c[1], c[2]) for c in CASES for cmd in ("run", "generate", "train") if _applies(cmd, c[1])],
    ids=[f"{cmd}-{c[0]}" for c in CASES for cmd in ("run", "generate", "train") if _applies(cmd, c[1])],
)
def test_bad_value_is_one_line_and_touches_nothing(
    command: str, items: list[str], expected: list[str], files: dict[str, Path], existing: Path
) -> None:
    before = snapshot(existing)
    args = [item.format(**files) for item in items]
    res = runner.invoke(app, cli_args(command, str(existing), *args, flags=("--overwrite",)))
    assert_one_line_error(res.output, res.exit_code, *expected)
    assert snapshot(existing) == before
    assert not files["marker"].exists(), "the malicious checkpoint was unpickled"


def test_debug_shows_the_traceback(files: dict[str, Path], existing: Path) -> None:
    res = runner.invoke(app, ["--debug", *cli_args("run", str(existing), "model.arch=resnet9000")])
    assert res.exit_code != 2
    assert isinstance(res.exception, InputError)


def test_unknown_key_in_a_yaml_file(files: dict[str, Path], existing: Path) -> None:
    before = snapshot(existing)
    res = runner.invoke(app, ["run", "-c", str(files["typo"]), "-o", str(existing), "--overwrite"])
    assert_one_line_error(res.output, res.exit_code, "unknown key 'epoch' in DistillConfig", "did you mean 'epochs'?")
    assert snapshot(existing) == before


def test_malformed_yaml(files: dict[str, Path], existing: Path) -> None:
    before = snapshot(existing)
    res = runner.invoke(app, ["run", "-c", str(files["malformed"]), "-o", str(existing), "--overwrite"])
    assert_one_line_error(res.output, res.exit_code, "malformed YAML", "line 2, column 7")
    assert snapshot(existing) == before


def test_invalid_cluster_yaml(files: dict[str, Path], existing: Path) -> None:
    before = snapshot(existing)
    res = runner.invoke(
        app, [*cli_args("run", str(existing), flags=("--overwrite",)), "--cluster", str(files["cluster"])]
    )
    assert_one_line_error(res.output, res.exit_code, "cluster.yaml: schema violation", "'foo' was unexpected")
    assert snapshot(existing) == before


@pytest.mark.parametrize("url", ["ftp://host/run", "gs://bucket/run", "htps://host/run"])
def test_unsupported_storage_scheme(url: str) -> None:
    res = runner.invoke(app, cli_args("run", url))
    assert_one_line_error(res.output, res.exit_code, "unsupported storage scheme", "supported: local path")


def test_unwritable_location(files: dict[str, Path]) -> None:
    res = runner.invoke(app, cli_args("run", str(files["a_file"] / "run")))
    assert_one_line_error(res.output, res.exit_code, "a-file/run failed", "Not a directory")
    assert files["a_file"].read_text() == "not a directory\n"


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="root bypasses directory permission bits; test_unwritable_location covers root",
)
def test_read_only_location(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        res = runner.invoke(app, cli_args("run", str(ro / "run")))
    finally:
        ro.chmod(0o755)
    assert_one_line_error(res.output, res.exit_code, "Permission denied")


def test_location_holding_a_run_needs_resume_or_overwrite(existing: Path) -> None:
    before = snapshot(existing)
    for command in ("run", "generate"):
        res = runner.invoke(app, cli_args(command, str(existing)))
        assert_one_line_error(res.output, res.exit_code, "already holds a run", "--resume", "--overwrite")
    res = runner.invoke(app, cli_args("train", str(existing)))
    assert_one_line_error(res.output, res.exit_code, "already holds a trained student", "--overwrite")
    assert snapshot(existing) == before


def test_resume_of_another_config_and_conflicting_flags(existing: Path) -> None:
    before = snapshot(existing)
    res = runner.invoke(app, cli_args("run", str(existing), "seed=7", flags=("--resume",)))
    assert_one_line_error(res.output, res.exit_code, "holds a run of a different config")
    res = runner.invoke(app, cli_args("run", str(existing), flags=("--resume", "--overwrite")))
    assert_one_line_error(res.output, res.exit_code, "--resume and --overwrite are mutually exclusive")
    res = runner.invoke(app, cli_args("generate", str(existing), flags=("--repair", "--overwrite")))
    assert_one_line_error(res.output, res.exit_code, "--repair and --overwrite are mutually exclusive")
    assert snapshot(existing) == before


# -- S3 credentials ------------------------------------------------------------------------------


def _s3_existing(bucket: str) -> tuple[Storage, dict[str, Any]]:
    storage = Storage.from_url(f"{bucket}/existing")
    storage.write_bytes_atomic("run.yaml", b"name: other\n")
    storage.write_bytes_atomic("metrics.json", b'{"quant_top1": 42.0}\n')
    return storage, _s3_snapshot(storage)


def _s3_snapshot(storage: Storage) -> dict[str, Any]:
    paths = storage.fs.find(storage.pyarrow_path(""))
    return {p: (storage.fs.info(p)["LastModified"], storage.fs.cat_file(p)) for p in paths}


def test_wrong_s3_credentials(s3_bucket: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    storage, before = _s3_existing(s3_bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAINTRAQUNKNOWNKEY")
    with s3_server.require_auth():
        res = runner.invoke(app, cli_args("run", storage.url, flags=("--overwrite",)))
    monkeypatch.undo()
    assert_one_line_error(res.output, res.exit_code, "access denied", "InvalidAccessKeyId", "AWS_ACCESS_KEY_ID")
    assert FAKE_SECRET not in res.output
    assert _s3_snapshot(storage) == before


def test_missing_s3_credentials(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage, before = _s3_existing(s3_bucket)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    res = runner.invoke(app, cli_args("run", storage.url, flags=("--overwrite",)))
    monkeypatch.undo()
    assert_one_line_error(res.output, res.exit_code, "credentials missing", "NoCredentialsError")
    assert _s3_snapshot(storage) == before


# -- errors that arrive wrapped --------------------------------------------------------------------


def _ray_task_error(cause: BaseException) -> BaseException:
    from ray.exceptions import RayTaskError

    trace = f"Traceback (most recent call last):\n  ...\n{type(cause).__name__}: {cause}"
    return RayTaskError("f", trace, cause, proctitle="ray::f", pid=1, ip="127.0.0.1").as_instanceof_cause()


def _botocore_in_oserror() -> BaseException:
    from botocore.exceptions import NoCredentialsError

    try:
        try:
            raise NoCredentialsError()
        except NoCredentialsError as exc:
            raise OSError("s3fs wrapped it") from exc
    except OSError as exc:
        return exc


def _wrapped_cases() -> list[tuple[str, Any, str]]:
    from ray.train import ControllerError, WorkerGroupError

    from pipeline.generate import GenerationError
    from pipeline.shards import ShardError

    bad = ShardError("shard 3 (/x/shard-00003.parquet): checksum mismatch", 3)
    return [
        ("ray_task", lambda: _ray_task_error(ValueError("bad value inside a task")), "bad value inside a task"),
        (
            "train_worker",
            lambda: WorkerGroupError("rank 0 failed", {1: RuntimeError("other"), 0: _ray_task_error(bad)}),
            "shard 3 (/x/shard-00003.parquet): checksum mismatch",
        ),
        ("train_controller", lambda: ControllerError(FileNotFoundError("no such file: x")), "no such file: x"),
        ("actor_init", lambda: GenerationError("a generator actor could not start: ValueError: v"), "could not start"),
        ("botocore", _botocore_in_oserror, "credentials missing"),
    ]


@pytest.mark.parametrize("index", range(5), ids=["ray_task", "train_worker", "train_controller", "actor_init", "boto"])
def test_wrapped_errors_reach_the_one_line_path(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    name, make, expected = _wrapped_cases()[index]

    @cli._guard
    def command() -> None:
        raise make()

    with pytest.raises(typer.Exit) as exit_info:
        command()
    assert exit_info.value.exit_code == 2, name
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def test_a_bug_keeps_its_traceback() -> None:
    @cli._guard
    def command() -> None:
        raise _ray_task_error(KeyError("unexpected"))

    assert explain(KeyError("x")) is None
    with pytest.raises(KeyError):
        command()


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_value_error_raised_in_a_ray_task_is_explained(ray_cluster: dict[str, Any]) -> None:
    import ray

    @ray.remote(num_cpus=0)
    def check(n: int) -> int:
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        return n

    with pytest.raises(Exception) as info:
        ray.get(check.remote(-1), timeout=60)
    assert explain(info.value) == "n must be positive, got -1"
