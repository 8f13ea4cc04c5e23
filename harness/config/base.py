"""Shared pieces of the suite schema: strict and open section models, scalar parameters."""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    model_validator,
)

SUITE_NAME_RE = re.compile(r"^[a-z0-9_-]+$")
PLB_MODES = ("off", "exact", "select", "chunk_loss")
SECTIONS = ("data", "model", "train", "eval", "debug", "pretrain")

Scalar = str | int | float | bool
# values of free-form sections (data/model params): scalars or flat lists of scalars
Param = Scalar | list[Scalar]


MAX_SEED = 2**63 - 1  # seeds are stored in Int64 columns
MAX_NAME = 64  # a suite name is a directory name; file systems stop at 255 bytes per component


def _is_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)  # NaN slips through every range check (NaN < low is False)
    return isinstance(value, (str, int, bool)) and not (
        isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SEED
    )


def _is_param(value: Any) -> bool:
    return _is_scalar(value) or (isinstance(value, list) and all(map(_is_scalar, value)))


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN would pass every `ge`/`le` bound; inf is opted in per field
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class _Open(BaseModel):
    """A `kind` plus free parameters (scalars or lists of scalars) checked by the builder."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _params(self) -> _Open:
        section = type(self).__name__.removesuffix("Cfg").lower()
        for key, value in (self.model_extra or {}).items():
            if not _is_param(value):
                raise ValueError(
                    f"{section}.{key} must be a finite scalar or a list of finite scalars "
                    f"(integers within ±2^63); got {value!r}"
                )
        return self

    def params(self) -> dict[str, Any]:
        """The free parameters (everything but `kind` and the declared fields)."""
        return dict(self.model_extra or {})
