"""Running the RPN over a folder of images and writing the proposals file ``rclip zeroshot --proposals`` reads.

Proposals file (JSON), one entry per image::

    [{"image_id": int, "boxes": [[x1, y1, x2, y2], ...], "objectness": [float, ...], "file_name"?: str}, ...]

Boxes are ``xyxy`` in pixels of the image *on disk* (the RPN sees the resized image; boxes are scaled back and
clipped to the original size), best first; ``objectness`` holds raw RPN logits, as the original keeps them.
``file_name`` is written when the ids were generated (no annotation file), so the entries can be matched to files.
The reader is ``rclip_core.data.coco.attach_proposals``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from rclip_core.data.coco import collate_list
from rclip_core.errors import RclipError
from rclip_core.rpn.data import ProposalImages
from rclip_core.rpn.model import RPNModel

log = logging.getLogger(__name__)


@dataclass
class ProposalSummary:
    images: int = 0
    images_skipped: list[str] = field(default_factory=list)  # one line per unreadable image
    images_without_proposals: int = 0
    proposals: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["images_per_second"] = round(self.images / self.seconds, 3) if self.seconds else None
        return d


def proposal_record(image_id: int, boxes: Tensor, objectness: Tensor, *, scale: tuple[float, float],
                    orig_size: tuple[int, int], file_name: str | None = None) -> dict:
    """One file entry: boxes (P, 4) in resized pixels → original pixels (clipped), logits rounded for JSON."""
    sx, sy = scale
    w, h = orig_size
    b = boxes.detach().cpu().double() / torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
    b[:, 0::2] = b[:, 0::2].clamp(0, w)
    b[:, 1::2] = b[:, 1::2].clamp(0, h)
    record: dict = {"image_id": image_id,
                    "boxes": [[round(v, 3) for v in row] for row in b.tolist()],
                    "objectness": [round(v, 5) for v in objectness.detach().cpu().double().tolist()]}
    if file_name is not None:
        record["file_name"] = file_name
    return record


@torch.no_grad()
def run_proposals(model: RPNModel, dataset: ProposalImages, *, batch_size: int = 1, num_workers: int = 0,
                  device: str | torch.device = "cpu", strict: bool = False, with_file_names: bool = False,
                  progress: Callable[[int], None] | None = None) -> tuple[list[dict], ProposalSummary]:
    """Propose on every image of ``dataset``.

    Args:
        model: an :class:`RPNModel` (put in eval mode here).
        dataset: images resized like the CLIP branch.
        batch_size: images per forward pass (padded together; 1 reproduces the original exactly).
        strict: an unreadable image raises instead of being skipped, logged and counted.
        with_file_names: add ``file_name`` to every entry (ids generated from a folder listing).
        progress: called with the number of images done after each batch.

    Returns:
        (file entries in dataset order, summary).
    """
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_list)
    model.eval().to(device)
    records: list[dict] = []
    summary = ProposalSummary()
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
                summary.images_skipped.append(item["error"])
        outputs = model([item["image"].to(device) for item in ok]) if ok else []
        for item, out in zip(ok, outputs):
            summary.images += 1
            summary.proposals += int(out["boxes"].shape[0])
            summary.images_without_proposals += int(out["boxes"].shape[0] == 0)
            records.append(proposal_record(item["image_id"], out["boxes"], out["objectness"], scale=item["scale"],
                                           orig_size=item["orig_size"],
                                           file_name=item["file_name"] if with_file_names else None))
        if progress is not None:
            progress(done)
    summary.seconds = time.perf_counter() - start
    return records, summary
