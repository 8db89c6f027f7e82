"""The run lock: one writer per run location, held with a lease that a heartbeat keeps fresh.

A crashed run's lock expires within :data:`LOCK_TTL_S` (at once on the same host when its pid is dead), so a run
location is never locked for good. The lock is an object in the run's :class:`~pipeline.storage.store.Storage`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

from pipeline.errors import LockedError, one_line
from pipeline.storage.failures import (
    redact,
)
from pipeline.storage.store import Storage

__all__ = ["LOCK_TTL_S", "Lock", "acquire_lock", "lock_owner", "read_lock_record", "run_lock"]

log = logging.getLogger(__name__)

#: Lease of a run lock held by :func:`run_lock`. The heartbeat refreshes it every quarter of this,
#: so a live run never loses it, and a crashed run's lock on another host (or on an object store
#: seen from elsewhere) expires within this many seconds; on the same host a dead pid is taken
#: over at once.
LOCK_TTL_S = 120.0


class Lock:
    """A held run lock: refresh it while working, release it when done (or use ``with``)."""

    def __init__(self, storage: Storage, rel: str, record: dict[str, Any], ttl_s: float) -> None:
        self.storage = storage
        self.rel = rel
        self.record = dict(record)
        self.ttl_s = ttl_s
        self.released = False
        #: Why the lock was lost (set by the heartbeat of :func:`run_lock`), else None.
        self.lost: str | None = None

    def check(self) -> None:
        """Raise LockedError if the heartbeat found the lock lost (taken over after its lease expired)."""
        if self.lost is not None:
            raise LockedError(self.lost)

    @property
    def owner(self) -> str:
        """Who holds the lock."""
        return str(self.record["owner"])

    @property
    def token(self) -> str:
        """Random token that distinguishes this holder from any other."""
        return str(self.record["token"])

    @property
    def expires(self) -> float:
        """Unix time when the lease ends unless refreshed."""
        return float(self.record["expires"])

    def _check_still_held(self) -> None:
        current = read_lock_record(self.storage, self.rel)
        if current is None or current.get("token") != self.token:
            holder = f"now held by {current.get('owner')!r}" if current else "the lock object is gone"
            raise LockedError(
                f"lock {self.storage.join(self.rel)} was lost by {self.owner!r} ({holder}); "
                "the lease probably expired - stop this run"
            )

    def refresh(self, ttl_s: float | None = None) -> None:
        """Extend the lease by ``ttl_s`` (default: the original ttl) from now."""
        if self.released:
            raise LockedError(f"lock {self.storage.join(self.rel)} was already released")
        self._check_still_held()
        self.ttl_s = ttl_s if ttl_s is not None else self.ttl_s
        self.record["expires"] = time.time() + self.ttl_s
        self.storage.write_json_atomic(self.rel, self.record)

    def release(self) -> None:
        """Delete the lock if we still hold it; leaves someone else's lock alone."""
        if self.released:
            return
        self.released = True
        current = read_lock_record(self.storage, self.rel)
        if current is not None and current.get("token") != self.token:
            log.warning("lock %s is held by someone else; not removing it", self.storage.join(self.rel))
            return
        self.storage.delete(self.rel)

    def __enter__(self) -> Lock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def acquire_lock(storage: Storage, name: str = "LOCK", *, owner: str, ttl_s: float = 300.0) -> Lock:
    """Take the run lock ``name`` in ``storage`` for ``owner`` with a lease of ``ttl_s`` seconds.

    Raises LockedError naming the holder when a live lock exists. A lock whose lease has
    expired, or whose holder process is gone (same host, pid no longer running), is taken
    over, so a crashed run can be resumed. Local storage creates the lock exclusively; on
    object stores (no compare-and-swap) the lock is written, then read back and its token
    compared: best effort against two runs starting in the same instant.
    """
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    rel = name
    existing = read_lock_record(storage, rel)
    if existing is not None:
        live, why = _lock_is_live(existing)
        if live:
            raise LockedError(_locked_message(storage, rel, existing))
        log.warning(
            "%s",
            redact(f"taking over lock {storage.join(rel)} from {existing.get('owner')!r}: {why}"),
        )
    now = time.time()
    record = {
        "owner": owner,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "created": now,
        "expires": now + ttl_s,
        "token": uuid.uuid4().hex,
    }
    if existing is None and storage.kind == "local":
        if not storage.create_exclusive(rel, _lock_bytes(record)):
            current = read_lock_record(storage, rel)
            raise LockedError(_locked_message(storage, rel, current or {}))
    else:
        storage.write_json_atomic(rel, record)
        if storage.is_object_store:
            time.sleep(0.1)  # let a concurrent writer's PUT land before we read back
    current = read_lock_record(storage, rel)
    if current is None or current.get("token") != record["token"]:
        raise LockedError(_locked_message(storage, rel, current or {}))
    return Lock(storage, rel, record, ttl_s)


