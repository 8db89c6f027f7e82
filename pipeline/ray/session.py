"""Start, join and stop the Ray session a pipeline command runs in.

:func:`start_ray` connects this process to Ray once per command: a new local Ray bound to
127.0.0.1 (``cfg.ray.num_cpus`` logical CPUs, else ``os.cpu_count()``; dashboard on 127.0.0.1
when ``cfg.ray.dashboard``), the cluster of a launcher YAML (``--cluster FILE``, see
:func:`pipeline.ray.cluster.connect`), or ``cfg.ray.address``. When Ray is already initialized in
this process (tests, notebooks, a caller's own ``ray.init``), it is reused as is and left
running. :func:`stop_ray` undoes only what :func:`start_ray` started; starts and stops nest,
so a command run inside a test session's Ray never shuts that Ray down.

Worker environment. Only non-secret settings travel in the job's ``runtime_env`` env_vars
(:data:`WORKER_ENV_VARS`: the S3 endpoint and region, the asset directories). Credentials never
do: a runtime_env is stored in the GCS and shown by the dashboard and ``ray job`` tooling, so a
secret put there would leak. None is needed either: local workers are forked from the raylet
this process started and inherit its environment (set credentials *before* ``start_ray``),
and on a cluster every node gets credentials from its instance profile / IAM role (see
``clusters/gpu.yaml``), which s3fs and pyarrow pick up by themselves.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from pipeline.config import RunConfig
from pipeline.ray.user_code import with_user_code

__all__ = [
    "WORKER_ENV_VARS",
    "ray_info",
    "ray_session",
    "runs_on_this_machine",
    "start_ray",
    "stop_ray",
    "worker_env_vars",
]

log = logging.getLogger(__name__)

#: Settings forwarded to every Ray worker of the job (never secrets; see the module docstring).
WORKER_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "INTRAQ_DATA_DIR",
    "INTRAQ_CACHE_DIR",
)
_PATH_VARS = ("INTRAQ_DATA_DIR", "INTRAQ_CACHE_DIR")

# How many start_ray calls that started (or nested inside a started) Ray are still open.
_depth = 0


def worker_env_vars(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The :data:`WORKER_ENV_VARS` set here, asset directories made absolute."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for name in WORKER_ENV_VARS:
        value = env.get(name)
        if not value:
            continue
        if name in _PATH_VARS and "://" not in value:
            value = os.path.abspath(os.path.expanduser(value))
        out[name] = value
    return out


def ray_info() -> dict[str, Any]:
    """``{"address", "dashboard_url", "local"}`` of the Ray this process is connected to."""
    import ray

    address = ray.get_runtime_context().gcs_address
    dashboard: str | None = None
    with contextlib.suppress(Exception):  # private helper; absent for Ray Client drivers
        from ray._private.worker import get_dashboard_url

        dashboard = get_dashboard_url() or None
    if dashboard and "://" not in dashboard:
        dashboard = f"http://{dashboard}"
    host = str(address).rsplit(":", 1)[0]
    return {"address": address, "dashboard_url": dashboard, "local": host in ("127.0.0.1", "localhost")}


def _is_loopback(address: str) -> bool:
    """Whether a GCS address (``host:port``; not a ``ray://`` client address) is this machine's loopback."""
    if "://" in address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def runs_on_this_machine(cfg: RunConfig, cluster_file: str | None = None) -> bool:
    """Whether :func:`start_ray` would give this run only this machine's resources (so only its GPUs):
    the Ray already initialized in this process is local, or none is and it would start one here
    (no ``--cluster``, no ``ray.address`` or a loopback one). Imports Ray only when it is already imported."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return bool(ray_info()["local"])
    return cluster_file is None and (not cfg.ray.address or _is_loopback(cfg.ray.address))


def start_ray(cfg: RunConfig, cluster_file: str | None = None) -> dict[str, Any]:
    """Connect this process to Ray for ``cfg`` and return ``{"address", "dashboard_url", "local"}``.

    Reuses an already initialized Ray (nothing is started, :func:`stop_ray` will not stop it).
    """
    global _depth
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        if _depth > 0:
            _depth += 1
        if cluster_file is not None:
            log.warning("Ray is already initialized in this process; --cluster %s is ignored", cluster_file)
        return ray_info()

    runtime_env = with_user_code({"env_vars": worker_env_vars()}, cfg.model)
    if cluster_file is None and cfg.ray.address:
        from pipeline.ray.cluster import resolve_auth_mode

        resolve_auth_mode(None)  # RAY_AUTH_MODE=token without a token: one-line error, no hang
        if _is_loopback(cfg.ray.address):
            from pipeline.ray.cluster import LOCAL_NODE_IP, loopback_only

            # A cluster on this machine bound to 127.0.0.1 (what start_ray makes): without this,
            # Ray rewrites 127.0.0.1 to the machine's outbound IP, where nothing listens, and hangs.
            with loopback_only():
                ray.init(address=cfg.ray.address, runtime_env=runtime_env, _node_ip_address=LOCAL_NODE_IP)
        else:
            ray.init(address=cfg.ray.address, runtime_env=runtime_env)
        info = ray_info()
        info["local"] = _is_loopback(cfg.ray.address)  # a cluster on this machine
    else:
        from pipeline.ray.cluster import connect

        num_cpus = (cfg.ray.num_cpus or os.cpu_count() or 1) if cluster_file is None else None
        conn = connect(cluster_file, num_cpus=num_cpus, dashboard=cfg.ray.dashboard, runtime_env=runtime_env)
        info = {"address": conn.address, "dashboard_url": conn.dashboard_url, "local": conn.local}
    _depth = 1
    return info


def stop_ray() -> None:
    """Shut Ray down if :func:`start_ray` started it and this closes the outermost start."""
    global _depth
    if _depth == 0:
        return
    _depth -= 1
    if _depth == 0:
        import ray

        ray.shutdown()


@contextlib.contextmanager
def ray_session(cfg: RunConfig, cluster_file: str | None = None) -> Iterator[dict[str, Any]]:
    """``start_ray`` … ``stop_ray`` as a context manager (reuses a running Ray)."""
    info = start_ray(cfg, cluster_file)
    try:
        yield info
    finally:
        stop_ray()
