"""``load_resume_state``: the one reader of resume points (training checkpoints, generator states)."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from intraq_core.torchfile import load_resume_state


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_a_resume_state_is_read_only_with_its_format_and_otherwise_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = {"format": "intraq-test/1", "epoch": 3, "weight": torch.tensor([1.5, -2.0])}
    caplog.set_level(logging.WARNING, logger="intraq_core.torchfile")

    got = load_resume_state(_saved(state), "intraq-test/1", what="run/state.pt", kind="test checkpoint")
    assert got is not None and got["epoch"] == 3
    torch.testing.assert_close(got["weight"], torch.tensor([1.5, -2.0]))
    assert caplog.messages == []

    other = {**state, "format": "intraq-test/2"}
    assert load_resume_state(_saved(other), "intraq-test/1", what="run/state.pt", kind="test checkpoint") is None
    assert load_resume_state(_saved([state]), "intraq-test/1", what="run/state.pt", kind="test checkpoint") is None
    assert caplog.messages == ["ignoring run/state.pt: not a test checkpoint (format 'intraq-test/1')"] * 2

    caplog.clear()
    assert load_resume_state(b"", "intraq-test/1", what="run/state.pt", kind="test checkpoint") is None
    (message,) = caplog.messages
    assert message.startswith("ignoring unreadable test checkpoint run/state.pt: could not read run/state.pt")
    assert "empty file (0 bytes)" in message
