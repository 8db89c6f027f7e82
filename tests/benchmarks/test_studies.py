"""The studies' claims name rows of their own study (benchmarks/studies.py)."""

from __future__ import annotations

import pytest

from benchmarks.studies import LOR_CLAIMS, LOR_ROWS, METHOD_CLAIMS, METHOD_ROWS, data_claims, data_rows


@pytest.mark.parametrize("study", ["lor", "data"])
def test_every_claim_names_rows_of_its_study(study: str) -> None:
    rows, claims = (LOR_ROWS, LOR_CLAIMS) if study == "lor" else (data_rows("cpu"), data_claims("cpu"))
    assert claims and all(high in rows and low in rows for high, low, *_ in claims)
    assert all(high in METHOD_ROWS and low in METHOD_ROWS for high, low, _ in METHOD_CLAIMS)
