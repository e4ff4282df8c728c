"""Which boxes the RPN trains on: base categories only, as the original's RPNs (regionclip_facts.md §1.2, §6).

The base/novel rule is ``rclip_core.data.categories.category_splits`` (LVIS: common + frequent; else a ``split``
field; else COCO's 48 base classes by name). Boxes of other categories are dropped, and so are images left with
none (detectron2's ``FILTER_EMPTY_ANNOTATIONS``). Images are served by ``rclip_core.data.coco.DetectionDataset``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from rclip_core.data.categories import category_splits, split_rule
from rclip_core.data.coco import ImageRecord, load_detection_annotations
from rclip_core.errors import RclipError

log = logging.getLogger(__name__)


def base_category_ids(categories: list[dict]) -> tuple[set[int], str]:
    """Ids of the base categories and the rule that found them (all categories when none is in a split)."""
    splits = category_splits(categories)
    base = {i for i, s in splits.items() if s == "base"}
    if not base:
        log.warning("no base/novel split in the categories (no 'frequency', no 'split', no COCO names): using all")
        return {int(c["id"]) for c in categories}, "all (no split found)"
    return base, split_rule(categories)


@dataclass
class TrainingData:
    """What :func:`load_training_records` kept and dropped."""

    records: list[ImageRecord]
    category_ids: list[int]  # kept categories
    split_rule: str
    boxes_kept: int = 0
    boxes_dropped: int = 0  # of categories not kept
    images_dropped: int = 0  # left without boxes
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.records)} images, {self.boxes_kept} boxes of {len(self.category_ids)} categories "
                f"({self.split_rule}); dropped {self.boxes_dropped} boxes of other categories and "
                f"{self.images_dropped} images without boxes")


def load_training_records(path: str | os.PathLike, *, categories: str = "base") -> TrainingData:
    """Read a COCO/LVIS instances file and keep the boxes the RPN trains on.

    Args:
        path: COCO- or LVIS-format JSON.
        categories: ``"base"`` (drop novel categories, see the module docstring) or ``"all"``.

    Raises:
        RclipError: a malformed file, or no image left with a box.
    """
    records, cats, _ = load_detection_annotations(path)
    if categories == "base":
        keep_ids, rule = base_category_ids(cats)
    elif categories == "all":
        keep_ids, rule = {int(c["id"]) for c in cats}, "all"
    else:
        raise RclipError(f"rpn.train.categories must be 'base' or 'all', got {categories!r}")
    data = TrainingData(records=[], category_ids=sorted(keep_ids), split_rule=rule)
    keep_tensor = torch.tensor(sorted(keep_ids), dtype=torch.int64)
    for rec in records:
        mask = torch.isin(rec.gt_labels, keep_tensor)
        data.boxes_dropped += int((~mask).sum())
        if not bool(mask.any()):
            data.images_dropped += 1
            continue
        rec.gt_boxes, rec.gt_labels = rec.gt_boxes[mask], rec.gt_labels[mask]
        data.boxes_kept += int(mask.sum())
        data.records.append(rec)
    if not data.records:
        raise RclipError(f"{path}: no image has a box of the training categories ({rule})")
    return data
