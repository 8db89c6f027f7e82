"""The base of every stage config: strict pydantic (unknown keys are errors naming the closest valid key)."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class StageConfig(BaseModel):
    """Base of every config: unknown keys are errors that name the closest valid key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            for key in data:
                if key not in known:
                    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.5)
                    hint = f"; did you mean '{close[0]}'?" if close else ""
                    valid = ", ".join(sorted(known))
                    raise ValueError(f"unknown key '{key}' in {cls.__name__}{hint} (valid keys: {valid})")
        return data
