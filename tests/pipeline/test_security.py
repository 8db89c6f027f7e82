"""Security: no untrusted code execution, no credential leaks, Ray on loopback with token auth.

* The package never evaluates or unpickles user-supplied data: a scan of the source of
  ``intraq_core/`` and ``pipeline/`` (AST, so aliases such as ``from pickle import loads`` are
  caught) for eval/exec, pickle-family loads, unsafe YAML, ``torch.load`` without
  ``weights_only=True`` and ``np.load(allow_pickle=True)``. The documented exceptions are listed
  with their justification and checked to still hold.
* A malicious checkpoint is refused without being executed; a Parquet shard carrying a
  pickled-object column is refused without being unpickled (datasets are plain Parquet only).
* Credentials never appear in any output: a run against loopback S3 (plus its report) and a local
  run, with the secret key in the environment, leave no trace of it in any object or file written,
  in the CLI output, in the logs (captured at DEBUG) or in the session's Ray logs; nor does the
  error of a run whose secret is rejected.
* The local Ray binds every listening socket to 127.0.0.1; with token authentication configured
  the CLI switches Ray to token mode (so Ray sends the token) and fails in one line without one.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.storage.shards import ShardError, ShardInfo, read_shard, shard_path, validate_shard
from pipeline.storage.store import Storage
from tests.pipeline.conftest import FAKE_SECRET, S3Server
from tests.pipeline.run_helpers import REPO, assert_one_line_error, cli_args

pytestmark = pytest.mark.timeout(120)

runner = CliRunner()

PACKAGES = ("intraq_core", "pipeline")

# Calls that evaluate code or deserialize arbitrary objects (fully qualified after resolving imports).
FORBIDDEN_CALLS = {
    "eval",
    "exec",
    "compile",
    "__import__",
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "ray.cloudpickle.load",
    "ray.cloudpickle.loads",
    "dill.load",
    "dill.loads",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "joblib.load",
    "pandas.read_pickle",
    "yaml.load",
    "yaml.load_all",
    "yaml.unsafe_load",
    "yaml.unsafe_load_all",
    "yaml.full_load",
    "yaml.full_load_all",
    "torch.jit.load",
    "torch.export.load",
    "torch.package.PackageImporter",
}

# The documented exceptions: (file, enclosing function, call) → why it is safe.
ALLOWED = {
    ("intraq_core/deploy.py", "run_exported", "torch.jit.load"): (
        "verification of an export: loads only the bytes export_bytes produced moments before in the "
        "same process (export_run → verify_export → run_exported), never a user-supplied file"
    ),
    ("intraq_core/deploy.py", "run_exported", "torch.export.load"): "as above, for the .pt2 format",
}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


class _Scanner(ast.NodeVisitor):
    """Collects (function, qualified call, call node) of every call, resolving import aliases."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.calls: list[tuple[str, str, ast.Call]] = []
        self.attributes: list[tuple[str, str]] = []  # (function, attribute name) of every a.b
        self.function = "<module>"

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.aliases[alias.asname or alias.name.split(".")[0]] = (
                alias.name if alias.asname else alias.name.split(".")[0]
            )

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}" if node.module else alias.name

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer, self.function = self.function, node.name
        self.generic_visit(node)
        self.function = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.attributes.append((self.function, node.attr))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = _dotted(node.func)
        if name is not None:
            head, _, rest = name.partition(".")
            resolved = self.aliases.get(head, head)
            self.calls.append((self.function, f"{resolved}.{rest}" if rest else resolved, node))
        self.generic_visit(node)


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _scanners() -> dict[str, _Scanner]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            scanner = _Scanner()
            scanner.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
            out[str(path.relative_to(REPO))] = scanner
    return out


def package_calls() -> list[tuple[str, str, str, ast.Call]]:
    """(file, enclosing function, qualified call, node) of every call in the package."""
    return [(rel, fn, call, node) for rel, sc in _scanners().items() for fn, call, node in sc.calls]


