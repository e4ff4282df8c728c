"""Drawing detections and the HTML index (pure: images + detections → images / HTML text).

Boxes are outlined in their class colour; each label sits on a filled band of that colour, in black or white
(whichever contrasts more), in Pillow's scalable default font sized to the picture, so labels stay legible on a
640-pixel photo and on a zoomed 128-pixel toy scene alike. Pictures made with random weights carry a red banner.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

RIGHT, WRONG = (40, 170, 60), (220, 40, 40)
RANDOM_WEIGHTS_NOTICE = "RANDOM WEIGHTS - labels are meaningless"


def class_color(index: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per class index (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``background`` (relative luminance, WCAG)."""
    def lin(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    lum = 0.2126 * lin(background[0]) + 0.7152 * lin(background[1]) + 0.0722 * lin(background[2])
    return (0, 0, 0) if lum > 0.179 else (255, 255, 255)


def font_for(image_size: tuple[int, int]) -> ImageFont.ImageFont:
    """Pillow's scalable default font, about 1/30 of the picture's shorter side (at least 11 px)."""
    return ImageFont.load_default(size=max(11, round(min(image_size) / 30)))


def draw_labeled_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str],
                       colors: Sequence[tuple[int, int, int]], *, width: int | None = None) -> Image.Image:
    """Outline ``boxes`` (``xyxy`` pixels) and write each label on a filled band of its colour; a new image."""
    out = image.convert("RGB").copy()
    if not len(boxes):
        return out
    draw = ImageDraw.Draw(out)
    font = font_for(out.size)
    width = width or max(1, round(min(out.size) / 200))
    for box, label, color in zip(boxes, labels, colors):
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
        if not label:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left + 4, bottom - top + 4
        ty = y0 - th if y0 - th >= 0 else y0  # above the box, or inside it at the top edge
        tx = min(max(0.0, x0), max(0.0, out.width - tw))
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=color)
        draw.text((tx + 2 - left, ty + 2 - top), label, fill=text_color(color), font=font)
    return out


def draw_banner(image: Image.Image, text: str, color: tuple[int, int, int] = WRONG) -> Image.Image:
    """``text`` on a band across the top of the picture (e.g. the random-weights notice); a new image."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = font_for(out.size)
    left, top, _, bottom = draw.textbbox((0, 0), text, font=font)
    draw.rectangle((0, 0, out.width, bottom - top + 6), fill=color)
    draw.text((4 - left, 3 - top), text, fill=text_color(color), font=font)
    return out


def draw_detections(image: Tensor, boxes: Tensor, names: list[str], scores: Tensor | None = None,
                    class_indices: list[int] | None = None, *, width: int = 2) -> Tensor:
    """Draw labelled boxes on a tensor image.

    Args:
        image: (3, H, W) uint8.
        boxes: (N, 4) ``xyxy`` pixels of ``image``.
        names: N label texts.
        scores: (N,) appended to the labels as ``name 0.87``.
        class_indices: N ints choosing colours (default: one colour per distinct name).

    Returns:
        (3, H, W) uint8, a new tensor.
    """
    if boxes.shape[0] == 0:
        return image.clone()
    if class_indices is None:
        order = {n: i for i, n in enumerate(dict.fromkeys(names))}
        class_indices = [order[n] for n in names]
    labels = [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist())] if scores is not None else list(names)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    out = draw_labeled_boxes(pil, boxes.tolist(), labels, [class_color(i) for i in class_indices], width=width)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


def tile(images: list[Tensor], nrow: int = 4, padding: int = 4) -> Tensor:
    """Lay out (3, H, W) uint8 images of one size in a grid → (3, H', W') uint8."""
    return make_grid(torch.stack(images), nrow=nrow, padding=padding, pad_value=255)


def select_detections(results: list[dict], *, score_thresh: float = 0.0, topk: int | None = None,
                      one_per_box: bool = False) -> list[dict]:
    """Pick what to draw from one image's COCO result records: above ``score_thresh``, best first, at most ``topk``;
    with ``one_per_box`` only the best class of each box (GT-box mode, where every box gets every class)."""
    dets = sorted((d for d in results if d["score"] >= score_thresh), key=lambda d: -d["score"])
    if one_per_box:
        best: dict[tuple, dict] = {}
        for d in dets:
            best.setdefault(tuple(d["bbox"]), d)
        dets = list(best.values())
    return dets[:topk] if topk is not None else dets


def _zoomed(image: Image.Image, zoom: int) -> Image.Image:
    return image.resize((image.width * zoom, image.height * zoom), Image.NEAREST) if zoom > 1 else image


def render(image: Image.Image, dets: list[dict], names: dict[int, str], *, zoom: int = 1, width: int | None = None,
           notice: str | None = None) -> Image.Image:
    """Draw COCO result records (``bbox`` xywh in ``image`` pixels) on a PIL RGB image → a new PIL image.

    ``zoom`` enlarges small images (nearest neighbour) first so labels stay legible; ``notice`` adds a banner.
    """
    image = _zoomed(image.convert("RGB"), zoom)
    boxes = [[zoom * x, zoom * y, zoom * (x + w), zoom * (y + h)] for x, y, w, h in (d["bbox"] for d in dets)]
    labels = [f"{names.get(d['category_id'], str(d['category_id']))} {float(d['score']):.2f}" for d in dets]
    out = draw_labeled_boxes(image, boxes, labels, [class_color(int(d["category_id"])) for d in dets], width=width)
    return draw_banner(out, notice) if notice else out


def draw_gt_verdicts(image: Image.Image, record, dets: list[dict], names: dict[int, str], *,
                     title: str | None = None, size: int = 256) -> Tensor:
    """Each ground-truth box of ``record`` with the best class the model gave it: green when right, red when wrong
    (the label then reads ``predicted (true: name)``). The picture is zoomed to about ``size`` pixels.

    Returns:
        (3, H, W) uint8.
    """
    from rclip_core.boxes import xyxy_to_xywh

    zoom = max(1, size // max(image.size))
    best: dict[tuple, dict] = {}
    for d in sorted(dets, key=lambda d: -d["score"]):
        best.setdefault(tuple(round(v, 3) for v in d["bbox"]), d)
    boxes, labels, colors = [], [], []
    for box, cat in zip(record.gt_boxes.tolist(), record.gt_labels.tolist()):
        key = tuple(round(v, 3) for v in xyxy_to_xywh(torch.tensor([box], dtype=torch.float64))[0].tolist())
        pred = best.get(key)
        right = pred is not None and int(pred["category_id"]) == int(cat)
        pred_name = names.get(int(pred["category_id"]), "?") if pred is not None else "none"
        boxes.append([zoom * v for v in box])
        labels.append(pred_name if right else f"{pred_name} (true: {names.get(int(cat), cat)})")
        colors.append(RIGHT if right else WRONG)
    out = draw_labeled_boxes(_zoomed(image.convert("RGB"), zoom), boxes, labels, colors)
    if title:
        out = draw_banner(out, title, color=(60, 60, 60))
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


def picture_names(file_names: list[str]) -> list[str]:
    """One distinct ``.png`` name per input file: its stem, or — when stems collide (``a/pic.jpg``, ``a/pic.png``,
    ``b/pic.jpg``) — stem plus extension, then the parent folder's name too, then a counter."""
    from collections import Counter

    paths = [Path(f) for f in file_names]
    stems = Counter(p.stem for p in paths)
    with_ext = Counter(f"{p.stem}_{p.suffix.lstrip('.')}" for p in paths)
    names, used = [], set()
    for p in paths:
        name = p.stem
        if stems[p.stem] > 1:
            name = f"{p.stem}_{p.suffix.lstrip('.')}"
            if with_ext[name] > 1:
                name = f"{p.parent.name}_{name}"
        base, k = name, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names.append(name + ".png")
    return names


