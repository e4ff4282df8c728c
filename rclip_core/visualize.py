"""Drawing detections (pure: image + detections → image), on torchvision's ``draw_bounding_boxes``."""

from __future__ import annotations

import colorsys

import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid


def class_color(index: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per class index (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: Tensor, boxes: Tensor, names: list[str], scores: Tensor | None = None,
                    class_indices: list[int] | None = None, *, width: int = 2) -> Tensor:
    """Draw labelled boxes.

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
    return draw_bounding_boxes(image, boxes.float(), labels=labels, colors=[class_color(i) for i in class_indices],
                               width=width)


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


def render(image, dets: list[dict], names: dict[int, str], *, zoom: int = 1, width: int = 2):
    """Draw COCO result records (``bbox`` xywh in ``image`` pixels) on a PIL RGB image → a new PIL image.

    ``zoom`` enlarges small images (nearest neighbour) first so labels stay legible.
    """
    import numpy as np
    from PIL import Image

    if zoom > 1:
        image = image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)
    img = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    boxes = zoom * torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)],
                                dtype=torch.float32).reshape(-1, 4)
    out = draw_detections(img, boxes, [names.get(d["category_id"], str(d["category_id"])) for d in dets],
                          torch.tensor([float(d["score"]) for d in dets]), [d["category_id"] for d in dets],
                          width=width)
    return Image.fromarray(out.permute(1, 2, 0).numpy())


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