def test_no_eval_or_unpickling_of_user_data_in_the_package() -> None:
    calls = package_calls()
    assert len(calls) > 1000, "the scan found suspiciously few calls"
    problems, allowed_seen = [], set()
    for rel, function, call, node in calls:
        where = f"{rel}:{node.lineno} in {function}()"
        if call in FORBIDDEN_CALLS:
            if (rel, function, call) in ALLOWED:
                allowed_seen.add((rel, function, call))
            else:
                problems.append(f"{where}: {call}(...)")
        elif call == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            problems.append(f"{where}: torch.load without weights_only=True")
        elif call in ("numpy.load", "numpy.lib.npyio.load") and not _is_false_or_absent(_keyword(node, "allow_pickle")):
            problems.append(f"{where}: numpy.load with allow_pickle")
    assert problems == [], "\n".join(problems)
    assert allowed_seen == set(ALLOWED), f"stale allow-list entries: {set(ALLOWED) - allowed_seen}"


def _is_false_or_absent(node: ast.AST | None) -> bool:
    return node is None or (isinstance(node, ast.Constant) and node.value is False)


def test_the_export_loader_only_sees_bytes_made_in_process() -> None:
    """The allow-listed loads stay reachable only through export_run's own verification."""
    callers = {(rel, fn) for rel, fn, call, _ in package_calls() if call.endswith("run_exported")}
    assert callers == {("intraq_core/deploy.py", "verify_export")}
    callers = {(rel, fn) for rel, fn, call, _ in package_calls() if call.endswith("verify_export")}
    assert callers == {("pipeline/stages/export.py", "export_run")}
    from pipeline.stages.export import export_run

    source = inspect.getsource(export_run)
    assert "blob, sites = export_bytes(" in source and "verify_export(fmt, blob," in source


def test_torchvision_cifar_is_checked_before_torchvision_unpickles_it() -> None:
    """The one indirect unpickling, in two places: ``eval.data: torchvision:cifar10`` (data.py) and
    the first download of the ``cifar10-test`` asset (assets.py) let torchvision read the official
    CIFAR batches, which are pickles. torchvision verifies every file's md5 against the checksums
    in its own source before loading it (also files already in a user-given ``eval.root``), so
    only the official files are ever unpickled: a substitute would need an md5 second preimage."""
    import torchvision.datasets as tvd

    users = {
        (rel, fn) for rel, sc in _scanners().items() for fn, attr in sc.attributes if attr in ("CIFAR10", "CIFAR100")
    }
    assert users == {("intraq_core/data.py", "_torchvision_cifar"), ("intraq_core/assets.py", "_fetch_cifar10_test")}
    for cls in (tvd.CIFAR10, tvd.CIFAR100):
        init = inspect.getsource(cls.__init__)
        assert init.index("self._check_integrity()") < init.index("pickle.load"), cls
        assert 'check_integrity(path, self.meta["md5"])' in inspect.getsource(cls._load_meta)
        assert all(len(md5) == 32 for _, md5 in cls.test_list)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


@pytest.mark.timeout(120)
def test_malicious_checkpoint_is_refused_not_executed(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil(marker)}, evil)
    for args in (
        ["evaluate", "--weights", str(evil), "--json"],
        ["evaluate", "--arch", str(evil), "--json"],
        cli_args("run", str(tmp_path / "run"), f"model.weights={evil}"),
        cli_args("run", str(tmp_path / "run"), f"model.arch={evil}"),
    ):
        res = runner.invoke(app, args)
        assert_one_line_error(res.output, res.exit_code, "weights_only=True", "posix.mkdir")
    assert not marker.exists()