def read_lock_record(storage: Storage, rel: str) -> dict[str, Any] | None:
    """The lock record at ``rel``; None if absent. An unparsable lock counts as absent."""
    try:
        raw = storage.read_bytes(rel)
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        log.warning("lock %s is not valid JSON; treating it as stale", storage.join(rel))
        return None
    return record if isinstance(record, dict) else None


def _locked_message(storage: Storage, rel: str, record: dict[str, Any]) -> str:
    expires = record.get("expires")
    until = _iso(expires) if isinstance(expires, (int, float)) else "unknown"
    text = (
        f"{storage.url} is locked by owner {record.get('owner')!r} (host {record.get('host')}, "
        f"pid {record.get('pid')}, lease until {until}); wait for that run to finish, use another "
        f"run url, or - if it crashed on another host - wait for the lease to expire or delete "
        f"{storage.join(rel)}"
    )
    return redact(one_line(text))


def lock_owner() -> str:
    """An owner name for a run lock: ``host:pid:random`` (unique per acquisition)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _Heartbeat:
    """A daemon thread that refreshes a lock's lease every ``every_s`` seconds until stopped.

    Refresh and stop share a mutex, so no refresh can land after :meth:`stop` returns (a late
    refresh would re-create a released lock). A refresh that fails because the store is
    unreachable is logged and retried at the next beat; one that finds the lock taken over marks
    it lost (``Lock.lost``) and ends the thread.
    """

    def __init__(self, lock: Lock, every_s: float) -> None:
        self.lock = lock
        self.every_s = every_s
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="intraq-lock-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        where = self.lock.storage.join(self.lock.rel)
        while not self._stop.wait(self.every_s):
            with self._mutex:
                if self._stop.is_set():
                    return
                try:
                    self.lock.refresh()
                except LockedError as exc:
                    self.lock.lost = str(exc)
                    log.error("%s", redact(one_line(str(exc))))
                    return
                except Exception as exc:
                    log.warning("%s", redact(one_line(f"could not refresh lock {where} (will retry): {exc}")))

    def stop(self) -> None:
        self._stop.set()
        with self._mutex:  # waits for a refresh in progress
            pass
        self._thread.join(timeout=5.0)


@contextlib.contextmanager
def run_lock(
    storage: Storage,
    name: str = "LOCK",
    *,
    owner: str | None = None,
    ttl_s: float | None = None,
    refresh_every_s: float | None = None,
) -> Iterator[Lock]:
    """Hold the run lock ``name`` of ``storage`` for the duration of the block.

    The lease is short (``ttl_s``, default :data:`LOCK_TTL_S`) and refreshed by a daemon
    heartbeat thread every ``ttl_s / 4`` seconds, so a long run keeps it while a crashed run's
    lock expires quickly (and on the same host is taken over at once: its pid is gone). Raises
    :class:`LockedError` if another live run holds it. On exit the heartbeat stops and the lock is
    released; a release that fails (store unreachable) is logged, not raised, so it never hides
    the error that ended the block; the lease then expires by itself. ``Lock.check()`` raises if
    the heartbeat found the lock taken over (call it between stages).
    """
    ttl = LOCK_TTL_S if ttl_s is None else float(ttl_s)
    lock = acquire_lock(storage, name, owner=owner or lock_owner(), ttl_s=ttl)
    beat = _Heartbeat(lock, refresh_every_s if refresh_every_s is not None else ttl / 4)
    beat.start()
    try:
        yield lock
    finally:
        beat.stop()
        try:
            lock.release()
        except Exception as exc:
            log.warning(
                "%s",
                redact(
                    one_line(
                        f"could not release lock {storage.join(lock.rel)} ({exc}); it is taken over once "
                        f"this process has exited, or after its lease ends at {_iso(lock.expires)}"
                    )
                ),
            )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def _lock_bytes(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _lock_is_live(record: dict[str, Any]) -> tuple[bool, str]:
    """Whether a lock record still protects a run, and if not, why not."""
    expires = record.get("expires")
    if not isinstance(expires, (int, float)):
        return False, "the lock record has no valid expiry"
    if expires < time.time():
        return False, f"its lease expired at {_iso(expires)}"
    pid = record.get("pid")
    if record.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        return False, f"its process {pid} on this host is gone"
    return True, "held"
