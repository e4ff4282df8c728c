"""Learning happens: the tiny CLIP, trained from random weights on toy-world captions with the default recipe for
about two minutes on 2 CPU cores, names the shapes in held-out GT boxes far above chance (design §6).

Measured with these defaults: this test gave 0.245 overall (base 0.33, novel 0.0; chance 0.125, 330 held-out boxes,
about 6 standard errors above chance); a separate sweep over four toy-world seeds gave 0.33-0.65. The bound, 1.6x
chance, sits below every measured value; training is seeded, so the result only moves with the machine's kernels.
"""

from __future__ import annotations

import torch

from rclip_core.clip_backbone import build_region_encoder, create_clip
from rclip_core.data.captions import CaptionDataset
from rclip_core.data.toyworld import SHAPES, generate_toyworld
from rclip_core.engine import region_accuracy, train_image_text
from rclip_core.recipes import ToyWorldCfg, TrainCfg

MIN_RATIO_TO_CHANCE = 1.6


def test_gt_box_zero_shot_accuracy_beats_chance_on_held_out_images(tmp_path):
    world, cfg = ToyWorldCfg(), TrainCfg()
    kw = {"image_size": world.image_size, "seed": world.seed, "max_objects": world.max_objects}
    train = generate_toyworld(tmp_path, num_images=world.num_train, prefix="train", **kw)
    val = generate_toyworld(tmp_path, num_images=world.num_val, prefix="val", **kw)

    torch.manual_seed(cfg.seed)
    clip = create_clip("tiny")
    encoder = build_region_encoder(clip, "tiny")
    dataset = CaptionDataset(train.captions_json, train.images_dir, image_size=cfg.image_size, seed=cfg.seed)
    history = train_image_text(clip, encoder, dataset, cfg)
    assert history["loss"][-1] < history["loss"][0]

    result = region_accuracy(clip, encoder, val.instances_json, val.images_dir, list(SHAPES),
                             image_size=cfg.image_size)
    chance = result["chance"]
    assert result["accuracy"] >= MIN_RATIO_TO_CHANCE * chance, result
    assert result["per_split"]["base"]["accuracy"] > chance, result
    # Novel shapes are not asserted: over four world seeds their accuracy ranged 0.08-0.62 (chance 0.125), so a
    # bound here would be flaky; the demo prints it.
