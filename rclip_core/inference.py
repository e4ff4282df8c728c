"""Running a :class:`~rclip_core.detector.RegionDetector` over a dataset: batching, unreadable images, rescaling to
the original image and COCO results records (``image_id, category_id, bbox xywh, score``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from rclip_core import boxes as B
from rclip_core.data.coco import collate_list
from rclip_core.detector import RegionDetector
from rclip_core.errors import RclipError
from rclip_core.summary import RunSummary

log = logging.getLogger(__name__)


def iterate_images(dataset: Dataset, summary: RunSummary, *, batch_size: int = 1, num_workers: int = 0,
                   strict: bool = False, progress: Callable[[int], None] | None = None):
    """Yield lists of readable dataset items, batch by batch; unreadable ones are logged, counted in ``summary``
    (or raise with ``strict``). ``progress`` gets the number of images done after each batch. When the pass ends,
    ``summary.seconds`` holds its wall time (the caller's work on each batch included)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_list)
    start = time.perf_counter()
    done = 0
    for batch in loader:
        done += len(batch)
        ok = []
        for item in batch:
            if item["error"] is None:
                ok.append(item)
            elif strict:
                raise RclipError(item["error"])
            else:
                log.warning("skipped: %s", item["error"])
                summary.skip(item["image_id"], item["error"])
        if ok:
            yield ok
        if progress is not None:
            progress(done)
    summary.seconds = time.perf_counter() - start


def run_detection(detector: RegionDetector, dataset: Dataset, *, category_ids: list[int], batch_size: int = 1,
                  num_workers: int = 0, device: str | torch.device = "cpu", strict: bool = False,
                  progress: Callable[[int], None] | None = None) -> tuple[list[dict], RunSummary]:
    """Detect on every image of a :class:`rclip_core.data.coco.DetectionDataset`.

    Args:
        category_ids: the dataset category id of each classifier row (K).
        strict: an unreadable image raises instead of being skipped and counted.
        progress: called with the number of images done after each batch.

    Returns:
        (COCO results records with boxes in original-image pixels, summary).
    """
    if len(category_ids) != detector.classifier.num_classes:
        raise ValueError("one category id per class embedding is needed")
    detector.eval().to(device)
    results: list[dict] = []
    summary = RunSummary()
    for batch in iterate_images(dataset, summary, batch_size=batch_size, num_workers=num_workers, strict=strict,
                                progress=progress):
        for item, det in zip(batch, detector.detect(batch)):
            summary.add_image(det["num_regions"], int(det["scores"].shape[0]))
            results.extend(to_coco_results(item["image_id"], det, item["scale"], category_ids))
    return results, summary


def to_coco_results(image_id: int, det: dict, scale: tuple[float, float], category_ids: list[int]) -> list[dict]:
    """Detections in resized-image pixels → COCO results records in original-image pixels (``xywh``)."""
    xywh = B.xyxy_to_xywh(B.unscale_boxes(det["boxes"], *scale))
    out = []
    for (x, y, w, h), s, lab in zip(xywh.tolist(), det["scores"].tolist(), det["labels"].tolist()):
        out.append({"image_id": image_id, "category_id": category_ids[lab],
                    "bbox": [round(x, 3), round(y, 3), round(w, 3), round(h, 3)], "score": round(s, 6)})
    return out


def category_ids_for(names: list[str], categories: list[dict], source: object = "embeddings") -> list[int]:
    """Map each embedding name to the annotation category of the same (cleaned, case-folded) name.

    Raises:
        RclipError: a name has no category in the annotation file (the ids would be wrong for evaluation).
    """
    from rclip_core.data.class_lists import name_key

    by_name = {name_key(c["name"]): int(c["id"]) for c in categories}
    missing = [n for n in names if name_key(n) not in by_name]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise RclipError(f"{source}: names not among the annotation file's categories: {shown}")
    return [by_name[name_key(n)] for n in names]
