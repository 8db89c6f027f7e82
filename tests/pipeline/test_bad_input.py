"""Bad input: one clear line, exit code 2, no traceback (unless --debug), nothing deleted or overwritten.

Every command is aimed at a location that already holds a run and, where the flag applies, is
given ``--overwrite``: a refused command must still leave every file of that location as it was
(same names, bytes and mtimes). Checks happen before Ray starts and before the location is
touched (:func:`pipeline.run.job.open_run`), so each case takes well under a second.

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

from pipeline.cli import app as cli
from pipeline.cli.app import app
from pipeline.cli.explain import explain
from pipeline.errors import InputError
from pipeline.storage.manifest import Manifest
from pipeline.storage.store import Storage
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
    images = np.zeros((10, 32, 32, 3), np.uint8)
    for name, labels in (
        ("labels_2d", np.arange(10).reshape(5, 2)),
        ("labels_negative", np.array([0, 1, -1, 3, 4, 5, 6, 7, 8, 9])),
        ("labels_fractional", np.array([0.0, 1.0, 2.5, 3, 4, 5, 6, 7, 8, 9])),
        ("labels_text", np.array(list("abcdefghij"))),
    ):
        out[name] = root / f"{name}.npz"
        np.savez(out[name], images=images, labels=labels)
    out["images_28px"] = root / "images_28px.npz"  # the model takes 32x32 and does not resize
    np.savez(out["images_28px"], images=np.zeros((10, 28, 28, 3), np.uint8), labels=np.arange(10))
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
    ("w_bits_above_8", ["quant.w_bits=9"], ["quant.w_bits: 9 is above the maximum 8"]),
    ("a_bits_below_2", ["quant.a_bits=1"], ["quant.a_bits: 1 is below the minimum 2"]),
    (
        "micro_batches_with_adi",
        ["generate.micro_batch_size=8", "generate.method=adi"],
        ["generate.micro_batch_size cannot keep the ADI term exact", "adi_weight=0"],
    ),
    ("distill_lr_zero", ["distill.lr=0"], ["distill.lr: 0 is too small: it must be greater than 0"]),
    ("generate_lr_negative", ["generate.lr=-0.5"], ["generate.lr: -0.5 is too small: it must be greater than 0"]),
    ("distill_batch_size_zero", ["distill.batch_size=0"], ["distill.batch_size: 0 is below the minimum 1"]),
    ("generate_batch_size_zero", ["generate.batch_size=0"], ["generate.batch_size: 0 is below the minimum 2"]),
    ("generate_iterations_zero", ["generate.iterations=0"], ["generate.iterations: 0 is below the minimum 1"]),
    (
        "distill_iterations_negative",
        ["distill.iterations_per_epoch=-3"],
        ["distill.iterations_per_epoch: -3 is below the minimum 1"],
    ),
    ("distill_epochs_negative", ["distill.epochs=-1"], ["distill.epochs: -1 is below the minimum 0"]),
    ("unknown_key", ["distill.epoch=3"], ["unknown key 'distill.epoch'", "did you mean 'distill.epochs'?"]),
    ("unknown_key_alias", ["distill.learning_rate=0.1"], ["did you mean 'distill.lr'?"]),
    (
        "test_set_classes",
        ["eval.data={test100}"],
        ["test100.npz: label 10 at index 10 is not a class index (0..9: the model predicts 10 classes)"],
    ),
    (
        "test_set_labels_2d",
        ["eval.data={labels_2d}"],
        ["labels_2d.npz: labels must be a 1-D array of class indices, got shape (5, 2)"],
    ),
    (
        "test_set_label_negative",
        ["eval.data={labels_negative}"],
        ["labels_negative.npz: label -1 at index 2 is not a class index"],
    ),
    (
        "test_set_label_fractional",
        ["eval.data={labels_fractional}"],
        ["labels_fractional.npz: label 2.5 at index 2 is not an integer class index"],
    ),
    (
        "test_set_labels_text",
        ["eval.data={labels_text}"],
        ["labels_text.npz: labels must be integer class indices, got dtype <U1"],
    ),
    (
        "test_set_image_size",
        ["eval.data={images_28px}"],
        ["images_28px.npz: images are 28x28, but the model takes 32x32 (model.image_size)"],
    ),
    (
        "mean_on_the_0_255_scale",
        ["model.mean=[123.7, 116.3, 103.5]"],
        ["model.mean=[123.7, 116.3, 103.5] is beyond the [0, 1] scale", "model.mean=0.4851,0.4561,0.4059"],
    ),
    (
        "std_on_the_0_255_scale",
        ["model.std=[58.4, 57.1, 57.4]"],
        ["model.std=[58.4, 57.1, 57.4] is beyond the [0, 1] scale", "divided by 255"],
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


# -- settings checked before anything is written -------------------------------------------------
#
# Each row was once a wrong number or a late failure: a batch larger than the training set trained
# on fewer images than metrics.json said; --bits W9A4 said "1 validation error for QuantConfig";
# device=cuda without a GPU wrote run.yaml and a log first (so the corrected command was refused,
# "already holds a run"); a key given twice in a YAML file kept the last one silently, an empty file
# ran every default; an empty or text weights file gave "checkpoint:" or "101". Every one is now one
# line, exit 2, and the WHOLE parent directory is as it was (files and directories, bytes and mtimes).


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root``: a file → (size, mtime_ns, sha256), a directory → ("dir", mtime_ns)."""
    import hashlib

    out: dict[str, tuple[Any, ...]] = {}
    for path in sorted(root.rglob("*")):
        rel, stat = str(path.relative_to(root)), path.lstat()
        if path.is_dir():
            out[rel] = ("dir", stat.st_mtime_ns)
        else:
            data = path.read_bytes()
            out[rel] = (len(data), stat.st_mtime_ns, hashlib.sha256(data).hexdigest())
    return out


