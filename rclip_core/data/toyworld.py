"""The toy world: synthetic scenes of coloured shapes with COCO instance boxes and COCO-style captions.

It stands in for COCO + COCO Captions where no real data can be downloaded (design §6): a tiny CLIP trained on its
captions from random weights learns, within minutes on a CPU, to name the shapes in GT boxes, and the category list
is split into base and novel shapes like the open-vocabulary COCO split. Novel shapes appear in captions (the concept
pool of RegionCLIP §3.2) but are marked ``"split": "novel"`` for detection training and evaluation.

Every image is drawn from its own random stream seeded by ``(seed, prefix, index)``, so the same call writes
byte-identical files and a train and a val set made with the same seed still differ.

Layout written by :func:`generate_toyworld`::

    out_dir/images/{prefix}_000001.png ...
    out_dir/instances_{prefix}.json     # COCO instances: images, annotations (bbox xywh), categories (+ "split")
    out_dir/captions_{prefix}.json      # COCO captions: images, annotations[{id, image_id, caption}]
"""

from __future__ import annotations

import io
import logging
import math
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rclip_core.errors import RclipError
from rclip_core.io import atomic_open, check_writable, write_json

log = logging.getLogger(__name__)

# Category id = index + 1. The order is part of the file format; append, never reorder.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "heart")
# Held out of detection training (captions still name them), like COCO's 17 novel classes.
NOVEL_SHAPES: tuple[str, ...] = ("star", "heart")
PLURALS: dict[str, str] = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}

# Saturated fill colours; backgrounds are kept desaturated so that no background pixel equals a fill colour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (30, 170, 50),
    "cyan": (30, 200, 220),
    "blue": (30, 60, 220),
    "purple": (140, 40, 200),
    "pink": (245, 110, 190),
}
BACKGROUNDS: tuple[str, ...] = ("noisy", "striped", "gradient", "checkered")

# Object radius (centre to farthest point) as a fraction of the image side, per size word.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.07, 0.11), "medium": (0.11, 0.16), "large": (0.16, 0.24)}
# Largest per-channel difference between the two colours of a texture. Low contrast keeps texture edges weaker than
# shape edges, which a small CNN trained from scratch would otherwise spend its first steps on.
BG_CONTRAST = 50.0
# Scenes with fewer objects are more common: P(n) ∝ n^-OBJECT_COUNT_POWER for n = 1..max_objects.
OBJECT_COUNT_POWER = 1.0
MIN_VISIBLE = 0.6  # a placement that hides more than 40 % of an earlier object is retried
PLACEMENT_TRIES = 25
# How often captions add a colour, a size word or the background. Kept low: colour and texture are global cues that
# a contrastive model picks up first, and captions that mostly name shapes make shape the cue worth learning.
P_COLOR, P_SIZE, P_BACKGROUND = 0.25, 0.15, 0.2
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class ToyWorldPaths:
    """Where one generated split lives."""

    root: Path
    images_dir: Path
    instances_json: Path
    captions_json: Path
    num_images: int


@dataclass
class ToyObject:
    """One drawn shape. ``mask`` (H, W) bool holds its visible pixels; ``box`` is their tight ``xyxy`` box with the
    exclusive right/bottom edge (COCO convention: width = x1 - x0 pixels)."""

    shape: str
    color: str
    size: str
    mask: np.ndarray
    full_area: int = 0  # pixels before later shapes covered part of it
    box: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class ToyScene:
    """One rendered image with its objects (in drawing order) and background kind."""

    image: Image.Image
    objects: list[ToyObject]
    background: str


def category_list() -> list[dict]:
    """COCO ``categories`` entries with the base/novel ``split`` field."""
    return [{"id": i + 1, "name": s, "supercategory": "shape", "split": "novel" if s in NOVEL_SHAPES else "base"}
            for i, s in enumerate(SHAPES)]


