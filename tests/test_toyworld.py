"""rclip_core.data.toyworld (the synthetic scenes) and rclip_core.data.captions (image-caption pairs)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from rclip_core.data.toyworld import (
    COLORS,
    NOVEL_SHAPES,
    SHAPES,
    generate_toyworld,
    render_scene,
)
from rclip_core.errors import RclipError

SHAPE_WORD = re.compile(r"\b(" + "|".join(SHAPES) + r")(?:e?s)?\b")


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return generate_toyworld(root, num_images=24, image_size=96, seed=3)


def test_same_seed_gives_identical_bytes(tmp_path):
    a = generate_toyworld(tmp_path / "a", num_images=5, image_size=64, seed=7)
    b = generate_toyworld(tmp_path / "b", num_images=5, image_size=64, seed=7)
    fa, fb = _files(a.root), _files(b.root)
    assert len(fa) == 7  # 5 images + 2 JSON files
    assert fa == fb


def test_different_seed_or_prefix_differs(tmp_path):
    a = generate_toyworld(tmp_path / "a", num_images=3, image_size=64, seed=1)
    b = generate_toyworld(tmp_path / "b", num_images=3, image_size=64, seed=2)
    c = generate_toyworld(tmp_path / "a", num_images=3, image_size=64, seed=1, prefix="val")
    img = "images/{}_000001.png"
    assert _files(a.root)[img.format("train")] != _files(b.root)[img.format("train")]
    assert _files(a.root)[img.format("train")] != _files(c.root)[img.format("val")]


def test_refuses_to_overwrite_without_force(tmp_path):
    generate_toyworld(tmp_path, num_images=2, image_size=64, seed=0)
    with pytest.raises(RclipError, match="already exists"):
        generate_toyworld(tmp_path, num_images=2, image_size=64, seed=0)
    p = generate_toyworld(tmp_path, num_images=1, image_size=64, seed=0, force=True)
    # A forced, smaller run leaves no stale images from the earlier one.
    assert sorted(x.name for x in p.images_dir.glob("train_*.png")) == ["train_000001.png"]


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(RclipError, match="num_images"):
        generate_toyworld(tmp_path, num_images=0)
    with pytest.raises(RclipError, match="max_objects"):
        generate_toyworld(tmp_path, num_images=1, max_objects=0)


def test_coco_instances_structure(world):
    data = json.loads(world.instances_json.read_text())
    assert [c["name"] for c in data["categories"]] == list(SHAPES)
    assert {c["name"] for c in data["categories"] if c["split"] == "novel"} == set(NOVEL_SHAPES)
    assert {c["split"] for c in data["categories"]} == {"base", "novel"}
    assert len(data["images"]) == 24
    for im in data["images"]:
        assert (world.images_dir / im["file_name"]).is_file()
        assert im["width"] == im["height"] == 96
    per_image = {}
    for a in data["annotations"]:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
        assert a["iscrowd"] == 0 and 1 <= a["category_id"] <= len(SHAPES)
    assert set(per_image) == {im["id"] for im in data["images"]}  # every image has objects
    assert min(per_image.values()) >= 1 and max(per_image.values()) <= 6
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])


def test_boxes_inside_image_and_tight_on_the_drawn_pixels(world):
    data = json.loads(world.instances_json.read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
        assert 0 < a["area"] <= w * h
        pixels = np.asarray(Image.open(world.images_dir / files[a["image_id"]]).convert("RGB"))
        is_color = (pixels == np.array(COLORS[a["attributes"]["color"]])).all(axis=-1)  # (H, W)
        inside = is_color[y:y + h, x:x + w]
        # Tight: every edge row/column of the box holds a pixel of the shape's fill colour.
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_render_scene_masks_match_boxes_and_pixels():
    for i in range(20):
        scene = render_scene(np.random.default_rng(i), 80)
        pixels = np.asarray(scene.image)
        assert 1 <= len(scene.objects) <= 6
        for o in scene.objects:
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # exactly the visible pixels
            assert (pixels[o.mask] == COLORS[o.color]).all()
            assert o.mask.sum() >= 0.6 * o.full_area  # occlusion is limited


def test_captions_name_exactly_the_shapes_present(world):
    inst = json.loads(world.instances_json.read_text())
    caps = json.loads(world.captions_json.read_text())
    shapes = {}
    for a in inst["annotations"]:
        shapes.setdefault(a["image_id"], set()).add(SHAPES[a["category_id"] - 1])
    by_image = {}
    for c in caps["annotations"]:
        by_image.setdefault(c["image_id"], []).append(c["caption"])
    assert set(by_image) == set(shapes)
    for image_id, texts in by_image.items():
        assert len(texts) >= 2
        for t in texts:
            named = set(SHAPE_WORD.findall(t))
            assert named and named <= shapes[image_id], (t, shapes[image_id])
        assert set(SHAPE_WORD.findall(texts[0])) == shapes[image_id]  # the first caption lists every object
