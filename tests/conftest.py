"""Shared fixtures. Everything runs offline on the tiny CLIP config and generated data."""

from __future__ import annotations

import os

# A failed hub download otherwise retries for ~45 s; nothing in the tests may reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rclip_core.runtime import set_thread_waiting_default  # noqa: E402

set_thread_waiting_default()  # as the command line does, before anything imports torch

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip():
    """A random-weight tiny open_clip CLIP (seeded), in eval mode. Do not modify it in tests; deep-copy instead."""
    import torch

    from rclip_core.clip_backbone import create_clip

    torch.manual_seed(0)
    return create_clip("tiny")


@pytest.fixture()
def small_coco(tmp_path):
    """Three random 96×128 images (plus one corrupt file) with two boxes each, COCO format, categories cat/dog."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    images, anns = [], []
    for i in range(1, 4):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 128, "height": 96})
        anns.append({"id": 10 * i, "image_id": i, "category_id": 1, "bbox": [8, 8, 40, 30], "area": 1200, "iscrowd": 0})
        anns.append({"id": 10 * i + 1, "image_id": i, "category_id": 3, "bbox": [60, 40, 50, 50], "area": 2500,
                     "iscrowd": 0})
    (img_dir / "broken.png").write_bytes(b"not a png")
    images.append({"id": 4, "file_name": "broken.png", "width": 128, "height": 96})
    anns.append({"id": 40, "image_id": 4, "category_id": 1, "bbox": [1, 1, 20, 20], "area": 400, "iscrowd": 0})
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]}))
    return {"ann": ann, "images": img_dir, "dir": tmp_path}


def skip_unless_ci(reason: str) -> None:
    """Skip a test whose dependency is missing on a developer's machine, but fail in CI (``CI=true``), where the
    README's install must have provided it (a silent skip there would hide a broken install)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: the install must provide it)")
    pytest.skip(reason)
