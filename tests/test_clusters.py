"""The cluster-launcher YAMLs under clusters/ pass Ray's own schema validation, offline."""

from __future__ import annotations

import copy
import itertools
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
CLUSTERS = REPO / "clusters"
CLUSTER_FILES = ["local.yaml", "gpu.yaml"]


def _raw(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTERS / name).read_text(encoding="utf-8"))


def _validated(raw: dict[str, Any]) -> dict[str, Any]:
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def _ray_start_args(command: str) -> list[str]:
    """The arguments of the `ray start` inside a (possibly compound) shell command."""
    words = shlex.split(command.replace(";", " ; "))
    start = next(i for i, (a, b) in enumerate(itertools.pairwise(words)) if (a, b) == ("ray", "start"))
    rest = words[start + 2 :]
    return rest[: rest.index(";")] if ";" in rest else rest


def _auth_texts(cfg: dict[str, Any]) -> str:
    docker = cfg.get("docker") or {}
    parts = [
        *cfg["head_start_ray_commands"],
        *cfg["worker_start_ray_commands"],
        *docker.get("run_options", []),
    ]
    return "\n".join(parts)


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_yaml_passes_ray_validation(name: str) -> None:
    cfg = _validated(_raw(name))
    assert cfg["head_node_type"] in cfg["available_node_types"]


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_dashboard_binds_to_loopback_only(name: str) -> None:
    cfg = _validated(_raw(name))
    heads = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    assert len(heads) == 1
    args = _ray_start_args(heads[0])
    assert "--head" in args
    assert "--dashboard-host=127.0.0.1" in args
    assert not any("0.0.0.0" in c for c in cfg["head_start_ray_commands"])
    for command in cfg["worker_start_ray_commands"]:
        assert "--dashboard-host" not in command or "--dashboard-host=127.0.0.1" in command


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_token_auth_is_on_and_token_is_shipped(name: str) -> None:
    cfg = _validated(_raw(name))
    assert re.search(r"\bRAY_AUTH_MODE=token\b", _auth_texts(cfg))
    assert "RAY_AUTH_MODE=disabled" not in _auth_texts(cfg)
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    # The token only travels by file: never inline in the config.
    assert "RAY_AUTH_TOKEN=" not in (CLUSTERS / name).read_text(encoding="utf-8")


def test_local_yaml_installs_the_package_and_uses_ssh() -> None:
    raw = _raw("local.yaml")
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] and isinstance(raw["provider"]["worker_ips"], list)
    assert raw["auth"]["ssh_user"]
    assert any(re.search(r"pip install .*intraq-pipeline", c) for c in raw["setup_commands"])
    assert ".venv" in raw["rsync_exclude"]
    assert ".git" in raw["rsync_exclude"]


def test_gpu_yaml_uses_our_image_and_gpu_workers() -> None:
    raw = _raw("gpu.yaml")
    cfg = _validated(raw)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["provider"]["region"] and cfg["provider"]["availability_zone"]

    image = cfg["docker"]["image"]
    repository, _, tag = image.rpartition(":")
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    version = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.MULTILINE).group(1)
    assert repository.rsplit("/", 1)[-1] == "intraq-pipeline"
    assert tag == version, "the image tag tracks the project version in pyproject.toml"
    assert cfg["docker"]["container_name"]

    head_type = cfg["head_node_type"]
    head = cfg["available_node_types"][head_type]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))

    workers = {n: t for n, t in cfg["available_node_types"].items() if n != head_type}
    assert workers
    for node_type in workers.values():
        assert node_type["resources"]["GPU"] == 1
        assert node_type["resources"]["CPU"] >= 1
        assert node_type["min_workers"] == 0
        assert 1 <= node_type["max_workers"] <= cfg["max_workers"]
        assert node_type["node_config"]["InstanceType"].startswith("g5.")
    assert cfg["idle_timeout_minutes"] > 0


