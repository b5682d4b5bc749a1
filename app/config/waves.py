"""The region-waves state the waves orchestrator (app/ops/waves.py) publishes to every region.

`POST /admin/waves` (deployments/router.py) takes it with the admin token, checks it against
`WavesDocument` and hands it to the region's RolloutController, which keeps the newest one and
shows it as `status["waves"]` (with its own `received_at`) on the operator page. The document
comes over the network, so every list and string is bounded and every number finite; a field
that does not fit is a 400 that names it (`parse_waves_document`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from app.config._base import FiniteStrictModel
from app.config.io import format_validation_error

__all__ = [
    "MAX_REGIONS",
    "MAX_TEXT",
    "RegionWaveState",
    "WaveState",
    "WavesDocument",
    "WavesDocumentError",
    "parse_waves_document",
]

MAX_REGIONS = 64  # in the whole document, all waves together
MAX_TEXT = 200  # characters in any string
MAX_VERSIONS = 64  # versions in a region's weights

Text = Annotated[str, Field(max_length=MAX_TEXT)]
RegionState = Literal[
    "pending", "starting", "running", "succeeded", "failed", "unreachable", "rolled_back"
]


class RegionWaveState(FiniteStrictModel):
    """One region of a wave, as the orchestrator last read it."""

    region: Text = Field(min_length=1, description="The region's name (its overlay's).")
    state: RegionState = Field(description="Where the orchestrator has this region.")
    phase: Text | None = Field(default=None, description="The region controller's phase.")
    step: Text | None = Field(default=None, description="The region controller's current step.")
    weights: dict[Text, Annotated[float, Field(ge=0, le=100)]] | None = Field(
        default=None, max_length=MAX_VERSIONS, description="Traffic weight (%) per version."
    )
    reason: Text | None = Field(default=None, description="Why it is where it is (errors).")


class WaveState(FiniteStrictModel):
    """One wave: its regions and, while it bakes, when the bake ends."""

    index: int = Field(ge=0, lt=MAX_REGIONS, description="0-based position in the waves file.")
    state: Text = Field(min_length=1, description="pending, running, baking, succeeded, ...")
    bake_until: float | None = Field(
        default=None,
        description="When the bake ends (unix s, orchestrator clock); None: not baking.",
    )
    regions: list[RegionWaveState] = Field(max_length=MAX_REGIONS)


class WavesDocument(FiniteStrictModel):
    """The whole waves state, as published (the controller adds `received_at`)."""

    name: Text = Field(min_length=1, description="The waves file's name.")
    published_at: float = Field(gt=0, description="Unix seconds on the orchestrator's clock.")
    on_failure: Literal["halt", "rollback_all"]
    phase: Text = Field(min_length=1, description="running, baking, paused, succeeded, ...")
    current_wave: int = Field(ge=0, lt=MAX_REGIONS, description="0-based.")
    waves: list[WaveState] = Field(min_length=1, max_length=MAX_REGIONS)

    @model_validator(mode="after")
    def _regions_capped(self) -> WavesDocument:
        total = sum(len(wave.regions) for wave in self.waves)
        if total > MAX_REGIONS:
            raise ValueError(f"waves: {total} regions in all; at most {MAX_REGIONS}")
        return self

    @model_validator(mode="after")
    def _current_wave_exists(self) -> WavesDocument:
        if self.current_wave >= len(self.waves):
            raise ValueError(
                f"current_wave ({self.current_wave}) must be less than the number of waves "
                f"({len(self.waves)})"
            )
        return self


class WavesDocumentError(ValueError):
    """A published waves document does not fit `WavesDocument`; the message names the field."""


def parse_waves_document(data: Any) -> WavesDocument:
    """`data` (parsed JSON) as a WavesDocument, or WavesDocumentError naming each bad field."""
    if not isinstance(data, dict):
        raise WavesDocumentError(f"waves: expected a JSON object, got {type(data).__name__}")
    try:
        return WavesDocument.model_validate(data, strict=True)
    except ValidationError as exc:
        # A cross-field rule's message starts with the field it names: no "(root)" before it.
        message = format_validation_error(exc, "waves").replace("waves: (root): ", "waves: ")
        raise WavesDocumentError(message) from None
