"""The claim verdicts (benchmarks/claims.py) against hand-computed seed spreads."""

from __future__ import annotations

from benchmarks.claims import verdict


def test_verdict_against_the_seed_spread() -> None:
    # means 90.5 vs 90.0, sample std 0.1414 and 0.7071: a 0.5 difference is inside the larger spread
    assert "not separated" in verdict([90.4, 90.6], [89.5, 90.5], "a > b")
    assert verdict([91.0, 91.2], [90.0, 90.2], "a > b").startswith("- a > b: held (91.10 vs 90.10, difference +1.00")
    assert ": not held (" in verdict([89.0, 89.2], [90.0, 90.2], "a > b")
    # "does not beat": broken only when the first row is above by more than the spread
    assert ": held (" in verdict([90.5, 90.7], [90.4, 90.6], "a does not beat b", strict=False)
    assert ": not held (" in verdict([91.5, 91.7], [90.4, 90.6], "a does not beat b", strict=False)
    assert "provisional" in verdict([91.0], [90.0], "a > b")
    assert verdict([], [90.0], "a > b") == "- a > b: not run yet."
