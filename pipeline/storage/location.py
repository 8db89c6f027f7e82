"""Where a run lives: :class:`StorageConfig` (URL, endpoint, region, how hard to retry) and the URL schemes.

Local paths, ``file://``, ``s3://`` (any S3-compatible endpoint) and ``memory://`` (tests); ``gs://``
only when its optional backend is installed. Credentials are never part of the configuration.
"""

from __future__ import annotations

import os
import re

import fsspec
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import StorageError

__all__ = ["StorageConfig", "split_url"]

#: Schemes handled by fsspec backends that are optional dependencies: supported only when installed.
_OPTIONAL_SCHEMES = {"gs": "gcsfs", "gcs": "gcsfs"}


class StorageConfig(BaseModel):
    """Where a run's outputs live and how hard to try when the store misbehaves.

    ``url`` is a local path, ``file://``, ``s3://bucket/prefix`` or ``memory://`` (tests).
    ``endpoint_url`` selects an S3-compatible endpoint (MinIO, Ceph, a loopback server); when
    unset it is read, at connection time, from ``AWS_ENDPOINT_URL_S3`` then ``AWS_ENDPOINT_URL``
    so a saved config stays portable between machines. There are deliberately no credential
    fields: credentials come from the standard AWS settings only.
    """

    model_config = ConfigDict(extra="forbid")

    url: str = "runs/default"
    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    retries: int = Field(default=5, ge=0)
    retry_backoff_s: float = Field(default=0.5, ge=0)
    timeout_s: float = Field(default=30, gt=0)

    def resolved_endpoint_url(self) -> str | None:
        """The endpoint to use: the configured one, else the standard AWS environment variables."""
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None

    def resolved_region(self) -> str | None:
        """The region to use: the configured one, else ``AWS_REGION`` / ``AWS_DEFAULT_REGION``."""
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def _supported_schemes() -> list[str]:
    """Schemes usable in this environment (optional backends only when installed)."""
    schemes = ["local path", "file://", "s3://", "memory://"]
    for scheme in _OPTIONAL_SCHEMES:
        if _optional_backend_available(scheme):
            schemes.append(f"{scheme}://")
    return schemes


def _optional_backend_available(scheme: str) -> bool:
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError):
        return False
    return True


def split_url(url: str) -> tuple[str, str]:
    """Return ``(kind, rest)`` for a storage URL, or raise StorageError for unsupported schemes."""
    if not url or not url.strip():
        raise StorageError("storage url is empty; give a local path or a URL such as s3://bucket/prefix")
    url = url.strip()
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", url)
    if match is None:
        return "local", url
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        return "local", rest
    if scheme in ("s3", "s3a"):
        return "s3", rest
    if scheme == "memory":
        return "memory", rest
    if scheme in _OPTIONAL_SCHEMES and _optional_backend_available(scheme):
        return scheme, rest
    hint = ""
    if scheme in _OPTIONAL_SCHEMES:
        hint = f" ({scheme}:// needs the '{_OPTIONAL_SCHEMES[scheme]}' package)"
    raise StorageError(
        f"unsupported storage scheme '{scheme}://' in {url!r}{hint}; supported: {', '.join(_supported_schemes())}"
    )
