import math

import torch

from rclip_core.classifier import CosineClassifier
from rclip_core.clip_backbone import build_region_encoder
from rclip_core.detector import ZeroShotDetector, fuse_scores, postprocess


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


def test_detector_returns_given_boxes_with_classifier_labels(tiny_clip):
    enc = build_region_encoder(tiny_clip, "tiny")
    text = torch.randn(4, enc.out_dim)
    det = ZeroShotDetector(enc, CosineClassifier(text), score_thresh=0.0, nms_thresh=0.5, max_dets=1)
    images = torch.randn(2, 3, 128, 160)
    boxes = [torch.tensor([[4.0, 4.0, 60.0, 70.0]]), torch.zeros(0, 4)]
    out = det(images, boxes)
    assert len(out) == 2 and out[1]["boxes"].shape == (0, 4)
    probs = det.region_probs(images, boxes)[0]
    assert out[0]["labels"].item() == probs.argmax().item()
    assert torch.equal(out[0]["boxes"], boxes[0])
    # objectness fusion changes scores, not labels
    fused = det(images, boxes, [torch.tensor([0.25]), torch.zeros(0)])
    assert torch.allclose(fused[0]["scores"], torch.sqrt(out[0]["scores"] * 0.25))
