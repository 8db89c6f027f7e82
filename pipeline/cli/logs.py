"""What the terminal shows, and the run's log file that keeps everything else.

A normal command shows its progress bars, the Ray dashboard URL, the project's own warnings and
errors, and its result lines. Everything else — Ray's own log records (token set-up, "Started a
local Ray instance"), Python warnings (Ray Data's deprecation warnings, torch's), and the
output of Ray's workers and actors (``TrainingReport(...)`` dicts, Ray Data's progress lines,
``core_worker.cc`` error lines of actors that are shut down) — goes to the command's log file
only. ``--verbose`` shows it on the terminal too, as Ray prints it.

The log file is written to a temporary file while the command runs and copied into the run
location (``<run>/logs/<command>-<UTC time>.log``, through :class:`pipeline.storage.store.Storage`,
so S3 works too) when the command ends, but only once the command got past its checks: a
refused command leaves the location untouched.

Worker output reaches the driver through Ray's log streaming (``log_to_driver``);
:func:`route_worker_output` replaces Ray's printer of that stream with one that writes to the log
file. That printer is a private part of Ray (``global_worker_stdstream_dispatcher``): if it
moves, worker output simply stays on the terminal as before. The progress bars of actors and Train
workers (``ray.experimental.tqdm_ray``) travel in the same stream, one line of bar state each:
those lines never go to the log file, and the replacement draws them on the terminal as Ray's
printer would (with ``--verbose``, Ray's printer, still in place, draws them). The raylet's warnings to the driver
(too many worker processes started, ...) come through Ray's error listener instead and are routed
the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["LOG_DIR", "RunLog", "configure_console", "quiet_ray_loggers", "route_worker_output"]

LOG_DIR = "logs"
#: Loggers whose warnings the terminal shows (everything at ERROR and above is shown too).
OWN_LOGGERS = ("pipeline", "intraq_core", "benchmarks", "__main__")
WORKER_LOGGER = "ray.workers"  # worker and actor output, as forwarded by Ray
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "intraq_run_log"
_RAY_PRINTER = "ray_print_logs"

_state: dict[str, Any] = {"verbose": False, "console": None}


class _ConsoleFilter(logging.Filter):
    """Our own loggers at the console level; other loggers only from ERROR, never Python warnings."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(WORKER_LOGGER):  # printed by Ray itself when verbose
            return False
        if _state["verbose"]:
            return record.levelno >= min(self.level, logging.INFO)
        if record.name == "py.warnings":
            return False
        own = record.name.split(".", 1)[0] in OWN_LOGGERS
        return record.levelno >= (self.level if own else logging.ERROR)


class _StderrHandler(logging.StreamHandler):
    """A stream handler writing to whatever ``sys.stderr`` is when a record is emitted.

    So a handler made while a caller had replaced stderr (a test runner, a notebook cell) does not
    keep writing into that closed stream afterwards.
    """

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_console(level: str | int = "WARNING", *, verbose: bool = False) -> None:
    """Set up the root logger for a CLI command: a filtered stderr handler, warnings as log records.

    The root logger passes everything from INFO up (so a :class:`RunLog` file gets it); the
    console handler filters (see :class:`_ConsoleFilter`). Calling it again reconfigures.
    """
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else int(level)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    _state["verbose"] = verbose
    root = logging.getLogger()
    old = _state["console"]
    if old is not None:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_ConsoleFilter(numeric))
    root.addHandler(handler)
    root.setLevel(min(numeric, logging.INFO))
    _state["console"] = handler
    logging.captureWarnings(False)  # re-install: whoever swapped warnings.showwarning since (a test runner)
    logging.captureWarnings(True)


def quiet_ray_loggers() -> None:
    """Route the driver's ``ray`` logger through the root logger (file always, terminal if verbose).

    Ray gives its ``ray`` logger its own stderr handler at import; ``ray.init`` keeps the handlers
    it finds. Call this after importing ray and before ``ray.init``.
    """
    import ray  # noqa: F401  (its import installs the handler replaced here)

    ray_logger = logging.getLogger("ray")
    for handler in list(ray_logger.handlers):
        ray_logger.removeHandler(handler)
    ray_logger.propagate = True
    ray_logger.setLevel(logging.INFO)


def _worker_lines(data: dict[str, Any]) -> Iterator[str]:
    """The lines of one batch of worker output, prefixed like Ray does (``(Name pid=N)``).

    The autoscaler's batches are its full status every few seconds: only its events are kept,
    as Ray's own printer does.
    """
    name = data.get("actor_name") or data.get("task_name") or ""
    pid = data.get("pid")
    prefix = f"({name + ' ' if name else ''}pid={pid}) "
    lines = data.get("lines", [])
    if pid == "autoscaler":
        try:
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        except Exception:  # Ray moved it, or it cannot tell the autoscaler version: drop the status dumps
            return
    for line in lines:
        yield prefix + str(line)


