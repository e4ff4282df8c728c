"""The offline region proposal network: a ResNet (C4 or FPN) RPN assembled from torchvision parts.

RegionCLIP takes its regions from an RPN trained on base-category boxes only (paper §3.1 "region proposals", §4.1):
the release runs the backbone and RPN of a detectron2 Mask R-CNN as ``offline_backbone`` /
``offline_proposal_generator`` (regionclip_facts.md §1.1, §1.2) — R50-C4 for COCO, R50-FPN for LVIS (the LVIS-866
RPN serves pretraining and zero-shot inference).

Built from ``torchvision.models.resnet*`` (with ``FrozenBatchNorm2d``), ``IntermediateLayerGetter`` /
``BackboneWithFPN`` (``FeaturePyramidNetwork`` + ``LastLevelMaxPool``), ``AnchorGenerator``, ``RPNHead`` and
``RegionProposalNetwork``. Where torchvision's parts differ from detectron2's in a way that changes proposals, this
module follows detectron2, so the released ``rpn_*.pth`` files give the same proposals after conversion
(``rclip_core.rpn.convert``):

- **Stride in the 1×1 conv** (``rpn.stride_in_1x1``): MSRA ResNets stride in the first 1×1 conv of a stage's first
  bottleneck, torchvision in the 3×3; the strides are moved after construction.
- **Anchors**: detectron2 lists a level's cell anchors size-major (for size: for ratio), torchvision ratio-major; it
  also rounds them and derives each level's stride from the padded size over the grid size, which is wrong where a
  grid is rounded up (P6, odd sizes). :class:`Detectron2AnchorGenerator` builds them detectron2's way, so the
  head's output channels need no permutation.
- **Proposals keep raw objectness logits** (the zero-shot score fusion multiplies by them), where torchvision's
  ``filter_proposals`` returns sigmoid probabilities; NMS then also runs on logits, so saturated probabilities
  cannot tie. Non-finite boxes are dropped and boxes must be wider and taller than ``min_box_size``.
- **Losses** are detectron2's: L1 on sampled positives (``SMOOTH_L1_BETA`` 0) and binary cross-entropy on sampled
  anchors, both summed and divided by ``batch_size_per_image × B``.

Input convention (detectron2's): the same resized image as the CLIP branch, channels flipped to BGR, ``(x - mean) /
std`` on 0-255 pixels (mean [103.53, 116.28, 123.675], std 1), zero-padded (after normalisation) to a multiple of 32
for FPN.

Shapes: B images, P proposals per image, A anchors per location, L feature levels, H_l × W_l the grid of level l,
N = Σ_l H_l·W_l·A anchors per image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import ResNet, get_weight, resnet18, resnet34, resnet50, resnet101
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from rclip_core.data.transforms import ImageNormalizer
from rclip_core.errors import RclipError
from rclip_core.recipes import RpnCfg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Architecture facts of one RPN layout and its detectron2 top-k defaults (used where the recipe says null)."""

    return_layers: dict[str, str]  # torchvision ResNet stage -> feature name
    strides: tuple[int, ...]  # of the feature maps the RPN head sees
    size_divisibility: int  # images are zero-padded to a multiple of this (0: only to the batch's largest)
    pre_nms_topk_train: int  # per level
    pre_nms_topk_test: int  # per level
    post_nms_topk_train: int


# One explicit table (design §4.3). Values: detectron2 configs Base-RCNN-C4.yaml / Base-RCNN-FPN.yaml.
LAYOUTS: dict[str, Layout] = {
    "c4": Layout(return_layers={"layer3": "res4"}, strides=(16,), size_divisibility=0,
                 pre_nms_topk_train=12000, pre_nms_topk_test=6000, post_nms_topk_train=2000),
    "fpn": Layout(return_layers={"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"},
                  strides=(4, 8, 16, 32, 64), size_divisibility=32,
                  pre_nms_topk_train=2000, pre_nms_topk_test=1000, post_nms_topk_train=1000),
}


