"""The cross held-out signal's arithmetic (benchmarks/crossprobe.py), hand-computed."""

from __future__ import annotations

import pytest

from benchmarks.crossprobe import other_method, over


def test_over_weights_each_part_by_its_images() -> None:
    parts = [{"images": 10, "agreement": 90.0, "kl": 0.1}, {"images": 30, "agreement": 50.0, "kl": 0.5}]
    # (10 * 90 + 30 * 50) / 40 = 60; (10 * 0.1 + 30 * 0.5) / 40 = 0.4
    assert over(parts) == pytest.approx({"agreement": 60.0, "kl": 0.4})


def test_other_method_scores_a_student_on_the_other_methods_images_only() -> None:
    scores = {
        "parts": [
            {"row": "a1", "method": "intraq", "images": 10, "agreement": 99.0, "kl": 0.01},
            {"row": "b1", "method": "bns_ce", "images": 30, "agreement": 80.0, "kl": 0.4},
            {"row": "b2", "images": 10, "agreement": 70.0, "kl": 0.6},  # written before parts named their method
        ]
    }
    # an IntraQ student: the two BNS+CE parts, (30 * 0.4 + 10 * 0.6) / 40 = 0.45, agreement 77.5
    got = other_method(scores, "intraq", {"b2": "bns_ce"})
    assert got == pytest.approx({"agreement": 77.5, "kl": 0.45})
    assert other_method(scores, "bns_ce", {"b2": "bns_ce"}) == pytest.approx({"agreement": 99.0, "kl": 0.01})
    assert other_method({"parts": scores["parts"][:1]}, "intraq", {}) is None
