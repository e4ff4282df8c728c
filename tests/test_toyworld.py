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


@pytest.mark.parametrize("web_size, web_scale", [(64, 2.0), (None, None)])
def test_demo_world_web_images_take_their_own_size_and_object_scale(tmp_path, web_size, web_scale):
    """The demo's web images (what the teacher learns from) can be generated at another side and object scale than
    the scenes; unset, they are the scenes'."""
    from rclip_core.demo import make_world
    from rclip_core.recipes import load_recipe

    sets = ["toyworld.num_web=6", "toyworld.num_train=2", "toyworld.num_val=2", "toyworld.image_size=96",
            "toyworld.size_scale=1.0"]
    sets += [f"toyworld.web_image_size={web_size or 'null'}", f"toyworld.web_size_scale={web_scale or 'null'}"]
    world = make_world(load_recipe("demo_tiny_toyworld", sets), tmp_path, force=False)
    web = json.loads(world.web.instances_json.read_text())
    train = json.loads(world.train.instances_json.read_text())
    side = web_size or 96
    assert {(i["width"], i["height"]) for i in web["images"]} == {(side, side)}
    assert {(i["width"], i["height"]) for i in train["images"]} == {(96, 96)}
    # The same seed draws the same relative radii, scaled by the object scale: box sides relative to the image
    # grow by 2.0 / 1.0 (up to rasterisation and clipping at the border).
    rel = np.mean([max(a["bbox"][2], a["bbox"][3]) for a in web["annotations"]]) / side
    plain = generate_toyworld(tmp_path / "plain", num_images=6, image_size=96, seed=100, prefix="web",
                              max_objects=1, size_scale=1.0)
    base_rel = np.mean([max(a["bbox"][2], a["bbox"][3]) for a in
                        json.loads(plain.instances_json.read_text())["annotations"]]) / 96
    assert rel == pytest.approx(base_rel * (web_scale or 1.0), rel=0.15)