def _inputs(root: Path) -> dict[str, Path]:
    """Bad weights and config files under ``root``."""
    root.mkdir()
    good = root / "good.pt"
    torch.save({"conv1.weight": torch.zeros(16, 3, 3, 3)}, good)
    out = {
        "empty_weights": root / "empty.pt",
        "text_weights": root / "text.pt",
        "truncated_weights": root / "truncated.pt",
        "list_weights": root / "list.pt",
        "pickle_weights": root / "pickle.pt",
        "duplicate_yaml": root / "duplicate.yaml",
        "empty_yaml": root / "empty.yaml",
    }
    out["empty_weights"].write_bytes(b"")
    out["text_weights"].write_text("101\n")
    out["truncated_weights"].write_bytes(good.read_bytes()[:300])
    torch.save([torch.zeros(1), torch.zeros(2), torch.zeros(3)], out["list_weights"])
    import pickle

    out["pickle_weights"].write_bytes(pickle.dumps({"conv1.weight": [0.0]}, protocol=4))
    out["duplicate_yaml"].write_text("name: dup\ndistill:\n  epochs: 2\n  batch_size: 8\n  epochs: 5\n")
    out["empty_yaml"].write_text("# nothing set here\n\n")
    good.unlink()
    return out


#: (id, the arguments after the command and location, texts of the one error line). ``{x}`` is a file
#: of :func:`_inputs`; ``{config}`` replaces ``-c smoke``.
BEFORE_ANYTHING: list[tuple[str, list[str], list[str]]] = [
    (
        "batch_larger_than_training_images",  # TINY: 32 images, seed 0, holdout 0.1 -> 7 held out, 25 trained on
        ["distill.batch_size=100"],
        [
            "distill.batch_size=100 is larger than the 25 training images (generate.num_images: 32 synthetic images, "
            "7 held out by distill.holdout_fraction=0.1)",
            "set distill.batch_size to at most 25",
        ],
    ),
    (
        "device_cuda_ray",
        ["device=cuda", "executor=ray"],
        ["device=cuda, but this machine (where the run's local Ray runs) has no CUDA GPU", "device=auto or device=cpu"],
    ),
    ("device_cuda_local", ["device=cuda"], ["device=cuda, but this machine has no CUDA GPU"]),
    (
        "use_gpu_yes",
        ["device=auto", "executor=ray", "ray.use_gpu=yes"],
        ["ray.use_gpu=yes, but this machine (where the run's local Ray runs) has no CUDA GPU", "ray.use_gpu=auto"],
    ),
    (
        "yaml_duplicate_key",
        ["{config}={duplicate_yaml}"],
        ["duplicate.yaml: duplicate key 'distill.epochs' at line 5 (first at line 3)", "keep only the last"],
    ),
    ("yaml_empty", ["{config}={empty_yaml}"], ["empty.yaml is empty (no settings)", "every default"]),
    (
        "weights_empty_file",
        ["model.weights={empty_weights}"],
        ["empty.pt as a torch checkpoint: it is an empty file (0 bytes)"],
    ),
    (
        "weights_text_file",
        ["model.weights={text_weights}"],
        ["text.pt as a torch checkpoint: it is a text file, not a torch checkpoint (it starts with '101')"],
    ),
    (
        "weights_truncated_zip",
        ["model.weights={truncated_weights}"],
        ["truncated.pt as a torch checkpoint: it is a truncated or damaged zip archive (300 bytes"],
    ),
    (
        "weights_not_a_state_dict",
        ["model.weights={list_weights}"],
        ["no state_dict found in", "list.pt: it holds a list of 3 item(s), not a dict"],
    ),
    (
        "weights_plain_pickle",
        ["model.weights={pickle_weights}"],
        ["pickle.pt as a torch checkpoint: it is a plain Python pickle, not a file written by torch.save"],
    ),
]


