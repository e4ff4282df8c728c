"""Recipes: typed, nested dataclasses loaded strictly from YAML, with ``--set a.b=value`` overrides.

Each default is defined once, here. A recipe file lists only what differs. Loading rejects an unknown key with its
dotted path and the valid keys, and a value of the wrong type with the expected type; the resolved recipe is saved
beside every output (:func:`save_recipe`) and inside checkpoints.

Defaults follow the original RegionCLIP release (see the README's "Differences" section for where we deviate):
CLIP pixel mean/std, shorter side 800 / longer at most 1333 at test time, temperature 0.01, an all-zero background
column in the softmax, score threshold 0.001, class-specific NMS 0.5 and 100 detections per image (COCO zero-shot).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from rclip_core.errors import RclipError


def within(lo: float | None, hi: float | None) -> dict:
    """Field metadata: the valid closed range of a number (None = unbounded); checked when a recipe is built."""
    return {"range": (lo, hi)}


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class ModelCfg:
    """Which CLIP and which weights.

    ``variant`` is a name from ``clip_backbone.VARIANTS`` (RN50, RN50x4, tiny), or ``null``: the variant the weights
    file records (an rclip checkpoint's recipe) or its shapes identify, else RN50. ``weights`` is an open_clip
    pretrained tag (``openai``), a local ``.pt``/``.pth``/``.safetensors`` file (ours, OpenAI's, or a converted
    RegionCLIP one), or ``null`` for random initialisation.
    """

    variant: str | None = None
    weights: str | None = None
    # RoIAlign output size; null = the variant's native attention-pool grid × 2 (14 for RN50, 18 for RN50x4).
    pooler_resolution: int | None = None


@dataclass
class InputCfg:
    """Detection-style preprocessing (detectron2 ResizeShortestEdge at test time, CLIP normalisation)."""

    min_size: int = field(default=800, metadata=within(1, None))
    max_size: int = field(default=1333, metadata=within(1, None))
    pixel_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    pixel_std: list[float] = field(default_factory=lambda: list(CLIP_STD))


@dataclass
class TextCfg:
    """Prompting for ``rclip embed``: ``single`` ("a photo of a {}.") or ``ensemble`` (the original's 81 templates)."""

    templates: Literal["single", "ensemble"] = "single"
    batch_size: int = 256
    # Cut token sequences after the longest end-of-text position in a batch: same features, far less compute.
    truncate: bool = True


@dataclass
class ZeroShotCfg:
    """Region classification and post-processing (regionclip_facts.md §3)."""

    temperature: float = field(default=0.01, metadata=within(1e-6, None))
    # Append the all-zero background embedding (logit 0) to the softmax, as the original does.
    background: bool = True
    score_thresh: float = field(default=0.001, metadata=within(0, 1))
    nms_thresh: float = field(default=0.5, metadata=within(0, 1))
    max_dets: int = field(default=100, metadata=within(1, None))
    # How RPN objectness joins class probability when proposals are given: sqrt(p * raw logit) as the original
    # ("raw_logit", can give NaN rows that are dropped, or scores above 1), sqrt(p * sigmoid) ("sigmoid"), or "none".
    score_fusion: Literal["raw_logit", "sigmoid", "none"] = "raw_logit"
    # Class-specific NMS: "hard" (nms_thresh; the original's zero-shot configs) or gaussian "soft" NMS (the original's
    # finetuned-detector test scripts: sigma 0.5, scores decayed by exp(-IoU^2 / sigma), pruned below prune).
    nms: Literal["hard", "soft"] = "hard"
    soft_nms_sigma: float = field(default=0.5, metadata=within(1e-6, None))
    soft_nms_prune: float = field(default=0.001, metadata=within(0, 1))
    # A finetuned detector's box regression moves its regions (off = keep the proposals, the original's NO_BOX_DELTA).
    box_deltas: bool = True
    # Top-N proposals per image (by objectness) when proposals are given.
    num_proposals: int = field(default=1000, metadata=within(1, None))
    # Selective search (no objectness to rank by beyond OpenCV's order): the first N boxes. Not an original setting:
    # fewer than an RPN's 1000 keeps a first run on a CPU to seconds per photo.
    selective_search_topk: int = field(default=300, metadata=within(1, None))
    batch_size: int = field(default=1, metadata=within(1, None))
    # Image decoding and resizing in DataLoader workers, beside the model; null = one per spare core (at most 4).
    num_workers: int | None = field(default=None, metadata=within(0, None))
    # Speed (README "Benchmarks"): batch norms folded into convolutions and channels-last weights change the
    # probabilities only by float rounding (tested within 1e-4), so they are on; regions go through res5 in chunks
    # of roi_chunk (bounded memory); amp bf16/fp16 autocast is off by default (its effect is reported, not hidden).
    fold_bn: bool = True
    channels_last: bool = True
    roi_chunk: int = field(default=128, metadata=within(1, None))
    amp: Literal["off", "bf16", "fp16"] = "off"
    # torch.compile of the trunk and res5 (README "Benchmarks": measured not to pay on a 2-core CPU, compile time
    # included); where it cannot compile (no C++ compiler, an unsupported op), one WARNING line and eager mode.
    compile: bool = False


@dataclass
class SolverCfg:
    """The training engine's settings (``rclip_core.engine``), shared by every training stage; each stage's section
    extends this class with its own defaults and adds its own fields.

    The schedule multiplies ``lr`` by a linear warm-up from ``warmup_factor`` to 1 over ``warmup_steps``, then either
    by ``lr_gamma`` at each of ``lr_steps`` (``multistep``, detectron2's WarmupMultiStepLR) or by a cosine from 1 to
    ``min_lr_ratio`` at ``steps`` (``cosine``).
    """

    steps: int = field(default=1000, metadata=within(1, None))
    # Images per step over all processes (each of N torchrun processes takes batch_size / N).
    batch_size: int = field(default=16, metadata=within(1, None))
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.02
    momentum: float = 0.9  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = 1e-8  # adamw
    weight_decay: float = 1e-4
    schedule: Literal["multistep", "cosine"] = "multistep"
    warmup_steps: int = 1000
    warmup_factor: float = 0.001
    lr_steps: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    min_lr_ratio: float = 0.0
    # Clip the gradient norm to this (0 = off).
    grad_clip: float = 0.0
    # Mixed precision: bf16 or fp16 autocast on CUDA (bf16 also on CPUs that support it); off = fp32.
    amp: Literal["off", "bf16", "fp16"] = "off"
    seed: int = 0
    # Write OUT/checkpoint.pt every N steps (and at the end, and on Ctrl-C); 0 = only then.
    checkpoint_every: int = 1000
    # DataLoader worker processes; null = one per available core beyond the first, at most 4, and none on two cores
    # or fewer (a worker beside the training process slowed it there: rclip_core/runtime.py).
    num_workers: int | None = field(default=None, metadata=within(0, None))


@dataclass
class ToyWorldCfg:
    """The synthetic scenes of ``rclip_core.data.toyworld`` that ``rclip demo`` generates.

    ``web``: photo-like single-object images with captions, what the teacher learns from (as CLIP learns from web
    photos); ``train``: multi-object scenes with captions and boxes, what region pretraining and the RPN see;
    ``val``: held-out multi-object scenes.
    """

    num_web: int = field(default=1200, metadata=within(1, None))
    num_train: int = field(default=600, metadata=within(1, None))
    num_val: int = field(default=150, metadata=within(1, None))
    image_size: int = field(default=128, metadata=within(32, None))
    max_objects: int = field(default=6, metadata=within(1, 9))
    # Object radii as a multiple of toyworld.SIZE_RANGES: at 1.5 a tiny CNN trained for a few hundred steps tells
    # the shapes apart (at 1.0 the smallest shapes are a single res4 cell and a supervised tiny net reached 46 %
    # on whole single-object images in 300 steps, against 82 % at 1.5).
    size_scale: float = field(default=1.5, metadata=within(0.2, 3))
    # The web images' own side and object scale; null = the scenes' (image_size, size_scale).
    web_image_size: int | None = field(default=None, metadata=within(32, None))
    web_size_scale: float | None = field(default=None, metadata=within(0.2, 3))
    seed: int = 0


@dataclass
class DemoCfg:
    """How ``rclip demo`` chains its stages: each stage's recipe (a shipped name or a file) and the concept pool."""

    teacher: str = "pretrain_tiny_toyworld_teacher"
    rpn: str = "rpn_r10c4_toyworld_base"
    student: str = "pretrain_tiny_toyworld"
    # Concepts kept from the training captions (`rclip vocab build --min-freq`).
    vocab_min_freq: int = field(default=5, metadata=within(1, None))
    # Overrides for one stage's recipe, e.g. ["pretrain.steps=100"] (the demo's --set applies to its own sections).
    teacher_set: list[str] = field(default_factory=list)
    rpn_set: list[str] = field(default_factory=list)
    student_set: list[str] = field(default_factory=list)


# detectron2's input convention for its (MSRA, caffe-style) ResNets: BGR order, 0-255 pixels, mean only.
DETECTRON2_MEAN = [103.53, 116.28, 123.675]


@dataclass
class RpnTrainCfg(SolverCfg):
    """Training the RPN on base-category boxes (detectron2's Base-RCNN solver, as the original's RPNs were trained:
    configs/Base-RCNN-{C4,FPN}.yaml, regionclip_facts.md §1.2): SGD with momentum, linear warm-up, step decay."""

    steps: int = field(default=90000, metadata=within(1, None))  # SOLVER.MAX_ITER
    batch_size: int = field(default=16, metadata=within(1, None))  # SOLVER.IMS_PER_BATCH
    lr: float = 0.02  # SOLVER.BASE_LR
    lr_steps: list[int] = field(default_factory=lambda: [60000, 80000])
    checkpoint_every: int = 5000
    # Shorter side drawn per image from this list (INPUT.MIN_SIZE_TRAIN), longer side at most max_size.
    min_sizes: list[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    max_size: int = 1333
    hflip: bool = True
    # "base": drop novel categories (data.categories.category_splits) and images left without boxes.
    categories: Literal["base", "all"] = "base"
    # Frozen stages: 1 = stem, 2 = stem + res2 (BACKBONE.FREEZE_AT); 0 trains everything.
    freeze_at: int = 2


@dataclass
class RpnCfg:
    """The offline region proposal network (``rclip_core.rpn``), with the original release's detectron2 defaults.

    Two layouts: ``c4`` (ResNet to res4, stride 16, all anchor sizes at one level; the original's COCO RPN) and
    ``fpn`` (P2-P6, one anchor size per level; the original's LVIS RPN used for pretraining and zero-shot).
    """

    layout: Literal["c4", "fpn"] = "fpn"
    # ResNet depth; 10 (one basic block per stage, no ImageNet weights) is for toy-world tests on a CPU.
    depth: Literal[10, 18, 34, 50, 101] = 50
    norm: Literal["FrozenBN", "BN", "GN"] = "FrozenBN"
    # detectron2's MSRA ResNets stride in the first 1x1 conv of a stage (torchvision: in the 3x3). Bottlenecks only.
    stride_in_1x1: bool = True
    # Start the trunk from torchvision's ImageNet weights when they can be loaded (random init otherwise, logged).
    imagenet_init: bool = True
    fpn_channels: int = 256
    # A norm (of kind ``norm``) after every FPN conv, as the LSJ-trained RPN has; detectron2's default has none.
    fpn_norm: bool = False
    # 3x3 convs in the RPN head (MODEL.RPN.CONV_DIMS; the LSJ RPN has two).
    head_convs: int = 1
    # Anchor sizes (sqrt of area, input pixels): all at the one C4 level, or one per FPN level P2..P6.
    anchor_sizes: list[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # height / width
    anchor_offset: float = 0.0
    # Top-k by objectness before NMS (per level for FPN) and after it. null = the layout's detectron2 default
    # (rclip_core.rpn.LAYOUTS): C4 12000/6000 before, 2000 after in training; FPN 2000/1000 before, 1000 after.
    pre_nms_topk_train: int | None = None
    pre_nms_topk_test: int | None = None
    post_nms_topk_train: int | None = None
    post_nms_topk_test: int = 1000
    nms_thresh: float = field(default=0.7, metadata=within(0, 1))
    # Proposals must be wider and taller than this (input pixels) after clipping.
    min_box_size: float = 0.0
    # Input: the same resized image as the CLIP branch, channels in this order, (x - mean) / std on 0-255 pixels.
    input_format: Literal["BGR", "RGB"] = "BGR"
    pixel_mean: list[float] = field(default_factory=lambda: list(DETECTRON2_MEAN))
    pixel_std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    # Anchor labelling for the loss: IoU below the first is background, at least the second foreground.
    iou_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.7])
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    # Images per forward pass and loader workers when proposing (null = one per spare core, at most 4).
    batch_size: int = 1
    num_workers: int | None = field(default=None, metadata=within(0, None))
    train: RpnTrainCfg = field(default_factory=RpnTrainCfg)


@dataclass
class PretrainCfg(SolverCfg):
    """Region-text pretraining (RegionCLIP §3.2-3.3; regionclip_facts.md §2 "Pretraining", §4), on the engine.

    Defaults are the paper's RN50 recipe (configs/pretrain/RegionCLIP_RN50.yaml): SGD, lr 0.002, 96 images per step,
    600k steps decayed at 300k and 525k, 1000 warm-up steps from 0.001, gradient norm clipped at 5.0; 100 of the
    RPN's top 300 proposals (NMS 0.5) per image; τ = 0.01; concept threshold 0.1; the three losses weighted 1.

    With ``concepts`` null there is no teacher and no region loss: only the image-text loss, which with
    ``train_text`` also trains the text tower (how the toy world's teacher is trained from scratch, as CLIP is).
    """

    steps: int = field(default=600000, metadata=within(1, None))
    batch_size: int = field(default=96, metadata=within(1, None))
    lr: float = 0.002
    lr_steps: list[int] = field(default_factory=lambda: [300000, 525000])
    grad_clip: float = 5.0
    checkpoint_every: int = 5000
    # --- data: image-caption pairs (rclip_core.data.captions): a CC3M-style .tsv (caption, image path), .jsonl, or a
    # COCO captions .json (the toy world writes one); image paths are relative to `images`.
    captions: str | None = None
    images: str | None = None
    # Training resize: shorter side drawn from min_sizes, longer side at most max_size (the original's
    # INPUT.MIN_SIZE_TRAIN); no flip (captions may say "left of").
    min_sizes: list[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    max_size: int = 1333
    # Keep decoded, resized images in memory: for small sets read many times (the toy world), not for CC3M.
    cache_images: bool = False
    # --- teacher and concept pool (an `rclip embed` file of the teacher's text tower); null = no region losses.
    concepts: str | None = None
    # Teacher weights; null = model.weights (the student and the teacher start from the same CLIP, as the original).
    teacher: str | None = None
    # --- regions: "rpn" (an RPN checkpoint from `rclip rpn train/convert`) or "random" boxes (the original's RANDOM).
    regions: Literal["rpn", "random"] = "rpn"
    rpn: str | None = None
    rpn_nms_thresh: float = field(default=0.5, metadata=within(0, 1))  # OFFLINE_RPN_NMS_THRESH
    rpn_topk: int = field(default=300, metadata=within(1, None))  # PRETRAIN_RPN_REGIONS
    # PRETRAIN_SAMPLE_REGIONS: drawn at random from the RPN's top boxes.
    regions_per_image: int = field(default=100, metadata=within(1, None))
    # --- losses (pure functions in rclip_core.losses); a weight of 0 turns a loss off.
    temperature: float = 0.01  # MATCHING_TEMP / CLSS_TEMP of the student's losses
    teacher_temperature: float = 0.01  # the pseudo-label softmax
    concept_thresh: float = field(default=0.1, metadata=within(0, 1))  # CONCEPT_THRES
    # Not the original's (off, as it): the teacher names each region only among the concepts the image's drawn
    # caption mentions (found as `rclip vocab build` finds them), for the pseudo concept and the distillation target;
    # an image whose caption names no pool concept keeps the whole pool. Weak supervision from the caption, as
    # caption-grounded pseudo labels in later open-vocabulary detectors.
    caption_concepts: bool = False
    loss_region_distill: float = 1.0
    loss_concept_contrastive: float = 1.0
    loss_image_text: float = 1.0
    # Gradient of the all-gathered image-text features: "all" reaches every rank's own features (the original's
    # differentiable gather), "local" only this rank's rows.
    gather_grad: Literal["all", "local"] = "all"
    # --- what trains: the student visual encoder above res2 (freeze_at 2), batch norm frozen (FrozenBN); the text
    # tower only with train_text (learning rate lr * text_lr_scale).
    freeze_at: int = 2
    frozen_bn: bool = True
    train_text: bool = False
    text_lr_scale: float = 1.0
    learn_temperature: bool = False
    # Count a caption that appears twice in a batch as a match for both images (toy-world captions repeat).
    same_caption_positive: bool = False
    # The image side of the image-text loss is the whole-image box (1.0, the original's global proposal) or a
    # random box covering at least this fraction of each side.
    global_box_min_scale: float = 1.0
    # From random weights: give residual blocks a unit output scale (engine-independent init; see
    # rclip_core.pretrain.reset_residual_scales). Only for scratch training.
    scratch_init: bool = False


@dataclass
class FinetuneCfg(SolverCfg):
    """Open-vocabulary detector transfer (RegionCLIP §3.4; regionclip_facts.md §2 "Open-vocabulary transfer"), on the
    engine. Defaults are the original's OV-COCO RN50 config (CLIP_fast_rcnn_R_50_C4_ovd.yaml): SGD momentum 0.9, lr
    0.002, 16 images per step, 90k steps decayed x0.1 at 60k and 80k, 5000 warm-up steps from 0.001, weight decay
    1e-4; shorter side 640-800 (longer <= 1333) with flips; stem + res2 frozen, FrozenBN; τ 0.01 against frozen text
    embeddings with an all-zero frozen background embedding; CE with background weight 0.2 and focal scaling γ 0.5;
    class-agnostic box regression (L1, detectron2's smooth-L1 beta 0); 512 RoIs per image, 25 % foreground at IoU 0.5,
    GT boxes appended to the proposals. Test-time settings are the recipe's ``zeroshot`` section.
    """

    steps: int = field(default=90000, metadata=within(1, None))
    batch_size: int = field(default=16, metadata=within(1, None))
    lr: float = 0.002
    lr_steps: list[int] = field(default_factory=lambda: [60000, 80000])
    warmup_steps: int = 5000
    checkpoint_every: int = 5000
    # --- data: COCO/LVIS instances; training keeps the base categories' boxes (novel boxes removed, their images
    # kept; images left with no box stay as negatives and are counted).
    annotations: str | None = None
    images: str | None = None
    val_annotations: str | None = None
    val_images: str | None = None
    min_sizes: list[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    max_size: int = 1333
    hflip: bool = True
    # Training categories by name: a class spec as --classes takes (coco48, lvis866, a names file, "a,b,c"); null =
    # the annotation file's base split (LVIS common + frequent, a 'split' field, or COCO's 48 by name).
    train_classes: str | None = None
    # An `rclip embed` file holding (at least) every training category; null = embed the names now with the model's
    # own text tower (text.templates). The classifier weights are these rows, frozen.
    train_embeddings: str | None = None
    # Test-time vocabulary of the evaluations: an `rclip embed` file; null = the validation file's categories embedded
    # with the model's text tower (base + novel: the original's separate test-time embedding file).
    test_embeddings: str | None = None
    # LVIS: repeat-factor sampling threshold (0.001 in the original); 0 = off.
    repeat_factor_thresh: float = field(default=0.0, metadata=within(0, 1))
    # --- proposals: the offline RPN (`rclip rpn train` / `rclip rpn convert`), frozen.
    rpn: str | None = None
    # Keep the RPN's best N proposals per image (by objectness) in training and in the evaluations; null = all it
    # gives (its post_nms_topk_test, 1000 in the original).
    rpn_topk: int | None = field(default=None, metadata=within(1, None))
    # --- model
    freeze_at: int = 2
    frozen_bn: bool = True
    temperature: float = field(default=0.01, metadata=within(1e-6, None))
    # Train the background embedding (starts at zero) instead of keeping it frozen at zero as the original.
    learn_background: bool = False
    # --- losses (rclip_core.losses.fast_rcnn_losses); null = off
    bg_weight: float | None = 0.2
    focal_gamma: float | None = 0.5
    smooth_l1_beta: float = 0.0
    loss_box_reg: float = 1.0  # weight; 0 = no box regression loss
    # --- RoI sampling
    rois_per_image: int = field(default=512, metadata=within(1, None))
    positive_fraction: float = field(default=0.25, metadata=within(0, 1))
    fg_iou_thresh: float = field(default=0.5, metadata=within(0, 1))
    append_gt: bool = True
    # --- evaluation on val_annotations every N steps (and at the end); 0 = only at the end; eval_limit = first N.
    eval_every: int = field(default=0, metadata=within(0, None))
    eval_limit: int | None = field(default=None, metadata=within(1, None))


@dataclass
class Recipe:
    """All sections; each stage reads the ones it needs."""

    model: ModelCfg = field(default_factory=ModelCfg)
    input: InputCfg = field(default_factory=InputCfg)
    text: TextCfg = field(default_factory=TextCfg)
    zeroshot: ZeroShotCfg = field(default_factory=ZeroShotCfg)
    pretrain: PretrainCfg = field(default_factory=PretrainCfg)
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)
    toyworld: ToyWorldCfg = field(default_factory=ToyWorldCfg)
    rpn: RpnCfg = field(default_factory=RpnCfg)
    demo: DemoCfg = field(default_factory=DemoCfg)


T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (after string annotations are resolved); return it converted."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RclipError(f"recipe key '{path}' must be a mapping of {sorted(_field_types(tp))}, got {value!r}")
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except RclipError as e:
                errors.append(str(e))
        raise RclipError(f"recipe key '{path}' expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(tp):
            value = "on" if value else "off"  # YAML 1.1 reads a bare off / on as a boolean (`--set zeroshot.amp=off`)
        if value not in typing.get_args(tp):
            raise RclipError(f"recipe key '{path}' must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise RclipError(f"recipe key '{path}' expects a list, got {value!r}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise RclipError(f"recipe key '{path}' expects true/false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise RclipError(f"recipe key '{path}' expects int, got {value!r}")
    if not isinstance(value, tp):
        raise RclipError(f"recipe key '{path}' expects {_type_name(tp)}, got {value!r}")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type[T], data: dict, path: str = "") -> T:
    fields = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise RclipError(f"unknown recipe key '{dotted}'; valid keys{' under ' + path if path else ''}: "
                             f"{', '.join(fields)}")
        kwargs[key] = _coerce(value, fields[key], dotted)
        lo, hi = _field_range(cls, key)
        v = kwargs[key]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (
                (lo is not None and v < lo) or (hi is not None and v > hi) or v != v):
            shown = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise RclipError(f"recipe key '{dotted}' must be in {shown}, got {v!r}")
    return cls(**kwargs)


def _field_range(cls: type, name: str) -> tuple[float | None, float | None]:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("range", (None, None))
    return None, None


def recipe_from_dict(data: dict | None, cls: type[T] = Recipe) -> T:
    """Build ``cls`` from a nested dict, rejecting unknown keys and wrong types with the key's dotted path."""
    return _build(cls, data or {})


def recipe_to_dict(recipe: Any) -> dict:
    """The resolved recipe as plain data (for YAML files and checkpoints)."""
    return dataclasses.asdict(recipe)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RclipError(f"--set expects key=value (e.g. zeroshot.nms_thresh=0.3), got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...], cls: type = Recipe) -> dict:
    """Apply ``a.b=value`` strings to a nested dict; the key must exist in ``cls`` (checked here, typed at build)."""
    data = dict(data)
    for item in overrides:
        keys, value = _parse_override(item)
        node_cls, node = cls, data
        for i, k in enumerate(keys):
            fields = _field_types(node_cls)
            dotted = ".".join(keys[: i + 1])
            if k not in fields:
                raise RclipError(f"--set {item}: unknown recipe key '{dotted}'; valid keys: {', '.join(fields)}")
            if i == len(keys) - 1:
                node[k] = value
            else:
                node_cls = fields[k]
                if not dataclasses.is_dataclass(node_cls):
                    raise RclipError(f"--set {item}: '{dotted}' is a value, not a section")
                node[k] = dict(node.get(k) or {})
                node = node[k]
    return data


def merge_recipe_dicts(base: dict, top: dict) -> dict:
    """``top`` laid over ``base`` section by section (nested dicts merge, other values replace); inputs unchanged."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merge_recipe_dicts(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                cls: type[T] = Recipe, *, base: dict | None = None) -> T:
    """Load a recipe YAML (or only defaults when ``path`` is None) and apply ``--set`` overrides.

    ``base`` (a nested dict, e.g. the recipe stored in a checkpoint) sits under the file: the file's keys and then
    the overrides replace its values, keys neither mentions keep it.

    Example:
        >>> r = load_recipe(None, ["zeroshot.nms_thresh=0.3", "model.variant=tiny"])
        >>> r.zeroshot.nms_thresh, r.model.variant
        (0.3, 'tiny')
    """
    data: dict = {}
    if path is not None:
        p = resolve_recipe_path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise RclipError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise RclipError(f"{p}: a recipe must be a YAML mapping, got {type(data).__name__}")
    if base:
        # A stored recipe may come from an older rclip with a section since renamed: keep the sections that exist.
        known = _field_types(cls)
        data = merge_recipe_dicts({k: v for k, v in base.items() if k in known}, data)
    try:
        return recipe_from_dict(apply_overrides(data, overrides, cls), cls)
    except RclipError as e:
        raise RclipError(f"{path}: {e}" if path else str(e)) from None


RECIPE_DIR = Path(__file__).parent / "data" / "recipes"


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with rclip (``rclip_core/data/recipes/*.yaml``)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_recipe_path(path: str | os.PathLike) -> Path:
    """A recipe file: an existing path, else the shipped recipe of that name (with or without ``.yaml``, with or
    without a leading ``recipes/``), so ``--recipe zeroshot_rn50_coco_gt`` works outside the repository."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = RECIPE_DIR / (p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml")
    if shipped.is_file():
        return shipped
    raise RclipError(f"recipe not found: {p} (neither a file nor a shipped recipe; shipped: "
                     f"{', '.join(shipped_recipes())})")


def save_recipe(recipe: Any, path: str | os.PathLike, *, force: bool = True) -> Path:
    """Write the resolved recipe (a :class:`Recipe` or its dict) as YAML, atomically."""
    from rclip_core.io import write_text

    data = recipe if isinstance(recipe, dict) else recipe_to_dict(recipe)
    return write_text(path, yaml.safe_dump(data, sort_keys=False), force=force)
