"""Region proposals that need no RPN checkpoint from the RegionCLIP release: proposal generators for
``RegionDetector`` built on well-kept libraries.

- :class:`SelectiveSearch`: OpenCV's selective search (``cv2.ximgproc``, opencv-contrib), no learned weights at all:
  the default region source of ``rclip visualize`` on a user's photo. Boxes come ranked, without an objectness
  score (so no score fusion).
- :class:`TorchvisionRPN`: the region proposal network of torchvision's COCO-trained Faster R-CNN (ResNet-50 FPN)
  as a class-agnostic proposal generator; its weights are read from a file or from torch's cache (where torchvision
  puts them after a download on a machine with network), never downloaded here. It is trained on all 80 COCO
  classes, so it is not an open-vocabulary-clean proposal source for COCO's novel classes.

Both take the batch's uint8 RGB images (already resized like the CLIP branch) and return boxes in those pixels.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from rclip_core import boxes as B
from rclip_core.detector import Proposals
from rclip_core.errors import RclipError

log = logging.getLogger(__name__)


class SelectiveSearch(nn.Module):
    """OpenCV selective search proposals (Uijlings et al. 2013), ranked as OpenCV returns them.

    Args:
        mode: ``"fast"`` (OpenCV's switchToSelectiveSearchFast) or ``"quality"`` (``--regions
            selective-search[:quality]``).
        topk: keep the first ``topk`` boxes (the recipe's ``zeroshot.selective_search_topk``).
        max_side: segment a copy scaled so its longer side is at most this (selective search's cost grows with the
            pixel count; boxes are scaled back).
        min_size: drop boxes narrower or lower than this (pixels of the input image).
    """

    def __init__(self, *, mode: str, topk: int, max_side: int = 500, min_size: float = 8.0) -> None:
        super().__init__()
        try:
            import cv2

            self._ss = cv2.ximgproc.segmentation
        except (ImportError, AttributeError):
            raise RclipError("selective search needs OpenCV's contrib modules: pip install "
                             "opencv-contrib-python-headless") from None
        if mode not in ("fast", "quality"):
            raise RclipError(f"selective search mode must be 'fast' or 'quality', got {mode!r}")
        self.mode, self.topk, self.max_side, self.min_size = mode, topk, max_side, min_size

    def boxes_for(self, image: Tensor) -> Tensor:
        """(P, 4) ``xyxy`` boxes for one (3, H, W) uint8 RGB image."""
        import cv2

        h, w = int(image.shape[1]), int(image.shape[2])
        scale = min(1.0, self.max_side / max(h, w))
        rgb = image.permute(1, 2, 0).cpu().numpy()
        if scale < 1.0:
            rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        ss = self._ss.createSelectiveSearchSegmentation()
        ss.setBaseImage(np.ascontiguousarray(rgb[:, :, ::-1]))  # OpenCV works in BGR
        (ss.switchToSelectiveSearchFast if self.mode == "fast" else ss.switchToSelectiveSearchQuality)()
        rects = ss.process()  # (N, 4) x, y, w, h, most promising first
        if len(rects) == 0:
            return torch.zeros((0, 4))
        boxes = B.clip_boxes(B.xywh_to_xyxy(torch.as_tensor(np.asarray(rects, dtype=np.float32)) / scale), w, h)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= self.min_size) & ((boxes[:, 3] - boxes[:, 1]) >= self.min_size)
        return boxes[keep][: self.topk]

    def forward(self, batch: list[dict], images=None, features=None) -> Proposals:
        return Proposals([self.boxes_for(item["image"]) for item in batch], None)


# torchvision's COCO Faster R-CNN weights (FasterRCNN_ResNet50_FPN_Weights.COCO_V1) and their file in torch's cache.
TORCHVISION_RPN_FILE = "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"


def torchvision_rpn_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file to use: ``path``, else torchvision's file in torch's hub cache; a one-line error saying where
    it was looked for and how to get it otherwise."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RclipError(f"torchvision Faster R-CNN weights not found: {p}")
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_RPN_FILE
    if not cached.is_file():
        raise RclipError(f"torchvision's COCO Faster R-CNN weights are not in torch's cache ({cached}); on a machine "
                         "with network run `python -c \"import torchvision; torchvision.models.detection."
                         "fasterrcnn_resnet50_fpn(weights='DEFAULT')\"` and copy the file there, or give its path "
                         "(--regions torchvision-rpn:FILE)")
    return cached


class TorchvisionRPN(nn.Module):
    """The RPN of torchvision's ``fasterrcnn_resnet50_fpn`` (COCO) proposing class-agnostic boxes.

    Its own input convention (ImageNet mean/std, RGB, resized by torchvision's transform to shorter side 800) and
    its own trunk; objectness comes back as logits (torchvision returns sigmoid probabilities; they are inverted so
    ``zeroshot.score_fusion`` treats every RPN alike).

    Args:
        weights: a state-dict file of ``fasterrcnn_resnet50_fpn`` (see :func:`torchvision_rpn_weights`).
        topk: proposals per image after NMS (the recipe's ``zeroshot.num_proposals``; torchvision's test default is
            1000 too).
    """

    def __init__(self, weights: str | os.PathLike, *, topk: int) -> None:
        super().__init__()
        from torchvision.models.detection import fasterrcnn_resnet50_fpn

        from rclip_core.checkpoint import check_state_dict, read_state_dict

        model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, rpn_post_nms_top_n_test=topk)
        state = read_state_dict(weights)
        check_state_dict(model, state, str(weights))
        model.load_state_dict(state)
        self.transform, self.backbone, self.rpn = model.transform, model.backbone, model.rpn
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> TorchvisionRPN:
        return super().train(False)  # frozen

    @torch.no_grad()
    def forward(self, batch: list[dict], images=None, features=None) -> Proposals:
        device = next(self.parameters()).device
        originals = [item["image"].to(device).float() / 255.0 for item in batch]
        image_list, _ = self.transform(originals)
        feats = self.backbone(image_list.tensors)
        rpn = self.rpn
        feature_list = list(feats.values())
        objectness, deltas = rpn.head(feature_list)
        anchors = rpn.anchor_generator(image_list, feature_list)
        counts = [o[0].numel() for o in objectness]
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
        boxes, probs = rpn.filter_proposals(proposals, objectness, image_list.image_sizes, counts)
        out_boxes, out_logits = [], []
        for b, p, (h, w), orig in zip(boxes, probs, image_list.image_sizes, originals):
            sy, sx = orig.shape[1] / h, orig.shape[2] / w  # back to the batch image's pixels
            out_boxes.append(B.scale_boxes(b, sx, sy).cpu())
            p = p.clamp(1e-6, 1 - 1e-6)
            out_logits.append(torch.log(p / (1 - p)).cpu())
        return Proposals(out_boxes, out_logits)


def is_finite_number(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