def _command_args(items: list[str], files: dict[str, Path], location: str, overwrite: bool) -> list[str]:
    config, sets_ = "smoke", []
    for item in items:
        if item.startswith("{config}="):
            config = item.split("=", 1)[1].format(**files)
        else:
            sets_.append(item.format(**files))
    args = cli_args("run", location, *sets_, flags=("--overwrite",) if overwrite else ())
    args[args.index("-c") + 1] = config
    return args


@pytest.mark.skipif(torch.cuda.is_available(), reason="the device rows need a machine without a GPU")
@pytest.mark.parametrize("where", ["new", "existing"])
@pytest.mark.parametrize(("items", "expected"), [c[1:] for c in BEFORE_ANYTHING], ids=[c[0] for c in BEFORE_ANYTHING])
def test_refused_before_anything_is_written(
    items: list[str], expected: list[str], where: str, tmp_path: Path, existing: Path
) -> None:
    files = _inputs(tmp_path / "inputs")
    location = existing if where == "existing" else tmp_path / "runs" / "new"
    before = tree(tmp_path)
    res = runner.invoke(app, _command_args(items, files, str(location), overwrite=where == "existing"))
    assert_one_line_error(res.output, res.exit_code, *expected)
    assert tree(tmp_path) == before  # no run.yaml, log, LOCK or directory; the existing run untouched


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--bits", "W9A4"], "error: --bits W9A4: quant.w_bits: 9 is above the maximum 8"),
        (
            ["--bits", "W1A1"],
            "error: --bits W1A1: quant.w_bits: 1 is below the minimum 2; quant.a_bits: 1 is below the minimum 2",
        ),
        (["--bits", "W4A4", "--calib-images", "0"], "error: --calib-images: 0 is below the minimum 1"),
    ],
    ids=["bits_above_max", "bits_below_min", "calib_images_zero"],
)
def test_evaluate_options_name_the_key_and_range(
    options: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    res = runner.invoke(app, ["evaluate", "--calib", "cifar10-test", "--limit", "10", "-q", *options])
    assert assert_one_line_error(res.output, res.exit_code) == expected
    assert tree(tmp_path) == before


def test_batch_check_boundary() -> None:
    """25 of the 32 TINY images are trained on: a batch of 25 runs, 26 is refused, no distillation needs none."""
    from pipeline.config import load_run_config
    from pipeline.stages.train import check_batch

    cfg = load_run_config("smoke", [*TINY, "distill.batch_size=25"])
    check_batch(cfg, 32, source="test")
    with pytest.raises(InputError, match=r"distill.batch_size=26 is larger than the 25 training images"):
        check_batch(
            cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"batch_size": 26})}), 32, source="t"
        )
    check_batch(
        cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"batch_size": 26, "epochs": 0})}),
        32,
        source="t",
    )


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (
            ["distill.batch_size=26"],
            "error: distill.batch_size=26 is larger than the 25 training images (generate.num_images: 32 synthetic",
        ),
        (
            ["distill.batch_size=8", "tune.space={distill.batch_size: [8, 30], distill.lr: [0.0001, 0.01]}"],
            "error: distill.batch_size=30 is larger than the 25 training images (generate.num_images, with "
            "distill.batch_size at their extremes in tune.space: 32 synthetic",
        ),
    ],
    ids=["base_batch", "batch_in_the_space"],
)
def test_tune_refuses_a_batch_larger_than_a_trials_training_images(
    sets: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each trial trains on TINY's 25 of 32 images: a batch above that (as set, or at the top of the
    searched range) is one line before Ray starts or the log file is written, as for ``run``."""
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    args = ["tune", "-c", "smoke", "-q", "--storage", str(tmp_path / "tune")]
    for item in (*TINY, *sets):
        args += ["--set", item]
    res = runner.invoke(app, args)
    assert assert_one_line_error(res.output, res.exit_code).startswith(expected)
    assert tree(tmp_path) == before


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens on it once the socket is closed


def test_unreachable_s3_endpoint_fails_fast_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials set, the endpoint a closed port: one line within 5 s, no retry warnings on the terminal."""
    import time

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "AKIAINTRAQTESTKEY",
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    t0 = time.monotonic()
    res = runner.invoke(app, cli_args("run", "s3://intraq-unreachable/run", f"storage.endpoint_url={endpoint}"))
    seconds = time.monotonic() - t0
    line = assert_one_line_error(res.output, res.exit_code, "s3://intraq-unreachable/run", endpoint, "failed after 2")
    assert "EndpointConnectionError" in line and FAKE_SECRET not in res.output
    assert res.output.strip().splitlines() == [line], res.output  # no warning lines before it
    assert seconds <= 5.0, seconds
    assert tree(tmp_path) == before


