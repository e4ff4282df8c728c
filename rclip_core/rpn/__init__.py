"""The offline region proposal network (RPN) of RegionCLIP, from torchvision parts with detectron2's behaviour.

- :mod:`~rclip_core.rpn.model`: ``build_rpn(cfg) -> RPNModel`` (C4 or FPN ResNet RPN), ``propose``;
- :mod:`~rclip_core.rpn.convert`: the original's detectron2 RPN checkpoints ⇄ ours, ``load_rpn``;
- :mod:`~rclip_core.rpn.data`: base-category training data, images to propose on;
- :mod:`~rclip_core.rpn.training`: ``train_rpn`` (detectron2's solver, resumable);
- :mod:`~rclip_core.rpn.proposals`: ``run_proposals`` over a dataset → the proposals file ``rclip zeroshot`` reads.
"""

from rclip_core.rpn.convert import convert_rpn_checkpoint, convert_rpn_state_dict, load_rpn, to_detectron2_state_dict
from rclip_core.rpn.model import LAYOUTS, RPNModel, build_rpn, propose
from rclip_core.rpn.proposals import run_proposals
from rclip_core.rpn.training import train_rpn

__all__ = ["LAYOUTS", "RPNModel", "build_rpn", "convert_rpn_checkpoint", "convert_rpn_state_dict", "load_rpn",
           "propose", "run_proposals", "to_detectron2_state_dict", "train_rpn"]
