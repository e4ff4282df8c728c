"""Image reading and detection-style preprocessing, matching the original's zero-shot path (regionclip_facts §9):
RGB with EXIF orientation, shortest edge resized with PIL bilinear on uint8, then /255 and CLIP mean/std."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from rclip_core.errors import RclipError


def read_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image as RGB with its EXIF rotation applied (grayscale, palette and RGBA are converted).

    Raises:
        RclipError: the file is missing or not a decodable image.
    """
    p = Path(path)
    try:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode == "RGBA":  # composite on white rather than letting transparent pixels turn black
                bg = Image.new("RGB", im.size, (255, 255, 255))
                bg.paste(im, mask=im.getchannel("A"))
                return bg
            return im.convert("RGB")
    except FileNotFoundError:
        raise RclipError(f"image not found: {p}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RclipError(f"{p}: not a readable image ({e.__class__.__name__})") from None


def shortest_edge_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(new_width, new_height): shorter side ``min_size``, longer side at most ``max_size`` (detectron2 rule)."""
    scale = min_size / min(width, height)
    if max(width, height) * scale > max_size:
        scale = max_size / max(width, height)
    return int(width * scale + 0.5), int(height * scale + 0.5)


def resize_shortest_edge(img: Image.Image, min_size: int, max_size: int) -> Image.Image:
    """Resize with PIL bilinear on uint8, as the original's test-time augmentation does."""
    w, h = shortest_edge_size(img.width, img.height, min_size, max_size)
    return img if (w, h) == img.size else img.resize((w, h), Image.BILINEAR)


def normalize(img: Image.Image, mean: list[float], std: list[float]) -> Tensor:
    """PIL RGB → float tensor (3, H, W): /255 then (x − mean) / std."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    return (arr - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def pad_batch(images: list[Tensor], divisibility: int = 32) -> Tensor:
    """Stack (3, H_i, W_i) tensors into (B, 3, H, W), zero-padding bottom/right (zero = the mean after
    normalisation). A batch of one is returned unpadded, as the original runs it."""
    if len(images) == 1:
        return images[0][None]
    h = max(t.shape[1] for t in images)
    w = max(t.shape[2] for t in images)
    h, w = -(-h // divisibility) * divisibility, -(-w // divisibility) * divisibility
    out = images[0].new_zeros((len(images), 3, h, w))
    for i, t in enumerate(images):
        out[i, :, : t.shape[1], : t.shape[2]] = t
    return out
