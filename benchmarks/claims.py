"""The source document's claims judged on a study's cells: held, not held, or not separated by
the seed-to-seed spread (every table of ``benchmarks/studies.py`` states them this way)."""

from __future__ import annotations

import statistics

#: How every table introduces the source document's claims.
CLAIMS_HEADER = (
    "Claims of the source document (ResNet-18 on ImageNet) at this budget: held / not held / not separated "
    "(the difference is within the seed-to-seed spread), on the means over seeds:"
)


def verdict(high: list[float], low: list[float], claim: str, *, strict: bool = True, digits: int = 2) -> str:
    """One line saying whether ``claim`` holds on the per-seed values of two rows.

    ``strict``: the claim is "high > low" (held when the mean difference exceeds the seed spread,
    not held when it is below minus the spread); otherwise it is "high does not exceed low"
    (not held only when high exceeds low by more than the spread). The spread is the larger
    sample standard deviation of the two rows; with one seed a row has none and the verdict
    is provisional.
    """
    if not high or not low:
        return f"- {claim}: not run yet."
    mh, ml = statistics.mean(high), statistics.mean(low)
    diff = mh - ml
    n = f"n = {len(high)}, {len(low)}"
    numbers = f"{mh:.{digits}f} vs {ml:.{digits}f}, difference {diff:+.{digits}f}"
    if min(len(high), len(low)) < 2:
        held = diff > 0 if strict else diff <= 0
        return f"- {claim}: {'held' if held else 'not held'} on one seed, provisional ({numbers}; {n})."
    spread = max(statistics.stdev(high), statistics.stdev(low))
    if strict:
        word = "held" if diff > spread else "not held" if diff < -spread else "not separated"
    else:
        word = "not held" if diff > spread else "held"
    return f"- {claim}: {word} ({numbers}, seed spread {spread:.{digits}f}; {n})."
