"""COCO/LVIS-format detection annotations, image lists, proposals files, and the one detection dataset.

Boxes leave this module as ``Tensor[N, 4]`` float32 ``xyxy`` (``rclip_core.boxes``); COCO's ``xywh`` is converted
here, at the file boundary. :class:`DetectionDataset` serves every command that reads images with boxes: zero-shot
inference, proposing, RPN training and finetuning. It decodes (``transforms.read_image``) and resizes each image once
and hands out uint8 tensors; the model normalises them per branch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from rclip_core import boxes as B
from rclip_core.data.files import folder_images, image_files
from rclip_core.data.transforms import read_image, resize_shortest_edge, to_uint8_tensor
from rclip_core.errors import RclipError
from rclip_core.io import read_json

log = logging.getLogger(__name__)


@dataclass
class ImageRecord:
    """One image and its boxes (``xyxy`` pixels of the image on disk)."""

    id: int
    file_name: str
    width: int | None = None
    height: int | None = None
    gt_boxes: Tensor = field(default_factory=lambda: torch.zeros((0, 4)))
    gt_labels: Tensor = field(default_factory=lambda: torch.zeros((0,), dtype=torch.int64))  # category ids
    proposals: Tensor | None = None  # (P, 4)
    objectness: Tensor | None = None  # (P,)


@dataclass
class BoxStats:
    """What the loader had to fix in the boxes it read."""

    clipped: int = 0  # boxes partly outside the image, clipped to it
    dropped: int = 0  # degenerate boxes (zero/negative width or height after clipping)
    crowd_skipped: int = 0


def _req(obj: object, key: str, where: str):
    if not isinstance(obj, dict):
        raise RclipError(f"{where} is not an object: {obj!r}"[:200])
    if key not in obj:
        raise RclipError(f"{where} lacks key '{key}'")
    return obj[key]


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise RclipError(f"{where} must be an integer, got {value!r}")
    return int(value)


def _bbox(value: object, where: str) -> list[float]:
    """A COCO ``bbox``: four finite numbers with non-negative width and height."""
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise RclipError(f"{where}: 'bbox' must be four numbers [x, y, w, h], got {value!r}")
    x, y, w, h = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise RclipError(f"{where}: 'bbox' has a non-finite value: {value!r}")
    if w < 0 or h < 0:
        raise RclipError(f"{where}: 'bbox' has a negative width or height: {value!r}")
    return [x, y, w, h]


def load_detection_annotations(path: str | os.PathLike, *, skip_crowd: bool = True
                               ) -> tuple[list[ImageRecord], list[dict], BoxStats]:
    """Read a COCO- or LVIS-format instances file, checking every entry.

    Raises:
        RclipError: naming the file and the entry: a missing key, a duplicate image or category id, an annotation
            of an unknown image or category, a ``bbox`` that is not four finite numbers with non-negative sizes.

    Returns:
        (images in file order with GT boxes/labels, categories sorted by id, what was clipped/dropped).
    """
    data = read_json(path, what="annotation file")
    if not isinstance(data, dict):
        raise RclipError(f"{path}: expected a COCO-format object with 'images', 'annotations', 'categories'")
    images_raw, anns, cats_raw = (_req(data, k, str(path)) for k in ("images", "annotations", "categories"))
    for key, value in (("images", images_raw), ("annotations", anns), ("categories", cats_raw)):
        if not isinstance(value, list):
            raise RclipError(f"{path}: '{key}' must be a list")
    cat_ids: set[int] = set()
    for j, c in enumerate(cats_raw):
        cid = _int(_req(c, "id", f"{path}: categories[{j}]"), f"{path}: categories[{j}].id")
        _req(c, "name", f"{path}: categories[{j}]")
        if cid in cat_ids:
            raise RclipError(f"{path}: categories[{j}] repeats category id {cid}")
        cat_ids.add(cid)
    cats = sorted(cats_raw, key=lambda c: int(c["id"]))
    records: dict[int, ImageRecord] = {}
    for i, im in enumerate(images_raw):
        where = f"{path}: images[{i}]"
        iid = _int(_req(im, "id", where), f"{where}.id")
        if iid in records:
            raise RclipError(f"{where} repeats image id {iid} (duplicate image id)")
        # LVIS files name images only by coco_url; their files are stored under the URL's base name.
        name = im.get("file_name") or (im["coco_url"].rsplit("/", 1)[-1] if "coco_url" in im else None)
        if name is None:
            raise RclipError(f"{where} lacks key 'file_name'")
        records[iid] = ImageRecord(id=iid, file_name=str(name), width=im.get("width"), height=im.get("height"))
    per_image: dict[int, tuple[list, list]] = {}
    stats = BoxStats()
    for j, a in enumerate(anns):
        where = f"{path}: annotations[{j}]"
        iid = _int(_req(a, "image_id", where), f"{where}.image_id")
        if iid not in records:
            raise RclipError(f"{where} refers to image_id {iid}, which is not in 'images'")
        cid = _int(_req(a, "category_id", where), f"{where}.category_id")
        if cid not in cat_ids:
            raise RclipError(f"{where} has category_id {cid}, which is not in 'categories'")
        bbox = _bbox(_req(a, "bbox", where), where)
        if skip_crowd and a.get("iscrowd", 0):
            stats.crowd_skipped += 1
            continue
        boxes, labels = per_image.setdefault(iid, ([], []))
        boxes.append(bbox)
        labels.append(cid)
    for iid, (xywh, labels) in per_image.items():
        rec = records[iid]
        kept, keep, clipped = B.clip_and_filter(B.xywh_to_xyxy(torch.tensor(xywh)), rec.width, rec.height)
        stats.clipped += clipped
        stats.dropped += int((~keep).sum())
        rec.gt_boxes, rec.gt_labels = kept, torch.tensor(labels, dtype=torch.int64)[keep]
    return list(records.values()), cats, stats


def images_in_folder(folder: str | os.PathLike) -> list[ImageRecord]:
    """Every image file in ``folder`` (sorted), with generated ids 1..N, for inference without annotations."""
    return [ImageRecord(id=i + 1, file_name=name) for i, name in enumerate(folder_images(folder))]


def images_from_paths(paths: Sequence[str | os.PathLike]) -> list[ImageRecord]:
    """Image files and/or folders (see :func:`rclip_core.data.files.image_files`) → records with absolute file
    names and ids 1..N in that order."""
    return [ImageRecord(id=i + 1, file_name=name) for i, name in enumerate(image_files(paths))]


def attach_proposals(records: list[ImageRecord], source: str | os.PathLike | list[dict], stats: BoxStats) -> None:
    """Attach precomputed proposals to ``records`` (matched by ``image_id``).

    File format (JSON; ``source`` may also be the already-loaded list): a list (or ``{"proposals": [...]}``) of
    ``{"image_id": int, "boxes": [[x1, y1, x2, y2], ...] (xyxy pixels of the image on disk), "objectness": [float,
    ...], "file_name"?: str}`` — raw RPN logits, as the original keeps them. An entry's ``file_name``, when present,
    must agree with the record's, so proposals made for another image list are not silently misapplied.
    """
    name = "proposals" if isinstance(source, list) else str(source)
    data = source if isinstance(source, list) else read_json(source, what="proposals file")
    items = data.get("proposals") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise RclipError(f"{name}: expected a list of {{image_id, boxes, objectness}}")
    by_id = {r.id: r for r in records}
    for j, item in enumerate(items):
        where = f"{name}: proposals[{j}]"
        iid = _int(_req(item, "image_id", where), f"{where}.image_id")
        try:
            boxes = B.as_boxes(_req(item, "boxes", where))
            obj = torch.as_tensor(_req(item, "objectness", where), dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise RclipError(f"{where}: 'boxes' must be [[x1, y1, x2, y2], ...] and 'objectness' numbers") from None
        if obj.shape[0] != boxes.shape[0]:
            raise RclipError(f"{where}: {boxes.shape[0]} boxes but {obj.shape[0]} objectness values")
        if iid not in by_id:
            continue  # proposals for images outside this run (e.g. --limit) are ignored
        rec = by_id[iid]
        if "file_name" in item and item["file_name"] != rec.file_name:
            raise RclipError(f"{where}: image_id {iid} is {item['file_name']!r} there but {rec.file_name!r} here")
        rec.proposals, keep, clipped = B.clip_and_filter(boxes, rec.width, rec.height)
        stats.clipped += clipped
        stats.dropped += int((~keep).sum())
        rec.objectness = obj[keep]


def _to_resized(boxes: Tensor, sx: float, sy: float, width: int, height: int) -> tuple[Tensor, Tensor]:
    """Boxes in original pixels → resized pixels, clipped to the resized image, degenerate ones dropped (as the
    original does before pooling). Returns (boxes, keep mask)."""
    kept, keep, _ = B.clip_and_filter(B.scale_boxes(boxes, sx, sy), width, height)
    return kept, keep


class DetectionDataset(Dataset):
    """Images with their boxes, decoded and resized once, as uint8 for the model's own normalisation.

    Indexed by an image index (inference: shorter side ``min_sizes[0]``, no flip) or by ``(index, sample_seed)``
    (training: the shorter side drawn from ``min_sizes`` and the flip from ``hflip``, both by the sample's seed, so a
    step can be replayed exactly when resuming; detectron2's ResizeShortestEdge "choice" + RandomFlip).

    Each item: ``image_id``, ``file_name``, ``image`` (3, H, W) uint8 or None when unreadable, ``error``
    (str | None), ``boxes`` (G, 4) and ``labels`` (G,) category ids of the GT, ``proposals`` (P, 4) and
    ``objectness`` (P,) when the record has proposals (None otherwise), all ``xyxy`` in resized pixels (flipped with
    the image); ``scale`` (sx, sy) from the original to the resized image, ``orig_size`` (w, h), ``flipped``.

    Args:
        records: the images.
        image_dir: folder the records' file names are relative to (absolute names ignore it).
        min_sizes: shorter side(s); max_size: longer side at most.
        hflip: random horizontal flip for training keys.
        min_side: an image whose resized shorter side is below this is skipped (too small for the RoI grid).
    """

    def __init__(self, records: list[ImageRecord], image_dir: str | os.PathLike, *, min_sizes: Sequence[int] | int,
                 max_size: int, hflip: bool = False, min_side: int = 32) -> None:
        self.records = records
        self.image_dir = Path(image_dir)
        self.min_sizes = [min_sizes] if isinstance(min_sizes, int) else list(min_sizes)
        if not self.min_sizes:
            raise RclipError("at least one input size (shorter side) is needed")
        self.max_size, self.hflip, self.min_side = max_size, hflip, min_side

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        if isinstance(key, tuple):
            index, seed = key
            rng = np.random.default_rng(seed)
            min_size = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
            flip = self.hflip and bool(rng.random() < 0.5)
        else:
            index, min_size, flip = int(key), self.min_sizes[0], False
        rec = self.records[index]
        item = {"image_id": rec.id, "file_name": rec.file_name, "image": None, "error": None,
                "boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64), "proposals": None,
                "objectness": None, "scale": (1.0, 1.0), "orig_size": (rec.width, rec.height), "flipped": flip}
        try:
            img = read_image(self.image_dir / rec.file_name)
        except RclipError as e:
            item["error"] = str(e)
            return item
        resized = resize_shortest_edge(img, min_size, self.max_size)
        if min(resized.size) < self.min_side:
            item["error"] = (f"{self.image_dir / rec.file_name}: too small or too elongated ({img.width}×{img.height}"
                             f" resizes to {resized.width}×{resized.height}, below {self.min_side} pixels)")
            return item
        w, h = resized.size
        sx, sy = w / img.width, h / img.height
        image = to_uint8_tensor(resized)
        item["boxes"], keep = _to_resized(rec.gt_boxes, sx, sy, w, h)
        item["labels"] = rec.gt_labels[keep]
        if rec.proposals is not None:
            item["proposals"], keep = _to_resized(rec.proposals, sx, sy, w, h)
            item["objectness"] = rec.objectness[keep] if rec.objectness is not None else None
        if flip:
            image = image.flip(-1)
            item["boxes"] = B.hflip_boxes(item["boxes"], w)
            if item["proposals"] is not None:
                item["proposals"] = B.hflip_boxes(item["proposals"], w)
        item.update(image=image, scale=(sx, sy), orig_size=(img.width, img.height))
        return item


def collate_list(batch: list[dict]) -> list[dict]:
    """Keep items as a list: images differ in size and are padded by the model's transform."""
    return batch
