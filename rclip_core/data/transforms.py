"""The one image reader and the preprocessing every command shares (regionclip_facts §9).

- :func:`read_image` decodes any photo the same way for training and inference: EXIF rotation applied, grayscale and
  palette images converted to RGB, transparency composited on white.
- Resizing happens on the decoded PIL image (PIL bilinear on uint8, detectron2's ``ResizeShortestEdge`` rule), so it
  runs in DataLoader workers and datasets hand out ``uint8`` tensors (3, H, W).
- Normalisation belongs to the model, per branch (:class:`ImageNormalizer`, as torchvision's
  ``GeneralizedRCNNTransform``): CLIP's RGB mean/std on pixels / 255 for the CLIP trunk, detectron2's BGR mean on
  0-255 pixels for a converted original RPN. One decoded, resized image feeds both.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor, nn

from rclip_core.errors import RclipError


class ImageList:
    """A padded batch and the size of each image before padding: the interface of torchvision's
    ``models.detection.image_list.ImageList`` (which its RPN and anchor generator read), defined here so that the
    zero-shot path never imports torchvision's Python package (see :mod:`rclip_core.tvops`).

    Attributes:
        tensors: (B, C, H, W) padded images.
        image_sizes: B (h_i, w_i) before padding.
    """

    def __init__(self, tensors: Tensor, image_sizes: list[tuple[int, int]]) -> None:
        self.tensors = tensors
        self.image_sizes = image_sizes

    def to(self, device: torch.device | str) -> ImageList:
        return ImageList(self.tensors.to(device), self.image_sizes)


def read_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image as RGB with its EXIF rotation applied (grayscale and palette converted, transparency
    composited on white).

    Raises:
        RclipError: the file is missing or not a decodable image.
    """
    p = Path(path)
    try:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # Composite on white rather than letting transparent pixels turn black (PIL's plain convert).
                rgba = im.convert("RGBA")
                bg = Image.new("RGB", rgba.size, (255, 255, 255))
                bg.paste(rgba, mask=rgba.getchannel("A"))
                return bg
            return im.convert("RGB")
    except FileNotFoundError:
        raise RclipError(f"image not found: {p}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RclipError(f"{p}: not a readable image ({e.__class__.__name__})") from None


def to_uint8_tensor(img: Image.Image) -> Tensor:
    """PIL RGB → uint8 tensor (3, H, W), contiguous and writable.

    One copy, channels first, by NumPy (single-threaded: a reader thread's copy does not start torch's thread pool
    beside the model's, and at half the cost of a copy and a torch permute)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())


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


def pad_batch(images: Sequence[Tensor], divisibility: int = 32, *, pad_single: bool = False) -> Tensor:
    """Stack (C, H_i, W_i) tensors into (B, C, H, W), zero-padding bottom/right to the largest size rounded up to
    ``divisibility`` (0 or 1: no rounding). Zero is the mean after normalisation. A single image is returned unpadded
    unless ``pad_single`` (the original runs the CLIP branch one unpadded image at a time)."""
    if len(images) == 1 and not pad_single:
        return images[0][None]
    h = max(int(t.shape[1]) for t in images)
    w = max(int(t.shape[2]) for t in images)
    if divisibility > 1:
        h, w = math.ceil(h / divisibility) * divisibility, math.ceil(w / divisibility) * divisibility
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for t, slot in zip(images, out):
        slot[:, : t.shape[1], : t.shape[2]].copy_(t)
    return out


class ImageNormalizer(nn.Module):
    """One branch's input convention: RGB uint8 images (3, H_i, W_i) → a normalised, padded ``ImageList``.

    ``x / pixel_scale`` (CLIP: 255, so mean/std are given for 0..1 pixels, as the original divides first;
    detectron2: 1), channels flipped to BGR when ``bgr``, then ``(x - mean) / std`` per channel, then zero-padded.

    Args:
        mean, std: three values each, in the branch's channel order.
        pixel_scale: pixels are divided by this first.
        bgr: flip RGB input to BGR (detectron2's MSRA ResNets).
        size_divisibility: pad height and width to a multiple of this (32 for FPN).
        pad_single: pad a batch of one image too (an FPN needs it; the CLIP branch runs one image unpadded).

    Example:
        >>> norm = ImageNormalizer([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], pixel_scale=255.0)
        >>> norm([torch.full((3, 4, 6), 255, dtype=torch.uint8)]).tensors.unique()
        tensor([1.])
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, pixel_scale: float, bgr: bool = False,
                 size_divisibility: int = 0, pad_single: bool = False) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise RclipError(f"pixel mean and std need three values each, got {list(mean)} and {list(std)}")
        if any(s <= 0 for s in std):
            raise RclipError(f"pixel std must be positive, got {list(std)}")
        # Not persistent: recipes hold them, and the original's checkpoints do not carry them either.
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.pixel_scale = float(pixel_scale)
        self.bgr = bgr
        self.size_divisibility = size_divisibility
        self.pad_single = pad_single

    def normalize(self, image: Tensor) -> Tensor:
        """One (3, H, W) RGB image (uint8, or float on 0-255) → float32 normalised (3, H, W)."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) RGB image tensor, got shape {tuple(image.shape)}")
        x = image.to(device=self.mean.device, dtype=torch.float32)
        if self.pixel_scale != 1.0:
            x = x / self.pixel_scale
        if self.bgr:
            x = x.flip(0)
        return (x - self.mean) / self.std

    def forward(self, images: Sequence[Tensor]) -> ImageList:
        """B RGB images → ``ImageList`` (tensors (B, 3, H, W), image_sizes [(h_i, w_i)] before padding)."""
        if len(images) == 0:
            raise ValueError("no images to normalise")
        tensors = [self.normalize(im) for im in images]
        sizes = [(int(t.shape[1]), int(t.shape[2])) for t in tensors]
        return ImageList(pad_batch(tensors, self.size_divisibility, pad_single=self.pad_single), sizes)


def clip_normalizer(mean: Sequence[float], std: Sequence[float]) -> ImageNormalizer:
    """The CLIP branch's convention: RGB, pixels / 255, CLIP mean/std; batches padded to 32, one image unpadded."""
    return ImageNormalizer(mean, std, pixel_scale=255.0, size_divisibility=32)
