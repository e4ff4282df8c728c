"""torchvision's compiled detection ops (``roi_align``, ``nms``) without importing torchvision's Python package.

Why: ``import torchvision`` runs ``torchvision.models`` and ``torchvision.ops``, whose ``roi_align`` module imports
``torch._dynamo`` (and sympy): about 1.8 s of a quiet 2-core machine's time, a tenth of a whole ``rclip zeroshot
--gt-boxes`` run on three photos. The ops themselves live in torchvision's compiled extension, which registers them
with torch (``torch.ops.torchvision.*``) when it is loaded; loading that one file is enough for inference.

Gradients: the extension's autograd formulas are registered by torchvision's Python package
(``torchvision._autograd_registrations``), so a call that needs a gradient goes through ``torchvision.ops`` itself
(imported then). Where the extension cannot be found (a different torchvision layout), everything falls back to
``import torchvision``: the same ops, only the import cost comes back.

Results are torchvision's: the same compiled kernels, and :func:`batched_nms` follows ``torchvision.ops.batched_nms``'s
rule for choosing between its two strategies (tested equal).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

import torch
from torch import Tensor

_loaded = False


def _extension_path() -> str | None:
    """The compiled extension's file inside the installed torchvision package, found without running its
    ``__init__``; None when there is none we know."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    finder = importlib.machinery.FileFinder(
        spec.submodule_search_locations[0],
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
    for name in ("_C_stable", "_C"):  # the name changed across torchvision releases
        found = finder.find_spec(name)
        if found is not None and found.origin and os.path.isfile(found.origin):
            return found.origin
    return None


def ensure_ops() -> None:
    """Make ``torch.ops.torchvision.roi_align`` / ``nms`` available, loading only the extension when torchvision is
    not imported yet (see the module docstring); falls back to ``import torchvision``."""
    global _loaded
    if _loaded:
        return
    if "torchvision" not in sys.modules:
        path = _extension_path()
        if path is not None:
            try:
                torch.ops.load_library(path)
            except (OSError, RuntimeError):  # not loadable alone: torchvision's own import reports why
                pass
    if not (hasattr(torch.ops.torchvision, "roi_align") and hasattr(torch.ops.torchvision, "nms")):
        import torchvision  # noqa: F401  registers the ops (and reports a broken install in its own words)
    _loaded = True


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def roi_align(features: Tensor, boxes: Tensor | list[Tensor], output_size: int, spatial_scale: float,
              sampling_ratio: int, aligned: bool) -> Tensor:
    """``torchvision.ops.roi_align``: features (B, C, H, W), boxes as B tensors (R_i, 4) ``xyxy`` or (R, 5) rows led
    by the image index → (R, C, output_size, output_size)."""
    if _needs_grad(features, *(boxes if isinstance(boxes, list) else [boxes])):
        from torchvision.ops import roi_align as tv_roi_align

        return tv_roi_align(features, boxes, output_size=output_size, spatial_scale=spatial_scale,
                            sampling_ratio=sampling_ratio, aligned=aligned)
    ensure_ops()
    if isinstance(boxes, list):
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
    else:
        rois = boxes
    return torch.ops.torchvision.roi_align(features, rois.to(features.dtype), spatial_scale, output_size,
                                           output_size, sampling_ratio, aligned)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision.ops.nms``: indices of the kept boxes (N, 4) ``xyxy``, by decreasing score."""
    ensure_ops()
    return torch.ops.torchvision.nms(boxes, scores, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision.ops.batched_nms``: NMS within each class, boxes (N, 4), scores (N,), classes (N,) → kept
    indices by decreasing score.

    Two ways to the same set, chosen by size as torchvision does (so that the kept boxes are torchvision's to the
    bit): small inputs shift each class's boxes by its own offset, so that no two classes overlap, and run one NMS;
    large ones run one NMS per class (the shifted coordinates would lose float precision and one big NMS is slower
    than many small ones).
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.numel() > (4000 if boxes.device.type == "cpu" else 100_000):
        kept = torch.zeros_like(scores, dtype=torch.bool)
        for c in torch.unique(classes):
            members = torch.where(classes == c)[0]
            kept[members[nms(boxes[members], scores[members], iou_threshold)]] = True
        idx = torch.where(kept)[0]
        return idx[scores[idx].sort(descending=True)[1]]
    shift = classes.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return nms(boxes + shift[:, None], scores, iou_threshold)
