"""COCO/LVIS-format detection annotations and the GT-box / proposal dataset for zero-shot inference.

Boxes leave this module as ``Tensor[N, 4]`` float32 ``xyxy`` in pixels of the image on disk; COCO's ``xywh`` is
converted here, at the file boundary, and nowhere else.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from rclip_core.data.transforms import normalize, read_image, resize_shortest_edge
from rclip_core.errors import RclipError
from rclip_core.io import read_json

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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


def _req(obj: dict, key: str, where: str):
    if key not in obj:
        raise RclipError(f"{where} lacks key '{key}'")
    return obj[key]


def _clean(boxes: Tensor, width: int | None, height: int | None, stats: BoxStats) -> tuple[Tensor, Tensor]:
    """Clip (N, 4) ``xyxy`` boxes to the image when its size is known, drop degenerate ones, count both.
    Returns (kept boxes, keep mask over the input)."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4), torch.zeros(0, dtype=torch.bool)
    out = boxes.clone()
    if width is not None and height is not None:
        out[:, 0::2] = out[:, 0::2].clamp(0, width)
        out[:, 1::2] = out[:, 1::2].clamp(0, height)
        stats.clipped += int((out != boxes).any(dim=1).sum())
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    stats.dropped += int((~keep).sum())
    return out[keep], keep


def load_detection_annotations(path: str | os.PathLike, *, skip_crowd: bool = True
                               ) -> tuple[list[ImageRecord], list[dict], BoxStats]:
    """Read a COCO- or LVIS-format instances file.

    Returns:
        (images in file order with GT boxes/labels, categories sorted by id, what was clipped/dropped).
    """
    data = read_json(path, what="annotation file")
    if not isinstance(data, dict):
        raise RclipError(f"{path}: expected a COCO-format object with 'images', 'annotations', 'categories'")
    images_raw = _req(data, "images", str(path))
    anns = _req(data, "annotations", str(path))
    cats = sorted(_req(data, "categories", str(path)), key=lambda c: _req(c, "id", f"{path}: a category"))
    records: dict[int, ImageRecord] = {}
    for i, im in enumerate(images_raw):
        where = f"{path}: images[{i}]"
        iid = int(_req(im, "id", where))
        # LVIS files name images only by coco_url; their files are stored under the URL's base name.
        name = im.get("file_name") or (im["coco_url"].rsplit("/", 1)[-1] if "coco_url" in im else None)
        if name is None:
            raise RclipError(f"{where} lacks key 'file_name'")
        records[iid] = ImageRecord(id=iid, file_name=str(name), width=im.get("width"), height=im.get("height"))
    per_image: dict[int, tuple[list, list]] = {}
    stats = BoxStats()
    for j, a in enumerate(anns):
        where = f"{path}: annotations[{j}]"
        iid = int(_req(a, "image_id", where))
        if iid not in records:
            raise RclipError(f"{where} refers to image_id {iid}, which is not in 'images'")
        if skip_crowd and a.get("iscrowd", 0):
            stats.crowd_skipped += 1
            continue
        x, y, w, h = (float(v) for v in _req(a, "bbox", where))
        per_image.setdefault(iid, ([], []))
        per_image[iid][0].append([x, y, x + w, y + h])
        per_image[iid][1].append(int(_req(a, "category_id", where)))
    for iid, (boxes, labels) in per_image.items():
        rec = records[iid]
        b, keep = _clean(torch.tensor(boxes, dtype=torch.float32), rec.width, rec.height, stats)
        rec.gt_boxes, rec.gt_labels = b, torch.tensor(labels, dtype=torch.int64)[keep]
    return list(records.values()), cats, stats


