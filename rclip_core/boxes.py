"""The box contract, and every box conversion, scaling, flip and clip in rclip.

**Contract**: boxes are ``Tensor[N, 4]`` float32 in ``xyxy`` order, in absolute pixels of one named image (the image
on disk, or the resized image a model sees). COCO files store ``xywh``; :func:`xywh_to_xyxy` / :func:`xyxy_to_xywh`
are called only where such files are read and written (``data/coco.py``, ``inference.py``, ``rpn/proposals.py``).
Per-image targets are ``{"boxes": Tensor[N, 4], "labels": Tensor[N] int64}``.

Plain torch (the same arithmetic as ``torchvision.ops.box_convert`` / ``clip_boxes_to_image``, tested equal), so that
reading annotation files never imports torchvision's Python package (see :mod:`rclip_core.tvops`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def as_boxes(data: Sequence[Sequence[float]] | Tensor) -> Tensor:
    """Any (N, 4)-shaped data (lists, tensors, N may be 0) → float32 ``Tensor[N, 4]``."""
    return torch.as_tensor(data, dtype=torch.float32).reshape(-1, 4)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO ``[x, y, w, h]`` (N, 4) → ``[x1, y1, x2, y2]`` (N, 4)."""
    b = as_boxes(boxes)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """``[x1, y1, x2, y2]`` (N, 4) → COCO ``[x, y, w, h]`` (N, 4), in the input's dtype."""
    b = boxes.reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1)


def scale_boxes(boxes: Tensor, sx: float, sy: float) -> Tensor:
    """Boxes (N, 4) in one image's pixels → pixels of the same image resized by ``sx`` × ``sy``; dtype kept
    (float64 for the way back to original pixels, which the COCO results are rounded from)."""
    return boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device=boxes.device)


def unscale_boxes(boxes: Tensor, sx: float, sy: float) -> Tensor:
    """The inverse of :func:`scale_boxes`: resized-image pixels → original pixels, computed in float64 (a division,
    as detectron2's ``detector_postprocess`` rescales)."""
    b = boxes.detach().to("cpu", torch.float64)
    return b / torch.tensor([sx, sy, sx, sy], dtype=torch.float64)


def hflip_boxes(boxes: Tensor, width: float) -> Tensor:
    """Boxes (N, 4) of an image ``width`` pixels wide → the same boxes after a horizontal flip."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def clip_boxes(boxes: Tensor, width: float, height: float) -> Tensor:
    """Clamp boxes (N, 4) to the ``width`` × ``height`` image (a new tensor)."""
    x = boxes[:, 0::2].clamp(min=0, max=width)
    y = boxes[:, 1::2].clamp(min=0, max=height)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def nonempty(boxes: Tensor) -> Tensor:
    """(N,) bool: positive width and height (degenerate boxes are dropped before pooling, as the original does)."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def clip_and_filter(boxes: Tensor, width: float | None, height: float | None) -> tuple[Tensor, Tensor, int]:
    """Clip boxes (N, 4) to the image when its size is known, then drop degenerate ones.

    Returns:
        (kept boxes (M, 4), keep mask (N,) over the input, how many boxes the clip changed).
    """
    boxes = as_boxes(boxes)
    clipped = 0
    out = boxes
    if width is not None and height is not None and boxes.numel():
        out = clip_boxes(boxes, width, height)
        clipped = int((out != boxes).any(dim=1).sum())
    keep = nonempty(out)
    return out[keep], keep, clipped


def full_image_boxes(num_images: int, height: int, width: int, *, device: torch.device | str = "cpu") -> Tensor:
    """(B, 4): one whole-image box per image (the original's "global" proposal in pretraining)."""
    return torch.tensor([[0.0, 0.0, float(width), float(height)]], device=device).repeat(num_images, 1)


def random_boxes(n: int, height: int, width: int, min_scale: float, generator: torch.Generator) -> Tensor:
    """(n, 4) random boxes inside a ``height`` × ``width`` image, each side a uniform fraction in ``[min_scale, 1]`` of
    the image side (aspect ratio kept) at a uniform position; ``min_scale`` 1 gives the whole image."""
    frac = min_scale + (1 - min_scale) * torch.rand(n, generator=generator)  # (n,)
    bw, bh = frac * width, frac * height
    x0 = torch.rand(n, generator=generator) * (width - bw)
    y0 = torch.rand(n, generator=generator) * (height - bh)
    return torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)  # (n, 4)
