"""Finding image files and naming the pictures made from them, without importing torch (commands check inputs and
outputs with these before any heavy import or model build)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from rclip_core.errors import RclipError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def folder_images(folder: str | os.PathLike) -> list[str]:
    """The image files of ``folder`` (by extension), sorted, as names relative to it."""
    p = Path(folder)
    if not p.is_dir():
        raise RclipError(f"image folder not found: {p}")
    names = sorted(f.name for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not names:
        raise RclipError(f"{p}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return names


def image_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Image files given one by one and/or as folders (their images, sorted) → absolute paths in that order, each
    once. Files given explicitly are kept whatever their extension (a bad one is reported when read)."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files.extend(f for f in sorted(p.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.exists():
            files.append(p)
        else:
            raise RclipError(f"no such image or folder: {p}")
    if not files:
        raise RclipError(f"no image files in {', '.join(str(p) for p in paths)}")
    return list(dict.fromkeys(str(f.resolve()) for f in files))  # a file named twice (folder and file) runs once


def picture_names(file_names: Sequence[str]) -> list[str]:
    """One distinct ``.png`` name per input file: its stem, or — when stems collide (``a/pic.jpg``, ``a/pic.png``,
    ``b/pic.jpg``) — stem plus extension, then the parent folder's name too, then a counter."""
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


DETECTIONS_FILE, INDEX_FILE = "detections.json", "index.html"


def picture_outputs(files: Sequence[str], *, html: bool) -> tuple[dict[str, str], list[str]]:
    """What ``rclip visualize`` writes in its folder for ``files``: the picture name of each file
    (:func:`picture_names`) and every file name it writes (pictures, ``detections.json``, ``index.html``)."""
    pngs = dict(zip(files, picture_names(files)))
    return pngs, [*pngs.values(), DETECTIONS_FILE, *([INDEX_FILE] if html else [])]
