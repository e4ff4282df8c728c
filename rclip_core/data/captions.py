"""Image-caption pairs for pretraining (RegionCLIP §3.3; the original's ``CLIPImgTxtPairTSVDataset``), read by index.

Sources (:func:`open_captions`), image paths relative to an image folder:

- **TSV**, CC3M-style: one pair per line, ``caption<TAB>image path`` (a header line ``caption<TAB>...`` is skipped);
- **JSONL**: one object per line, ``{"image": path, "caption": str}`` or ``{"image": path, "captions": [str, ...]}``;
- **COCO captions JSON** (``images`` + ``annotations[{image_id, caption}]``; the toy world writes these): several
  captions per image.

TSV and JSONL files are never loaded whole: one pass records each line's byte offset (8 bytes per pair: 26 MB for
CC3M's 3.3 M pairs) and items are read by seeking. A COCO captions file is one JSON document and is parsed once
(COCO Captions: 118 k images, about 90 MB).

:class:`CaptionDataset` items are drawn by ``(index, sample_seed)`` keys (``rclip_core.engine.StepSampler``): the
seed picks the caption when an image has several (the original draws one at random each step) and the training
size (shorter side from ``min_sizes``, longer at most ``max_size``). An unreadable image is replaced by the next
readable one and counted (``"skipped"``), so every batch stays full.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from rclip_core.data.transforms import read_image, resize_shortest_edge, to_uint8_tensor
from rclip_core.errors import RclipError
from rclip_core.io import read_json

log = logging.getLogger(__name__)

# How many following pairs an unreadable image may be replaced by before the item fails.
MAX_REPLACEMENTS = 16


class _LineIndex:
    """Byte offsets of the non-empty lines of a text file (a header line optionally skipped)."""

    def __init__(self, path: Path, *, skip_header: bool) -> None:
        offsets = []
        with open(path, "rb") as f:
            pos = 0
            first = True
            for line in f:
                if line.strip() and not (first and skip_header and _is_tsv_header(line)):
                    offsets.append(pos)
                first = False
                pos += len(line)
        self.path = path
        self.offsets = np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def line(self, i: int) -> str:
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            return f.readline().decode("utf-8", errors="replace").rstrip("\r\n")


def _is_tsv_header(line: bytes) -> bool:
    return line.split(b"\t", 1)[0].strip().lower() in (b"caption", b"captions", b"text")


class CaptionSource:
    """Image-caption pairs by index: ``len(source)``, ``source.get(i) -> (image path, [captions])``."""

    def __init__(self, path: str | os.PathLike, images_dir: str | os.PathLike) -> None:
        self.path = Path(path)
        self.images_dir = Path(images_dir)
        if not self.path.is_file():
            raise RclipError(f"caption file not found: {self.path}")
        suffix = self.path.suffix.lower()
        self._pairs: list[tuple[str, list[str]]] | None = None
        self._lines: _LineIndex | None = None
        if suffix == ".json":
            self.kind = "coco"
            self._pairs = _coco_pairs(self.path)
        elif suffix in (".tsv", ".jsonl"):
            self.kind = suffix[1:]
            self._lines = _LineIndex(self.path, skip_header=suffix == ".tsv")
        else:
            raise RclipError(f"{self.path}: unknown caption file type (expected .tsv, .jsonl or a COCO captions .json)")
        if len(self) == 0:
            raise RclipError(f"{self.path}: no image-caption pairs (the file is empty)")

    def __len__(self) -> int:
        return len(self._pairs) if self._pairs is not None else len(self._lines)  # type: ignore[arg-type]

    def get(self, i: int) -> tuple[Path, list[str]]:
        """Image path (under ``images_dir``) and captions of pair ``i``."""
        if self._pairs is not None:
            name, caps = self._pairs[i]
            return self.images_dir / name, caps
        line = self._lines.line(i)  # type: ignore[union-attr]
        where = f"{self.path}: pair {i + 1}"
        if self.kind == "tsv":
            parts = line.split("\t")
            if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
                raise RclipError(f"{where}: expected 'caption<TAB>image path', got {line[:80]!r}")
            return self.images_dir / parts[1].strip(), [parts[0].strip()]
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RclipError(f"{where}: malformed JSON ({e.msg})") from None
        caps = obj.get("captions") if isinstance(obj, dict) else None
        caps = caps if isinstance(caps, list) else [obj.get("caption")] if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not obj.get("image") or not caps or not all(isinstance(c, str) for c in caps):
            raise RclipError(f"{where}: expected {{\"image\": path, \"caption\": text}}, got {line[:80]!r}")
        return self.images_dir / str(obj["image"]), [str(c) for c in caps]

    def check_images(self, sample: int = 64) -> None:
        """Refuse a source none of whose first ``sample`` images exists (wrong image folder, say)."""
        n = min(sample, len(self))
        if not any(self.get(i)[0].is_file() for i in range(n)):
            raise RclipError(f"{self.path}: none of the first {n} images exists under {self.images_dir} "
                             f"(e.g. {self.get(0)[0]})")


def _coco_pairs(path: Path) -> list[tuple[str, list[str]]]:
    data = read_json(path, what="captions file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise RclipError(f"{path}: not a COCO captions file (needs 'images' and 'annotations' lists)")
    by_image: dict[int, list[str]] = {}
    for j, ann in enumerate(data["annotations"]):
        try:
            by_image.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]))
        except (KeyError, TypeError, ValueError):
            raise RclipError(f"{path}: annotations[{j}] lacks image_id/caption") from None
    pairs = []
    for img in data["images"]:
        caps = by_image.get(int(img["id"])) if isinstance(img, dict) and "id" in img else None
        if caps:
            pairs.append((str(img["file_name"]), caps))
    return pairs


def open_captions(path: str | os.PathLike, images_dir: str | os.PathLike) -> CaptionSource:
    """A :class:`CaptionSource` for a ``.tsv``, ``.jsonl`` or COCO captions ``.json`` file."""
    return CaptionSource(path, images_dir)


class CaptionDataset(Dataset):
    """Training items of image-caption pairs.

    Each item (``dataset[(index, sample_seed)]``): ``image`` (3, H, W) uint8 resized, ``caption`` (str, drawn by the
    seed), ``index`` (of the pair used), ``seed``, ``scale`` (sx, sy), ``orig_size`` (w, h), ``skipped`` (unreadable
    images replaced before this one), ``proposals`` / ``objectness`` (from a :class:`ProposalCache`, resized pixels)
    or None.

    Args:
        source: the pairs.
        min_sizes, max_size: training resize (shorter side drawn from ``min_sizes``).
        proposals: cached RPN proposals (original pixels), attached to each item.
        cache_images: keep decoded, resized images in memory (per worker), for small sets read many times (the toy
            world); a large set (CC3M) should leave it off.
    """

    def __init__(self, source: CaptionSource, *, min_sizes: list[int], max_size: int,
                 proposals: ProposalCache | None = None, cache_images: bool = False) -> None:
        if not min_sizes:
            raise RclipError("pretrain.min_sizes must list at least one size")
        self.source, self.min_sizes, self.max_size, self.proposals = source, list(min_sizes), max_size, proposals
        self._cache: dict[tuple[int, int], tuple] | None = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int, min_size: int) -> tuple[dict | None, str | None]:
        """One pair at shorter side ``min_size``: (item without caption choice, None) or (None, reason)."""
        path, captions = self.source.get(index)
        cached = self._cache.get((index, min_size)) if self._cache is not None else None
        if cached is None:
            try:
                img = read_image(path)
            except RclipError as e:
                return None, str(e)
            resized = resize_shortest_edge(img, min_size, self.max_size)
            cached = (to_uint8_tensor(resized), (resized.width / img.width, resized.height / img.height), img.size)
            if self._cache is not None:
                self._cache[(index, min_size)] = cached
        image, scale, orig_size = cached
        item = {"image": image, "captions": captions, "index": index, "scale": scale, "orig_size": orig_size,
                "proposals": None, "objectness": None}
        if self.proposals is not None:
            item["proposals"], item["objectness"] = self.proposals.get(index, *item["scale"])
        return item, None

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (int(key), 0)
        rng = np.random.default_rng(seed)
        min_size = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
        reasons = []
        for k in range(MAX_REPLACEMENTS + 1):
            item, reason = self.load((index + k) % len(self), min_size)
            if item is not None:
                caps = item.pop("captions")
                item.update(caption=caps[int(rng.integers(len(caps)))] if len(caps) > 1 else caps[0], seed=seed,
                            skipped=k)
                return item
            reasons.append(reason)
        raise RclipError(f"{MAX_REPLACEMENTS + 1} images in a row could not be read, e.g. {reasons[0]}")


class ProposalCache:
    """RPN proposals for every pair of a caption source, memory-mapped (``--cache-proposals DIR``).

    Files: ``boxes.npy`` (N, K, 4) float32 in original-image pixels, ``objectness.npy`` (N, K), ``counts.npy``
    (N,) and ``meta.json`` (what made them: source, RPN, top-k, NMS), so a later run reuses them only when they fit.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.boxes = np.load(self.folder / "boxes.npy", mmap_mode="r")
        self.objectness = np.load(self.folder / "objectness.npy", mmap_mode="r")
        self.counts = np.load(self.folder / "counts.npy", mmap_mode="r")

    @staticmethod
    def meta_path(folder: str | os.PathLike) -> Path:
        return Path(folder) / "meta.json"

    def get(self, index: int, sx: float, sy: float):
        """(boxes (P, 4) scaled by ``sx``, ``sy``, objectness (P,)) of pair ``index``."""
        import torch

        from rclip_core.boxes import scale_boxes

        n = int(self.counts[index])
        boxes = torch.from_numpy(np.array(self.boxes[index, :n], dtype=np.float32))
        return scale_boxes(boxes, sx, sy), torch.from_numpy(np.array(self.objectness[index, :n], dtype=np.float32))