def render_pictures(records, image_dir, results: list[dict], names: dict[int, str], out_dir, *,
                    score_thresh: float, topk: int | None, one_per_box: bool, skipped_ids: set[int],
                    force: bool, notice: str | None = None) -> tuple[list[dict], int]:
    """Draw each record's detections and write ``out_dir/<name>.png`` atomically (see :func:`picture_names`).

    Returns:
        (HTML entries ``{"image", "source", "labels"}`` for :func:`html_index`, images without detections drawn).
    """
    from rclip_core.data.transforms import read_image
    from rclip_core.io import atomic_open

    by_image: dict[int, list[dict]] = {}
    for d in results:
        by_image.setdefault(d["image_id"], []).append(d)
    pngs = dict(zip((r.id for r in records), picture_names([r.file_name for r in records])))
    entries, empty = [], 0
    for rec in records:
        if rec.id in skipped_ids:
            continue
        dets = select_detections(by_image.get(rec.id, []), score_thresh=score_thresh, topk=topk,
                                 one_per_box=one_per_box)
        empty += not dets
        image = read_image(Path(image_dir) / rec.file_name)
        with atomic_open(Path(out_dir) / pngs[rec.id], "wb", force=force) as f:
            render(image, dets, names, zoom=max(1, 256 // max(image.size)), notice=notice).save(f, format="PNG")
        entries.append({"image": pngs[rec.id], "source": str(rec.file_name),
                        "labels": [f"{names.get(d['category_id'], d['category_id'])} {d['score']:.2f}" for d in dets]})
    return entries, empty


def html_index(entries: list[dict], title: str = "rclip detections") -> str:
    """An HTML page showing every output picture with its detections.

    Args:
        entries: ``{"image": relative path of the PNG, "source": original file, "labels": ["cat 0.91", ...]}``.
    """
    from html import escape

    rows = []
    for e in entries:
        labels = ", ".join(escape(x) for x in e["labels"]) or "<em>no detections</em>"
        rows.append(f'<figure><img src="{escape(e["image"])}" loading="lazy"><figcaption><b>{escape(e["source"])}'
                    f"</b><br>{labels}</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:1em}figure{display:inline-block;vertical-align:top;margin:.5em;"
             "max-width:420px}img{max-width:420px;border:1px solid #ccc}figcaption{font-size:13px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{style}</style>"
            f"</head><body><h1>{escape(title)}</h1>\n" + "\n".join(rows) + "\n</body></html>\n")
