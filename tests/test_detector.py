import math

import torch

from rclip_core.detector import GivenBoxes, build_region_detector, fuse_scores, postprocess


def test_postprocess_is_class_specific_nms_with_threshold_and_topk():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([[0.9, 0.05], [0.8, 0.7], [0.0005, 0.6]])  # (R, K)
    out = postprocess(boxes, scores, score_thresh=0.001, nms_thresh=0.5, max_dets=100)
    pairs = sorted(zip(out["labels"].tolist(), [round(s, 3) for s in out["scores"].tolist()]))
    # class 0: box 1 is suppressed by box 0 (IoU 0.82); class 1: box 0 (0.05) suppressed by box 1 (0.7);
    # the 0.0005 score is under the threshold; one box can give several classes.
    assert pairs == [(0, 0.9), (1, 0.6), (1, 0.7)]
    assert out["scores"].tolist() == sorted(out["scores"].tolist(), reverse=True)
    top1 = postprocess(boxes, scores, score_thresh=0.001, nms_thresh=0.5, max_dets=1)
    assert top1["scores"].tolist() == [0.8999999761581421]


def test_postprocess_same_class_boxes_under_the_iou_threshold_survive():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [6.0, 0.0, 16.0, 10.0]])  # IoU 0.25
    out = postprocess(boxes, torch.tensor([[0.9], [0.8]]), score_thresh=0.0, nms_thresh=0.5, max_dets=10)
    assert len(out["scores"]) == 2


def test_postprocess_empty_and_nan():
    empty = postprocess(torch.zeros(0, 4), torch.zeros(0, 3), score_thresh=0.0, nms_thresh=0.5, max_dets=5)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [10.0, 10.0, 20.0, 20.0]])
    out = postprocess(boxes, torch.tensor([[float("nan"), 0.5], [0.4, 0.3]]), score_thresh=0.0, nms_thresh=0.5,
                      max_dets=5)
    assert out["boxes"].tolist() == [[10.0, 10.0, 20.0, 20.0]] * 2  # the NaN row is dropped whole


def test_score_fusion_modes():
    p = torch.tensor([[0.25, 0.5]])
    assert torch.equal(fuse_scores(p, None, "raw_logit"), p)
    assert torch.allclose(fuse_scores(p, torch.tensor([4.0]), "raw_logit"), torch.tensor([[1.0, math.sqrt(2)]]))
    assert torch.isnan(fuse_scores(p, torch.tensor([-1.0]), "raw_logit")).all()
    sig = fuse_scores(p, torch.tensor([0.0]), "sigmoid")
    assert torch.allclose(sig, torch.sqrt(p * 0.5))
    assert torch.equal(fuse_scores(p, torch.tensor([3.0]), "none"), p)


def _detector(clip, text, **zeroshot):
    from rclip_core.recipes import load_recipe

    recipe = load_recipe(None, ["model.variant=tiny"] + [f"zeroshot.{k}={v}" for k, v in zeroshot.items()])
    return build_region_detector(clip, text, recipe, GivenBoxes("boxes"))


def test_detector_returns_given_boxes_with_classifier_labels(tiny_clip):
    text = torch.randn(4, 32)
    det = _detector(tiny_clip, text, score_thresh=0.0, max_dets=1)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 128, 160), generator=g, dtype=torch.uint8) for _ in range(2)]
    batch = [{"image": images[0], "boxes": torch.tensor([[4.0, 4.0, 60.0, 70.0]])},
             {"image": images[1], "boxes": torch.zeros(0, 4)}]
    out = det.detect(batch)
    assert len(out) == 2 and out[1]["boxes"].shape == (0, 4) and out[1]["num_regions"] == 0
    raw = det(batch)
    probs = det.region_probs(raw)[0]
    assert raw.class_logits.shape == (1, 5)  # K + background
    assert out[0]["labels"].item() == probs.argmax().item() and out[0]["num_regions"] == 1
    assert torch.equal(out[0]["boxes"], batch[0]["boxes"])
    # one image alone gives the same probabilities as in a padded batch of two (the padding is right/bottom)
    alone = det.region_probs(det(batch[:1]))[0]
    assert torch.allclose(alone, probs, atol=1e-5)


def test_given_proposals_keep_the_top_objectness_and_fuse_it(tiny_clip):
    from rclip_core.recipes import load_recipe

    recipe = load_recipe(None, ["model.variant=tiny", "zeroshot.score_thresh=0.0", "zeroshot.score_fusion=sigmoid"])
    det = build_region_detector(tiny_clip, torch.randn(3, 32), recipe, GivenBoxes("proposals", topk=1))
    image = torch.full((3, 96, 96), 90, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [30.0, 30.0, 90.0, 90.0]])
    out = det.detect([{"image": image, "proposals": boxes, "objectness": torch.tensor([-1.0, 2.0])}])[0]
    assert out["num_regions"] == 1 and torch.equal(out["boxes"][0], boxes[1])
    plain = build_region_detector(tiny_clip, det.classifier.class_embeddings, load_recipe(
        None, ["model.variant=tiny", "zeroshot.score_thresh=0.0"]), GivenBoxes("boxes"))
    p = plain.detect([{"image": image, "boxes": boxes[1:]}])[0]
    assert torch.allclose(out["scores"].sort().values, torch.sqrt(p["scores"] * torch.sigmoid(torch.tensor(2.0))
                                                                  ).sort().values, atol=1e-6)


def test_zero_shot_detector_takes_the_recipes_nms(tiny_clip):
    """`--set zeroshot.nms=soft` reaches the zero-shot path: two overlapping boxes of one class both survive gaussian
    soft-NMS (the second with a decayed score) where hard NMS keeps one."""
    text = torch.randn(1, 32)  # one class: every box is named the same
    image = torch.full((3, 96, 96), 90, dtype=torch.uint8)
    batch = [{"image": image, "boxes": torch.tensor([[0.0, 0.0, 60.0, 60.0], [2.0, 2.0, 62.0, 62.0]])}]
    hard = _detector(tiny_clip, text, score_thresh=0.0).detect(batch)[0]
    soft = _detector(tiny_clip, text, score_thresh=0.0, nms="soft").detect(batch)[0]
    assert len(hard["scores"]) == 1 and len(soft["scores"]) == 2
    assert soft["scores"][1] < soft["scores"][0] and torch.isclose(soft["scores"][0], hard["scores"][0])
