"""Running a :class:`ZeroShotDetector` over a dataset: batching, unreadable images, rescaling to the original image
and COCO results records (``image_id, category_id, bbox xywh, score``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from rclip_core.data.coco import collate_list
from rclip_core.data.transforms import pad_batch
from rclip_core.detector import ZeroShotDetector
from rclip_core.errors import RclipError

log = logging.getLogger(__name__)


@dataclass
class InferenceSummary:
    images: int = 0
    images_skipped: list[str] = field(default_factory=list)  # one line per unreadable image
    skipped_ids: list[int] = field(default_factory=list)
    images_without_regions: int = 0
    images_without_detections: int = 0
    regions: int = 0
    detections: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["images_per_second"] = round(self.images / self.seconds, 3) if self.seconds else None
        return d


def run_detection(detector: ZeroShotDetector, dataset: Dataset, *, category_ids: list[int], batch_size: int = 1,
                  num_workers: int = 0, device: str | torch.device = "cpu", strict: bool = False,
                  progress: Callable[[int], None] | None = None) -> tuple[list[dict], InferenceSummary]:
    """Detect on every image of a :class:`rclip_core.data.coco.RegionDataset`.

    Args:
        category_ids: the dataset category id of each classifier row (K).
        strict: an unreadable image raises instead of being skipped and counted.
        progress: called with the number of images done after each batch.

    Returns:
        (COCO results records with boxes in original-image pixels, summary).
    """
    if len(category_ids) != detector.classifier.num_classes:
        raise ValueError("one category id per class embedding is needed")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_list)
    detector.eval().to(device)
    results: list[dict] = []
    summary = InferenceSummary()
    start = time.perf_counter()
    done = 0
    for batch in loader:
        done += len(batch)
        ok = []
        for item in batch:
            if item["error"] is not None:
                if strict:
                    raise RclipError(item["error"])
                log.warning("skipped: %s", item["error"])
                summary.images_skipped.append(item["error"])
                summary.skipped_ids.append(item["image_id"])
            elif item["boxes"].shape[0] == 0:
                summary.images_without_regions += 1
                summary.images += 1
            else:
                ok.append(item)
        if ok:
            images = pad_batch([it["image"] for it in ok]).to(device)
            boxes = [it["boxes"].to(device) for it in ok]
            obj = [it["objectness"].to(device) for it in ok] if ok[0]["objectness"] is not None else None
            dets = detector(images, boxes, obj)
            for it, det in zip(ok, dets):
                summary.images += 1
                summary.regions += int(it["boxes"].shape[0])
                summary.detections += int(det["scores"].shape[0])
                summary.images_without_detections += int(det["scores"].shape[0] == 0)
                results.extend(to_coco_results(it["image_id"], det, it["scale"], category_ids))
        if progress is not None:
            progress(done)
    summary.seconds = time.perf_counter() - start
    return results, summary


def to_coco_results(image_id: int, det: dict, scale: tuple[float, float], category_ids: list[int]) -> list[dict]:
    """Detections in resized-image pixels → COCO results records in original-image pixels (``xywh``)."""
    sx, sy = scale
    boxes = det["boxes"].detach().cpu().double() / torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
    out = []
    for (x1, y1, x2, y2), s, lab in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist()):
        out.append({"image_id": image_id, "category_id": category_ids[lab],
                    "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)], "score": round(s, 6)})
    return out


def category_ids_for(names: list[str], categories: list[dict], source: object = "embeddings") -> list[int]:
    """Map each embedding name to the annotation category of the same (cleaned, case-folded) name.

    Raises:
        RclipError: a name has no category in the annotation file (the ids would be wrong for evaluation).
    """
    from rclip_core.text_embed import clean_name

    by_name = {clean_name(c["name"]).lower(): int(c["id"]) for c in categories}
    missing = [n for n in names if clean_name(n).lower() not in by_name]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise RclipError(f"{source}: names not among the annotation file's categories: {shown}")
    return [by_name[clean_name(n).lower()] for n in names]
