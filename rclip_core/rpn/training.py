"""Training the RPN on base-category boxes, as a stage of the one engine (``rclip_core.engine``).

The original trains its RPNs as part of a Mask R-CNN on base categories only (regionclip_facts.md §1.2): R50-C4 on
COCO's 48 base classes, R50-FPN on LVIS's 866 common + frequent ones. Here the RPN trains alone with the same solver
(detectron2's Base-RCNN: SGD, linear warm-up, step decay; ``recipes.RpnTrainCfg``): the stage is the model, the pure
:func:`rpn_losses` and a :class:`~rclip_core.data.coco.DetectionDataset` with detectron2's training augmentation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from rclip_core import engine
from rclip_core.data.coco import DetectionDataset
from rclip_core.recipes import RpnTrainCfg
from rclip_core.rpn.model import RPNModel, freeze_stages


def rpn_losses(model: torch.nn.Module, batch: list[dict]) -> dict[str, Tensor]:
    """``{"loss_rpn_cls", "loss_rpn_box"}`` of a batch of dataset items (uint8 images, GT boxes)."""
    return model([item["image"] for item in batch], [{"boxes": item["boxes"]} for item in batch]).losses


def train_rpn(model: RPNModel, dataset: DetectionDataset, cfg: RpnTrainCfg, *, recipe: dict,
              out_dir: str | os.PathLike | None, resume: bool = False, device: str | torch.device = "cpu",
              hooks: Sequence[engine.Hook] = ()) -> engine.TrainResult:
    """Train ``model`` in place (stages up to ``cfg.freeze_at`` frozen) for ``cfg.steps`` steps; checkpoints and
    metrics go to ``out_dir`` (``checkpoint.pt`` holds the full recipe, so ``rclip rpn propose`` rebuilds it)."""
    freeze_stages(model, cfg.freeze_at)
    return engine.train(model, rpn_losses, dataset, cfg, out_dir=out_dir, recipe=recipe, resume=resume,
                        section="rpn.train", device=device, hooks=hooks)