def resnet10(*, weights: None = None, norm_layer: Callable[[int], nn.Module] | None = None) -> ResNet:
    """torchvision's ``ResNet`` with one basic block per stage: a trunk small enough to train on a CPU in a minute
    (the toy-world recipe). There are no ImageNet weights for it."""
    return ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=norm_layer)


RESNETS: dict[int, Callable[..., ResNet]] = {10: resnet10, 18: resnet18, 34: resnet34, 50: resnet50, 101: resnet101}

NORMS: dict[str, Callable[[int], nn.Module]] = {
    "FrozenBN": FrozenBatchNorm2d,
    "BN": nn.BatchNorm2d,
    "GN": lambda channels: nn.GroupNorm(32, channels),
}


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise RclipError(f"unknown RPN layout {name!r}; available: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


# ---------------------------------------------------------------------------------------------------------------
# trunk


def stage_channels(trunk: ResNet) -> list[int]:
    """Output channels of ``layer1..layer4``, read from the blocks (256..2048 for bottlenecks, 64..512 for basic)."""
    out = []
    for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4):
        last = layer[-1]
        out.append(last.conv3.out_channels if isinstance(last, Bottleneck) else last.conv2.out_channels)
    return out


def move_stride_to_1x1(trunk: ResNet) -> int:
    """Put each strided bottleneck's stride in its first 1×1 conv instead of the 3×3 (MSRA / detectron2
    ``STRIDE_IN_1X1``). Basic blocks have no 1×1 conv and are left alone. Returns how many blocks changed."""
    changed = 0
    for module in trunk.modules():
        if isinstance(module, Bottleneck) and module.conv2.stride != (1, 1):
            module.conv1.stride, module.conv2.stride = module.conv2.stride, (1, 1)
            changed += 1
    return changed


def load_imagenet_weights(trunk: ResNet, depth: int, norm: str) -> bool:
    """Initialise ``trunk`` from torchvision's ImageNet weights; on any failure keep the random init and say so.

    The weights were trained with the stride in the 3×3 conv and RGB input normalised by ImageNet mean/std; recipes
    that train from them set ``stride_in_1x1: false`` and that input convention (see recipes/rpn_*.yaml).
    """
    if norm == "GN":
        log.info("ResNet-%d trunk: random init (ImageNet weights are for batch norm, not GN)", depth)
        return False
    try:
        weights = get_weight(f"ResNet{depth}_Weights.IMAGENET1K_V1")
    except (KeyError, ValueError):
        log.info("ResNet-%d trunk: random init (torchvision has no ImageNet weights for it)", depth)
        return False
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as e:  # offline machine, proxy, corrupt cache: all mean "no weights", none is fatal
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("ResNet-%d trunk: random init (torchvision's ImageNet weights could not be loaded: %s)",
                    depth, reason)
        return False
    trunk.load_state_dict(state)  # FrozenBatchNorm2d drops BN's num_batches_tracked itself
    log.info("ResNet-%d trunk: initialised from torchvision's ImageNet weights (%s)", depth, weights.url)
    return True


def build_trunk(cfg: RpnCfg, *, imagenet_init: bool | None = None) -> ResNet:
    """The torchvision ResNet of ``cfg`` (depth, norm, stride placement), ImageNet-initialised when asked."""
    if cfg.depth not in RESNETS:
        raise RclipError(f"rpn.depth {cfg.depth} is not available; choose one of {sorted(RESNETS)}")
    trunk = RESNETS[cfg.depth](weights=None, norm_layer=NORMS[cfg.norm])
    if cfg.imagenet_init if imagenet_init is None else imagenet_init:
        loaded = load_imagenet_weights(trunk, cfg.depth, cfg.norm)
        if loaded and (cfg.stride_in_1x1 or cfg.input_format != "RGB" or cfg.pixel_std == [1.0, 1.0, 1.0]):
            log.warning("torchvision's ImageNet weights expect the stride in the 3x3 conv and RGB input normalised by "
                        "ImageNet mean/std; this recipe has stride_in_1x1=%s, input_format=%s, pixel_std=%s (see "
                        "recipes/rpn_r50c4_coco_base.yaml)", cfg.stride_in_1x1, cfg.input_format, cfg.pixel_std)
    else:
        log.debug("ResNet-%d trunk: random init (imagenet_init off)", cfg.depth)
    if cfg.stride_in_1x1:
        move_stride_to_1x1(trunk)
    return trunk


