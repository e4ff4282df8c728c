"""The frozen teacher of pretraining runs prepared for inference (batch norms folded, channels-last, the first-token
attention pool, ``inference_mode``) and gives the plain teacher's pseudo labels: the same kept regions and concepts,
distributions within 1e-4 (issue 11 item 5)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from rclip_core.clip_backbone import build_region_encoder, create_clip
from rclip_core.pretrain import build_teacher
from rclip_core.pseudo_labels import pseudo_labels
from tests.test_inference_optimisations import randomise_norms
from tests.test_pretrain import _batch, _stage, toy  # noqa: F401  (toy is a fixture)


def test_prepared_teacher_gives_the_plain_teachers_pseudo_labels(toy):  # noqa: F811
    model, dataset = _stage(toy)
    model.eval()
    batch = _batch(dataset, 2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.teacher.modules())  # the stage's teacher is folded
    assert model.teacher.trunk.stem[0].weight.is_contiguous(memory_format=torch.channels_last)

    clip = randomise_norms(create_clip("tiny", log_random_init=False), seed=1)  # norms where a wrong fold shows
    plain = build_region_encoder(copy.deepcopy(clip), "tiny").requires_grad_(False).eval()
    plain.head.full_attention = True
    results = {}
    for name, teacher in (("plain", plain), ("prepared", build_teacher(copy.deepcopy(clip), "tiny"))):
        model.teacher = teacher
        with torch.enable_grad():  # as in training: the teacher part must not depend on the caller's mode
            out = model(batch)
        assert not out.teacher_regions.requires_grad and not out.teacher_regions.is_inference()
        results[name] = out.teacher_regions
    ref, got = results["plain"], results["prepared"]
    assert ref.shape[0] == 2 * 4  # regions_per_image 4 of each image
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4
    cfg = model.cfg
    pl_ref, pl_got = (pseudo_labels(r, model.concepts, temperature=cfg.teacher_temperature,
                                    threshold=cfg.concept_thresh) for r in (ref, got))
    assert torch.equal(pl_ref.keep, pl_got.keep) and torch.equal(pl_ref.targets, pl_got.targets)
    assert float((pl_ref.teacher_probs - pl_got.teacher_probs).abs().max()) < 1e-4
    # the comparison has power: the distributions are not one-hot
    assert float(pl_ref.teacher_probs.max(dim=1).values.min()) < 0.99