def _bucket_tree(storage: Storage) -> dict[str, Any]:
    bucket = storage.pyarrow_path("").split("/", 1)[0]
    return {p: (storage.fs.info(p)["LastModified"], storage.fs.cat_file(p)) for p in storage.fs.find(bucket)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_refusal_leaves_an_s3_bucket_untouched(s3_bucket: str) -> None:
    """device=cuda on the default (Ray) executor at an S3 location: no run.yaml, no logs/, no LOCK."""
    storage, _ = _s3_existing(s3_bucket)
    before = _bucket_tree(storage)
    for url in (storage.url, f"{s3_bucket}/fresh"):
        res = runner.invoke(app, cli_args("run", url, "device=cuda", "executor=ray", flags=("--overwrite",)))
        assert_one_line_error(res.output, res.exit_code, "device=cuda, but this machine")
    assert _bucket_tree(storage) == before


def test_write_probe_leaves_no_directory(tmp_path: Path) -> None:
    """The location's write probe removes the directories it had to create (they are made again by the run)."""
    Storage.from_url(str(tmp_path / "a" / "b" / "run")).check_writable()
    assert list(tmp_path.iterdir()) == []


def test_config_sections_are_the_run_config_layout() -> None:
    """The prefixes one-line validation errors give each config class are where RunConfig holds them."""
    from pydantic import BaseModel

    from intraq_core.config import QuantConfig, ReconstructConfig
    from intraq_core.errors import CONFIG_SECTIONS
    from pipeline.config import RunConfig

    layout = {
        field.annotation.__name__: name
        for name, field in RunConfig.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }
    assert QuantConfig.model_fields["reconstruct"].annotation is ReconstructConfig
    expected = {**layout, "ReconstructConfig": "quant.reconstruct"}
    assert expected == CONFIG_SECTIONS


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

    from pipeline.errors import GenerationError
    from pipeline.storage.shards import ShardError

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
        (
            "pydantic",
            _validation_error,
            "quant.w_bits: 9 is above the maximum 8; quant.a_bits: 1 is below the minimum 2",
        ),
    ]


def _validation_error() -> BaseException:
    """What library code (``evaluate_command(bits=(9, 1))``) raises: a bare pydantic ValidationError."""
    from pydantic import ValidationError

    from intraq_core.config import QuantConfig

    try:
        QuantConfig(w_bits=9, a_bits=1)
    except ValidationError as exc:
        return exc
    raise AssertionError("QuantConfig accepted w_bits=9")


@pytest.mark.parametrize(
    "index", range(6), ids=["ray_task", "train_worker", "train_controller", "actor_init", "boto", "pydantic"]
)
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
