"""How uptake is drawn over the T1C: a plain value (no numpy), so that the config and
the model card can name a style without loading the rendering code
(:mod:`dicom_node.inference.fusion`)."""

from __future__ import annotations

from dataclasses import dataclass

COLORMAPS = ("hot",)


@dataclass(frozen=True)
class FusionStyle:
    """How uptake is drawn over the T1C. Recorded in every model card."""

    colormap: str = "hot"
    alpha: float = 0.6
    window_low: float = 0.0
    window_high: float = 4.0
    display_threshold: float = 0.3

    def __post_init__(self) -> None:
        if self.colormap not in COLORMAPS:
            raise ValueError(f"colormap must be one of {COLORMAPS}, got {self.colormap!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if not self.window_high > self.window_low:
            raise ValueError("window_high must be greater than window_low")

    def as_dict(self) -> dict[str, float | str]:
        return {
            "colormap": self.colormap,
            "alpha": self.alpha,
            "window_low": self.window_low,
            "window_high": self.window_high,
            "display_threshold": self.display_threshold,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> FusionStyle:
        return cls(
            colormap=str(data.get("colormap", "hot")),
            alpha=float(data.get("alpha", 0.6)),  # type: ignore[arg-type]
            window_low=float(data.get("window_low", 0.0)),  # type: ignore[arg-type]
            window_high=float(data.get("window_high", 4.0)),  # type: ignore[arg-type]
            display_threshold=float(data.get("display_threshold", 0.3)),  # type: ignore[arg-type]
        )
