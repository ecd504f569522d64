"""The base of every run-config section: strict (unknown keys and wrong types are errors), and the float
type that accepts YAML 1.1's numeric strings. Imports no torch."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict


def _number(v: Any) -> Any:
    # YAML 1.1 reads 1e-4 as a string; accept numeric strings for float fields, nothing else.
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


Float = Annotated[float, BeforeValidator(_number)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


def _no_is_false(v: Any) -> Any:
    # YAML 1.1 reads a bare `no` (train.mixed_precision: no) as false: take it as the word it was.
    return "no" if v is False else v


NoOr = BeforeValidator(_no_is_false)