def test_parquet_with_a_pickled_object_column_is_refused_without_unpickling(tmp_path: Path) -> None:
    # Importing Ray Data registers its pickled-object extension type: the worst case for a reader.
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectArray

    marker = tmp_path / "pwned"
    n = 2
    table = pa.table(
        {
            "image": ArrowPythonObjectArray.from_objects([_Evil(marker)] * n),
            "label": pa.array(np.zeros(n, np.int64)),
            "seed": pa.array(np.zeros(n, np.int64)),
            "index": pa.array(np.arange(n, dtype=np.int64)),
        }
    )
    meta = {"format": "intraq-shard/1", "shard": 0, "image_shape": [3, 32, 32], "num_classes": 10}
    table = table.replace_schema_metadata({b"intraq": json.dumps(meta).encode()})
    storage = Storage.from_url(str(tmp_path))
    storage.makedirs("shards")
    pq.write_table(table, tmp_path / shard_path(0))
    raw = (tmp_path / shard_path(0)).read_bytes()
    info = ShardInfo(0, shard_path(0), n, hashlib.sha256(raw).hexdigest(), len(raw))
    with pytest.raises(ShardError, match="column 'image' has type"):
        validate_shard(storage, info)
    with pytest.raises(ShardError, match="column 'image' has type"):
        read_shard(storage, shard_path(0))
    assert not marker.exists()


# -- credentials never leak ------------------------------------------------------------------


def _leaks(data: bytes, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s.encode() in data or quote(s, safe="").encode() in data]


def _scan_storage(storage: Storage, secrets: list[str]) -> tuple[int, list[str]]:
    paths = storage.fs.find(storage.pyarrow_path(""))
    found = [f"{p}: {leak}" for p in paths for leak in _leaks(storage.fs.cat_file(p), secrets)]
    return len(paths), found