class ResNetC4(nn.Module):
    """The ResNet trunk up to res4 (stride 16): images (B, 3, H, W) → ``{"res4": (B, C, ⌈H/16⌉, ⌈W/16⌉)}``."""

    def __init__(self, trunk: ResNet) -> None:
        super().__init__()
        self.body = IntermediateLayerGetter(trunk, return_layers=LAYOUTS["c4"].return_layers)
        self.out_channels = stage_channels(trunk)[2]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.body(x)


def build_backbone(cfg: RpnCfg, *, imagenet_init: bool | None = None) -> nn.Module:
    """``ResNetC4`` or torchvision's ``BackboneWithFPN`` (P2-P6, ``LastLevelMaxPool``); both have ``out_channels``."""
    layout = get_layout(cfg.layout)
    trunk = build_trunk(cfg, imagenet_init=imagenet_init)
    if cfg.layout == "c4":
        return ResNetC4(trunk)
    return BackboneWithFPN(trunk, return_layers=layout.return_layers, in_channels_list=stage_channels(trunk),
                           out_channels=cfg.fpn_channels, extra_blocks=LastLevelMaxPool(),
                           norm_layer=NORMS[cfg.norm] if cfg.fpn_norm else None)


# ---------------------------------------------------------------------------------------------------------------
# anchors and proposals


