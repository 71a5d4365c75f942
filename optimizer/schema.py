"""The building blocks of mergeopt's declared schemas (pydantic): strict mappings and the value types whose errors
are the one-liners users see. Search spaces, optimizer settings and task sets are declared with these; the one
formatter of their errors is :func:`optimizer.errors.schema_error`."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict


class Strict(BaseModel):
    """A mapping whose keys are all declared (a misspelt key is an error, answered with the nearest name), frozen
    once validated: the configuration the code holds is the one that was checked."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


def integer(minimum: int | None) -> BeforeValidator:
    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
            raise ValueError(f"must be {'a positive integer' if minimum == 1 else 'an integer'}"
                             f"{'' if minimum in (None, 1) else f' of at least {minimum}'}, got {value!r}")
        return value
    return BeforeValidator(check)


def _positive_number(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"must be a positive number, got {value!r}")
    return float(value)


def _non_negative_number(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or not math.isfinite(value):
        raise ValueError(f"must be a non-negative number, got {value!r}")
    return float(value)


def _fraction(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise ValueError(f"must be a fraction in (0, 1], got {value!r}")
    return float(value)


def text(what: str) -> BeforeValidator:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"must be {what}, got {value!r}")
        return value
    return BeforeValidator(check)


def one_of(names: tuple[str, ...] | list[str], what: str = "") -> BeforeValidator:
    def check(value: Any) -> str:
        if value not in names:
            raise ValueError(f"{value!r} is not {what or ' or '.join(names)}")
        return value
    return BeforeValidator(check)


PositiveInt = Annotated[int, integer(1)]
Integer = Annotated[int, integer(None)]
PositiveNumber = Annotated[float, BeforeValidator(_positive_number)]
NonNegativeNumber = Annotated[float, BeforeValidator(_non_negative_number)]
Fraction = Annotated[float, BeforeValidator(_fraction)]
