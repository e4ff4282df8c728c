"""rclip_core.engine: the image-text training loop (loss falls, exact resume) and GT-box region accuracy."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from rclip_core.clip_backbone import build_region_encoder
from rclip_core.data.captions import CaptionDataset
from rclip_core.data.toyworld import SHAPES, generate_toyworld
from rclip_core.engine import random_global_boxes, region_accuracy, reset_residual_scales, train_image_text
from rclip_core.errors import RclipError
from rclip_core.recipes import TrainCfg

# Small and quick: 16 images of 64 px, batches of 8.
CFG = TrainCfg(steps=6, batch_size=8, lr=1e-3, warmup_steps=2, image_size=64, checkpoint_every=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_toyworld(tmp_path_factory.mktemp("toy"), num_images=16, image_size=64, seed=5)


@pytest.fixture()
def parts(tiny_clip, world):
    clip = copy.deepcopy(tiny_clip)
    encoder = build_region_encoder(clip, "tiny")
    dataset = CaptionDataset(world.captions_json, world.images_dir, image_size=CFG.image_size)
    return clip, encoder, dataset


def test_training_reduces_the_loss(parts):
    clip, encoder, dataset = parts
    seen = []
    cfg = dataclasses.replace(CFG, steps=40)
    history = train_image_text(clip, encoder, dataset, cfg, progress=lambda s, n, loss: seen.append((s, n, loss)))
    losses = history["loss"]
    assert history["step"] == list(range(1, 41)) and len(losses) == 40
    assert [s for s, _, _ in seen] == history["step"] and all(n == 40 for _, n, _ in seen)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert not clip.training  # handed back in eval mode


def test_resume_continues_exactly_at_the_saved_step(parts, tiny_clip, tmp_path):
    clip, encoder, dataset = parts
    straight = train_image_text(clip, encoder, dataset, CFG)

    # Interrupt a run of the same recipe during step 4, after the step-3 checkpoint (a shorter run would have a
    # different learning-rate schedule, so it is not the same training).
    def interrupt(step: int, total: int, loss: float) -> None:
        if step == 4:
            raise KeyboardInterrupt

    first = copy.deepcopy(tiny_clip)
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        train_image_text(first, build_region_encoder(first, "tiny"), dataset,
                         dataclasses.replace(CFG, checkpoint_every=3), checkpoint_path=ckpt, progress=interrupt)
    assert torch.load(ckpt, weights_only=True)["step"] == 3

    resumed = copy.deepcopy(tiny_clip)
    history = train_image_text(resumed, build_region_encoder(resumed, "tiny"), dataset, CFG, resume_from=ckpt)
    assert history["start_step"] == 3 and history["step"] == [4, 5, 6]
    # Same batches, captions, optimizer and schedule state: the resumed run matches the uninterrupted one.
    assert history["loss"] == pytest.approx(straight["loss"][3:], rel=1e-4, abs=1e-5)
    for (name, a), b in zip(clip.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_checkpoint_is_written_every_n_steps(parts, tmp_path):
    clip, encoder, dataset = parts
    saved = []
    ckpt = tmp_path / "c.pt"

    def progress(step, total, loss):
        if ckpt.exists():
            saved.append(torch.load(ckpt, weights_only=True)["step"])

    train_image_text(clip, encoder, dataset, dataclasses.replace(CFG, steps=5, checkpoint_every=2),
                     checkpoint_path=ckpt, progress=progress)
    # progress runs after the save check of the previous step: steps 2 and 4, then the end.
    assert saved[-1] == 4 and 2 in saved
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 5 and {"model", "optimizer", "scheduler", "recipe"} <= set(state)
    assert state["recipe"]["train"]["steps"] == 5


def test_bad_inputs_are_rejected(parts, tmp_path):
    clip, encoder, dataset = parts
    with pytest.raises(RclipError, match="batch_size"):
        train_image_text(clip, encoder, dataset, dataclasses.replace(CFG, batch_size=64))
    with pytest.raises(RclipError, match="not found"):
        train_image_text(clip, encoder, dataset, CFG, resume_from=tmp_path / "nope.pt")


def test_reset_residual_scales(tiny_clip):
    clip = copy.deepcopy(tiny_clip)
    assert reset_residual_scales(clip) == 4  # one bottleneck per stage in the tiny config
    assert all(float(p.min()) == 1.0 for n, p in clip.visual.named_parameters() if n.endswith("bn3.weight"))


def test_random_global_boxes_stay_inside():
    g = torch.Generator().manual_seed(0)
    boxes = random_global_boxes(200, 60, 80, 0.4, g)
    assert boxes.shape == (200, 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 80 + 1e-4).all() and (boxes[:, 3] <= 60 + 1e-4).all()
    sides = (boxes[:, 2] - boxes[:, 0]) / 80
    assert sides.min() >= 0.4 - 1e-6 and sides.max() <= 1 + 1e-6
    full = random_global_boxes(3, 60, 80, 1.0, g)
    assert torch.allclose(full, torch.tensor([[0.0, 0.0, 80.0, 60.0]] * 3))


def test_region_accuracy_report(tiny_clip, world):
    clip = copy.deepcopy(tiny_clip)
    result = region_accuracy(clip, build_region_encoder(clip, "tiny"), world.instances_json, world.images_dir,
                             list(SHAPES), image_size=96)
    assert result["chance"] == pytest.approx(1 / len(SHAPES))
    assert 0.0 <= result["accuracy"] <= 1.0
    assert set(result["per_split"]) <= {"base", "novel"}
    assert sum(s["num_boxes"] for s in result["per_split"].values()) == result["num_boxes"] > 0
    # Restricting the candidate names skips the other categories' boxes.
    only = region_accuracy(clip, build_region_encoder(clip, "tiny"), world.instances_json, world.images_dir,
                           ["circle", "square"])
    assert only["chance"] == 0.5 and only["num_boxes"] < result["num_boxes"]