class Detectron2AnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` with detectron2's anchors (``DefaultAnchorGenerator``).

    Cell anchors are listed size-major (for size: for ratio), with width ``sqrt(size² / ratio)`` and height ``ratio
    × width`` computed in float64 and not rounded; each level has a fixed stride, and the anchors of a location sit at
    ``(offset + (i, j)) × stride``.

    Args:
        sizes: per level, the anchor sizes (sqrt of area) in input pixels.
        aspect_ratios: per level, height / width ratios.
        strides: per level, the feature map's stride in input pixels.
        offset: detectron2's ANCHOR_GENERATOR.OFFSET (0.0 in its defaults).
    """

    def __init__(self, sizes: tuple[tuple[float, ...], ...], aspect_ratios: tuple[tuple[float, ...], ...], *,
                 strides: tuple[int, ...], offset: float = 0.0) -> None:
        if not len(sizes) == len(aspect_ratios) == len(strides):
            raise ValueError("one entry of sizes, aspect_ratios and strides per feature level is needed")
        super().__init__(sizes, aspect_ratios)
        self.strides = tuple(strides)
        self.offset = offset

    def generate_anchors(self, scales: list[float], aspect_ratios: list[float], dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device("cpu")) -> Tensor:
        """Zero-centred ``xyxy`` cell anchors (len(scales) × len(ratios), 4), size-major."""
        sizes = torch.as_tensor(scales, dtype=torch.float64)[:, None]  # (S, 1)
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float64)[None, :]  # (1, R)
        widths = torch.sqrt(sizes**2 / ratios)  # (S, R); flattening it row-major gives the size-major order
        heights = ratios * widths
        anchors = torch.stack([-widths / 2, -heights / 2, widths / 2, heights / 2], dim=-1)  # (S, R, 4)
        return anchors.reshape(-1, 4).to(dtype=dtype, device=device)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """Anchors of every image, (N, 4) each: levels in order, then locations row-major, then cell anchors."""
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        if self.offset:
            per_level = [a + self.offset * s for a, s in zip(per_level, self.strides)]
        anchors = torch.cat(per_level)
        return [anchors for _ in image_list.image_sizes]


class LogitRPN(RegionProposalNetwork):
    """torchvision's ``RegionProposalNetwork`` with detectron2's proposal selection and losses.

    ``filter_proposals`` returns raw objectness logits (torchvision: sigmoid probabilities) and follows detectron2's
    ``find_top_rpn_proposals``: top-k per level, drop non-finite, clip to the image, drop boxes not wider/taller than
    ``min_box_size``, NMS per level, top-k overall. ``compute_loss`` is detectron2's ``RPN.losses``.
    """

    def __init__(self, anchor_generator: AnchorGenerator, head: nn.Module, *, fg_iou_thresh: float,
                 bg_iou_thresh: float, batch_size_per_image: int, positive_fraction: float,
                 pre_nms_top_n: dict[str, int], post_nms_top_n: dict[str, int], nms_thresh: float,
                 min_box_size: float = 0.0) -> None:
        super().__init__(anchor_generator, head, fg_iou_thresh, bg_iou_thresh, batch_size_per_image,
                         positive_fraction, pre_nms_top_n, post_nms_top_n, nms_thresh)
        self.min_box_size = min_box_size

    def forward(self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        """Proposals, their logits and (in training) losses.

        torchvision's ``forward`` drops the proposal scores; this one is the same sequence of its parts but returns
        them.

        Args:
            images: the normalised, padded batch with the unpadded (h, w) of each image.
            features: the backbone's feature maps, levels in order.
            targets: per image ``{"boxes": (G_i, 4)}``: the losses are computed when given.

        Returns:
            (B tensors (P, 4), B tensors (P,) raw logits, ``{"loss_objectness", "loss_rpn_box_reg"}`` or ``{}``).
        """
        feature_list = list(features.values())
        objectness, pred_bbox_deltas = self.head(feature_list)  # per level (B, A, H, W), (B, 4A, H, W)
        anchors = self.anchor_generator(images, feature_list)  # B × (N, 4)
        num_anchors_per_level = [int(o[0].numel()) for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)  # (B·N, 1), (B·N, 4)
        # Detached: proposals are not back-propagated (approximate joint training, as detectron2 and torchvision).
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, logits = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        losses: dict[str, Tensor] = {}
        if targets is not None:
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_cls, loss_box = self.compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)
            losses = {"loss_objectness": loss_cls, "loss_rpn_box_reg": loss_box}
        return boxes, logits, losses

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: boxes (P, 4) ``xyxy`` in input pixels and their raw logits (P,), best first.

        Args:
            proposals: (B, N, 4) decoded boxes of every anchor.
            objectness: (B·N, 1) logits.
            image_shapes: (h, w) of each image before padding.
            num_anchors_per_level: H_l·W_l·A per level.
        """
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)  # (B, N); proposals are not back-propagated
        levels = torch.cat([torch.full((n,), lvl, dtype=torch.int64, device=device)
                            for lvl, n in enumerate(num_anchors_per_level)])  # (N,)
        top_idx = self._get_top_n_idx(objectness, num_anchors_per_level)  # (B, K): best of each level, in level order
        batch = torch.arange(num_images, device=device)[:, None]
        boxes_all, logits_all, levels_all = proposals[batch, top_idx], objectness[batch, top_idx], levels[top_idx]

        out_boxes, out_logits = [], []
        for boxes, logits, lvl, shape in zip(boxes_all, logits_all, levels_all, image_shapes):
            valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(logits)
            if not bool(valid.all()):
                if self.training:
                    raise FloatingPointError("the RPN predicted non-finite boxes or scores: training has diverged")
                boxes, logits, lvl = boxes[valid], logits[valid], lvl[valid]
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            keep = ((boxes[:, 2] - boxes[:, 0]) > self.min_box_size) & ((boxes[:, 3] - boxes[:, 1]) > self.min_box_size)
            boxes, logits, lvl = boxes[keep], logits[keep], lvl[keep]
            keep = box_ops.batched_nms(boxes, logits, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            out_boxes.append(boxes[keep])
            out_logits.append(logits[keep])
        return out_boxes, out_logits

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(objectness loss, box loss) over ``batch_size_per_image`` sampled anchors per image.

        Args:
            objectness: (B·N, 1) logits.
            pred_bbox_deltas: (B·N, 4).
            labels: B tensors (N,): 1 foreground, 0 background, -1 ignored.
            regression_targets: B tensors (N, 4) encoded matched boxes.
        """
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        pos = torch.cat(sampled_pos).bool()  # (B·N,)
        sampled = pos | torch.cat(sampled_neg).bool()
        targets = torch.cat(regression_targets)  # (B·N, 4)
        normalizer = self.fg_bg_sampler.batch_size_per_image * len(labels)
        box_loss = F.l1_loss(pred_bbox_deltas[pos], targets[pos], reduction="sum") / normalizer
        cls_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels)[sampled],
                                                      reduction="sum") / normalizer
        return cls_loss, box_loss


def build_anchor_generator(cfg: RpnCfg) -> Detectron2AnchorGenerator:
    """All sizes at the one C4 level, or one size per FPN level; the same ratios everywhere."""
    layout = get_layout(cfg.layout)
    sizes = tuple(float(s) for s in cfg.anchor_sizes)
    ratios = tuple(float(r) for r in cfg.aspect_ratios)
    if not sizes or not ratios:
        raise RclipError("rpn.anchor_sizes and rpn.aspect_ratios must not be empty")
    if len(layout.strides) == 1:
        per_level = (sizes,)
    elif len(sizes) == len(layout.strides):
        per_level = tuple((s,) for s in sizes)
    else:
        raise RclipError(f"rpn.anchor_sizes: the {cfg.layout} layout has {len(layout.strides)} levels and takes one "
                         f"size per level, got {len(sizes)}: {list(sizes)}")
    return Detectron2AnchorGenerator(per_level, (ratios,) * len(per_level), strides=layout.strides,
                                     offset=cfg.anchor_offset)


# ---------------------------------------------------------------------------------------------------------------
# the model


@dataclass
class RPNOutput:
    """What :class:`RPNModel` returns: per image, proposals (P, 4) ``xyxy`` in the input image's pixels and their raw
    objectness logits (P,), best first; the RPN losses when targets were given (else empty)."""

    boxes: list[Tensor]
    objectness: list[Tensor]
    losses: dict[str, Tensor]


class RPNModel(nn.Module):
    """A standalone RPN: its own input convention, ResNet backbone and proposal network.

    Args:
        transform: RGB uint8 images → normalised, padded ``ImageList`` in this RPN's convention
            (:class:`rclip_core.data.transforms.ImageNormalizer`: BGR, detectron2 mean, 0-255, for converted
            original RPNs; padded to 32 for FPN).
        backbone: normalised images (B, 3, H, W) → an ordered dict of feature maps; has ``out_channels``.
        rpn: a :class:`LogitRPN` over those feature maps.

    Example:
        >>> model = build_rpn(load_recipe(None, ["rpn.layout=c4"]).rpn).eval()
        >>> out = model([torch.zeros(3, 480, 640, dtype=torch.uint8)])
        >>> out.boxes[0].shape, out.objectness[0].shape             # (P, 4), (P,)
    """

    def __init__(self, transform: ImageNormalizer, backbone: nn.Module, rpn: LogitRPN) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> RPNOutput:
        """Proposals, and losses when ``targets`` are given.

        Args:
            images: RGB images (3, H_i, W_i), uint8 (or float on 0-255), already resized like the CLIP branch.
            targets: per image ``{"boxes": (G_i, 4) xyxy}`` in the same pixels (G_i may be 0).

        Returns:
            :class:`RPNOutput`. The top-k before and after NMS are the training ones in training mode.
        """
        if len(images) == 0:
            return RPNOutput([], [], {})
        image_list = self.transform(images)
        features = self.backbone(image_list.tensors)
        if targets is not None:
            device = image_list.tensors.device
            targets = [{"boxes": t["boxes"].to(device, torch.float32).reshape(-1, 4)} for t in targets]
        boxes, logits, losses = self.rpn(image_list, features, targets)
        if losses:
            losses = {"loss_rpn_cls": losses["loss_objectness"], "loss_rpn_box": losses["loss_rpn_box_reg"]}
        return RPNOutput(boxes, logits, losses)


def topk_settings(cfg: RpnCfg) -> tuple[dict[str, int], dict[str, int]]:
    """(pre-NMS, post-NMS) top-k for training and testing, the layout's defaults filling the recipe's nulls."""
    layout = get_layout(cfg.layout)

    def pick(value: int | None, default: int) -> int:
        return default if value is None else value

    pre = {"training": pick(cfg.pre_nms_topk_train, layout.pre_nms_topk_train),
           "testing": pick(cfg.pre_nms_topk_test, layout.pre_nms_topk_test)}
    post = {"training": pick(cfg.post_nms_topk_train, layout.post_nms_topk_train), "testing": cfg.post_nms_topk_test}
    return pre, post


def build_rpn(cfg: RpnCfg, *, imagenet_init: bool | None = None, seed: int = 0) -> RPNModel:
    """An :class:`RPNModel` from an ``rpn`` recipe section.

    Args:
        cfg: layout, depth, norm, anchors, top-k, NMS, input convention.
        imagenet_init: overrides ``cfg.imagenet_init`` (False when weights will be loaded anyway).
        seed: seeds the random initialisation (without touching the caller's random state), so the same recipe
            builds the same network every time.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_rpn(cfg, imagenet_init)


def _build_rpn(cfg: RpnCfg, imagenet_init: bool | None) -> RPNModel:
    if len(cfg.iou_thresholds) != 2 or cfg.iou_thresholds[0] > cfg.iou_thresholds[1]:
        raise RclipError(f"rpn.iou_thresholds must be [background_below, foreground_from], got {cfg.iou_thresholds}")
    if cfg.head_convs < 1:
        raise RclipError(f"rpn.head_convs must be at least 1, got {cfg.head_convs}")
    layout = get_layout(cfg.layout)
    anchors = build_anchor_generator(cfg)
    backbone = build_backbone(cfg, imagenet_init=imagenet_init)
    head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0], conv_depth=cfg.head_convs)
    pre, post = topk_settings(cfg)
    rpn = LogitRPN(anchors, head, fg_iou_thresh=cfg.iou_thresholds[1], bg_iou_thresh=cfg.iou_thresholds[0],
                   batch_size_per_image=cfg.batch_size_per_image, positive_fraction=cfg.positive_fraction,
                   pre_nms_top_n=pre, post_nms_top_n=post, nms_thresh=cfg.nms_thresh, min_box_size=cfg.min_box_size)
    transform = ImageNormalizer(cfg.pixel_mean, cfg.pixel_std, pixel_scale=1.0, bgr=cfg.input_format == "BGR",
                                size_divisibility=layout.size_divisibility, pad_single=True)
    return RPNModel(transform, backbone, rpn)


@torch.no_grad()
def propose(model: RPNModel, images: list[Tensor]) -> RPNOutput:
    """Proposals for RGB uint8 images already resized like the CLIP branch (puts ``model`` in eval mode)."""
    return model.eval()(images)


def freeze_stages(model: RPNModel, freeze_at: int) -> None:
    """Stop gradients into the stem (``freeze_at`` ≥ 1) and ``layer1..layer{freeze_at - 1}`` (detectron2 FREEZE_AT)."""
    body = model.backbone.body
    frozen = (["conv1", "bn1"] if freeze_at >= 1 else []) + [f"layer{i}" for i in range(1, freeze_at)]
    for name in frozen:
        if hasattr(body, name):
            getattr(body, name).requires_grad_(False)


def num_cell_anchors(model: RPNModel) -> list[int]:
    """Anchors per location at each feature level (15 for R50-C4, 3 at each of five levels for FPN)."""
    return model.rpn.anchor_generator.num_anchors_per_location()

