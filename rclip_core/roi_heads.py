"""Training-time RoI selection and box coding of the finetuned detector (RegionCLIP §3.4 transfer; detectron2's
``ROIHeads.label_and_sample_proposals``, regionclip_facts.md §2 "ROI sampling"), built from torchvision's detection
parts: :class:`~torchvision.models.detection._utils.Matcher`,
:class:`~torchvision.models.detection._utils.BalancedPositiveNegativeSampler` and
:class:`~torchvision.models.detection._utils.BoxCoder`.

Per image: the ground-truth boxes are appended to the proposals (so every image has foreground to learn from early
on), each region is matched to the GT box it overlaps most (IoU ≥ 0.5: that box's class; below: background), and
``batch_size_per_image`` regions are drawn with at most ``positive_fraction`` foreground. Box regression targets are
the deltas from each region to its matched GT box, with detectron2's weights (10, 10, 5, 5).

Shapes: P_i proposals of image i, G_i GT boxes, S_i sampled regions, S = Σ S_i, K classes (background = K).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import box_iou

# detectron2's MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS, which the original's box predictor encodes deltas with.
BOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def make_box_coder() -> BoxCoder:
    """The box coder of the RoI head: detectron2's weights and its clamp of dw/dh at log(1000/16)."""
    return BoxCoder(BOX_REG_WEIGHTS)


@dataclass
class SampledRegions:
    """The regions the RoI head trains on, per image, and their targets.

    Attributes:
        boxes: B tensors (S_i, 4), ``xyxy`` in resized-image pixels.
        gt_classes: B tensors (S_i,) int64 in 0..K (K = background).
        regression_targets: B tensors (S_i, 4), deltas to the matched GT box (zeros for background rows).
        num_foreground: foreground regions over the batch.
    """

    boxes: list[Tensor]
    gt_classes: list[Tensor]
    regression_targets: list[Tensor]
    num_foreground: int


class ProposalSampler:
    """Match proposals to GT boxes and draw a balanced sample per image.

    Args:
        num_classes: K; background regions get label K.
        iou_thresh: foreground at IoU ≥ this (detectron2's ROI_HEADS.IOU_THRESHOLDS [0.5]).
        batch_size_per_image: regions drawn per image (512).
        positive_fraction: at most this share of them foreground (0.25).
        append_gt: add the GT boxes to the proposals first (detectron2's PROPOSAL_APPEND_GT).

    Example:
        >>> s = ProposalSampler(num_classes=2)
        >>> out = s([torch.tensor([[0., 0., 10., 10.]])], [torch.tensor([[0., 0., 10., 10.]])], [torch.tensor([1])])
        >>> out.gt_classes[0].tolist()  # the proposal and the appended GT box, both class 1
        [1, 1]
    """

    def __init__(self, *, num_classes: int, iou_thresh: float = 0.5, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, append_gt: bool = True) -> None:
        self.num_classes = num_classes
        # One threshold, no "between" band and no low-quality matches: detectron2's RoI matcher.
        self.matcher = Matcher(iou_thresh, iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_coder = make_box_coder()
        self.append_gt = append_gt

    def _label(self, proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor]:
        """(P,) labels in 0..K and (P, 4) matched GT boxes (the proposal itself for background)."""
        if gt_boxes.shape[0] == 0:  # a negative image: everything is background
            return torch.full((proposals.shape[0],), self.num_classes, dtype=torch.int64,
                              device=proposals.device), proposals
        matched = self.matcher(box_iou(gt_boxes, proposals))  # (P,): GT index, or -1 below the threshold
        fg = matched >= 0
        idx = matched.clamp(min=0)
        labels = torch.where(fg, gt_labels[idx], torch.full_like(idx, self.num_classes))
        return labels, torch.where(fg[:, None], gt_boxes[idx], proposals)

    @torch.no_grad()
    def __call__(self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]) -> SampledRegions:
        """Sample regions for B images.

        Args:
            proposals: B tensors (P_i, 4); never back-propagated through (they come from a frozen RPN).
            gt_boxes: B tensors (G_i, 4).
            gt_labels: B tensors (G_i,) int64 class indices in 0..K-1.
        """
        all_props, all_labels, all_matched = [], [], []
        for props, gts, labs in zip(proposals, gt_boxes, gt_labels):
            props = props.detach().float()
            gts = gts.to(props.device, torch.float32)
            labs = labs.to(props.device, torch.int64)
            if self.append_gt:
                props = torch.cat([props, gts])
            labels, matched = self._label(props, gts, labs)
            all_props.append(props)
            all_labels.append(labels)
            all_matched.append(matched)
        # torchvision's sampler: 1 = foreground, 0 = background (its own convention, mapped here).
        pos_masks, neg_masks = self.sampler([(lab < self.num_classes).to(torch.int64) for lab in all_labels])
        boxes, classes, targets = [], [], []
        num_fg = 0
        for props, labels, matched, pos, neg in zip(all_props, all_labels, all_matched, pos_masks, neg_masks):
            keep = (pos | neg).nonzero()[:, 0]
            b, m = props[keep], matched[keep]
            boxes.append(b)
            classes.append(labels[keep])
            num_fg += int((labels[keep] < self.num_classes).sum())
            targets.append(self.box_coder.encode_single(m, b) if b.shape[0] else b.new_zeros((0, 4)))
        return SampledRegions(boxes, classes, targets, num_fg)


