"""The pixels the CLIP trunk sees, on the shipped paths, equal open_clip's own preprocessing of the same file.

A colour-asymmetric image (red left, blue at the bottom) goes through what ``rclip zeroshot`` runs (``prepare_images``
+ ``run_zeroshot``: reader, dataset, the detector's transform) and through what ``rclip pretrain`` runs
(``pretrain.build_stage``: caption dataset, the stage's transform). The trunk's input is caught and compared with
``open_clip.image_transform`` at the image's own size (so open_clip's resize and crop are no-ops): a BGR flip or a
mean/std of the wrong channel order anywhere on either path fails here, whichever module it hides in.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

SIZE = 128  # tiny's nominal input size; both paths are set to resize to it, i.e. not at all


@pytest.fixture()
def asymmetric_photo(tmp_path):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    arr = np.zeros((SIZE, SIZE, 3), np.uint8)
    arr[..., 0] = (255 - 2 * xx).clip(0, 255)  # red on the left
    arr[..., 1] = 60
    arr[..., 2] = (2 * yy - 255).clip(0, 255)  # blue at the bottom
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(arr).save(folder / "a.png")
    return folder / "a.png"


def open_clip_pixels(path) -> torch.Tensor:
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    preprocess = open_clip.image_transform(SIZE, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    return preprocess(Image.open(path))  # (3, SIZE, SIZE)


@pytest.fixture()
def trunk_inputs(monkeypatch):
    """Every tensor the CLIP trunk is called with, in order."""
    from rclip_core.clip_backbone import CLIPTrunk

    seen: list[torch.Tensor] = []
    forward = CLIPTrunk.forward

    def spy(self, x):
        seen.append(x.detach().float().clone())
        return forward(self, x)

    monkeypatch.setattr(CLIPTrunk, "forward", spy)
    return seen


def test_zero_shot_path_feeds_the_trunk_open_clip_rgb_pixels(tiny_clip, asymmetric_photo, trunk_inputs):
    import copy

    from rclip_core.recipes import load_recipe
    from rclip_core.region_spec import RegionSource
    from rclip_core.zeroshot import prepare_images, run_zeroshot

    recipe = load_recipe(None, ["model.variant=tiny", f"input.min_size={SIZE}", f"input.max_size={2 * SIZE}"])
    source = RegionSource.parse("selective-search")
    images = prepare_images(["cat", "dog"], source, inputs=[asymmetric_photo], match_names=False)
    run_zeroshot(copy.deepcopy(tiny_clip), torch.randn(2, 32), images, source, recipe)
    assert len(trunk_inputs) == 1 and trunk_inputs[0].shape == (1, 3, SIZE, SIZE)
    assert torch.allclose(trunk_inputs[0][0], open_clip_pixels(asymmetric_photo), atol=1e-5)


def test_pretraining_path_feeds_the_trunk_open_clip_rgb_pixels(asymmetric_photo, trunk_inputs):
    from rclip_core.pretrain import build_stage, compute_losses
    from rclip_core.recipes import load_recipe

    pairs = asymmetric_photo.parent.parent / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": asymmetric_photo.name, "caption": "a red and blue square"}) + "\n")
    recipe = load_recipe("pretrain_tiny_toyworld_teacher", [
        f"pretrain.captions={pairs}", f"pretrain.images={asymmetric_photo.parent}", f"pretrain.min_sizes=[{SIZE}]",
        f"pretrain.max_size={2 * SIZE}", "pretrain.cache_images=false", "pretrain.global_box_min_scale=1.0"])
    model, dataset = build_stage(recipe)
    compute_losses(model.train(), [dataset[(0, 0)]])
    assert len(trunk_inputs) == 1 and trunk_inputs[0].shape == (1, 3, SIZE, SIZE)
    assert torch.allclose(trunk_inputs[0][0], open_clip_pixels(asymmetric_photo), atol=1e-5)
