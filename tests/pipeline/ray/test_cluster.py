"""pipeline.ray.cluster: config loading errors, head address, token auth decisions, one local Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline.ray.cluster import (
    ClusterAuthError,
    ClusterConfigError,
    TokenSource,
    _dashboard_url,
    client_address,
    connect,
    find_auth_token,
    head_address,
    load_cluster_config,
    resolve_auth_mode,
    token_auth_required,
)

REPO = Path(__file__).resolve().parents[3]
LOCAL_YAML = REPO / "clusters" / "local.yaml"
GPU_YAML = REPO / "clusters" / "gpu.yaml"
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _write(tmp_path: Path, data: object, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def _local_raw() -> dict:
    return yaml.safe_load(LOCAL_YAML.read_text(encoding="utf-8"))


def _gpu_raw() -> dict:
    return yaml.safe_load(GPU_YAML.read_text(encoding="utf-8"))


def _single_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- load_cluster_config -------------------------------------------------------------------


def test_module_import_does_not_import_ray() -> None:
    code = "import sys, pipeline.ray.cluster; sys.exit('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode()


@pytest.mark.parametrize("path", [LOCAL_YAML, GPU_YAML], ids=["local", "gpu"])
def test_repo_cluster_configs_load(path: Path) -> None:
    cfg = load_cluster_config(path)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert token_auth_required(cfg)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ClusterConfigError, match="not found") as exc:
        load_cluster_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in _single_line(exc)


def test_malformed_yaml_reports_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "cluster_name: x\nprovider:\n  type: local\n  head_ip: [1.2.3.4\n")
    with pytest.raises(ClusterConfigError, match=r"malformed YAML at line \d+, column \d+") as exc:
        load_cluster_config(path)
    assert str(path) in _single_line(exc)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "must be a mapping"),
        ("- a\n- b\n", "must be a mapping"),
        ("cluster_name: x\n", "missing `provider`"),
        ("provider: {type: local, worker_ips: []}\n", "head_ip"),
        ("provider: {type: local, head_ip: 10.0.0.1}\n", "worker_ips"),
    ],
)
def test_structural_errors(tmp_path: Path, content: str, reason: str) -> None:
    with pytest.raises(ClusterConfigError, match=reason) as exc:
        load_cluster_config(_write(tmp_path, content))
    _single_line(exc)


def test_schema_violation_names_the_key(tmp_path: Path) -> None:
    raw = _gpu_raw()
    raw["available_node_types"]["ray.worker.gpu"]["gpus"] = 1
    with pytest.raises(ClusterConfigError, match=r"schema violation at available_node_types/ray.worker.gpu") as exc:
        load_cluster_config(_write(tmp_path, raw))
    assert "'gpus' was unexpected" in _single_line(exc)


def test_wrong_type_is_a_schema_violation(tmp_path: Path) -> None:
    raw = _local_raw()
    raw["auth"]["ssh_user"] = 7
    with pytest.raises(ClusterConfigError, match=r"schema violation at auth/ssh_user"):
        load_cluster_config(_write(tmp_path, raw))


def test_min_above_max_workers_is_rejected(tmp_path: Path) -> None:
    # Ray's validation compares only the sum of min_workers with the global max_workers.
    raw = _gpu_raw()
    raw["available_node_types"]["ray.worker.gpu"].update(min_workers=3, max_workers=2)
    with pytest.raises(ClusterConfigError, match=r"min_workers \(3\) > max_workers \(2\)"):
        load_cluster_config(_write(tmp_path, raw))

    raw["available_node_types"]["ray.worker.gpu"].update(min_workers=9, max_workers=9)
    with pytest.raises(ClusterConfigError, match="max_workers"):
        load_cluster_config(_write(tmp_path, raw))


# --- addresses -----------------------------------------------------------------------------


def test_head_address_local_provider() -> None:
    cfg = load_cluster_config(LOCAL_YAML)
    assert head_address(cfg) == "192.0.2.10"
    assert client_address(cfg) == "ray://192.0.2.10:10001"


def test_head_address_cloud_provider_is_none() -> None:
    cfg = load_cluster_config(GPU_YAML)
    assert head_address(cfg) is None
    assert client_address(cfg) == "auto"


def test_client_port_follows_head_start_command() -> None:
    cfg = {
        "provider": {"type": "local", "head_ip": "10.1.2.3", "worker_ips": []},
        "head_start_ray_commands": ["ray start --head --ray-client-server-port=20001"],
    }
    assert client_address(cfg) == "ray://10.1.2.3:20001"


# --- token auth ----------------------------------------------------------------------------


def test_token_auth_required_detection() -> None:
    assert token_auth_required({"head_start_ray_commands": ["export RAY_AUTH_MODE=token; ray start --head"]})
    assert token_auth_required({"docker": {"run_options": ["--env RAY_AUTH_MODE=token"]}})
    assert not token_auth_required({"head_start_ray_commands": ["RAY_AUTH_MODE=disabled ray start --head"]})
    assert not token_auth_required({"head_start_ray_commands": ["ray start --head"]})


def test_find_auth_token_precedence(tmp_path: Path) -> None:
    home = tmp_path / "home"
    default = home / ".ray" / "auth_token"
    assert find_auth_token({}, home) is None

    default.parent.mkdir(parents=True)
    default.write_text("tok-default\n")
    assert find_auth_token({}, home) == TokenSource("default", str(default))

    token_file = tmp_path / "token"
    token_file.write_text("tok-file")
    found = find_auth_token({"RAY_AUTH_TOKEN_PATH": str(token_file)}, home)
    assert found == TokenSource("path_env", str(token_file))
    assert find_auth_token({"RAY_AUTH_TOKEN": "tok", "RAY_AUTH_TOKEN_PATH": str(token_file)}, home) == TokenSource(
        "env"
    )
    assert TokenSource("env").describe() == "RAY_AUTH_TOKEN"  # names the source, never the token


def test_bad_token_path_fails_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ClusterAuthError, match="RAY_AUTH_TOKEN_PATH") as exc:
        find_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, tmp_path)
    _single_line(exc)
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ClusterAuthError, match="empty"):
        find_auth_token({"RAY_AUTH_TOKEN_PATH": str(empty)}, tmp_path)


def test_resolve_auth_mode(tmp_path: Path) -> None:
    token_cluster = {
        "cluster_name": "c",
        "head_start_ray_commands": ["export RAY_AUTH_MODE=token; ray start"],
    }
    open_cluster = {"cluster_name": "c", "head_start_ray_commands": ["ray start --head"]}
    assert resolve_auth_mode(open_cluster, {}, tmp_path) == "disabled"
    assert resolve_auth_mode(token_cluster, {"RAY_AUTH_TOKEN": "t"}, tmp_path) == "token"
    assert resolve_auth_mode(open_cluster, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t"}, tmp_path) == "token"
    assert resolve_auth_mode(None, {"RAY_AUTH_MODE": "disabled"}, tmp_path) == "disabled"

    with pytest.raises(ClusterAuthError, match="no token was found") as exc:
        resolve_auth_mode(token_cluster, {}, tmp_path)
    assert "cluster 'c' requires it" in _single_line(exc)
    with pytest.raises(ClusterAuthError, match="RAY_AUTH_MODE=token"):
        resolve_auth_mode(open_cluster, {"RAY_AUTH_MODE": "token"}, tmp_path)
    with pytest.raises(ClusterAuthError, match="RAY_AUTH_MODE=disabled here") as exc:
        resolve_auth_mode(token_cluster, {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "t"}, tmp_path)
    _single_line(exc)


def test_connect_fails_early_without_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in AUTH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ClusterAuthError, match="no token was found") as exc:
        connect(LOCAL_YAML)
    _single_line(exc)
    assert "RAY_AUTH_MODE" not in os.environ  # nothing was switched on

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ClusterAuthError, match="disabled here"):
        connect(LOCAL_YAML)


def test_connect_rejects_num_cpus_for_a_cluster() -> None:
    with pytest.raises(ValueError, match="local Ray only"):
        connect(LOCAL_YAML, num_cpus=2)


def test_connect_reports_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ClusterConfigError, match="not found"):
        connect(tmp_path / "missing.yaml")


def test_local_connect_checks_token_path_before_starting_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ClusterAuthError, match="RAY_AUTH_TOKEN_PATH"):
        connect(None, num_cpus=1, dashboard=False)


def test_dashboard_url_gets_a_scheme() -> None:
    assert _dashboard_url(SimpleNamespace(dashboard_url="127.0.0.1:8265")) == "http://127.0.0.1:8265"
    assert _dashboard_url(SimpleNamespace(dashboard_url="https://h:1")) == "https://h:1"
    assert _dashboard_url(SimpleNamespace(dashboard_url="")) is None


# --- one real local Ray --------------------------------------------------------------------


_CONNECT_SCRIPT = """
import os
import time

import ray
from pipeline.ray.cluster import connect


def workers_started() -> int:
    log = os.path.join(connection.context.address_info["session_dir"], "logs", "raylet.out")
    with open(log) as f:
        return f.read().count("Started worker process")

connection = connect(None, num_cpus=2, dashboard=False)
try:
    assert ray.is_initialized()
    assert connection.local
    assert connection.dashboard_url is None
    assert connection.address.startswith("127.0.0.1:"), connection.address
    assert ray.cluster_resources()["CPU"] == 2
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    time.sleep(2.0)  # Ray's default prestarts num_cpus idle workers right after the driver connects
    assert workers_started() == 0, f"{workers_started()} worker processes started before any work"

    @ray.remote(num_cpus=1)
    def square(x: int) -> int:
        return x * x

    assert ray.get(square.remote(7)) == 49
finally:
    connection.shutdown()
assert not ray.is_initialized()
print("connected-ok")
"""


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_connect_starts_a_local_ray() -> None:
    # A fresh process: connect() starts its own Ray, whatever Ray the test session runs.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CONNECT_SCRIPT], capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "connected-ok" in out.stdout
