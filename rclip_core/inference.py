"""Running a :class:`~rclip_core.detector.RegionDetector` over a dataset: batching, unreadable images, rescaling to
the original image and COCO results records (``image_id, category_id, bbox xywh, score``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rclip_core import boxes as B
from rclip_core.data.coco import collate_list
from rclip_core.detector import RegionDetector
from rclip_core.errors import RclipError
from rclip_core.summary import RunSummary

log = logging.getLogger(__name__)

T = TypeVar("T")
_END = object()


def read_ahead(batches: Iterable[T]) -> Iterator[T]:
    """Yield ``batches`` in order while one background thread already fetches the next: decoding the next image
    (PIL and torch release the GIL) overlaps the model's work on this one, without the start-up and transfer
    costs of a loader worker process. An error of the source is raised where its item would have been yielded;
    closing the generator early waits for the fetch in flight (at most one) and stops."""
    it = iter(batches)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rclip-read-ahead") as pool:
        pending = pool.submit(next, it, _END)
        while True:
            item = pending.result()
            if item is _END:
                return
            pending = pool.submit(next, it, _END)
            yield item


def iterate_images(dataset: Dataset, summary: RunSummary, *, batch_size: int = 1, num_workers: int = 0,
                   strict: bool = False, progress: Callable[[int], None] | None = None, prefetch: bool = True):
    """Yield lists of readable dataset items, batch by batch; unreadable ones are logged, counted in ``summary``
    (or raise with ``strict``). ``progress`` gets the number of images done after each batch. When the pass ends,
    ``summary.seconds`` holds its wall time (the caller's work on each batch included).

    ``prefetch``: without loader workers, the next batch is read in a background thread (:func:`read_ahead`)
    while the caller works on this one (loader workers prefetch by themselves)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_list)
    start = time.perf_counter()
    done = 0
    for batch in read_ahead(loader) if prefetch and num_workers == 0 else loader:
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
    if done and len(summary.images_skipped) == done:  # nothing to show for the run: an error, not an empty result
        more = f" and {done - 1} more" if done > 1 else ""
        raise RclipError(f"no image could be read or used: {summary.images_skipped[0]}{more}")


def run_detection(detector: RegionDetector, dataset: Dataset, *, category_ids: list[int], batch_size: int = 1,
                  num_workers: int = 0, device: str | torch.device = "cpu", strict: bool = False,
                  progress: Callable[[int], None] | None = None, prefetch: bool = True
                  ) -> tuple[list[dict], RunSummary]:
    """Detect on every image of a :class:`rclip_core.data.coco.DetectionDataset`.

    Args:
        category_ids: the dataset category id of each classifier row (K).
        strict: an unreadable image raises instead of being skipped and counted.
        progress: called with the number of images done after each batch.
        prefetch: read the next batch in a background thread while this one is detected (see
            :func:`iterate_images`); off: read it when it is needed.

    Returns:
        (COCO results records with boxes in original-image pixels, summary).
    """
    if len(category_ids) != detector.classifier.num_classes:
        raise ValueError("one category id per class embedding is needed")
    detector.eval().to(device)
    results: list[dict] = []
    summary = RunSummary()
    for batch in iterate_images(dataset, summary, batch_size=batch_size, num_workers=num_workers, strict=strict,
                                progress=progress, prefetch=prefetch):
        for item, det in zip(batch, detector.detect(batch)):
            summary.add_image(det["num_regions"], int(det["scores"].shape[0]))
            results.extend(to_coco_results(item["image_id"], det, item["scale"], category_ids))
    return results, summary


class CompiledOrEager(nn.Module):
    """``torch.compile(module)``, falling back to ``module`` itself, with one WARNING line, when compiling fails
    (``torch.compile`` compiles on the first call, so that is where a missing C++ compiler or an op it cannot
    trace shows; the eager call then decides whether the error was the compiler's or the input's).

    Args:
        module: the module to compile; its parameters are shared, not copied.
        what: a name for the WARNING line.
    """

    def __init__(self, module: nn.Module, what: str) -> None:
        super().__init__()
        self.module = module
        self.what = what
        self.compiled = None  # built on the first call, so a run without the option never imports torch._dynamo
        self.failed = False

    def forward(self, *args, **kwargs):
        if not self.failed:
            try:
                if self.compiled is None:  # kept out of the module tree (it wraps the same parameters)
                    object.__setattr__(self, "compiled", torch.compile(self.module))
                return self.compiled(*args, **kwargs)
            except Exception as e:  # torch.compile raises many types (compiler missing, backend or tracing errors)
                out = self.module(*args, **kwargs)  # an error of the input itself raises here, as without compile
                self.failed = True
                first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:160]
                log.warning("torch.compile failed for %s (%s): running it in eager mode", self.what, first)
                return out
        return self.module(*args, **kwargs)


def compile_detector(detector: RegionDetector) -> RegionDetector:
    """``zeroshot.compile``: the detector's trunk and res5 (where nearly all the time goes) under ``torch.compile``,
    each with its eager fallback (:class:`CompiledOrEager`); in place, returns ``detector``."""
    detector.backbone = CompiledOrEager(detector.backbone, "the trunk")
    head = detector.roi_heads.head
    head.layer4 = CompiledOrEager(head.layer4, "res5")
    return detector


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
