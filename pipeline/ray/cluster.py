"""Cluster configs and connecting to Ray: a local Ray, or a cluster described by a launcher YAML.

Ray is imported lazily (inside functions), so importing this module stays cheap.

Token authentication (Ray >= 2.52; checked against the installed Ray 2.60): every Ray process
reads ``RAY_AUTH_MODE`` (``token`` or ``disabled``) from its environment. With ``token``, the
token is taken from ``RAY_AUTH_TOKEN`` (the token itself), else the file named by
``RAY_AUTH_TOKEN_PATH`` (an unreadable or empty file is fatal to the Ray process), else
``~/.ray/auth_token``. A new local ``ray.init()`` turns token auth on when ``RAY_AUTH_MODE`` is
unset and generates that file if missing; connecting to an explicit address (``ray://...``)
turns it on only when ``RAY_AUTH_MODE=token`` is set. ``connect`` therefore sets
``RAY_AUTH_MODE=token`` in this process when the cluster's YAML enables it, and fails early,
in one line, when no token can be found.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ClusterAuthError, one_line

__all__ = [
    "DEFAULT_CLIENT_PORT",
    "ClusterAuthError",
    "ClusterConfigError",
    "RayConnection",
    "TokenSource",
    "client_address",
    "connect",
    "find_auth_token",
    "head_address",
    "load_cluster_config",
    "loopback_only",
    "resolve_auth_mode",
    "token_auth_required",
]

DEFAULT_CLIENT_PORT = 10001
"""Ray Client server port that ``ray start --head`` opens unless told otherwise."""

LOCAL_NODE_IP = "127.0.0.1"

_AUTH_MODE_ENV = "RAY_AUTH_MODE"
_TOKEN_ENV = "RAY_AUTH_TOKEN"
_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
_DEFAULT_TOKEN_RELATIVE = Path(".ray") / "auth_token"
_TOKEN_MODE_RE = re.compile(r"\bRAY_AUTH_MODE=([\"']?)token\1(?![\w-])")
_CLIENT_PORT_RE = re.compile(r"--ray-client-server-port[=\s]+(\d+)")
_MAX_REASON = 300


class ClusterConfigError(ValueError):
    """A cluster config that cannot be used; the message is one line naming file and reason."""


@dataclass(frozen=True)
class TokenSource:
    """Where Ray will find the auth token: ``env`` (RAY_AUTH_TOKEN), ``path_env`` or ``default``."""

    kind: str
    location: str | None = None

    def describe(self) -> str:
        """Human-readable origin, never the token itself."""
        if self.kind == "env":
            return _TOKEN_ENV
        if self.kind == "path_env":
            return f"{_TOKEN_PATH_ENV}={self.location}"
        return str(self.location)


@dataclass(frozen=True)
class RayConnection:
    """What ``connect`` did: the address used, the dashboard URL and the auth mode in force."""

    address: str
    local: bool
    auth_mode: str
    dashboard_url: str | None
    context: Any = None

    def shutdown(self) -> None:
        """Disconnect this process from Ray (and stop it, for a local Ray)."""
        import ray

        ray.shutdown()


def _fail(path: Path, reason: object) -> ClusterConfigError:
    return ClusterConfigError(f"{path}: {one_line(reason, _MAX_REASON)}")


@contextlib.contextmanager
def _quiet_autoscaler_logs() -> Iterator[None]:
    """Silence the INFO chatter ``prepare_config`` logs for every config."""
    log = logging.getLogger("ray.autoscaler._private.util")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _precheck(raw: object, path: Path) -> dict[str, Any]:
    """Structural checks Ray would otherwise answer with a KeyError or an abort."""
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else type(raw).__name__
        raise _fail(path, f"the top level must be a mapping of config keys, got {kind}")
    provider = raw.get("provider")
    if not isinstance(provider, dict) or not isinstance(provider.get("type"), str):
        raise _fail(path, "missing `provider` with a `type` (e.g. aws, gcp, local)")
    if provider["type"] == "local" and "coordinator_address" not in provider:
        if not isinstance(provider.get("head_ip"), str) or not provider["head_ip"]:
            raise _fail(path, "the local provider needs `provider.head_ip`")
        if not isinstance(provider.get("worker_ips"), list):
            raise _fail(path, "the local provider needs `provider.worker_ips` (a list, may be empty)")
    return raw


def _check_worker_bounds(cfg: Mapping[str, Any], path: Path) -> None:
    """Per node type ``min_workers <= max_workers``: Ray's validation only checks the sum."""
    for name, node_type in (cfg.get("available_node_types") or {}).items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers")
        if high is not None and low > high:
            raise _fail(path, f"node type {name!r}: min_workers ({low}) > max_workers ({high})")