def images_in_folder(folder: str | os.PathLike) -> list[ImageRecord]:
    """Every image file in ``folder`` (sorted), with generated ids 1..N, for inference without annotations."""
    p = Path(folder)
    if not p.is_dir():
        raise RclipError(f"image folder not found: {p}")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise RclipError(f"{p}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return [ImageRecord(id=i + 1, file_name=f.name) for i, f in enumerate(files)]


def images_from_paths(paths: list[str | os.PathLike]) -> list[ImageRecord]:
    """Image files given one by one and/or as folders (their images, sorted) → records with absolute file names
    and ids 1..N in that order. Files given explicitly are kept whatever their extension (a bad one is reported
    when read)."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files.extend(r_path for r_path in sorted(p.iterdir()) if r_path.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.exists():
            files.append(p)
        else:
            raise RclipError(f"no such image or folder: {p}")
    if not files:
        raise RclipError(f"no image files in {', '.join(str(p) for p in paths)}")
    return [ImageRecord(id=i + 1, file_name=str(f.resolve())) for i, f in enumerate(files)]


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
        iid = int(_req(item, "image_id", where))
        boxes = torch.tensor(_req(item, "boxes", where), dtype=torch.float32).reshape(-1, 4)
        obj = torch.tensor(_req(item, "objectness", where), dtype=torch.float32).reshape(-1)
        if obj.shape[0] != boxes.shape[0]:
            raise RclipError(f"{where}: {boxes.shape[0]} boxes but {obj.shape[0]} objectness values")
        if iid not in by_id:
            continue  # proposals for images outside this run (e.g. --limit) are ignored
        rec = by_id[iid]
        if "file_name" in item and item["file_name"] != rec.file_name:
            raise RclipError(f"{where}: image_id {iid} is {item['file_name']!r} there but {rec.file_name!r} here")
        rec.proposals, keep = _clean(boxes, rec.width, rec.height, stats)
        rec.objectness = obj[keep]


class RegionDataset(Dataset):
    """Images resized and normalised for the CLIP trunk, with their boxes scaled alike.

    Each item is a dict: ``image_id``, ``image`` (3, H, W) or None when unreadable, ``error`` (str | None),
    ``boxes`` (R, 4) in resized pixels (GT boxes, or proposals when ``use_proposals``), ``objectness`` (R,) or None,
    ``scale`` (sx, sy) from the original to the resized image, ``orig_size`` (w, h).
    """

    def __init__(self, records: list[ImageRecord], image_dir: str | os.PathLike, *, min_size: int, max_size: int,
                 pixel_mean: list[float], pixel_std: list[float], use_proposals: bool = False,
                 num_proposals: int | None = None) -> None:
        self.records = records
        self.image_dir = Path(image_dir)
        self.min_size, self.max_size = min_size, max_size
        self.mean, self.std = pixel_mean, pixel_std
        self.use_proposals = use_proposals
        self.num_proposals = num_proposals

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        item = {"image_id": rec.id, "image": None, "error": None, "boxes": torch.zeros((0, 4)), "objectness": None,
                "scale": (1.0, 1.0), "orig_size": (rec.width, rec.height)}
        try:
            img = read_image(self.image_dir / rec.file_name)
        except RclipError as e:
            item["error"] = str(e)
            return item
        orig_w, orig_h = img.size
        resized = resize_shortest_edge(img, self.min_size, self.max_size)
        sx, sy = resized.width / orig_w, resized.height / orig_h
        if self.use_proposals:
            boxes = rec.proposals if rec.proposals is not None else torch.zeros((0, 4))
            obj = rec.objectness if rec.objectness is not None else torch.zeros((0,))
            if self.num_proposals is not None and boxes.shape[0] > self.num_proposals:
                top = obj.topk(self.num_proposals).indices
                boxes, obj = boxes[top], obj[top]
            item["objectness"] = obj
        else:
            boxes = rec.gt_boxes
        boxes = boxes * torch.tensor([sx, sy, sx, sy])
        # Clip to the resized image and drop boxes that became empty, as the original does before pooling.
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, resized.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, resized.height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        item["boxes"] = boxes[keep]
        if item["objectness"] is not None:
            item["objectness"] = item["objectness"][keep]
        item.update(image=normalize(resized, self.mean, self.std), scale=(sx, sy), orig_size=(orig_w, orig_h))
        return item


def collate_list(batch: list[dict]) -> list[dict]:
    """Keep items as a list: images differ in size and are padded later, only when batched together."""
    return batch
