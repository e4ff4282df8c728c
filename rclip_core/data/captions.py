"""Image-caption pairs from a COCO-captions JSON (``images`` + ``annotations[{image_id, caption}]``) and images.

The input of the image-text contrastive loss (RegionCLIP §3.3): each item is one image, resized to a fixed square
training size and normalised with the CLIP mean/std, and one of its captions. Like the original, when an image has
several captions one is drawn at random; the draw depends on ``(seed, epoch, index)`` only, so it changes every
epoch (call :meth:`CaptionDataset.set_epoch`) and an interrupted run resumes with the same captions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rclip_core.errors import RclipError
from rclip_core.io import read_json
from rclip_core.recipes import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)


def load_image(path: str | Path, size: int | None = None) -> Tensor:
    """Read an image as (3, H, W) uint8 RGB, resized (bilinear) to ``size`` × ``size`` when ``size`` is given."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise RclipError(f"image not found: {path}") from None
    except OSError as e:
        raise RclipError(f"{path}: not a readable image ({e})") from None
    return torch.from_numpy(arr).permute(2, 0, 1)  # (3, H, W)


def normalize_image(image: Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Tensor:
    """uint8 (..., 3, H, W) → float32 normalised with per-channel ``mean``/``std`` (given for 0..1 pixel values)."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (image.float() / 255.0 - m) / s


class CaptionDataset(torch.utils.data.Dataset):
    """COCO-captions pairs: ``dataset[i] = (image (3, S, S) float32 normalised, caption str)``.

    Args:
        captions_json: a COCO captions file; images without a caption are skipped.
        images_dir: folder that ``images[].file_name`` is relative to.
        image_size: training side S; images are resized (not cropped) to S × S.
        mean, std: normalisation (CLIP's by default).
        tokenizer: when given, captions are returned as its output for one string (e.g. open_clip's (77,) tokens).
        seed: seeds the caption draw.
        cache: keep decoded, resized images in memory (uint8) after their first read.

    Example:
        >>> ds = CaptionDataset("toy/captions_train.json", "toy/images", image_size=128)  # doctest: +SKIP
        >>> image, caption = ds[0]; image.shape  # doctest: +SKIP
        torch.Size([3, 128, 128])
    """

    def __init__(self, captions_json: str | Path, images_dir: str | Path, *, image_size: int,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 tokenizer: Callable[[list[str]], Tensor] | None = None, seed: int = 0, cache: bool = True) -> None:
        data = read_json(captions_json, what="captions file")
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise RclipError(f"{captions_json}: not a COCO captions file (needs 'images' and 'annotations')")
        by_image: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            try:
                by_image.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]))
            except (KeyError, TypeError, ValueError):
                raise RclipError(f"{captions_json}: caption annotation without image_id/caption: {ann!r}") from None
        self.images_dir = Path(images_dir)
        self.files: list[str] = []
        self.captions: list[list[str]] = []
        for img in data["images"]:
            caps = by_image.get(int(img["id"]))
            if caps:
                self.files.append(str(img["file_name"]))
                self.captions.append(caps)
        if not self.files:
            raise RclipError(f"{captions_json}: no image has a caption")
        self.image_size = image_size
        self.mean, self.std = list(mean), list(std)
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, Tensor] | None = {} if cache else None
        log.info("captions: %d images, %d captions from %s", len(self.files), sum(map(len, self.captions)),
                 captions_json)

    def set_epoch(self, epoch: int) -> None:
        """Choose which caption each image gets (a new draw per epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def image_uint8(self, index: int) -> Tensor:
        """(3, S, S) uint8 image ``index``, resized to the training size."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image = load_image(self.images_dir / self.files[index], self.image_size)
        if self._cache is not None:
            self._cache[index] = image
        return image

    def caption(self, index: int) -> str:
        """This epoch's caption of image ``index``."""
        caps = self.captions[index]
        if len(caps) == 1:
            return caps[0]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return caps[int(rng.integers(len(caps)))]

    def __getitem__(self, index: int) -> tuple[Tensor, str | Tensor]:
        image = normalize_image(self.image_uint8(index), self.mean, self.std)
        text = self.caption(index)
        if self.tokenizer is not None:
            return image, self.tokenizer([text])[0]
        return image, text