def load_cluster_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a Ray cluster-launcher YAML and validate it offline with Ray's own schema.

    Returns the config as Ray's launcher sees it (defaults filled in). Raises
    ``ClusterConfigError`` with a one-line reason: missing file, malformed YAML (with line and
    column), or a schema violation.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(path, "cluster config not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, f"cannot read cluster config: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise _fail(path, f"malformed YAML at {where}{problem}") from None
    except yaml.YAMLError as exc:
        raise _fail(path, f"malformed YAML: {exc}") from None
    raw = _precheck(raw, path)

    try:
        import jsonschema
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:
        raise _fail(path, f"cannot validate without ray[default] ({exc})") from None
    try:
        with _quiet_autoscaler_logs():
            cfg = prepare_config(raw)
            validate_config(cfg)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(part) for part in exc.absolute_path) or "top level"
        raise _fail(path, f"schema violation at {where}: {exc.message}") from None
    except Exception as exc:  # Ray reports problems as ValueError, KeyError, click errors...
        raise _fail(path, f"invalid cluster config: {exc}") from None
    _check_worker_bounds(cfg, path)
    return cfg


def head_address(cfg: Mapping[str, Any]) -> str | None:
    """The head's IP for the local (on-prem) provider; ``None`` for cloud providers."""
    provider = cfg.get("provider") or {}
    if provider.get("type") != "local":
        return None
    head_ip = provider.get("head_ip")
    return str(head_ip) if head_ip else None


def _client_port(cfg: Mapping[str, Any]) -> int:
    match = _CLIENT_PORT_RE.search(" ".join(map(str, cfg.get("head_start_ray_commands") or [])))
    return int(match.group(1)) if match else DEFAULT_CLIENT_PORT


def client_address(cfg: Mapping[str, Any]) -> str:
    """``ray://<head_ip>:<client port>`` for the local provider, else ``auto`` (run on the head)."""
    host = head_address(cfg)
    return f"ray://{host}:{_client_port(cfg)}" if host else "auto"


def token_auth_required(cfg: Mapping[str, Any]) -> bool:
    """Whether the cluster starts Ray with ``RAY_AUTH_MODE=token`` (start commands or docker env)."""
    docker = cfg.get("docker") or {}
    texts: list[object] = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        texts.extend(cfg.get(key) or [])
    for key in ("run_options", "head_run_options", "worker_run_options"):
        texts.extend(docker.get(key) or [])
    return any(_TOKEN_MODE_RE.search(str(text)) for text in texts)


def find_auth_token(
    environ: Mapping[str, str] | None = None, home: str | os.PathLike[str] | None = None
) -> TokenSource | None:
    """Find the token the way Ray does, without reading it into memory longer than needed.

    Raises ``ClusterAuthError`` when ``RAY_AUTH_TOKEN_PATH`` is set but unreadable or empty
    (Ray aborts the process in that case rather than falling back).
    """
    env = os.environ if environ is None else environ
    if env.get(_TOKEN_ENV, "").strip():
        return TokenSource("env")
    token_path = env.get(_TOKEN_PATH_ENV)
    if token_path:
        if not _nonempty_file(Path(token_path).expanduser()):
            raise ClusterAuthError(
                f"{_TOKEN_PATH_ENV}={token_path} is set but the file is missing, unreadable or empty"
            )
        return TokenSource("path_env", token_path)
    default = Path(home) if home is not None else Path.home()
    default = default / _DEFAULT_TOKEN_RELATIVE
    return TokenSource("default", str(default)) if _nonempty_file(default) else None