def _draw_bar(line: str) -> None:
    """Draw one bar state sent by a worker's ``tqdm_ray`` bar on this terminal, as Ray's printer does."""
    from ray.experimental import tqdm_ray

    try:
        tqdm_ray.instance().process_state_update(json.loads(line))
    except Exception as exc:  # a bar must never break the command
        logging.getLogger(__name__).debug("progress bar state not drawn: %s", exc)


def route_worker_output(*, verbose: bool) -> bool:
    """Send the output of Ray's workers to the log (and, unless ``verbose``, not to the terminal);
    their progress bars to the terminal, never to the log.

    Returns whether Ray's stream could be intercepted (see the module docstring).
    """
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC
    except ImportError:  # pragma: no cover - Ray moved its private printer
        return False
    log = logging.getLogger(WORKER_LOGGER)

    def handle(data: dict[str, Any]) -> None:
        lines = data.get("lines", [])
        bars = [line for line in lines if RAY_TQDM_MAGIC in line]
        if bars:
            data = {**data, "lines": [line for line in lines if RAY_TQDM_MAGIC not in line]}
            if not verbose:  # Ray's printer, which draws them otherwise, is gone
                for line in bars:
                    _draw_bar(line)
        for line in _worker_lines(data):
            log.info("%s", line)

    dispatcher.remove_handler(_HANDLER_NAME)
    dispatcher.add_handler(_HANDLER_NAME, handle)
    if not verbose:
        dispatcher.remove_handler(_RAY_PRINTER)
        _route_driver_messages(handle)
    return True


def _route_driver_messages(handle: Any) -> None:
    """The raylet's warnings to this driver ("N PYTHON worker processes have been started …") do
    not pass through the stream dispatcher: Ray's error listener prints them with its module-level
    ``print_to_stdstream``. Replaced for the command's duration by ``handle`` (to the log file);
    :func:`stop_routing_worker_output` puts Ray's back."""
    from ray._private import worker

    original = _state.setdefault("print_to_stdstream", worker.print_to_stdstream)

    def to_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        try:
            handle(data)
        except Exception:  # never lose Ray's message: fall back to its printer
            original(data, ignore_prefix)

    worker.print_to_stdstream = to_log


def stop_routing_worker_output() -> None:
    """Undo :func:`route_worker_output` (Ray's own printer is restored by the next ``ray.init``)."""
    with contextlib.suppress(ImportError):
        from ray._private import worker
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

        dispatcher.remove_handler(_HANDLER_NAME)
        original = _state.pop("print_to_stdstream", None)
        if original is not None:
            worker.print_to_stdstream = original


class RunLog:
    """The log file of one command: every record from INFO up, copied to the run location at the end.

    Use as a context manager around the command; call :meth:`keep` once the command may write to
    its location (its checks passed). A command that ends with one of ``refusals`` (errors that
    refuse to touch the location: it is occupied, locked, already trained) leaves no log there
    either. ``url`` is where the file went (None until then).
    """

    def __init__(self, storage_config: Any, command: str, *, refusals: tuple[type[BaseException], ...] = ()) -> None:
        self.storage_config = storage_config
        self.command = command
        self.refusals = refusals
        self.url: str | None = None
        self._keep = False
        fd, name = tempfile.mkstemp(prefix=f"intraq-{command}-", suffix=".log")
        os.close(fd)
        self.path = Path(name)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter(_FORMAT))
        self.handler.setLevel(logging.INFO)
        self.started = time.gmtime()

    def keep(self) -> None:
        """Copy the file into the run location when the command ends (its checks passed)."""
        self._keep = True

    def __enter__(self) -> RunLog:
        root = logging.getLogger()
        root.addHandler(self.handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()
        refused = exc_type is not None and issubclass(exc_type, self.refusals)
        try:
            if self._keep and not refused:
                self.url = self._upload()
        finally:
            self.path.unlink(missing_ok=True)

    def _upload(self) -> str | None:
        from pipeline.storage.store import Storage

        name = f"{self.command}-{time.strftime('%Y%m%dT%H%M%SZ', self.started)}.log"
        try:
            storage = Storage.from_config(self.storage_config).child(LOG_DIR)
            storage.write_bytes_atomic(name, self.path.read_bytes())
            return storage.join(name)
        except Exception as exc:  # the log is a convenience: never fail a finished command over it
            logging.getLogger(__name__).warning("could not write the log file to the run location: %s", exc)
            return None
