"""``RegionDetector(transform, backbone, proposal_generator, roi_heads)``: RegionCLIP's detector, composed from built
parts as torchvision's ``GeneralizedRCNN`` is (RegionCLIP §3.1 zero-shot inference, §3.4 transfer; the original's
``CLIPFastRCNN``, regionclip_facts.md §3).

- **transform**: an :class:`~rclip_core.data.transforms.ImageNormalizer` (CLIP's RGB mean/std) turning the batch's
  uint8 images into a normalised, padded ``ImageList``;
- **backbone**: the CLIP trunk to res4 (:class:`~rclip_core.clip_backbone.CLIPTrunk`, ``out_channels``, ``stride``);
- **proposal_generator**: where regions come from: :class:`GivenBoxes` (ground-truth boxes or a proposals file
  carried by the batch) or :class:`RPNProposals` (a standalone RPN with its own trunk and input convention, run on
  the same decoded, resized image);
- **roi_heads**: :class:`RegionHeads`: pooler + res5 + attention pool (:class:`~rclip_core.clip_backbone.RegionHead`)
  and a cosine classifier against text embeddings (+ the class-agnostic box regressor finetuning adds).

``forward`` returns raw outputs (:class:`RegionOutputs`) for losses or post-processing; :meth:`RegionDetector.detect`
is ``forward`` followed by the pure post-processing (:func:`fuse_scores`, :func:`postprocess`).

Batch items (what :class:`rclip_core.data.coco.DetectionDataset` yields): ``{"image": uint8 (3, H, W) resized,
"boxes": (G, 4), "labels": (G,), "proposals"?: (P, 4), "objectness"?: (P,), ...}``, boxes ``xyxy`` in pixels of the
resized image.

Shapes: B images, P_i regions of image i, R = Σ P_i, K classes, D embedding dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from rclip_core.classifier import CosineClassifier
from rclip_core.clip_backbone import CLIPTrunk, RegionHead
from rclip_core.data.transforms import ImageList, ImageNormalizer
from rclip_core.tvops import batched_nms

ScoreFusion = Literal["raw_logit", "sigmoid", "none"]
NmsKind = Literal["hard", "soft"]


# ---------------------------------------------------------------------------------------------------------------
# proposal generators


@dataclass
class Proposals:
    """Regions per image (``xyxy`` in the resized image's pixels), raw objectness logits (None for GT boxes) and the
    proposal generator's training losses (empty when it is frozen or given)."""

    boxes: list[Tensor]
    objectness: list[Tensor] | None
    losses: dict[str, Tensor] = field(default_factory=dict)


def _top_by_objectness(boxes: Tensor, objectness: Tensor | None, k: int | None) -> tuple[Tensor, Tensor | None]:
    if objectness is None or k is None or boxes.shape[0] <= k:
        return boxes, objectness
    top = objectness.topk(k).indices
    return boxes[top], objectness[top]


class GivenBoxes(nn.Module):
    """Regions that come with the batch: ground-truth boxes (``key="boxes"``, no objectness; the paper's GT-box
    protocol) or precomputed proposals (``key="proposals"`` with ``"objectness"``), the best ``topk`` kept.

    Example:
        >>> GivenBoxes("boxes")([{"boxes": torch.tensor([[0., 0., 9., 9.]])}], None, None).boxes
        [tensor([[0., 0., 9., 9.]])]
    """

    def __init__(self, key: Literal["boxes", "proposals"], *, topk: int | None = None) -> None:
        super().__init__()
        self.key, self.topk = key, topk

    def forward(self, batch: list[dict], images: ImageList | None, features: Tensor | None) -> Proposals:
        boxes, objectness = [], []
        for item in batch:
            b = item.get(self.key)
            b = torch.zeros((0, 4)) if b is None else b
            obj = item.get("objectness") if self.key == "proposals" else None
            if self.key == "proposals" and obj is None:
                obj = torch.zeros(b.shape[0])
            b, obj = _top_by_objectness(b, obj, self.topk)
            boxes.append(b)
            objectness.append(obj)
        return Proposals(boxes, objectness if self.key == "proposals" else None)


class RPNProposals(nn.Module):
    """A standalone RPN (:class:`rclip_core.rpn.model.RPNModel`, its own ResNet and input convention) proposing on
    the batch's uint8 images; frozen (eval mode, no gradients), as the original's offline RPN.

    Args:
        rpn: the RPN; its ``post_nms_topk_test`` already bounds the count.
        topk: keep at most this many (by objectness) per image.
    """

    def __init__(self, rpn: nn.Module, *, topk: int | None = None) -> None:
        super().__init__()
        self.rpn = rpn.eval().requires_grad_(False)
        self.topk = topk

    def train(self, mode: bool = True) -> RPNProposals:
        super().train(mode)
        self.rpn.eval()  # frozen: proposals never use the training-time top-k
        return self

    def forward(self, batch: list[dict], images: ImageList | None, features: Tensor | None) -> Proposals:
        device = next(self.rpn.parameters()).device
        with torch.no_grad():
            out = self.rpn([item["image"].to(device) for item in batch])
        pairs = [_top_by_objectness(b, o, self.topk) for b, o in zip(out.boxes, out.objectness)]
        return Proposals([b for b, _ in pairs], [o for _, o in pairs])


# ---------------------------------------------------------------------------------------------------------------
# RoI heads


@dataclass
class RegionOutputs:
    """What :meth:`RegionDetector.forward` returns.

    Attributes:
        proposals: B tensors (P_i, 4), the regions, ``xyxy`` in resized-image pixels.
        objectness: B tensors (P_i,) of raw RPN logits, or None (GT boxes).
        image_sizes: B (h, w) of the resized images before padding.
        region_features: (R, D) region embeddings (not normalised).
        class_logits: (R, K [+1]) cosine / τ, the background column last when the classifier has one.
        box_deltas: (R, 4) class-agnostic box regression, or None without a regressor.
        proposal_losses: the proposal generator's training losses.
        gt_classes: in training with a sampler, (R,) labels of the sampled regions in 0..K (K = background).
        regression_targets: in training with a sampler, (R, 4) target deltas of the sampled regions.
    """

    proposals: list[Tensor]
    objectness: list[Tensor] | None
    image_sizes: list[tuple[int, int]]
    region_features: Tensor
    class_logits: Tensor
    box_deltas: Tensor | None = None
    proposal_losses: dict[str, Tensor] = field(default_factory=dict)
    gt_classes: Tensor | None = None
    regression_targets: Tensor | None = None


class RegionHeads(nn.Module):
    """Pooler + res5 + attention pool (``head``) and the cosine ``classifier``, with an optional class-agnostic
    ``box_regressor`` (``Linear(D, 4)``, the original's ``bbox_pred``) for finetuned detectors, and the training-time
    ``sampler`` (:class:`rclip_core.roi_heads.ProposalSampler`) that picks and labels the regions a training forward
    pass classifies."""

    def __init__(self, head: RegionHead, classifier: CosineClassifier, box_regressor: nn.Module | None = None, *,
                 sampler=None) -> None:
        super().__init__()
        self.head = head
        self.classifier = classifier
        self.box_regressor = box_regressor
        self.sampler = sampler

    def forward(self, features: Tensor, boxes_per_image: list[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """res4 (B, C4, h, w) and B tensors (P_i, 4) → (features (R, D), logits (R, K [+1]), deltas (R, 4) | None)."""
        feats = self.head(features, boxes_per_image)  # (R, D)
        deltas = self.box_regressor(feats) if self.box_regressor is not None else None
        return feats, self.classifier.logits(feats), deltas


# ---------------------------------------------------------------------------------------------------------------
# post-processing (pure)


def fuse_scores(probs: Tensor, objectness: Tensor | None, mode: ScoreFusion) -> Tensor:
    """Combine class probabilities (R, K) with proposal objectness (R,) → scores (R, K).

    ``raw_logit`` is the original's ``sqrt(p × logit)``: a negative logit gives NaN (the row is dropped later) and
    a logit above 1 can lift scores above 1. ``sigmoid`` uses ``sqrt(p × sigmoid(logit))`` instead; ``none`` keeps p.
    """
    if objectness is None or mode == "none":
        return probs
    obj = objectness.float() if mode == "raw_logit" else objectness.float().sigmoid()
    return torch.sqrt(probs * obj[:, None])


def postprocess(boxes: Tensor, scores: Tensor, *, score_thresh: float, nms_thresh: float, max_dets: int,
                nms: NmsKind = "hard", soft_nms_sigma: float = 0.5, soft_nms_prune: float = 0.001
                ) -> dict[str, Tensor]:
    """Per-image detections from class-agnostic boxes (R, 4) and scores (R, K).

    Keeps every (box, class) pair above ``score_thresh`` (so one box can yield several classes), drops non-finite
    scores, applies class-specific NMS, and keeps the ``max_dets`` best: detectron2's
    ``fast_rcnn_inference_single_image`` rule. ``nms="soft"`` is gaussian soft-NMS instead
    (:func:`rclip_core.roi_heads.soft_nms`, the original's finetuned-detector tests): scores are decayed, not cut.

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
    if nms == "soft":
        from rclip_core.roi_heads import soft_nms

        order, decayed = soft_nms(det_boxes, det_scores, labels, sigma=soft_nms_sigma, prune=soft_nms_prune,
                                  topk=max_dets)  # the loop stops once the best max_dets are known
        det_scores = det_scores.index_put((order,), decayed)
        order = order[:max_dets]
        return {"boxes": det_boxes[order], "scores": det_scores[order], "labels": labels[order]}
    order = batched_nms(det_boxes, det_scores, labels, nms_thresh)[:max_dets]
    return {"boxes": det_boxes[order], "scores": det_scores[order], "labels": labels[order]}


# ---------------------------------------------------------------------------------------------------------------
# the detector


class RegionDetector(nn.Module):
    """RegionCLIP's detector: transform → backbone (res4) → proposal generator → RoI heads.

    Args:
        transform: uint8 images → normalised ``ImageList`` (the CLIP branch's convention).
        backbone: normalised images → res4 (``out_channels``, ``stride``).
        proposal_generator: :class:`GivenBoxes` or :class:`RPNProposals` (or any module of that signature).
        roi_heads: :class:`RegionHeads`.
        score_fusion, score_thresh, nms_thresh, max_dets, nms, soft_nms_sigma, soft_nms_prune: post-processing of
            :meth:`detect` (the recipe's ``zeroshot`` section).
        box_deltas: apply the RoI heads' box regression to the regions in :meth:`detect` (a finetuned detector;
            the zero-shot path keeps the regions, the original's NO_BOX_DELTA).

    Example:
        >>> det = build_region_detector(clip, emb, recipe, GivenBoxes("boxes"))
        >>> det.detect([{"image": image_uint8, "boxes": torch.tensor([[10., 10., 80., 90.]])}])
    """

    def __init__(self, transform: ImageNormalizer, backbone: CLIPTrunk, proposal_generator: nn.Module,
                 roi_heads: RegionHeads, *, score_fusion: ScoreFusion, score_thresh: float, nms_thresh: float,
                 max_dets: int, nms: NmsKind, soft_nms_sigma: float, soft_nms_prune: float, amp: str = "off",
                 box_deltas: bool = False) -> None:
        super().__init__()
        self.nms, self.soft_nms_sigma, self.soft_nms_prune = nms, soft_nms_sigma, soft_nms_prune
        self.box_deltas = box_deltas
        self.transform = transform
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.score_fusion = score_fusion
        self.score_thresh, self.nms_thresh, self.max_dets = score_thresh, nms_thresh, max_dets
        self.amp = amp  # "off", "bf16" or "fp16": autocast of the forward pass in detect (scores stay float32)

    @property
    def classifier(self) -> CosineClassifier:
        return self.roi_heads.classifier

    def forward(self, batch: list[dict]) -> RegionOutputs:
        """Raw outputs for a batch of items (see the module docstring)."""
        images = self.transform([item["image"] for item in batch])
        features = self.backbone(images.tensors)  # (B, C4, H/16, W/16)
        proposals = self.proposal_generator(batch, images, features)
        boxes = [b.to(features.device, torch.float32) for b in proposals.boxes]
        objectness = proposals.objectness
        gt_classes = targets = None
        sampler = self.roi_heads.sampler
        if self.training and sampler is not None:  # train on a labelled sample of proposals + GT boxes
            sampled = sampler(boxes, [item["boxes"] for item in batch], [item["labels"] for item in batch])
            boxes, objectness = sampled.boxes, None
            gt_classes = torch.cat(sampled.gt_classes)  # (R,)
            targets = torch.cat(sampled.regression_targets)  # (R, 4)
        feats, logits, deltas = self.roi_heads(features, boxes)
        return RegionOutputs(proposals=boxes, objectness=objectness, image_sizes=images.image_sizes,
                             region_features=feats, class_logits=logits, box_deltas=deltas,
                             proposal_losses=proposals.losses, gt_classes=gt_classes, regression_targets=targets)

    def region_probs(self, outputs: RegionOutputs) -> list[Tensor]:
        """Class probabilities per image (B tensors (P_i, K)): softmax over K [+ background], background dropped."""
        probs = self.classifier.probs(outputs.class_logits)
        return list(probs.split([int(b.shape[0]) for b in outputs.proposals]))

    def _autocast(self):
        import contextlib

        if self.amp == "off":
            return contextlib.nullcontext()
        device = next(self.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    @torch.inference_mode()
    def detect(self, batch: list[dict]) -> list[dict[str, Tensor]]:
        """Detections per image in resized-image pixels: ``{"boxes", "scores", "labels"}`` (see :func:`postprocess`)
        and ``"num_regions"``, how many regions were classified.

        Regions are the output boxes (no box regression in zero-shot, as the original's NO_BOX_DELTA), or with
        ``box_deltas`` the regions moved by the box regressor and clipped to the image; proposal objectness is fused
        into the scores (``score_fusion``).
        """
        with self._autocast():
            out = self.forward(batch)
        out.class_logits = out.class_logits.float()
        deltas = None
        if self.box_deltas and out.box_deltas is not None:
            deltas = out.box_deltas.float().split([int(b.shape[0]) for b in out.proposals])
        dets = []
        for i, (boxes, probs) in enumerate(zip(out.proposals, self.region_probs(out))):
            obj = out.objectness[i] if out.objectness is not None else None
            scores = fuse_scores(probs, obj.to(probs.device) if obj is not None else None, self.score_fusion)
            if deltas is not None:
                from rclip_core.roi_heads import decode_boxes

                boxes = decode_boxes(deltas[i], boxes, out.image_sizes[i])
            det = postprocess(boxes.float(), scores, score_thresh=self.score_thresh, nms_thresh=self.nms_thresh,
                              max_dets=self.max_dets, nms=self.nms, soft_nms_sigma=self.soft_nms_sigma,
                              soft_nms_prune=self.soft_nms_prune)
            dets.append({**det, "num_regions": int(boxes.shape[0])})
        return dets


def build_region_detector(clip: nn.Module, class_embeddings: Tensor, recipe, proposal_generator: nn.Module
                          ) -> RegionDetector:
    """A zero-shot :class:`RegionDetector` over ``clip.visual`` from a :class:`rclip_core.recipes.Recipe`: the
    variant's pooler, ``zeroshot`` classifier and post-processing, the ``input`` normalisation."""
    from rclip_core.clip_backbone import pooler_resolution_for
    from rclip_core.data.transforms import clip_normalizer

    visual = clip.visual
    zs = recipe.zeroshot
    head = RegionHead(visual.layer4, visual.attnpool,
                      pooler_resolution=pooler_resolution_for(getattr(clip, "rclip_variant", recipe.model.variant),
                                                              recipe.model.pooler_resolution), chunk=zs.roi_chunk)
    classifier = CosineClassifier(class_embeddings, temperature=zs.temperature, background=zs.background)
    return RegionDetector(clip_normalizer(recipe.input.pixel_mean, recipe.input.pixel_std), CLIPTrunk(visual),
                          proposal_generator, RegionHeads(head, classifier), score_fusion=zs.score_fusion,
                          score_thresh=zs.score_thresh, nms_thresh=zs.nms_thresh, max_dets=zs.max_dets,
                          nms=zs.nms, soft_nms_sigma=zs.soft_nms_sigma, soft_nms_prune=zs.soft_nms_prune,
                          amp=zs.amp)
