"""The one training checkpoint of every executor: its identity, its bytes, and its background writer.

A checkpoint holds the :class:`~intraq_core.distill.Distiller` state (student with bare, DDP-free
keys; optimizer; step; augmentation RNG), the epoch, the history, the selector's scores and best
student so far, executor bookkeeping (plain types, e.g. Ray's attempt counter) and the identity of
the training (config hash, dataset fingerprint, number of training images). Tensors and plain types
only, read with ``torch.load(weights_only=True)``. A checkpoint of another training is ignored (with
a warning) and training restarts. The local executor keeps it at ``train_state.pt``; Ray Train keeps
the same file in each of its checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import logging
from typing import Any

import torch

from intraq_core.distill import Distiller
from intraq_core.selection import Selector
from intraq_core.torchfile import load_resume_state
from pipeline.context import RunContext
from pipeline.storage.manifest import Manifest
from pipeline.storage.store import Storage

log = logging.getLogger(__name__)

#: The local executor's resume point (Ray Train's checkpoints hold a file of the same name).
TRAIN_STATE_PATH = "train_state.pt"
TRAIN_STATE_FORMAT = "intraq-train-state/1"


def dataset_fingerprint(manifest: Manifest) -> str:
    """A short hash of the exact shard files of a manifest (their sha256, in shard order)."""
    h = hashlib.sha256()
    for entry in sorted(manifest.shards, key=lambda e: e.index):
        h.update(f"{entry.index}:{entry.sha256}\n".encode())
    return h.hexdigest()[:16]


def train_identity(ctx: RunContext, manifest: Manifest, num_train: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: config, dataset, training images (not the workers)."""
    return {"config_hash": ctx.cfg.config_hash(), "dataset": dataset_fingerprint(manifest), "num_train": num_train}


def train_state_bytes(
    identity: dict[str, Any],
    epoch: int,
    history: list[dict[str, Any]],
    distiller: Distiller,
    extra: dict[str, Any] | None = None,
    selector: Selector | None = None,
) -> bytes:
    """The checkpoint of both executors (tensors and plain types only: weights-only loadable).

    ``extra`` holds executor bookkeeping (plain types), e.g. Ray's attempt counter; ``selector``
    its scores and best state so far.
    """
    payload = {
        "format": TRAIN_STATE_FORMAT,
        **identity,
        "epoch": int(epoch),
        "history": [dict(row) for row in history],
        "distiller": distiller.state_dict(),
        "extra": dict(extra or {}),
        "selector": selector.state() if selector is not None else None,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def parse_train_state(raw: bytes, identity: dict[str, Any] | None, where: str) -> dict[str, Any] | None:
    """A checkpoint from :func:`train_state_bytes` if it belongs to this training, else None.

    Read with ``torch.load(weights_only=True)``; an unreadable or foreign checkpoint is ignored
    with a warning naming ``where`` (training then starts from the calibrated student).
    ``identity`` None accepts any training's checkpoint.
    """
    state = load_resume_state(raw, TRAIN_STATE_FORMAT, what=where, kind="training checkpoint")
    if state is None:
        return None
    differs = [k for k, v in (identity or {}).items() if state.get(k) != v]
    if differs:
        log.warning("ignoring training checkpoint %s of another training (%s differ)", where, ", ".join(differs))
        return None
    log.info("resuming distillation after epoch %d from %s", int(state["epoch"]), where)
    return state


def load_train_state(ctx: RunContext, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The local executor's checkpoint at ``train_state.pt``, if it belongs to this training."""
    try:
        raw = ctx.storage.read_bytes(TRAIN_STATE_PATH)
    except FileNotFoundError:
        return None
    return parse_train_state(raw, identity, ctx.storage.join(TRAIN_STATE_PATH))


class CheckpointWriter:
    """Writes checkpoints in a background thread, one at a time, while training goes on.

    :meth:`submit` takes the bytes already serialized (a snapshot: training may change the
    tensors right after), waits for the previous write, and starts this one; :meth:`flush` waits
    for the last. A failed write is raised by the next :meth:`submit` or :meth:`flush`.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="intraq-checkpoint")
        self._pending: concurrent.futures.Future[None] | None = None

    def submit(self, rel: str, data: bytes) -> None:
        self.flush()
        self._pending = self._pool.submit(self.storage.write_bytes_atomic, rel, data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:  # failing already: wait for the write, but report the original error
            try:
                self.close()
            except Exception as write_error:
                log.warning("checkpoint write failed too: %s", write_error)
