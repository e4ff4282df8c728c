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
