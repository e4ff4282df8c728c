"""Region sources by name (``--regions SPEC``), with no heavy imports: commands parse and check them before
building anything. The generators themselves are built by ``rclip_core.zeroshot.build_proposal_generator``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rclip_core.errors import RclipError

SourceKind = Literal["gt", "proposals", "rpn", "selective-search", "torchvision-rpn"]
_NEEDS_FILE = ("gt", "proposals", "rpn")


@dataclass(frozen=True)
class RegionSource:
    """Where regions come from: ``kind`` and its file (annotations, proposals, RPN checkpoint, torchvision weights)
    or option (selective search's ``fast`` / ``quality``)."""

    kind: SourceKind
    path: Path | None = None
    option: str | None = None

    @classmethod
    def parse(cls, spec: str) -> RegionSource:
        """``gt:FILE``, ``proposals:FILE``, ``rpn:FILE``, ``selective-search[:fast|quality]``,
        ``torchvision-rpn[:FILE]``."""
        kind, _, arg = spec.partition(":")
        kinds = ("gt", "proposals", "rpn", "selective-search", "torchvision-rpn")
        if kind not in kinds:
            raise RclipError(f"--regions {spec!r}: unknown region source {kind!r}; one of {', '.join(kinds)}")
        if kind in _NEEDS_FILE and not arg:
            raise RclipError(f"--regions {kind} needs a file: {kind}:PATH")
        if kind == "selective-search":
            return cls(kind, None, arg or "fast")
        return cls(kind, Path(arg) if arg else None)  # type: ignore[arg-type]

    def describe(self) -> str:
        if self.kind == "selective-search":
            return f"selective search ({self.option}, OpenCV)"
        if self.kind == "torchvision-rpn":
            return "torchvision's COCO Faster R-CNN RPN" + (f" ({self.path})" if self.path else "")
        return {"gt": "ground-truth boxes of", "proposals": "proposals from", "rpn": "RPN"}[self.kind] + f" {self.path}"

    def check_available(self) -> None:
        """Refuse, in one line, a source whose weights are missing (torchvision's RPN), before any model is built."""
        if self.kind == "torchvision-rpn":
            from rclip_core.region_sources import torchvision_rpn_weights

            torchvision_rpn_weights(self.path)

    @property
    def has_objectness(self) -> bool:
        return self.kind in ("proposals", "rpn", "torchvision-rpn")
