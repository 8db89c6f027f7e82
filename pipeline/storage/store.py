"""Run storage behind one small API: local paths, ``file://``, ``s3://`` and ``memory://`` URLs.

Every stage reads and writes its outputs through :class:`Storage` so that the same code runs on
a laptop (local directory), in unit tests (``memory://``) and on a cluster (S3 or any
S3-compatible endpoint). The class adds what plain fsspec lacks for a pipeline:

* atomic writes (a reader never sees a partially written object),
* one retry policy for transient errors (ours, with botocore's own retries switched off so an
  unreachable endpoint fails in seconds instead of minutes). Not botocore's standard mode: its
  backoff (jittered, growing from 1 s towards 20 s) cannot be set from ``retry_backoff_s`` (its six
  attempts at a closed loopback port took 12-21 s; a run's checks must fail within 5 s), and it
  retries neither local or other fsspec backends nor a GetObject body that breaks while being read
  (that happens after botocore has returned the response). ``StorageConfig.retries`` is the number
  of retries on both paths: this loop's, and pyarrow's ``AwsStandardS3RetryStrategy``,
* one-line :class:`StorageError` messages for wrong schemes, credentials and endpoints, with
  secrets removed (:func:`redact`),
* the run lock's (:mod:`pipeline.storage.lock`) operations, the lock using only the public ones
  (exclusive creation of a local file: :meth:`Storage.create_exclusive`), with local files written
  durably (:mod:`pipeline.storage.local_files`).

Where a run lives is a :class:`~pipeline.storage.location.StorageConfig`.

Credentials are never part of the configuration: they come from the standard AWS settings
(environment, ``AWS_PROFILE``, instance roles), so they are never written to a run directory or a
log. This module imports only fsspec, pyarrow and pydantic (never Ray or torch) on purpose: it is
imported by every Ray worker and by the CLI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import time
import uuid
from collections.abc import Callable
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

from pipeline.errors import StorageError, one_line
from pipeline.storage.failures import (
    _describe,
    _is_credentials_error,
    _is_missing_bucket,
    _is_transient,
    redact,
)
from pipeline.storage.local_files import create_local_exclusive, write_local_atomic
from pipeline.storage.location import StorageConfig, split_url

__all__ = ["Storage"]

log = logging.getLogger(__name__)

T = TypeVar("T")


#: The checks before a run (:meth:`Storage.fail_fast`): at most this many retries, this connect timeout
#: (seconds) and this backoff, so an unreachable endpoint is refused within 5 s instead of after every retry.
FAIL_FAST_RETRIES = 1
FAIL_FAST_CONNECT_TIMEOUT_S = 2.0
FAIL_FAST_BACKOFF_S = 0.25


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


class Storage:
    """An fsspec filesystem plus a root path, with atomic writes, retries and clear errors.

    Paths given to methods are relative to the root (``"shards/shard-00000.parquet"``); ``join``
    turns them into full paths/URLs. Instances pickle as their config, so a Ray worker rebuilds
    the filesystem with its own environment (credentials are never pickled).
    """

    def __init__(self, config: StorageConfig, *, fail_fast: bool = False) -> None:
        self.config = config
        #: A check before a run: few, quiet retries and a short connect timeout (see :meth:`fail_fast`).
        self.quick = fail_fast
        self.kind, rest = split_url(config.url)
        self._endpoint = config.resolved_endpoint_url() if self.kind == "s3" else None
        self.fs: fsspec.AbstractFileSystem
        if self.kind == "local":
            self.fs = fsspec.filesystem("file", auto_mkdir=True)
            self._root = os.path.abspath(os.path.expanduser(rest)).rstrip("/") or "/"
        elif self.kind == "s3":
            self._root = rest.strip("/")
            bucket = self._root.split("/", 1)[0]
            if not _BUCKET_RE.match(bucket):
                raise StorageError(
                    f"invalid S3 bucket name {bucket!r} in {config.url!r}: bucket names are 3-63 "
                    "characters of lowercase letters, digits, '.' and '-'"
                )
            self.fs = self._make_s3fs()
        elif self.kind == "memory":
            self.fs = fsspec.filesystem("memory")
            self._root = "/" + rest.strip("/")
        else:
            self.fs = fsspec.filesystem(self.kind)
            self._root = str(self.fs._strip_protocol(f"{self.kind}://{rest}")).rstrip("/")

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: StorageConfig) -> Storage:
        """Open the storage described by ``config`` (no network access happens here)."""
        return cls(config)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Storage:
        """Shorthand for ``Storage.from_config(StorageConfig(url=url, **options))``."""
        return cls(StorageConfig(url=url, **options))

    def fail_fast(self) -> Storage:
        """This location for the checks before a run: at most :data:`FAIL_FAST_RETRIES` retry, a
        :data:`FAIL_FAST_CONNECT_TIMEOUT_S` connect timeout, and its retry notes at INFO (the run's log
        file, not the terminal). An unreachable endpoint is then one line within 5 seconds."""
        return Storage(self.config, fail_fast=True)

    def child(self, *parts: str) -> Storage:
        """A Storage rooted at ``parts`` below this one (same endpoint, retries and timeouts)."""
        return Storage(self.config.model_copy(update={"url": self.join(*parts)}))

    def __reduce__(self) -> tuple[Callable[[StorageConfig], Storage], tuple[StorageConfig]]:
        return (Storage.from_config, (self.config,))

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def _make_s3fs(self) -> fsspec.AbstractFileSystem:
        """An s3fs filesystem that fails fast and leaves retrying to :meth:`_call`.

        botocore's retries are reduced to a single attempt and s3fs's own retry loop to one pass,
        so one failing call costs at most ``connect_timeout`` (loopback: milliseconds). Listing
        caches are disabled: other processes (generation actors) write the same prefix.
        """
        from s3fs import S3FileSystem

        cfg = self.config
        config_kwargs: dict[str, Any] = {
            "connect_timeout": min(cfg.timeout_s, FAIL_FAST_CONNECT_TIMEOUT_S if self.quick else 5.0),
            "read_timeout": cfg.timeout_s,
            "retries": {"total_max_attempts": 1, "mode": "standard"},
        }
        client_kwargs: dict[str, Any] = {}
        region = cfg.resolved_region()
        if region:
            client_kwargs["region_name"] = region
        if self._endpoint:
            # S3-compatible servers (MinIO, Ceph, moto) generally need path-style addressing.
            config_kwargs["s3"] = {"addressing_style": "path"}
        fs = S3FileSystem(
            anon=cfg.anon,
            endpoint_url=self._endpoint,
            client_kwargs=client_kwargs,
            config_kwargs=config_kwargs,
            use_listings_cache=False,
            skip_instance_cache=True,
        )
        fs.retries = 1
        return fs

    # -- paths -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The root as a full URL (an absolute path for local storage)."""
        return self.join()

    @property
    def is_object_store(self) -> bool:
        """True where a single PUT is atomic and there are no real directories."""
        return self.kind not in ("local",)

    def _rel(self, *parts: str) -> str:
        """Normalize a relative path; reject absolute paths, URLs and ``..`` escapes."""
        joined = "/".join(str(p).strip("/") for p in parts if str(p).strip("/"))
        if "://" in joined:
            raise StorageError(f"expected a path relative to {self.url}, got a URL: {joined!r}")
        norm = posixpath.normpath(joined) if joined else ""
        if norm in (".", ""):
            return ""
        if norm == ".." or norm.startswith("../"):
            raise StorageError(f"path {joined!r} escapes the storage root {self.url}")
        return norm

    def _path(self, *parts: str) -> str:
        """Path inside ``self.fs`` for a relative path."""
        rel = self._rel(*parts)
        if not rel:
            return self._root
        return f"{self._root.rstrip('/')}/{rel}"

    def join(self, *parts: str) -> str:
        """Full path/URL of ``parts`` below the root (for messages, manifests and other tools)."""
        path = self._path(*parts)
        if self.kind == "local":
            return path
        if self.kind == "memory":
            return "memory://" + path
        return f"{self.kind}://{path}"

    def _relative_to_root(self, fs_path: str) -> str:
        root = self._root.rstrip("/")
        fs_path = fs_path.rstrip("/")
        if self.kind == "memory" and not fs_path.startswith("/"):
            fs_path = "/" + fs_path
        if fs_path == root:
            return ""
        if fs_path.startswith(root + "/"):
            return fs_path[len(root) + 1 :]
        return fs_path

    # -- error handling --------------------------------------------------------------------

    def _call(
        self,
        what: str,
        rel: str,
        fn: Callable[[], T],
        passthrough: tuple[type[BaseException], ...] = (),
    ) -> T:
        """Run ``fn`` with our retry policy and translate failures to one-line StorageErrors.

        Transient failures (connection refused/reset, timeouts, 5xx, throttling) are retried
        ``config.retries`` times with exponential backoff. Exceptions in ``passthrough`` (for
        example FileNotFoundError on reads) are re-raised unchanged.
        """
        retries = min(self.config.retries, FAIL_FAST_RETRIES) if self.quick else self.config.retries
        backoff = min(self.config.retry_backoff_s, FAIL_FAST_BACKOFF_S) if self.quick else self.config.retry_backoff_s
        attempts = retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:
                if _is_credentials_error(exc):
                    raise StorageError(self._credentials_message(what, rel, exc)) from exc
                if passthrough and isinstance(exc, passthrough) and not _is_missing_bucket(exc):
                    raise
                if not _is_transient(exc):
                    raise StorageError(self._message(what, rel, exc)) from exc
                if attempt == attempts:
                    raise StorageError(self._message(what, rel, exc, attempts=attempts)) from exc
                delay = min(backoff * 2 ** (attempt - 1), 30.0)
                log.log(
                    logging.INFO if self.quick else logging.WARNING,
                    "%s",
                    redact(
                        one_line(
                            f"{what} {self.join(rel)}: transient error (attempt {attempt}/{attempts}), "
                            f"retrying in {delay:.2f}s: {_describe(exc)}"
                        )
                    ),
                )
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _where(self) -> str:
        return f" (endpoint {self._endpoint})" if self._endpoint else ""

    def _message(self, what: str, rel: str, exc: BaseException, attempts: int | None = None) -> str:
        target = self.join(rel)
        if _is_missing_bucket(exc):
            bucket = self._root.split("/", 1)[0]
            text = f"{what} {target} failed: bucket '{bucket}' does not exist{self._where()}"
        elif attempts is not None:
            text = f"{what} {target}{self._where()} failed after {attempts} attempts: {_describe(exc)}"
        else:
            text = f"{what} {target}{self._where()} failed: {_describe(exc)}"
        return redact(one_line(text))

    def _credentials_message(self, what: str, rel: str, exc: BaseException) -> str:
        text = (
            f"{what} {self.join(rel)}{self._where()} failed: access denied - credentials missing, rejected "
            f"or without permission ({_describe(exc)}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "(and AWS_SESSION_TOKEN), or AWS_PROFILE, or run with an instance role"
        )
        return redact(one_line(text))

    # -- basic operations ------------------------------------------------------------------

    def exists(self, rel: str = "") -> bool:
        """Whether an object or directory exists (never answered from a stale listing cache)."""
        path = self._path(rel)

        def op() -> bool:
            self.fs.invalidate_cache(path)
            return bool(self.fs.exists(path))

        return self._call("checking", rel, op)

    def ls(self, rel: str = "") -> list[str]:
        """Sorted relative paths of the entries directly under ``rel``; [] if it does not exist."""
        path = self._path(rel)

        def op() -> list[str]:
            self.fs.invalidate_cache(path)
            try:
                entries = self.fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
            return sorted(self._relative_to_root(str(e)) for e in entries)

        return self._call("listing", rel, op)

    def read_bytes(self, rel: str) -> bytes:
        """The whole object; raises FileNotFoundError when it does not exist."""
        path = self._path(rel)
        return self._call("reading", rel, lambda: bytes(self.fs.cat_file(path)), (FileNotFoundError,))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Write an object so that readers see either the old content or all of the new one.

        Local files are written to a temporary name in the same directory, flushed to disk and
        renamed over the target. On object stores a single PUT (or a completed multipart upload)
        is already atomic, so the object is written directly.
        """
        if not self._rel(rel):
            raise StorageError(f"cannot write to the storage root {self.url} itself; give a file name")
        path = self._path(rel)
        if self.kind == "local":
            self._call("writing", rel, lambda: write_local_atomic(path, bytes(data)))
        else:
            self._call("writing", rel, lambda: self.fs.pipe_file(path, bytes(data)))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create a local file only if it does not exist yet (atomically: the run lock's primitive);
        whether it was created. Object stores have no such operation (no compare-and-swap)."""
        if self.kind != "local":
            raise StorageError(f"{self.join(rel)}: exclusive creation needs local storage, not {self.kind}://")
        path = self._path(rel)
        return self._call("locking", rel, lambda: create_local_exclusive(path, bytes(data)))

    def read_json(self, rel: str) -> Any:
        """Parse a JSON object; StorageError if it is not valid JSON."""
        raw = self.read_bytes(rel)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StorageError(f"{self.join(rel)} is not valid JSON: {exc}") from exc

    def write_json_atomic(self, rel: str, obj: Any) -> None:
        """Write ``obj`` as indented JSON atomically; NaN/Infinity are refused (not valid JSON)."""
        try:
            text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
        except ValueError as exc:
            raise StorageError(f"cannot write {self.join(rel)}: {exc}") from exc
        self.write_bytes_atomic(rel, (text + "\n").encode("utf-8"))

    def open(self, rel: str, mode: str = "rb") -> IO[Any]:
        """Open a file object (streaming). Writes through it are NOT atomic on local storage."""
        path = self._path(rel)
        if any(c in mode for c in "wax") and self.kind == "local":
            self.makedirs(posixpath.dirname(self._rel(rel)))
        passthrough: tuple[type[BaseException], ...] = (FileNotFoundError,) if "r" in mode else ()
        return self._call("opening", rel, lambda: self.fs.open(path, mode), passthrough)

    def delete(self, rel: str, recursive: bool = False) -> None:
        """Remove an object (or a tree with ``recursive``); a missing path is not an error."""
        path = self._path(rel)

        def op() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=recursive)
            self.fs.invalidate_cache(path)

        self._call("deleting", rel, op)

    def makedirs(self, rel: str = "") -> None:
        """Create a directory (and parents) on local storage; object stores need none."""
        if self.kind != "local":
            return
        path = self._path(rel)
        self._call("creating directory", rel, lambda: os.makedirs(path, exist_ok=True))

    def check_reachable(self) -> None:
        """One read-only request (a listing of the location: unlike a HEAD request, its error names
        the code, e.g. InvalidAccessKeyId) that fails on an unreachable endpoint or rejected
        credentials; writes nothing. Local storage needs no request."""
        if self.kind == "local":
            return
        self.ls()

    def check_writable(self) -> None:
        """Probe the location with a real write, read-back and delete; StorageError if any fails.

        Run before expensive work so a wrong bucket, endpoint or credential fails in seconds. It
        leaves the location as it found it: local directories it had to create are removed again.
        """
        created = self._missing_local_dirs()
        try:
            self.makedirs()
            probe = f".write-probe-{uuid.uuid4().hex}"
            payload = b"intraq write probe\n"
            self.write_bytes_atomic(probe, payload)
            try:
                try:
                    back = self.read_bytes(probe)
                except FileNotFoundError as exc:
                    raise StorageError(f"{self.join(probe)} was written but cannot be read back") from exc
                if back != payload:
                    raise StorageError(f"{self.join(probe)} read back different bytes than were written")
            finally:
                self.delete(probe)
        finally:
            for path in created:  # deepest first; one another process has written into stays
                with contextlib.suppress(OSError):
                    os.rmdir(path)

    def _missing_local_dirs(self) -> list[str]:
        """The root and those of its parents that do not exist yet (local storage), deepest first."""
        if self.kind != "local":
            return []
        missing, path = [], self._root
        while path and not os.path.lexists(path):
            missing.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        return missing

    # -- pyarrow / Ray Data ----------------------------------------------------------------

    def pyarrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem for this storage and the root path inside it.

        Pass both to ``pyarrow.dataset.dataset`` or ``ray.data.read_parquet(paths,
        filesystem=fs)`` with paths ``f"{root}/{rel}"``. S3 uses pyarrow's native client (fast,
        picklable, credentials from the worker's own AWS environment); ``memory://`` and other
        fsspec backends are wrapped with ``FSSpecHandler``.
        """
        if self.kind == "local":
            return pafs.LocalFileSystem(), self._root
        if self.kind == "s3":
            cfg = self.config
            kwargs: dict[str, Any] = {
                "anonymous": cfg.anon,
                "region": cfg.resolved_region() or self._bucket_region(),
                "connect_timeout": min(cfg.timeout_s, 5.0),
                "request_timeout": cfg.timeout_s,
                "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.retries + 1),
            }
            if self._endpoint:
                parsed = urlparse(self._endpoint)
                if parsed.scheme and parsed.netloc:
                    kwargs["scheme"] = parsed.scheme
                    kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
                else:
                    kwargs["endpoint_override"] = self._endpoint
            return pafs.S3FileSystem(**kwargs), self._root
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs)), self._root

    def _bucket_region(self) -> str:
        """Region of the bucket on AWS when none is configured (one request); us-east-1 otherwise."""
        if self._endpoint:
            return "us-east-1"
        try:
            return str(pafs.resolve_s3_region(self._root.split("/", 1)[0]))
        except (OSError, ValueError):
            return "us-east-1"

    def pyarrow_path(self, rel: str) -> str:
        """Path of ``rel`` inside the filesystem returned by :meth:`pyarrow_filesystem`."""
        return self._path(rel)