def decode_boxes(deltas: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Apply class-agnostic deltas (R, 4) to boxes (R, 4) and clip to the image (h, w): the finetuned detector's
    output boxes (the original's ``predict_boxes`` with NO_BOX_DELTA off)."""
    if boxes.shape[0] == 0:
        return boxes
    out = make_box_coder().decode_single(deltas.float(), boxes.float())
    h, w = image_size
    return torch.stack([out[:, 0].clamp(0, w), out[:, 1].clamp(0, h), out[:, 2].clamp(0, w), out[:, 3].clamp(0, h)],
                       dim=1)


def _pairwise_iou(b: np.ndarray) -> np.ndarray:
    """IoU of every pair within each group: boxes (G, n, 4) float32 → (G, n, n), with ``torchvision.ops.box_iou``'s
    float32 arithmetic step for step (so the same values to the bit), one coordinate at a time (contiguous arrays)."""
    x1, y1, x2, y2 = (np.ascontiguousarray(b[..., i]) for i in range(4))  # (G, n) each
    area = (x2 - x1) * (y2 - y1)
    w = np.clip(np.minimum(x2[:, :, None], x2[:, None, :]) - np.maximum(x1[:, :, None], x1[:, None, :]), 0, None)
    h = np.clip(np.minimum(y2[:, :, None], y2[:, None, :]) - np.maximum(y1[:, :, None], y1[:, None, :]), 0, None)
    inter = w * h
    with np.errstate(invalid="ignore", divide="ignore"):  # padding rows (zero boxes) give 0/0, never used
        return inter / (area[:, :, None] + area[:, None, :] - inter)


# Classes soft-NMSed together: (classes × boxes²) IoU entries per group, about 64 MB of float64.
_SOFT_NMS_GROUP = 8_000_000


def soft_nms(boxes: Tensor, scores: Tensor, labels: Tensor, *, sigma: float = 0.5, prune: float = 0.001,
             topk: int | None = None) -> tuple[Tensor, Tensor]:
    """Gaussian soft-NMS per class (Bodla et al. 2017; the original's test scripts, ``batched_soft_nms`` with
    method gaussian, σ 0.5, prune 0.001): repeatedly take the best remaining box of a class, decay the others of
    that class by exp(−IoU²/σ), drop those below ``prune``.

    The loop is serial within a class, but classes are independent: they run side by side, one NumPy step per
    pick for a group of classes at once (the largest class sets the number of steps), instead of one step per pick
    of every class; the same arithmetic per class (float64 decays of float32 IoUs), so the same result.

    With ``topk`` only the first ``topk`` of that result are wanted (the detector keeps ``max_dets``), and the loop
    stops early: a class's picks never rise (each pick is its class's highest remaining score, and decays only
    lower the rest), so once ``topk`` picks score strictly above every class's next pick, no later pick can rank
    among the first ``topk``, ties included (the first ``topk`` are the same rows with the same scores as without
    ``topk``, cut).

    Args:
        boxes: (N, 4); scores: (N,) finite; labels: (N,) class of each row.
        topk: return at most this many (None: all).

    Returns:
        (indices into the inputs, their decayed scores), sorted by decayed score (highest first; ties in class
        order, then pick order).
    """
    b_all = boxes.detach().cpu().float().numpy()
    s_all = scores.detach().cpu().double().numpy()
    _, inverse, counts = np.unique(labels.cpu().numpy(), return_inverse=True, return_counts=True)
    by_class = np.argsort(inverse.reshape(-1), kind="stable")  # rows grouped by class, input order within
    starts = np.concatenate([[0], np.cumsum(counts)])
    keep_idx: list[np.ndarray] = []
    keep_scores: list[np.ndarray] = []
    first = 0
    while first < counts.shape[0]:
        last = first + 1  # classes [first, last) form a group within the memory budget
        while last < counts.shape[0] and (last + 1 - first) * int(counts[first:last + 1].max()) ** 2 <= _SOFT_NMS_GROUP:
            last += 1
        g, n = last - first, int(counts[first:last].max())
        rows = np.full((g, n), -1, dtype=np.int64)  # (G, n) input row of each slot, -1 = padding
        for j, c in enumerate(range(first, last)):
            rows[j, : counts[c]] = by_class[starts[c]:starts[c + 1]]
        # (G, n) remaining scores; -inf marks padding and rows picked or pruned (never the max of a running class)
        s = np.where(rows >= 0, s_all[rows], -np.inf)
        iou = _pairwise_iou(np.where((rows >= 0)[..., None], b_all[rows], 0.0).astype(np.float32)).astype(np.float64)
        picks = np.zeros((g, n), dtype=np.int64)  # slot picked at each step, per class
        picked = np.full((g, n), -np.inf)  # its score; -inf: the class had nothing left (never above a pick)
        lanes = np.arange(g)
        for step in range(n):
            top = s.argmax(axis=1)  # (G,)
            best = s[lanes, top]  # each class's pick of this step: no later pick of its class is higher
            bound = best.max()
            if bound == -np.inf:  # every class is done
                break
            # (step * g bounds the picks made so far: the count is only worth making once it can reach topk)
            if topk is not None and step * g >= topk and np.count_nonzero(picked[:, :step] > bound) >= topk:
                break
            picks[:, step] = top
            picked[:, step] = best
            s[lanes, top] = -np.inf
            decay = iou[lanes, top]  # (G, n), a copy: exp(-IoU² / σ) in place, the serial loop's steps
            np.square(decay, out=decay)
            np.negative(decay, out=decay)
            np.divide(decay, sigma, out=decay)
            np.exp(decay, out=decay)
            s *= decay  # -inf stays -inf (or NaN against a padding row's 0/0 IoU, pruned next)
            s = np.where(s > prune, s, -np.inf)
        done = picked > -np.inf  # class-major, pick order within: the order the serial loop appends in
        keep_idx.append(rows[np.nonzero(done)[0], picks[done]])
        keep_scores.append(picked[done])
        first = last
    idx = torch.from_numpy(np.concatenate(keep_idx) if keep_idx else np.zeros(0, dtype=np.int64)).to(boxes.device)
    sc = torch.from_numpy(np.concatenate(keep_scores) if keep_scores else np.zeros(0)).to(scores)
    order = sc.argsort(descending=True, stable=True)[:topk]
    return idx[order], sc[order]
