"""The one base of every config, manifest and request settings object of the project."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class FrozenConfig(BaseModel):
    """Immutable, rejects unknown keys, round-trips through JSON; no inf or NaN anywhere."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