def _nonempty_file(path: Path) -> bool:
    try:
        return bool(path.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        return False


def resolve_auth_mode(
    cfg: Mapping[str, Any] | None,
    environ: Mapping[str, str] | None = None,
    home: str | os.PathLike[str] | None = None,
) -> str:
    """Decide the auth mode for connecting to ``cfg``'s cluster: ``"token"`` or ``"disabled"``.

    Token mode applies when ``RAY_AUTH_MODE=token`` is set here or the cluster config enables it;
    a token must then be available. ``RAY_AUTH_MODE=disabled`` against a token-enabled cluster
    is a conflict. Raises ``ClusterAuthError`` (one line) in both failure cases.
    """
    env = os.environ if environ is None else environ
    env_mode = env.get(_AUTH_MODE_ENV, "").strip().lower() or None
    cluster_wants = cfg is not None and token_auth_required(cfg)
    name = (cfg or {}).get("cluster_name", "?")
    if cluster_wants and env_mode == "disabled":
        raise ClusterAuthError(
            f"cluster {name!r} runs with RAY_AUTH_MODE=token but {_AUTH_MODE_ENV}=disabled here: "
            f"unset it or set {_AUTH_MODE_ENV}=token"
        )
    if not (cluster_wants or env_mode == "token"):
        return "disabled"
    if find_auth_token(env, home) is None:
        why = f"cluster {name!r} requires it" if cluster_wants else f"{_AUTH_MODE_ENV}=token"
        default = Path(home) if home is not None else Path.home()
        raise ClusterAuthError(
            f"Ray token authentication is on ({why}) but no token was found: set {_TOKEN_ENV}, "
            f"or {_TOKEN_PATH_ENV} to a token file, or write the cluster's token to "
            f"{default / _DEFAULT_TOKEN_RELATIVE} (`ray get-auth-token` on the head prints it)"
        )
    return "token"


def _enable_token_mode() -> None:
    """Turn token auth on for this process, also if Ray has already read its config."""
    os.environ[_AUTH_MODE_ENV] = "token"
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # private API moved: the variable still works if read later
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Keep a new local Ray on 127.0.0.1.

    On Linux, Ray 2.60 replaces ``_node_ip_address="127.0.0.1"`` with the machine's outbound IP
    (``services.resolve_ip_for_localhost``), and the GCS, raylet and workers then listen on all
    interfaces. With ``ray_constants.ENABLE_RAY_CLUSTER`` off (what
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` sets at import), the loopback address is kept and
    every server binds to it. The flag is only consulted while the node starts, so it is
    switched off for ``ray.init`` alone and restored afterwards.
    """
    try:
        from ray._private import ray_constants
    except ImportError:  # private module moved: Ray keeps its own choice of address
        yield
        return
    previous = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if previous is None:
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


def _dashboard_url(context: Any) -> str | None:
    url = getattr(context, "dashboard_url", None)
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def connect(
    cluster_file: str | os.PathLike[str] | None,
    *,
    num_cpus: int | None = None,
    dashboard: bool = True,
    runtime_env: dict[str, Any] | None = None,
) -> RayConnection:
    """Connect this process to Ray.

    Without ``cluster_file``, start a new local Ray bound to 127.0.0.1 (dashboard, if any, on
    127.0.0.1 too; ``num_cpus`` caps its logical CPUs). With a cluster file, connect to its head:
    ``ray://<head_ip>:10001`` for the local provider, ``auto`` for cloud providers (the CLI then
    runs on the head, e.g. via ``ray submit``/``ray attach``). Token auth is enabled when the
    cluster config or ``RAY_AUTH_MODE`` asks for it; a missing token raises ``ClusterAuthError``.
    """
    if cluster_file is None:
        return _connect_local(num_cpus=num_cpus, dashboard=dashboard, runtime_env=runtime_env)
    if num_cpus is not None:
        raise ValueError("num_cpus applies to a local Ray only; a cluster's nodes declare their CPUs")
    cfg = load_cluster_config(cluster_file)
    mode = resolve_auth_mode(cfg)
    address = client_address(cfg)
    if mode == "token":
        _enable_token_mode()

    import ray

    try:
        context = ray.init(address=address, runtime_env=runtime_env)
    except ConnectionError as exc:
        hint = (
            " (cloud clusters are reached from their head: `ray attach`/`ray submit` the cluster file)"
            if address == "auto"
            else ""
        )
        raise ConnectionError(
            f"cannot reach Ray at {address} for cluster {cfg.get('cluster_name', '?')!r} "
            f"({cluster_file}): {one_line(exc, _MAX_REASON)}{hint}"
        ) from exc
    return RayConnection(
        address=address,
        local=False,
        auth_mode=mode,
        dashboard_url=_dashboard_url(context),
        context=context,
    )


def _connect_local(*, num_cpus: int | None, dashboard: bool, runtime_env: dict[str, Any] | None) -> RayConnection:
    if os.environ.get(_AUTH_MODE_ENV, "").strip().lower() != "disabled":
        find_auth_token()  # a bad RAY_AUTH_TOKEN_PATH would abort Ray: fail in one line instead

    import ray

    with loopback_only():
        context = ray.init(
            address="local",  # never attach to a cluster named by RAY_ADDRESS
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host=LOCAL_NODE_IP,
            runtime_env=runtime_env,
            _node_ip_address=LOCAL_NODE_IP,
            # Ray prestarts num_cpus idle Python workers for the first driver; in `make smoke` they
            # never ran any work (the actors and Train workers started their own): on a 2-CPU
            # laptop, two idle processes whose start-up CPU and memory are spent for nothing.
            _system_config={"prestart_worker_first_driver": False},
        )
    # A new local Ray sets RAY_AUTH_MODE=token itself when it was unset.
    mode = "token" if os.environ.get(_AUTH_MODE_ENV, "").strip().lower() == "token" else "disabled"
    return RayConnection(
        address=str(context.address_info.get("gcs_address") or "local"),
        local=True,
        auth_mode=mode,
        dashboard_url=_dashboard_url(context) if dashboard else None,
        context=context,
    )
