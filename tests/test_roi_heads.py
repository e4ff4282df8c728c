"""The finetuned detector's training parts: the Fast R-CNN losses (rclip_core.losses.fast_rcnn_losses) against plainly
written loops on fixed-seed inputs, RoI matching and sampling (rclip_core.roi_heads), soft-NMS, and the empty cases
(an image with no GT, an image with no proposals, no region at all)."""

from __future__ import annotations

import math

import pytest
import torch

from rclip_core.losses import fast_rcnn_losses
from rclip_core.roi_heads import ProposalSampler, decode_boxes, make_box_coder, soft_nms


def _inputs(seed: int = 0, r: int = 12, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(r, k + 1, generator=g) * 3
    labels = torch.randint(0, k + 1, (r,), generator=g)
    labels[:3] = k  # some background for sure
    labels[3] = 0  # and some foreground
    deltas = torch.randn(r, 4, generator=g)
    targets = torch.randn(r, 4, generator=g)
    return logits, labels, deltas, targets


def _reference(logits, labels, deltas, targets, *, bg_weight, gamma, beta):
    """Loops over regions: the original's FastRCNNOutputLayers.losses, written out by hand."""
    r, k1 = logits.shape
    bg = k1 - 1
    per, weights = [], []
    for i in range(r):
        row = [float(v) for v in logits[i]]
        m = max(row)
        log_z = m + math.log(sum(math.exp(v - m) for v in row))
        t = int(labels[i])
        ce = log_z - row[t]
        w = bg_weight if (bg_weight is not None and t == bg) else 1.0
        if gamma is None:
            per.append(w * ce)
            weights.append(w)
        else:
            p_t = math.exp(row[t] - log_z)
            per.append(ce * (1 - p_t) ** gamma * w)
            weights.append(1.0)  # the focal path divides by R, not by the weights' sum
    cls = sum(per) / sum(weights)
    box = 0.0
    for i in range(r):
        if int(labels[i]) == bg:
            continue
        for j in range(4):
            d = abs(float(deltas[i, j]) - float(targets[i, j]))
            box += (0.5 * d * d / beta if d < beta else d - 0.5 * beta) if beta > 0 else d
    return cls, box / r


@pytest.mark.parametrize("bg_weight,gamma,beta", [(0.2, 0.5, 0.0), (0.8, None, 0.0), (None, None, 1.0),
                                                  (None, 0.5, 0.5), (0.2, 2.0, 0.0)])
def test_fast_rcnn_losses_equal_plain_loops(bg_weight, gamma, beta):
    logits, labels, deltas, targets = _inputs(seed=3)
    out = fast_rcnn_losses(logits, deltas, labels, targets, bg_weight=bg_weight, focal_gamma=gamma,
                           smooth_l1_beta=beta)
    cls, box = _reference(logits, labels, deltas, targets, bg_weight=bg_weight, gamma=gamma, beta=beta)
    assert float(out["loss_cls"]) == pytest.approx(cls, rel=1e-5)
    assert float(out["loss_box_reg"]) == pytest.approx(box, rel=1e-5)


def test_background_weight_and_focal_scaling_change_the_loss_as_documented():
    logits, labels, deltas, targets = _inputs(seed=5)
    plain = float(fast_rcnn_losses(logits, None, labels, None)["loss_cls"])
    focal = float(fast_rcnn_losses(logits, None, labels, None, focal_gamma=0.5)["loss_cls"])
    assert focal < plain  # (1 - p_t)^γ ≤ 1
    only_bg = torch.full_like(labels, logits.shape[1] - 1)
    a = float(fast_rcnn_losses(logits, None, only_bg, None, focal_gamma=0.5)["loss_cls"])
    b = float(fast_rcnn_losses(logits, None, only_bg, None, focal_gamma=0.5, bg_weight=0.2)["loss_cls"])
    assert b == pytest.approx(0.2 * a, rel=1e-6)  # the focal path: weights multiplied in, plain mean
    # The weighted-mean path: an all-background batch is unchanged by the weight (it cancels in sum w l / sum w).
    c = float(fast_rcnn_losses(logits, None, only_bg, None)["loss_cls"])
    d = float(fast_rcnn_losses(logits, None, only_bg, None, bg_weight=0.8)["loss_cls"])
    assert d == pytest.approx(c, rel=1e-6)


def test_losses_of_no_region_are_zero_and_backpropagate():
    logits = torch.zeros((0, 3), requires_grad=True)
    deltas = torch.zeros((0, 4), requires_grad=True)
    out = fast_rcnn_losses(logits, deltas, torch.zeros((0,), dtype=torch.int64), torch.zeros((0, 4)),
                           bg_weight=0.2, focal_gamma=0.5)
    assert float(out["loss_cls"].detach()) == 0 and float(out["loss_box_reg"].detach()) == 0
    sum(out.values()).backward()
    assert logits.grad is not None and deltas.grad is not None


def test_a_region_named_with_certainty_keeps_the_focal_gradient_finite():
    # A logit margin of 30 (a cosine margin of 0.3 at τ 0.01) rounds p_t to 1 in float32, where (1 - p_t)^0.5 has an
    # infinite derivative: unguarded, the whole step's gradient is NaN (seen in toy finetuning).
    logits = torch.tensor([[30.0, 0.0, 0.0], [0.0, 0.0, 30.0], [0.5, 0.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 2, 1])
    out = fast_rcnn_losses(logits, None, labels, None, bg_weight=0.2, focal_gamma=0.5)
    out["loss_cls"].backward()
    assert torch.isfinite(logits.grad).all(), logits.grad
    assert float(logits.grad[2].abs().sum()) > 0  # the uncertain region still learns
    # the cap moves the loss of the certain regions by far less than the uncertain region's
    ce = torch.nn.functional.cross_entropy(logits.detach()[2:], labels[2:])
    probs = logits.detach()[2].softmax(0)
    assert float(out["loss_cls"]) == pytest.approx(float(ce * (1 - probs[1]) ** 0.5) / 3, rel=1e-4)


def test_only_background_gives_zero_box_loss_with_gradient():
    logits, _, deltas, targets = _inputs()
    deltas.requires_grad_(True)
    labels = torch.full((logits.shape[0],), logits.shape[1] - 1)
    out = fast_rcnn_losses(logits, deltas, labels, targets)
    assert float(out["loss_box_reg"]) == 0
    out["loss_box_reg"].backward()
    assert deltas.grad is not None and float(deltas.grad.abs().sum()) == 0


def _boxes(g, n, size=100.0):
    xy = torch.rand(n, 2, generator=g) * size * 0.7
    wh = torch.rand(n, 2, generator=g) * size * 0.3 + 4
    return torch.cat([xy, xy + wh], dim=1)


def test_sampler_labels_match_a_plain_iou_loop_and_respect_the_quota():
    from torchvision.ops import box_iou

    g = torch.Generator().manual_seed(1)
    gts = _boxes(g, 3)
    labels = torch.tensor([0, 2, 1])
    # Proposals: jittered copies of the GT boxes (foreground) and random boxes (mostly background).
    props = torch.cat([gts + torch.randn(3, 4, generator=g), gts + 2.0, _boxes(g, 40)])
    torch.manual_seed(0)
    sampler = ProposalSampler(num_classes=3, batch_size_per_image=16, positive_fraction=0.25)
    out = sampler([props], [gts], [labels])
    boxes, classes, targets = out.boxes[0], out.gt_classes[0], out.regression_targets[0]
    assert boxes.shape[0] == 16
    assert int((classes < 3).sum()) <= 4 and out.num_foreground == int((classes < 3).sum())
    coder = make_box_coder()
    for b, c, t in zip(boxes, classes, targets):
        ious = box_iou(b[None], gts)[0]
        best = int(ious.argmax())
        if float(ious[best]) >= 0.5:
            assert int(c) == int(labels[best])
            assert torch.allclose(t, coder.encode_single(gts[best][None], b[None])[0], atol=1e-5)
        else:
            assert int(c) == 3 and float(t.abs().sum()) == 0
    # The appended GT boxes are candidates: decoding a GT box's target onto itself is the identity.
    assert torch.allclose(decode_boxes(targets, boxes, (200, 200)), torch.where(
        (classes < 3)[:, None], decode_boxes(targets, boxes, (200, 200)), boxes), atol=1e-4)


def test_sampler_keeps_every_region_when_fewer_than_the_quota():
    g = torch.Generator().manual_seed(2)
    gts = _boxes(g, 2)
    props = _boxes(g, 5)
    out = ProposalSampler(num_classes=2, batch_size_per_image=512)([props], [gts], [torch.tensor([0, 1])])
    assert out.boxes[0].shape[0] <= 7  # 5 proposals + 2 GT, foreground capped at 25 % of 512 never reached
    assert set(out.gt_classes[0][-2:].tolist()) <= {0, 1, 2}


def test_sampler_empty_cases_no_gt_and_no_proposals():
    sampler = ProposalSampler(num_classes=2, batch_size_per_image=8)
    g = torch.Generator().manual_seed(4)
    gts = _boxes(g, 2)
    out = sampler([_boxes(g, 6), torch.zeros((0, 4)), torch.zeros((0, 4))],
                  [torch.zeros((0, 4)), gts, torch.zeros((0, 4))],
                  [torch.zeros((0,), dtype=torch.int64), torch.tensor([1, 0]), torch.zeros((0,), dtype=torch.int64)])
    # An image without GT: all background; without proposals: its GT boxes alone; neither: nothing.
    assert out.gt_classes[0].tolist() == [2] * out.boxes[0].shape[0] and out.boxes[0].shape[0] > 0
    assert sorted(out.gt_classes[1].tolist()) == [0, 1]
    assert torch.allclose(out.regression_targets[1], torch.zeros(2, 4), atol=1e-5)
    assert out.boxes[2].shape == (0, 4) and out.gt_classes[2].shape == (0,)


def _soft_nms_reference(boxes, scores, labels, sigma, prune):
    """The original's loop: pick the best, decay every other of its class, prune, repeat."""
    from torchvision.ops import box_iou

    items = [(i, float(s), int(c)) for i, (s, c) in enumerate(zip(scores, labels))]
    out = []
    while items:
        top = max(items, key=lambda x: x[1])
        out.append((top[0], top[1]))
        rest = []
        for i, s, c in items:
            if i == top[0]:
                continue
            if c == top[2]:
                s = s * math.exp(-float(box_iou(boxes[i][None], boxes[top[0]][None])[0, 0]) ** 2 / sigma)
            if s > prune:
                rest.append((i, s, c))
        items = rest
    return out


def test_soft_nms_equals_the_original_loop():
    g = torch.Generator().manual_seed(7)
    boxes = _boxes(g, 30)
    boxes[10:20] = boxes[:10] + 1.5  # overlapping pairs
    scores = torch.rand(30, generator=g)
    labels = torch.randint(0, 3, (30,), generator=g)
    idx, sc = soft_nms(boxes, scores, labels, sigma=0.5, prune=0.001)
    ref = _soft_nms_reference(boxes, scores, labels, 0.5, 0.001)
    ref.sort(key=lambda x: -x[1])
    assert idx.tolist() == [i for i, _ in ref]
    assert torch.allclose(sc, torch.tensor([s for _, s in ref]), atol=1e-6)
    empty_idx, empty_sc = soft_nms(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert empty_idx.shape == (0,) and empty_sc.shape == (0,)


def test_postprocess_soft_keeps_overlapping_boxes_with_decayed_scores():
    from rclip_core.detector import postprocess

    boxes = torch.tensor([[0., 0., 10., 10.], [1., 0., 11., 10.], [50., 50., 60., 60.]])
    scores = torch.tensor([[0.9], [0.8], [0.7]])
    hard = postprocess(boxes, scores, score_thresh=0.01, nms_thresh=0.5, max_dets=10)
    soft = postprocess(boxes, scores, score_thresh=0.01, nms_thresh=0.5, max_dets=10, nms="soft")
    assert hard["scores"].tolist() == pytest.approx([0.9, 0.7])
    iou = 90 / 110
    assert soft["scores"].tolist() == pytest.approx([0.9, 0.7, 0.8 * math.exp(-iou ** 2 / 0.5)], rel=1e-5)
    assert postprocess(boxes, scores, score_thresh=0.01, nms_thresh=0.5, max_dets=2, nms="soft")["scores"].shape == (2,)


def test_a_gt_box_with_no_proposal_above_the_threshold_gets_no_low_quality_match():
    gt = torch.tensor([[0., 0., 10., 10.]])
    props = torch.tensor([[0., 0., 10., 4.], [50., 50., 60., 60.]])  # IoU 0.4 with the GT, and nothing
    out = ProposalSampler(num_classes=1, append_gt=False)([props], [gt], [torch.tensor([0])])
    assert out.gt_classes[0].tolist() == [1, 1]  # both background (detectron2's RoI matcher)


def test_soft_nms_prunes_boxes_decayed_below_the_threshold():
    boxes = torch.tensor([[0., 0., 10., 10.]] * 3)  # identical: each pick decays the rest by exp(-1 / 0.5)
    idx, sc = soft_nms(boxes, torch.tensor([0.01, 0.009, 0.008]), torch.zeros(3, dtype=torch.int64))
    assert idx.tolist() == [0, 1]  # the third fell to 0.008 e^-4 = 1.5e-4 < 0.001
    assert sc.tolist() == pytest.approx([0.01, 0.009 * math.exp(-2)])


def test_pairwise_iou_is_torchvisions_to_the_bit():
    import numpy as np
    from torchvision.ops import box_iou

    from rclip_core.roi_heads import _pairwise_iou

    g = torch.Generator().manual_seed(3)
    boxes = _boxes(g, 40).reshape(2, 20, 4)
    boxes[0, 5:10] = boxes[0, :5] + 0.5
    ours = _pairwise_iou(boxes.numpy().astype(np.float32))
    for i in range(2):
        assert torch.equal(torch.from_numpy(ours[i]), box_iou(boxes[i], boxes[i]))


@pytest.mark.parametrize("group", [1, 50, 8_000_000])  # classes one at a time, a few together, all together
def test_soft_nms_of_many_classes_side_by_side_equals_the_original_loop(monkeypatch, group):
    import rclip_core.roi_heads as RH

    monkeypatch.setattr(RH, "_SOFT_NMS_GROUP", group)
    g = torch.Generator().manual_seed(11)
    boxes = _boxes(g, 60)
    boxes[20:40] = boxes[:20] + torch.rand(20, 4, generator=g) * 3  # overlapping pairs
    scores = torch.rand(60, generator=g) * 0.2
    scores[::7] = 0.0009  # below the pruning threshold from the start
    labels = torch.randint(0, 7, (60,), generator=g) * 3  # sparse class ids, uneven class sizes
    idx, sc = soft_nms(boxes, scores, labels, sigma=0.5, prune=0.001)
    ref = _soft_nms_reference(boxes, scores, labels, 0.5, 0.001)
    ref.sort(key=lambda x: -x[1])
    assert idx.tolist() == [i for i, _ in ref]
    assert torch.allclose(sc, torch.tensor([s for _, s in ref], dtype=sc.dtype), atol=1e-7)


def test_soft_nms_breaks_a_tie_for_the_earlier_box_as_the_serial_loop_does():
    boxes = torch.tensor([[50., 50., 60., 60.], [0., 0., 10., 10.], [1., 0., 11., 10.]])
    idx, sc = soft_nms(boxes, torch.tensor([0.1, 0.5, 0.5]), torch.tensor([1, 0, 0]))
    assert idx.tolist() == [1, 2, 0] and sc[0] == 0.5 and sc[1] < 0.5  # box 1 kept at 0.5, box 2 decayed by it


def _tied_soft_nms_inputs(seed: int, n: int = 90, k: int = 5):
    """Overlapping boxes in uneven classes with scores on a coarse grid, so that picks tie within and across
    classes (where the early stop of ``topk`` must keep the serial order)."""
    g = torch.Generator().manual_seed(seed)
    boxes = _boxes(g, n)
    boxes[n // 3: 2 * (n // 3)] = boxes[: n // 3] + torch.rand(n // 3, 4, generator=g) * 4
    boxes[-5:] = boxes[:5]  # identical boxes: exact decay ties
    scores = torch.randint(1, 9, (n,), generator=g).float() / 8
    labels = torch.randint(0, k, (n,), generator=g) ** 2  # sparse ids, uneven class sizes
    return boxes, scores, labels


@pytest.mark.parametrize("group", [1, 400, 8_000_000])  # classes one at a time, a few together, all together
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_nms_topk_is_the_full_result_cut_to_the_bit(monkeypatch, group, seed):
    import rclip_core.roi_heads as RH

    monkeypatch.setattr(RH, "_SOFT_NMS_GROUP", group)
    boxes, scores, labels = _tied_soft_nms_inputs(seed)
    idx, sc = soft_nms(boxes, scores, labels)
    assert len(set(sc.tolist())) < sc.shape[0]  # the inputs do tie
    for k in [0, 1, 2, 3, 7, 10, 25, 60, idx.shape[0], idx.shape[0] + 5]:
        top_idx, top_sc = soft_nms(boxes, scores, labels, topk=k)
        assert torch.equal(top_idx, idx[:k]) and torch.equal(top_sc, sc[:k]), k


def test_soft_nms_topk_stops_the_loop_early(monkeypatch):
    import numpy as np

    import rclip_core.roi_heads as RH

    calls = []
    real_exp = np.exp
    monkeypatch.setattr(RH.np, "exp", lambda *a, **kw: calls.append(1) or real_exp(*a, **kw))  # one decay per step
    boxes, scores, labels = _tied_soft_nms_inputs(0)
    soft_nms(boxes, scores, labels)
    full = len(calls)
    calls.clear()
    soft_nms(boxes, scores, labels, topk=5)
    assert 0 < len(calls) < full / 2


def test_postprocess_soft_max_dets_cuts_the_full_soft_nms_result():
    from rclip_core.detector import postprocess

    boxes, _, _ = _tied_soft_nms_inputs(3, n=40)
    scores = torch.rand(40, 6, generator=torch.Generator().manual_seed(3))
    kw = dict(score_thresh=0.05, nms_thresh=0.5, nms="soft")
    full = postprocess(boxes, scores, max_dets=10_000, **kw)
    for k in [1, 9, 50]:
        cut = postprocess(boxes, scores, max_dets=k, **kw)
        assert all(torch.equal(cut[key], full[key][:k]) for key in ("boxes", "scores", "labels")), k


def test_soft_nms_prunes_a_score_equal_to_the_threshold_and_handles_negative_scores():
    boxes = torch.tensor([[0., 0., 10., 10.], [50., 50., 60., 60.], [1., 0., 11., 10.]])  # box 1 apart: no decay
    idx, _ = soft_nms(boxes, torch.tensor([0.5, 0.001, 0.3], dtype=torch.float64), torch.zeros(3, dtype=torch.int64),
                      prune=0.001)
    assert idx.tolist() == [0, 2]  # 0.001 is not above the threshold (the original's ``score > prune``)
    g = torch.Generator().manual_seed(5)
    boxes = _boxes(g, 30)
    scores = torch.rand(30, generator=g) - 0.5
    labels = torch.randint(0, 3, (30,), generator=g)
    idx, sc = soft_nms(boxes, scores, labels, sigma=0.5, prune=-1.0)
    ref = _soft_nms_reference(boxes, scores, labels, 0.5, -1.0)
    ref.sort(key=lambda x: -x[1])
    assert idx.tolist() == [i for i, _ in ref]
    assert torch.allclose(sc, torch.tensor([s for _, s in ref], dtype=sc.dtype), atol=1e-7)
