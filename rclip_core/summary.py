"""The one summary of a run over images (zero-shot inference, proposing): counts, skipped images, speed.

Written by the commands as ``OUT_STEM.summary.json``; ``random_weights`` marks runs whose model had no trained
weights, so nobody mistakes their output for a result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RunSummary:
    """What a pass over a dataset did."""

    images: int = 0  # images processed (skipped ones not included)
    images_skipped: list[str] = field(default_factory=list)  # one line per unreadable / unusable image
    skipped_ids: list[int] = field(default_factory=list)
    images_without_regions: int = 0
    images_without_detections: int = 0
    regions: int = 0  # boxes classified, or proposals made
    detections: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float | None:
        return round(self.images / self.seconds, 3) if self.seconds else None

    def add_image(self, regions: int, detections: int | None = None) -> None:
        """Count one processed image with its ``regions`` (boxes classified or proposals made) and, for detection
        runs, its ``detections``."""
        self.images += 1
        self.regions += regions
        self.images_without_regions += int(regions == 0)
        if detections is not None:
            self.detections += detections
            self.images_without_detections += int(detections == 0)

    def skip(self, image_id: int, reason: str) -> None:
        self.images_skipped.append(reason)
        self.skipped_ids.append(image_id)

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_second": self.images_per_second}
