"""Running the RPN over images and writing the proposals file ``rclip zeroshot --proposals`` reads.

Proposals file (JSON), one entry per image::

    [{"image_id": int, "boxes": [[x1, y1, x2, y2], ...], "objectness": [float, ...], "file_name"?: str}, ...]

Boxes are ``xyxy`` in pixels of the image *on disk* (the RPN sees the resized image; boxes are scaled back and
clipped to the original size), best first; ``objectness`` holds raw RPN logits, as the original keeps them.
``file_name`` is written when the ids were generated (no annotation file), so the entries can be matched to files.
The reader is ``rclip_core.data.coco.attach_proposals``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from rclip_core import boxes as B
from rclip_core.inference import iterate_images
from rclip_core.rpn.model import RPNModel
from rclip_core.summary import RunSummary

log = logging.getLogger(__name__)


def proposal_record(image_id: int, boxes: Tensor, objectness: Tensor, *, scale: tuple[float, float],
                    orig_size: tuple[int, int], file_name: str | None = None) -> dict:
    """One file entry: boxes (P, 4) in resized pixels → original pixels (clipped), logits rounded for JSON."""
    w, h = orig_size
    b = B.clip_boxes(B.unscale_boxes(boxes, *scale), w, h)
    record: dict = {"image_id": image_id,
                    "boxes": [[round(v, 3) for v in row] for row in b.tolist()],
                    "objectness": [round(v, 5) for v in objectness.detach().cpu().double().tolist()]}
    if file_name is not None:
        record["file_name"] = file_name
    return record


@torch.no_grad()
def run_proposals(model: RPNModel, dataset: Dataset, *, batch_size: int = 1, num_workers: int = 0,
                  device: str | torch.device = "cpu", strict: bool = False, with_file_names: bool = False,
                  progress: Callable[[int], None] | None = None) -> tuple[list[dict], RunSummary]:
    """Propose on every image of a :class:`rclip_core.data.coco.DetectionDataset`.

    Args:
        model: an :class:`RPNModel` (put in eval mode here).
        batch_size: images per forward pass (padded together; 1 reproduces the original exactly).
        strict: an unreadable image raises instead of being skipped, logged and counted.
        with_file_names: add ``file_name`` to every entry (ids generated from a folder listing).
        progress: called with the number of images done after each batch.

    Returns:
        (file entries in dataset order, summary; ``regions`` counts the proposals).
    """
    model.eval().to(device)
    records: list[dict] = []
    summary = RunSummary()
    for batch in iterate_images(dataset, summary, batch_size=batch_size, num_workers=num_workers, strict=strict,
                                progress=progress):
        out = model([item["image"].to(device) for item in batch])
        for item, boxes, logits in zip(batch, out.boxes, out.objectness):
            summary.add_image(int(boxes.shape[0]))
            records.append(proposal_record(item["image_id"], boxes, logits, scale=item["scale"],
                                           orig_size=item["orig_size"],
                                           file_name=item["file_name"] if with_file_names else None))
    return records, summary
