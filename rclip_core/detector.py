"""Zero-shot region recognition and detection: ``ZeroShotDetector(encoder, classifier)`` (RegionCLIP §3.1 zero-shot
inference; the exact post-processing of the original release, regionclip_facts.md §3).

Shapes: B images, R_i regions of image i, K classes, D embedding dim.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from rclip_core.classifier import CosineClassifier
from rclip_core.clip_backbone import CLIPRegionEncoder

ScoreFusion = Literal["raw_logit", "sigmoid", "none"]


def fuse_scores(probs: Tensor, objectness: Tensor | None, mode: ScoreFusion) -> Tensor:
    """Combine class probabilities (R, K) with proposal objectness (R,) → scores (R, K).

    ``raw_logit`` is the original's ``sqrt(p × logit)``: a negative logit gives NaN (the row is dropped later) and
    a logit above 1 can lift scores above 1. ``sigmoid`` uses ``sqrt(p × sigmoid(logit))`` instead; ``none`` keeps p.
    """
    if objectness is None or mode == "none":
        return probs
    obj = objectness.float() if mode == "raw_logit" else objectness.float().sigmoid()
    return torch.sqrt(probs * obj[:, None])


def postprocess(boxes: Tensor, scores: Tensor, *, score_thresh: float, nms_thresh: float, max_dets: int
                ) -> dict[str, Tensor]:
    """Per-image detections from class-agnostic boxes (R, 4) and scores (R, K).

    Keeps every (box, class) pair above ``score_thresh`` (so one box can yield several classes), drops non-finite
    scores, applies class-specific NMS, and keeps the ``max_dets`` best: detectron2's
    ``fast_rcnn_inference_single_image`` rule.

    Returns:
        ``{"boxes": (N, 4), "scores": (N,), "labels": (N,) class indices 0..K-1}``, sorted by score.
    """
    finite = torch.isfinite(scores).all(dim=1)
    boxes, scores = boxes[finite], scores[finite]
    keep = scores > score_thresh  # (R, K)
    idx = keep.nonzero()  # (M, 2): region, class
    det_boxes = boxes[idx[:, 0]]
    det_scores = scores[keep]
    labels = idx[:, 1]
    order = batched_nms(det_boxes, det_scores, labels, nms_thresh)[:max_dets]
    return {"boxes": det_boxes[order], "scores": det_scores[order], "labels": labels[order]}


class ZeroShotDetector(nn.Module):
    """Classify given regions (GT boxes or proposals) of images with text embeddings.

    Args:
        encoder: a :class:`CLIPRegionEncoder`.
        classifier: a :class:`CosineClassifier` over K class embeddings.
        score_thresh, nms_thresh, max_dets: post-processing (see :func:`postprocess`).
        score_fusion: how proposal objectness joins the class probability (see :func:`fuse_scores`).

    Example:
        >>> det = ZeroShotDetector(encoder, CosineClassifier(text_emb), score_thresh=0.001)
        >>> out = det(images, [torch.tensor([[10., 10., 80., 90.]])])   # one dict per image
    """

    def __init__(self, encoder: CLIPRegionEncoder, classifier: CosineClassifier, *, score_thresh: float = 0.001,
                 nms_thresh: float = 0.5, max_dets: int = 100, score_fusion: ScoreFusion = "raw_logit") -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier
        self.score_thresh, self.nms_thresh, self.max_dets = score_thresh, nms_thresh, max_dets
        self.score_fusion = score_fusion

    @torch.no_grad()
    def region_probs(self, images: Tensor, boxes_per_image: list[Tensor]) -> list[Tensor]:
        """Class probabilities per image: B tensors (R_i, K)."""
        probs = self.classifier(self.encoder(images, boxes_per_image))  # (R, K)
        return list(probs.split([int(b.shape[0]) for b in boxes_per_image]))

    @torch.no_grad()
    def forward(self, images: Tensor, boxes_per_image: list[Tensor],
                objectness_per_image: list[Tensor] | None = None) -> list[dict[str, Tensor]]:
        """Detections per image, boxes in the coordinates of ``images``.

        Args:
            images: (B, 3, H, W) normalised.
            boxes_per_image: B tensors (R_i, 4) ``xyxy``; the regions themselves are the output boxes (no box
                regression in zero-shot, as the original's NO_BOX_DELTA).
            objectness_per_image: B tensors (R_i,) of raw RPN logits, or None for GT boxes (no fusion).
        """
        probs_per_image = self.region_probs(images, boxes_per_image)
        out = []
        for i, (boxes, probs) in enumerate(zip(boxes_per_image, probs_per_image)):
            obj = objectness_per_image[i] if objectness_per_image is not None else None
            scores = fuse_scores(probs, obj, self.score_fusion)
            out.append(postprocess(boxes.to(probs.device).float(), scores, score_thresh=self.score_thresh,
                                   nms_thresh=self.nms_thresh, max_dets=self.max_dets))
        return out


def build_zeroshot_detector(clip: nn.Module, class_embeddings: Tensor, recipe) -> ZeroShotDetector:
    """A :class:`ZeroShotDetector` over ``clip.visual`` from a :class:`rclip_core.recipes.Recipe`."""
    from rclip_core.clip_backbone import build_region_encoder

    encoder = build_region_encoder(clip, recipe.model.variant, recipe.model.pooler_resolution)
    zs = recipe.zeroshot
    classifier = CosineClassifier(class_embeddings, temperature=zs.temperature, background=zs.background)
    return ZeroShotDetector(encoder, classifier, score_thresh=zs.score_thresh, nms_thresh=zs.nms_thresh,
                            max_dets=zs.max_dets, score_fusion=zs.score_fusion)
