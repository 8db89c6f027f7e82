"""User code a run needs on every Ray worker: the module of ``model.arch = "package.module:callable"``.

The driver imports a user's model module from its ``PYTHONPATH``; Ray workers on other nodes (and
workers of a Ray that was started elsewhere) have no such path. The module's file, or its
package's directory, is shipped with the job as a Ray runtime environment ``py_modules`` entry:
Ray uploads it once (content-addressed) and puts it on every worker's ``sys.path``. Installed
packages (site-packages) and the project's own packages are not shipped; every node has them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from intraq_core.config import ModelConfig
from intraq_core.models.checkpoint import read_model_checkpoint
from intraq_core.models.imported import local_source

__all__ = ["model_py_modules", "with_user_code"]


def model_py_modules(model: ModelConfig) -> list[str]:
    """Local paths to ship so workers can import ``model.arch`` (empty unless it is user code).

    A project checkpoint given as ``arch`` ships the code of the architecture it records.
    """
    arch = model.arch
    if Path(arch).expanduser().is_file():
        arch = str(read_model_checkpoint(Path(arch).expanduser())["model_config"].get("arch", ""))
    source = local_source(arch)
    return [str(source)] if source is not None else []


def with_user_code(
    runtime_env: dict[str, Any] | None, model: ModelConfig, *, upload: bool = False
) -> dict[str, Any] | None:
    """``runtime_env`` plus the ``py_modules`` that ``model`` needs (unchanged when it needs none).

    ``ray.init`` uploads the local paths of a job's runtime environment itself. An actor's or a
    Train worker's must name already uploaded packages: ``upload=True`` uploads them now (Ray
    content-addresses them, so each is stored once) and names their ``gcs://`` URIs instead.
    """
    modules = model_py_modules(model)
    if not modules:
        return runtime_env
    env = dict(runtime_env or {})
    env["py_modules"] = sorted({*env.get("py_modules", []), *modules})
    if upload:
        env = _upload(env)
    return env


def _upload(env: dict[str, Any]) -> dict[str, Any]:
    """``env`` with its local ``py_modules`` uploaded to the connected Ray and named by URI."""
    import tempfile

    # Ray's own upload step of ray.init (a private module: stable since Ray 1.x).
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed

    with tempfile.TemporaryDirectory(prefix="intraq-py-modules-") as scratch:
        return upload_py_modules_if_needed(env, include_gitignore=True, scratch_dir=scratch)
