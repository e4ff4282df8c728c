"""Images and boxes for the RPN: base-category training data with detectron2's augmentation, and images to propose on.

Both feed :class:`rclip_core.rpn.model.RPNModel` uint8 RGB tensors (3, H, W) resized with the CLIP branch's rule
(``rclip_core.data.transforms.resize_shortest_edge``: PIL bilinear, shorter side ``min_size``, longer at most
``max_size``); the model does the channel flip and normalisation. Boxes are ``xyxy`` in the resized image's pixels.

Base categories (the original trains its RPNs on base boxes only, regionclip_facts.md §1.2, §6): LVIS categories
whose ``frequency`` is not ``"r"``; otherwise categories with ``"split": "base"``; otherwise COCO's 48 base classes
found by name (``rclip_core.evaluation.coco_ovd_splits``). Boxes of other categories are dropped, and so are images
left with none (detectron2's ``FILTER_EMPTY_ANNOTATIONS``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from rclip_core.data.coco import ImageRecord, load_detection_annotations
from rclip_core.data.transforms import read_image, resize_shortest_edge
from rclip_core.errors import RclipError

log = logging.getLogger(__name__)


def image_to_tensor(img: Image.Image) -> Tensor:
    """PIL RGB → uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def base_category_ids(categories: list[dict]) -> tuple[set[int], str]:
    """Ids of the base categories and how they were found (see the module docstring)."""
    from rclip_core.evaluation import coco_ovd_splits

    if any("frequency" in c for c in categories):
        return {int(c["id"]) for c in categories if c.get("frequency") != "r"}, "LVIS frequency c+f"
    splits = coco_ovd_splits(categories)
    if splits:
        how = "'split' field" if any("split" in c for c in categories) else "COCO's 48 base classes by name"
        return set(splits["base"]), how
    log.warning("no base/novel split in the categories (no 'frequency', no 'split', no COCO names): using all")
    return {int(c["id"]) for c in categories}, "all (no split found)"


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


class RpnTrainDataset(Dataset):
    """Training images keyed by ``(index, shorter side, flip)``, so the sampler (seeded per step) fixes every
    augmentation and resuming replays the same batches.

    Each item: ``{"image": (3, H, W) uint8 RGB, "boxes": (G, 4) xyxy in its pixels, "image_id": int}``.
    """

    def __init__(self, records: list[ImageRecord], image_dir: str | os.PathLike, *, max_size: int) -> None:
        self.records = records
        self.image_dir = Path(image_dir)
        self.max_size = max_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int, bool]) -> dict:
        index, min_size, flip = key
        rec = self.records[index]
        img = read_image(self.image_dir / rec.file_name)  # an unreadable training image stops training, named
        resized = resize_shortest_edge(img, min_size, self.max_size)
        sx, sy = resized.width / img.width, resized.height / img.height
        boxes = rec.gt_boxes * torch.tensor([sx, sy, sx, sy])
        image = image_to_tensor(resized)
        if flip:
            image = image.flip(-1)
            boxes = torch.stack([resized.width - boxes[:, 2], boxes[:, 1], resized.width - boxes[:, 0], boxes[:, 3]],
                                dim=1)
        return {"image": image, "boxes": boxes, "image_id": rec.id}


class StepBatches:
    """Batches of dataset keys for steps ``start_step + 1 .. steps``: a batch sampler for ``DataLoader``.

    Each epoch is a permutation seeded by ``(seed, epoch)`` (the last incomplete batch dropped); each image's shorter
    side and flip are drawn from a generator seeded by ``(seed, step)``. So the batch of any step can be recomputed,
    which makes resuming exact, and nothing here touches torch's global random state.
    """

    def __init__(self, num_images: int, *, batch_size: int, steps: int, min_sizes: list[int], hflip: bool,
                 seed: int, start_step: int = 0) -> None:
        if num_images < 1 or batch_size < 1:
            raise RclipError("training needs at least one image and a batch size of at least 1")
        if not min_sizes:
            raise RclipError("rpn.train.min_sizes must list at least one size")
        self.n, self.batch_size, self.steps = num_images, batch_size, steps
        self.min_sizes, self.hflip, self.seed, self.start_step = list(min_sizes), hflip, seed, start_step

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def _order(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        # With fewer images than a batch, an "epoch" repeats the permutation to fill one batch.
        per_epoch = max(1, self.n // self.batch_size)
        for step in range(self.start_step + 1, self.steps + 1):
            epoch, offset = divmod(step - 1, per_epoch)
            order = self._order(epoch).repeat(-(-self.batch_size // self.n))
            idx = order[offset * self.batch_size:(offset + 1) * self.batch_size]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * step + 1)
            sizes = torch.randint(len(self.min_sizes), (len(idx),), generator=g)
            flips = torch.rand(len(idx), generator=g) < 0.5
            yield [(int(i), self.min_sizes[int(s)], bool(f) and self.hflip) for i, s, f in zip(idx, sizes, flips)]


class ProposalImages(Dataset):
    """Images read (RGB, EXIF-rotated) and resized like the CLIP branch, for proposing.

    Each item: ``image_id``, ``file_name``, ``image`` (3, H, W) uint8 or None when unreadable, ``error`` (str | None),
    ``scale`` (sx, sy) from the original to the resized image, ``orig_size`` (w, h).
    """

    def __init__(self, records: list[ImageRecord], image_dir: str | os.PathLike, *, min_size: int,
                 max_size: int) -> None:
        self.records = records
        self.image_dir = Path(image_dir)
        self.min_size, self.max_size = min_size, max_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        item = {"image_id": rec.id, "file_name": rec.file_name, "image": None, "error": None, "scale": (1.0, 1.0),
                "orig_size": (rec.width, rec.height)}
        try:
            img = read_image(self.image_dir / rec.file_name)
        except RclipError as e:
            item["error"] = str(e)
            return item
        resized = resize_shortest_edge(img, self.min_size, self.max_size)
        item.update(image=image_to_tensor(resized), orig_size=(img.width, img.height),
                    scale=(resized.width / img.width, resized.height / img.height))
        return item