def _pinned_ray() -> str:
    """The exact Ray version pyproject.toml pins (``ray[...]==X``)."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    found = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\d.]+)", d))]
    assert len(found) == 1, f"pyproject.toml must pin ray exactly once, got {deps}"
    return found[0]


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_ray_is_pinned_to_the_pyproject_version(name: str) -> None:
    cfg = _validated(_raw(name))
    version = _pinned_ray()
    setup = "\n".join(cfg["setup_commands"])
    mentioned = set(re.findall(r"ray(?:\[[^\]]*\])?==([\d.]+)", setup))
    assert mentioned == {version}, (name, mentioned, version)
    if name == "gpu.yaml":  # the image brings Ray; the node refuses another version than the pin
        assert f"ray.__version__ == '{version}'" in setup
        assert cfg["docker"]["image"].rsplit(":", 1)[-1] and "rayproject/ray" not in cfg["docker"]["image"]
        assert f"rayproject/ray:{version}-" in (REPO / "Dockerfile").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_every_node_exports_metrics_and_the_dashboard_finds_grafana(name: str) -> None:
    cfg = _validated(_raw(name))
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert len(starts) == 1, key
        args = _ray_start_args(starts[0])
        ports = [a.split("=", 1)[1] for a in args if a.startswith("--metrics-export-port=")]
        assert len(ports) == 1 and ports[0].isdigit(), (key, args)
    head = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "RAY_GRAFANA_HOST=http://127.0.0.1:" in head and "RAY_PROMETHEUS_HOST=http://127.0.0.1:" in head


def test_gpu_yaml_names_its_image_once_and_logs_in_to_its_registry() -> None:
    text = (CLUSTERS / "gpu.yaml").read_text(encoding="utf-8")
    cfg = _validated(_raw("gpu.yaml"))
    image = cfg["docker"]["image"]
    assert text.count(image) == 1, "docker.image is the only place the image is named"
    assert "`docker.image` is the one place the image is named" in text  # documented in the header
    registry = image.split("/", 1)[0]
    assert re.fullmatch(r"\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com", registry), registry
    init = "\n".join(cfg["initialization_commands"])
    # The credential helper answers Docker for the ECR registry (and region) the image names.
    assert "amazon-ecr-credential-helper" in init and "'credsStore'] = 'ecr-login'" in init
    assert cfg["docker"]["pull_before_run"] is True


@pytest.mark.parametrize(
    ("name", "breakage", "error"),
    [
        (
            "gpu.yaml",
            lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_workers=99),
            ValueError,
        ),
        ("gpu.yaml", lambda c: c.update(max_workers="many"), jsonschema.ValidationError),
        ("gpu.yaml", lambda c: c.update(unknown_key=1), jsonschema.ValidationError),
        ("gpu.yaml", lambda c: c["docker"].update(imagee="typo"), jsonschema.ValidationError),
        (
            "gpu.yaml",
            lambda c: c["available_node_types"]["ray.worker.gpu"].update(gpus=1),
            jsonschema.ValidationError,
        ),
        ("gpu.yaml", lambda c: c.update(head_node_type="ray.head.missing"), ValueError),
        ("local.yaml", lambda c: c.update(unknown_key=1), jsonschema.ValidationError),
        ("local.yaml", lambda c: c["auth"].update(ssh_usr="typo"), jsonschema.ValidationError),
    ],
    ids=[
        "min>max_workers",
        "wrong-type",
        "unknown-key",
        "docker-typo",
        "node-type-typo",
        "bad-head-type",
        "local-unknown-key",
        "local-auth-typo",
    ],
)
def test_broken_copies_are_rejected(name: str, breakage: Any, error: type[Exception]) -> None:
    raw = _raw(name)
    _validated(raw)  # the original is fine...
    broken = copy.deepcopy(raw)
    breakage(broken)
    with pytest.raises(error):
        _validated(broken)  # ...the broken copy is not