def _scan_tree(root: Path, secrets: list[str]) -> tuple[int, list[str]]:
    files = [p for p in root.rglob("*") if p.is_file()]
    found = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        found += [f"{path}: {leak}" for leak in _leaks(data, secrets)]
    return len(files), found


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_credentials_never_reach_outputs_logs_or_errors(
    ray_cluster: dict[str, Any], s3_bucket: str, s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET  # set for the session (and Ray) by conftest
    secrets = [FAKE_SECRET]
    log_file = tmp_path / "debug.log"
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for noisy in ("botocore", "s3fs", "fsspec", "urllib3", "aiobotocore", "matplotlib", "PIL"):
        monkeypatch.setattr(logging.getLogger(noisy), "level", logging.INFO)
    outputs = []
    try:
        s3_url = f"{s3_bucket}/run"
        for args in (
            cli_args("run", s3_url),
            ["report", s3_url, "--no-tsne", "--real-images", "0"],
            cli_args("run", str(tmp_path / "local")),
        ):
            res = runner.invoke(app, args)
            assert res.exit_code == 0, res.output
            outputs.append(res.output)

        # A Ray worker (started with the secret in its environment) touching S3, for the Ray logs.
        @ray.remote(num_cpus=0)
        def list_run(url: str) -> list[str]:
            return Storage.from_url(url).ls("")

        assert "metrics.json" in ray.get(list_run.remote(s3_url), timeout=60)

        # The key id is known but the secret is wrong (it *is* the secret we are hiding): rejected.
        from tests.pipeline.storage.test_storage import _iam_user_key

        key_id, _ = _iam_user_key(s3_server.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        with s3_server.require_auth():
            res = runner.invoke(app, cli_args("run", f"{s3_bucket}/rejected"))
        assert_one_line_error(res.output, res.exit_code, "access denied", "SignatureDoesNotMatch")
        outputs.append(res.output)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()

    for output in outputs:
        assert _leaks(output.encode(), secrets) == [], output
    n_s3, found = _scan_storage(Storage.from_url(s3_url), secrets)
    assert Storage.from_url(s3_url).exists("report/report.html")
    assert n_s3 >= 10 and found == []  # run.yaml, manifest, shards, students, metrics, report, ...
    n_local, found = _scan_tree(tmp_path / "local", secrets)
    assert n_local >= 10 and found == []
    assert log_file.stat().st_size > 0 and _leaks(log_file.read_bytes(), secrets) == []
    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    n_ray, found = _scan_tree(session_dir / "logs", secrets)
    assert n_ray > 0 and found == [], found
    # Positive control: the scan does find the secret, also URL-quoted.
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "leak.txt").write_text(f"x={quote(FAKE_SECRET + '/+', safe='')}")
    assert _scan_tree(tmp_path / "control", [FAKE_SECRET + "/+"])[1] != []


# -- Ray: loopback only, token authentication ----------------------------------------------------


def _listening_sockets() -> dict[str, tuple[str, int]]:
    """socket inode → (ip, port) of every listening TCP socket of this machine (/proc/net)."""
    out = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            ip_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(ip_hex)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # per-word little endian
            out[fields[9]] = (socket.inet_ntop(family, raw), int(port_hex, 16))
    return out


def _ray_process_sockets() -> dict[str, str]:
    """socket inode → command line, for the processes of Ray's session (and this driver)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not (int(pid) == os.getpid() or "/ray/" in cmd or cmd.startswith("ray::")):
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    out[link[8:-1]] = cmd[:80]
        except OSError:
            continue
    return out


@pytest.mark.ray
@pytest.mark.timeout(60)
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_local_ray_listens_on_loopback_only(ray_cluster: dict[str, Any]) -> None:
    listening, owners = _listening_sockets(), _ray_process_sockets()
    ray_listening = {inode: addr for inode, addr in listening.items() if inode in owners}
    assert len(ray_listening) >= 4, "expected the GCS, raylet, dashboard and agents to listen"
    exposed = {f"{owners[i]} on {ip}:{port}" for i, (ip, port) in ray_listening.items()}
    exposed = {e for e in exposed if not any(f" on {lo}:" in e for lo in ("127.0.0.1", "::ffff:127.0.0.1", "::1"))}
    assert exposed == set()
    dashboard_port = int(ray_cluster["dashboard_url"].rsplit(":", 1)[1])
    assert ("127.0.0.1", dashboard_port) in ray_listening.values()


TOKEN_SCRIPT = r"""
import json, os, sys
import ray
from typer.testing import CliRunner
from pipeline.cli.app import app

seen = []
def fake_init(*args, **kwargs):  # stands in for the unreachable head of clusters/local.yaml
    seen.append({"address": kwargs.get("address"), "mode": os.environ.get("RAY_AUTH_MODE")})
    raise ConnectionError("simulated: no route to the head")
ray.init = fake_init

out, cluster = sys.argv[1], sys.argv[2]
args = ["run", "-c", "smoke", "-q", "-o", out, "--set", "executor=ray", "--set", "eval.limit=10", "--cluster", cluster]
results = {}
cases = {"no_token": {}, "disabled_here": {"RAY_AUTH_MODE": "disabled"}, "token": {"RAY_AUTH_TOKEN": sys.argv[3]}}
for case, env in cases.items():
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(name, None)
    os.environ.update(env)
    res = CliRunner().invoke(app, args)
    results[case] = {"exit": res.exit_code, "output": res.output, "seen": list(seen)}
    seen.clear()
print(json.dumps(results))
"""


@pytest.mark.timeout(120)
def test_cluster_token_auth_is_passed_and_required(tmp_path: Path) -> None:
    token = "intraq-test-ray-token-7f3e9a"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1")  # no ~/.ray/auth_token
    proc = subprocess.run(
        [sys.executable, "-c", TOKEN_SCRIPT, str(tmp_path / "run"), str(REPO / "clusters" / "local.yaml"), token],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    no_token = results["no_token"]
    assert_one_line_error(no_token["output"], no_token["exit"], "token authentication is on", "RAY_AUTH_TOKEN")
    assert no_token["seen"] == [], "Ray must not be contacted without a token"
    disabled = results["disabled_here"]
    assert_one_line_error(disabled["output"], disabled["exit"], "RAY_AUTH_MODE=disabled here")
    with_token = results["token"]
    assert with_token["seen"] == [{"address": "ray://192.0.2.10:10001", "mode": "token"}]
    assert_one_line_error(with_token["output"], with_token["exit"], "cannot reach Ray at ray://192.0.2.10:10001")
    assert all(token not in r["output"] for r in results.values())
    assert token not in proc.stderr
