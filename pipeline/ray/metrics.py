"""Custom Ray metrics of the pipeline (the Ray dashboard's series; progress bars are ``tqdm_ray``'s).

Metrics are recorded with ``ray.util.metrics`` from the driver and from actors/workers; outside
a Ray process (the local executor, unit tests without Ray, a Ray Client driver) every call is a
silent no-op, so stage code records unconditionally and never fails because of metrics.

Where to look: Ray exports them in Prometheus text format, prefixed ``ray_`` (a counter also
gets ``_total``), on each node's metrics export port
(``ray._private.worker.global_worker.node.metrics_export_port``; ``curl
http://127.0.0.1:<port>/metrics | grep intraq``), roughly every 5-10 s. With Prometheus and
Grafana set up (``ray metrics launch-prometheus`` starts a Prometheus that scrapes the local
cluster) the Ray dashboard's *Metrics* tab plots them; Grafana can then chart e.g.
``ray_intraq_generation_loss{term="bns_mean"}`` or ``rate(ray_intraq_shards_done_total[1m])``.

=========================================== ======= =========== ==========================
metric                                      kind    tags        recorded by
=========================================== ======= =========== ==========================
``intraq_shards_done``                      counter run         generation driver
``intraq_generation_image_iterations_per_s`` gauge   run, actor  each generation actor
``intraq_generation_loss``                  gauge   run, term   each generation actor
``intraq_distill_loss``                     gauge   run, worker distillation workers
``intraq_distill_samples_per_s``            gauge   run, worker distillation workers
=========================================== ======= =========== ==========================

Tag values not given are recorded as ``""`` (Ray requires every declared tag key).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Literal

__all__ = [
    "DISTILL_LOSS",
    "DISTILL_SAMPLES_PER_S",
    "GENERATION_IMAGE_ITERATIONS_PER_S",
    "GENERATION_LOSS",
    "SHARDS_DONE",
    "Metric",
]

log = logging.getLogger(__name__)


class Metric:
    """A Ray counter or gauge created lazily in each Ray process; a no-op outside Ray.

    The underlying ``ray.util.metrics`` object is created on first use and re-created when
    this process joins a new Ray job (tests start and stop Ray in one process).
    """

    def __init__(
        self, kind: Literal["counter", "gauge"], name: str, description: str, tag_keys: tuple[str, ...] = ()
    ) -> None:
        self.kind = kind
        self.name = name
        self.description = description
        self.tag_keys = tuple(tag_keys)
        self._impl: Any = None
        self._job: str | None = None
        self._disabled = False
        self._lock = threading.Lock()

    def _get(self) -> Any:
        if self._disabled:
            return None
        try:
            import ray

            if not ray.is_initialized():
                return None
            from ray.util.client import ray as client_ray

            if client_ray.is_connected():  # Ray Client drivers cannot record metrics
                return None
            job = ray.get_runtime_context().get_job_id()
            with self._lock:
                if self._impl is None or self._job != job:
                    from ray.util import metrics

                    cls = metrics.Counter if self.kind == "counter" else metrics.Gauge
                    self._impl = cls(self.name, description=self.description, tag_keys=self.tag_keys)
                    self._job = job
                return self._impl
        except Exception as exc:  # metrics must never break a stage
            log.debug("metric %s disabled: %s", self.name, exc)
            self._disabled = True
            return None

    def _tags(self, tags: dict[str, Any]) -> dict[str, str]:
        unknown = set(tags) - set(self.tag_keys)
        if unknown:
            raise ValueError(f"metric {self.name}: unknown tags {sorted(unknown)}; declared {self.tag_keys}")
        return {k: str(tags.get(k, "")) for k in self.tag_keys}

    def inc(self, value: float = 1.0, **tags: Any) -> None:
        """Add ``value`` to a counter."""
        if self.kind != "counter":
            raise TypeError(f"metric {self.name} is a gauge: use set()")
        full = self._tags(tags)
        impl = self._get()
        if impl is not None:
            self._record(impl.inc, value, full)

    def set(self, value: float, **tags: Any) -> None:
        """Set a gauge to ``value``."""
        if self.kind != "gauge":
            raise TypeError(f"metric {self.name} is a counter: use inc()")
        full = self._tags(tags)
        impl = self._get()
        if impl is not None:
            self._record(impl.set, value, full)

    def _record(self, fn: Any, value: float, tags: dict[str, str]) -> None:
        try:
            fn(float(value), tags=tags)
        except Exception as exc:
            log.debug("metric %s not recorded: %s", self.name, exc)


SHARDS_DONE = Metric("counter", "intraq_shards_done", "Synthetic-image shards finished", ("run",))
GENERATION_IMAGE_ITERATIONS_PER_S = Metric(
    "gauge",
    "intraq_generation_image_iterations_per_s",
    "Images x optimization iterations per second of one generation actor (last shard)",
    ("run", "actor"),
)
GENERATION_LOSS = Metric(
    "gauge", "intraq_generation_loss", "Synthesis loss term of the latest reported shard", ("run", "term")
)
DISTILL_LOSS = Metric("gauge", "intraq_distill_loss", "Distillation training loss", ("run", "worker"))
DISTILL_SAMPLES_PER_S = Metric(
    "gauge", "intraq_distill_samples_per_s", "Distillation training throughput", ("run", "worker")
)