# ---------------------------------------------------------------- drawing


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    """A random low-saturation RGB colour (float, 0..255): grey-ish with a tint."""
    grey = rng.uniform(70, 190)
    tint = rng.uniform(-1, 1, size=3)
    return np.clip(grey + 28 * tint, 0, 255)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 texture and its kind. Textures are low-contrast so the shapes, not the texture, carry meaning."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    a = _muted_color(rng)
    b = np.clip(a + rng.uniform(-1, 1, size=3) * BG_CONTRAST, 0, 255)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "noisy":
        t = rng.uniform(0, 1, size=(size, size)).astype(np.float32)
    elif kind == "striped":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.06, 0.2)
        t = (np.floor((xx * math.cos(angle) + yy * math.sin(angle)) / period) % 2).astype(np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:  # checkered
        cell = rng.uniform(0.08, 0.2)
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    img = a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]
    # Mild pixel noise on every texture keeps flat regions from being trivially separable from shapes.
    img = img + rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), kind


def _regular_polygon(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.sin(angle + 2 * math.pi * k / n), cy - r * math.cos(angle + 2 * math.pi * k / n))
            for k in range(n)]


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float) -> None:
    """Draw ``shape`` of radius ``r`` (centre to farthest point) filled with 255 on an ``L`` mask."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ri = 0.55 * r
        draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    elif shape == "square":
        # Radius is the half-diagonal; the base orientation is axis-aligned and rotation stays small, so a square
        # never looks like a diamond.
        draw.polygon(_regular_polygon(cx, cy, r, 4, math.pi / 4 + angle), fill=255)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + 0.15 * r, r, 3, angle), fill=255)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, math.pi / 6 + angle), fill=255)
    elif shape == "star":
        outer = _regular_polygon(cx, cy, r, 5, angle)
        inner = _regular_polygon(cx, cy, 0.42 * r, 5, angle + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=255)
    elif shape == "cross":
        a, w = r / math.sqrt(1 + 0.35**2), 0.35 * r / math.sqrt(1 + 0.35**2)  # arm length and half-width
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w),
               (-w, -w)]
        draw.polygon(_rotate(pts, cx, cy, angle), fill=255)
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        xs = 16 * np.sin(ts) ** 3
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        scale = r / 17.0
        pts = [(float(x) * scale, (float(y) + 2.5) * scale) for x, y in zip(xs, ys, strict=True)]
        draw.polygon(_rotate(pts, cx, cy, angle), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight ``xyxy`` box (exclusive right/bottom) of a boolean mask, or None when empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        return None
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def _num_objects(rng: np.random.Generator, max_objects: int) -> int:
    weights = np.arange(1, max_objects + 1, dtype=np.float64) ** -OBJECT_COUNT_POWER
    return int(rng.choice(np.arange(1, max_objects + 1), p=weights / weights.sum()))


def render_scene(rng: np.random.Generator, image_size: int, *, max_objects: int = 6,
                 size_scale: float = 1.0) -> ToyScene:
    """Draw one scene: a textured background and 1..``max_objects`` shapes.

    A placement that would hide more than 40 % of an earlier shape is retried, and dropped after a few tries, so
    every object stays recognisable. Boxes are the tight boxes of each shape's visible pixels.
    """
    bg, kind = _background(rng, image_size)
    canvas = bg.copy()
    objects: list[ToyObject] = []
    for _ in range(_num_objects(rng, max_objects)):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        size = list(SIZE_RANGES)[int(rng.integers(len(SIZE_RANGES)))]
        lo, hi = (size_scale * v for v in SIZE_RANGES[size])
        for _try in range(PLACEMENT_TRIES):
            r = rng.uniform(lo, hi) * image_size
            cx, cy = rng.uniform(r, image_size - r, size=2)
            angle = rng.uniform(-0.25, 0.25)
            mask_img = Image.new("L", (image_size, image_size), 0)
            _draw_shape(ImageDraw.Draw(mask_img), shape, float(cx), float(cy), float(r), float(angle))
            mask = np.asarray(mask_img) > 0
            if not mask.any():
                continue
            # Visible fraction of each earlier object if this one is drawn on top of it.
            if all((o.mask & ~mask).sum() >= MIN_VISIBLE * o.full_area for o in objects if (o.mask & mask).any()):
                break
        else:
            continue
        for o in objects:
            o.mask = o.mask & ~mask
        objects.append(ToyObject(shape=shape, color=color, size=size, mask=mask, full_area=int(mask.sum())))
        canvas[mask] = COLORS[color]
    for o in objects:
        o.box = _mask_box(o.mask)  # type: ignore[assignment]  # never empty: MIN_VISIBLE > 0
    return ToyScene(image=Image.fromarray(canvas), objects=objects, background=kind)


# ---------------------------------------------------------------- captions


def _phrase(rng: np.random.Generator, obj: ToyObject, *, p_color: float, p_size: float) -> str:
    """'a [size] [colour] shape' with the adjectives drawn independently."""
    words = []
    if rng.random() < p_size:
        words.append(obj.size)
    if rng.random() < p_color:
        words.append(obj.color)
    words.append(obj.shape)
    article = "an" if words[0][0] in "aeiou" else "a"
    return f"{article} {' '.join(words)}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _relation(a: ToyObject, b: ToyObject) -> str:
    """Where ``a`` is relative to ``b``, from box centres (image y grows downwards)."""
    (ax, ay), (bx, by) = a.center, b.center
    if abs(ax - bx) >= abs(ay - by):
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"


def _list_caption(rng: np.random.Generator, objects: list[ToyObject]) -> str:
    """Names every object ("a red circle, a star and a small blue square")."""
    order = rng.permutation(len(objects))
    return _join([_phrase(rng, objects[i], p_color=P_COLOR, p_size=P_SIZE) for i in order]) + "."


def _count_caption(rng: np.random.Generator, objects: list[ToyObject], background: str) -> str:
    """Names every shape with its count ("two circles and a star [on a striped background]")."""
    counts = Counter(o.shape for o in objects)
    parts = [f"a {s}" if n == 1 else f"{NUMBER_WORDS[n]} {PLURALS[s]}" for s, n in sorted(counts.items())]
    return _join(parts) + (f" on a {background} background." if rng.random() < P_BACKGROUND else ".")


def _relation_caption(rng: np.random.Generator, objects: list[ToyObject]) -> str:
    i, j = rng.choice(len(objects), size=2, replace=False)
    a, b = objects[int(i)], objects[int(j)]
    return f"{_phrase(rng, a, p_color=P_COLOR, p_size=P_SIZE)} {_relation(a, b)} " \
           f"{_phrase(rng, b, p_color=P_COLOR, p_size=P_SIZE)}."


def scene_captions(rng: np.random.Generator, scene: ToyScene) -> list[str]:
    """Three captions of different phrasings. The first always names every object; captions never name a shape
    that is not in the image."""
    objs = scene.objects
    if len(objs) == 1:
        o = objs[0]
        return [f"a photo of {_phrase(rng, o, p_color=P_COLOR, p_size=P_SIZE)}.",
                _count_caption(rng, objs, scene.background),
                f"{_phrase(rng, o, p_color=P_COLOR, p_size=P_SIZE)}."]
    third = _relation_caption(rng, objs) if rng.random() < 0.5 else f"a photo of {_list_caption(rng, objs)}"
    return [_list_caption(rng, objs), _count_caption(rng, objs, scene.background), third]


# ---------------------------------------------------------------- files


def _image_rng(seed: int, prefix: str, index: int) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process, which would break byte-identical outputs.
    return np.random.default_rng([seed, zlib.crc32(prefix.encode("utf-8")), index])


def generate_toyworld(out_dir: str | Path, *, num_images: int, image_size: int = 128, seed: int = 0,
                      prefix: str = "train", max_objects: int = 6, size_scale: float = 1.0,
                      force: bool = False) -> ToyWorldPaths:
    """Write ``num_images`` synthetic scenes with COCO instances and captions (layout in the module docstring).

    Args:
        out_dir: root folder; created if missing. Several prefixes (train, val) can share it.
        num_images: how many images.
        image_size: side of the square images in pixels.
        seed: the same seed (and prefix) gives byte-identical files.
        prefix: names the split: ``images/{prefix}_000001.png``, ``instances_{prefix}.json``,
            ``captions_{prefix}.json``.
        max_objects: at most this many shapes per image (at least 1).
        size_scale: object radii are this multiple of ``SIZE_RANGES`` (the size words keep their meaning relative to
            one another); photo-like single-object sets use larger objects than the multi-object scenes.
        force: overwrite existing outputs; without it an existing output raises :class:`RclipError`.

    Returns:
        :class:`ToyWorldPaths`.

    Example:
        >>> import tempfile
        >>> p = generate_toyworld(tempfile.mkdtemp(), num_images=4, image_size=96, seed=1)
        >>> p.instances_json.name, len(list(p.images_dir.glob("train_*.png")))
        ('instances_train.json', 4)
    """
    if num_images < 1:
        raise RclipError(f"toy world: num_images must be at least 1, got {num_images}")
    if image_size < 32:
        raise RclipError(f"toy world: image_size must be at least 32 pixels, got {image_size}")
    if not 1 <= max_objects <= len(NUMBER_WORDS) - 1:
        raise RclipError(f"toy world: max_objects must be in 1..{len(NUMBER_WORDS) - 1}, got {max_objects}")
    root = Path(out_dir)
    paths = ToyWorldPaths(root=root, images_dir=root / "images", instances_json=root / f"instances_{prefix}.json",
                          captions_json=root / f"captions_{prefix}.json", num_images=num_images)
    # Check every output before writing any, so a refused run leaves nothing half-replaced.
    check_writable(paths.instances_json, force=force)
    check_writable(paths.captions_json, force=force)
    if not force and paths.images_dir.is_dir() and any(paths.images_dir.glob(f"{prefix}_*.png")):
        raise RclipError(f"{paths.images_dir} already holds {prefix}_*.png images; pass --force to overwrite them")
    paths.images_dir.mkdir(parents=True, exist_ok=True)
    if force:  # drop images of an earlier, larger run so the folder matches the JSON
        for old in paths.images_dir.glob(f"{prefix}_*.png"):
            old.unlink()

    images, annotations, captions = [], [], []
    for i in range(num_images):
        rng = _image_rng(seed, prefix, i)
        scene = render_scene(rng, image_size, max_objects=max_objects, size_scale=size_scale)
        image_id = i + 1
        file_name = f"{prefix}_{image_id:06d}.png"
        buf = io.BytesIO()
        # Low compression: files are small anyway and writing is the generator's main cost.
        scene.image.save(buf, format="PNG", compress_level=1)
        with atomic_open(paths.images_dir / file_name, "wb") as f:
            f.write(buf.getvalue())
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": SHAPES.index(o.shape) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(o.mask.sum()), "iscrowd": 0,
                "attributes": {"color": o.color, "size": o.size},
            })
        for text in scene_captions(rng, scene):
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})

    info = {"description": "rclip toy world", "seed": seed, "prefix": prefix, "image_size": image_size}
    write_json(paths.instances_json, {"info": info, "images": images, "annotations": annotations,
                                      "categories": category_list()}, force=True, indent=None)
    write_json(paths.captions_json, {"info": info, "images": images, "annotations": captions}, force=True,
               indent=None)
    log.info("toy world: wrote %d images, %d boxes, %d captions to %s", num_images, len(annotations), len(captions),
             root)
    return paths
