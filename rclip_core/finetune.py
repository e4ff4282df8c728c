"""Open-vocabulary detector transfer (RegionCLIP §3.4; the original's ``CLIPFastRCNN`` trained with
CLIP_fast_rcnn_R_50_C4_ovd.yaml / CLIP_fast_rcnn_R_50_C4.yaml, regionclip_facts.md §2), as a stage of the one engine:
:class:`FinetuneModel`, the pure :func:`compute_losses` and a :class:`~rclip_core.data.coco.DetectionDataset`.

The detector is a :class:`~rclip_core.detector.RegionDetector` composed from built parts: the CLIP trunk to res4 (stem
and res2 frozen, batch norms frozen), the offline RPN (frozen), and RoI heads = RoIAlign → res5 → attention pool →
cosine classifier against the *frozen* text embeddings of the training (base) categories plus the all-zero background
embedding, and a class-agnostic ``Linear(D, 4)`` box regressor. Training sees base boxes only: novel annotations are
removed, their images kept, and images left with no box stay in as negatives (counted). At test time the classifier
takes any vocabulary (base + novel), see :func:`build_detector`.

**Detector checkpoints** (what ``rclip finetune`` writes and ``rclip weights convert`` makes of the original's
finetuned files): an rclip checkpoint whose ``model`` is the state dict of :class:`DetectorWeights`: ``clip.*`` (the
whole CLIP, text tower included, so test-time class names can be embedded), ``classifier.class_embeddings`` (the
training vocabulary), ``classifier.bg_embedding`` and ``box_regressor.{weight,bias}``; plus ``"detector"``:
``{"rpn": {"model": RPN state dict, "recipe": {"rpn": ...}}, "class_names": [...]}``. ``create_clip`` reads its CLIP
part (``checkpoint.state_dict_of``), ``rpn.load_rpn`` its RPN, :func:`read_detector` the rest.

Shapes: B images, R sampled regions, K training classes, D embedding dim.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from rclip_core import distributed as D
from rclip_core import engine
from rclip_core.classifier import CosineClassifier
from rclip_core.clip_backbone import CLIPTrunk, RegionHead, pooler_resolution_for
from rclip_core.data.coco import ImageRecord
from rclip_core.errors import RclipError
from rclip_core.losses import fast_rcnn_losses
from rclip_core.recipes import FinetuneCfg, Recipe, recipe_to_dict

log = logging.getLogger(__name__)

DETECTOR_KEY = "detector"  # the top-level entry marking a detector checkpoint


# ---------------------------------------------------------------------------------------------------------------
# the model


class DetectorWeights(nn.Module):
    """What a detector checkpoint's ``model`` holds (see the module docstring); the parts are shared with the
    detector, not copied."""

    def __init__(self, clip: nn.Module, classifier: CosineClassifier, box_regressor: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.classifier = classifier
        self.box_regressor = box_regressor


def make_box_regressor(dim: int, seed: int) -> nn.Linear:
    """The class-agnostic ``Linear(D, 4)`` (the original's ``bbox_pred``: weights N(0, 0.001²), bias 0), drawn from
    ``seed`` (the recipe's): it is built before the engine seeds its loop, so the global generator would make two
    runs of one recipe differ (by up to 7 AP50 points on the toy world)."""
    reg = nn.Linear(dim, 4)
    nn.init.normal_(reg.weight, std=0.001, generator=torch.Generator().manual_seed(seed))
    nn.init.zeros_(reg.bias)
    return reg


class FinetuneModel(nn.Module):
    """The detector in training: a :class:`~rclip_core.detector.RegionDetector` whose RoI heads sample and label
    regions (:class:`~rclip_core.roi_heads.ProposalSampler`), and its checkpoint part :attr:`weights`.

    Args:
        clip: open_clip ``CLIP``; its visual tower trains above ``cfg.freeze_at`` (norms frozen), its text tower not.
        class_embeddings: (K, D) text embeddings of the training categories (frozen).
        proposal_generator: the frozen offline RPN (:class:`~rclip_core.detector.RPNProposals`) or
            ``GivenBoxes("proposals")`` for precomputed proposals.
        recipe: the resolved recipe (``finetune``, ``model``, ``input``).
    """

    def __init__(self, clip: nn.Module, class_embeddings: Tensor, proposal_generator: nn.Module, recipe: Recipe,
                 *, box_regressor: nn.Module | None = None, bg_embedding: Tensor | None = None) -> None:
        super().__init__()
        from rclip_core.data.transforms import clip_normalizer
        from rclip_core.detector import RegionDetector, RegionHeads
        from rclip_core.roi_heads import ProposalSampler

        cfg = recipe.finetune
        self.cfg = cfg
        visual = clip.visual
        clip.requires_grad_(False)  # the text tower and logit scale stay frozen; the visual parts are switched on
        visual.requires_grad_(True)
        trunk = CLIPTrunk(visual)
        head = RegionHead(visual.layer4, visual.attnpool, pooler_resolution=pooler_resolution_for(
            clip.rclip_variant, recipe.model.pooler_resolution))
        classifier = CosineClassifier(class_embeddings, temperature=cfg.temperature, background=True,
                                      bg_embedding=bg_embedding, learn_background=cfg.learn_background)
        reg = box_regressor if box_regressor is not None else make_box_regressor(head.out_dim, cfg.seed)
        sampler = ProposalSampler(num_classes=classifier.num_classes, iou_thresh=cfg.fg_iou_thresh,
                                  batch_size_per_image=cfg.rois_per_image, positive_fraction=cfg.positive_fraction,
                                  append_gt=cfg.append_gt)
        zs = recipe.zeroshot
        self.detector = RegionDetector(
            clip_normalizer(recipe.input.pixel_mean, recipe.input.pixel_std), trunk, proposal_generator,
            RegionHeads(head, classifier, reg, sampler=sampler), score_fusion=zs.score_fusion,
            score_thresh=zs.score_thresh, nms_thresh=zs.nms_thresh, max_dets=zs.max_dets, nms=zs.nms,
            soft_nms_sigma=zs.soft_nms_sigma, soft_nms_prune=zs.soft_nms_prune, box_deltas=zs.box_deltas)
        self.weights = DetectorWeights(clip, classifier, reg)
        trunk.freeze(cfg.freeze_at)
        if cfg.frozen_bn:  # FrozenBN, as the original: statistics and affine parameters stay as loaded
            for m in visual.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)

    @property
    def clip(self) -> nn.Module:
        return self.weights.clip

    def train(self, mode: bool = True) -> FinetuneModel:
        super().train(mode)  # the trunk's own train() keeps its frozen stages' norms in eval mode
        self.detector.proposal_generator.eval()  # frozen RPN
        self.weights.clip.transformer.eval()
        if self.cfg.frozen_bn:  # last: the trunk shares these norms and would switch them back on
            for m in self.weights.clip.visual.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, batch: list[dict]):
        return self.detector(batch)


def compute_losses(model: nn.Module, batch: list[dict]) -> dict[str, Tensor]:
    """The finetuning losses of one batch (:func:`rclip_core.losses.fast_rcnn_losses` on the sampled regions), and
    ``count_negative_images`` (images in the batch without a base box)."""
    inner: FinetuneModel = D.unwrap(model)
    cfg = inner.cfg
    out = model(batch)
    losses = fast_rcnn_losses(out.class_logits, out.box_deltas if cfg.loss_box_reg > 0 else None, out.gt_classes,
                              out.regression_targets, bg_weight=cfg.bg_weight, focal_gamma=cfg.focal_gamma,
                              smooth_l1_beta=cfg.smooth_l1_beta)
    if "loss_box_reg" in losses:
        losses["loss_box_reg"] = cfg.loss_box_reg * losses["loss_box_reg"]
    elif out.box_deltas is not None:  # keep the regressor in the graph (DDP wants every parameter used)
        losses["loss_cls"] = losses["loss_cls"] + 0.0 * out.box_deltas.sum()
    losses[engine.COUNT_PREFIX + "negative_images"] = torch.tensor(
        float(sum(1 for item in batch if int(item["boxes"].shape[0]) == 0)))
    losses.update(region_accuracy_counts(out.class_logits, out.gt_classes))
    return losses


def region_accuracy_counts(class_logits: Tensor, gt_classes: Tensor) -> dict[str, Tensor]:
    """How many sampled regions the classifier gets right, foreground and background apart (detectron2 logs the
    same as ``fast_rcnn/fg_cls_accuracy`` and ``cls_accuracy``): a detector that trades its foreground for its
    background shows it here long before its AP does.

    Args:
        class_logits: (R, K + 1), background last; gt_classes: (R,) in 0..K.

    Returns:
        ``count_foreground_regions``, ``count_foreground_right``, ``count_background_regions``,
        ``count_background_right`` (0-dim float tensors; the engine sums them over ranks).
    """
    k = class_logits.shape[1] - 1
    with torch.no_grad():
        right = class_logits.argmax(dim=1) == gt_classes
        fg = gt_classes < k
        values = {"foreground_regions": fg.sum(), "foreground_right": (right & fg).sum(),
                  "background_regions": (~fg).sum(), "background_right": (right & ~fg).sum()}
    return {engine.COUNT_PREFIX + name: v.float().cpu() for name, v in values.items()}


# ---------------------------------------------------------------------------------------------------------------
# data


@dataclass
class TrainingSet:
    """The training images with base boxes only (labels: class indices 0..K-1) and what was removed."""

    records: list[ImageRecord]
    class_names: list[str]
    category_ids: list[int]
    rule: str
    boxes_kept: int = 0
    boxes_removed: int = 0  # of non-training (novel) categories
    negative_images: int = 0  # images left with no training box (kept as negatives)
    categories: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.records)} images, {self.boxes_kept} boxes of {len(self.class_names)} training categories "
                f"({self.rule}); removed {self.boxes_removed} boxes of other categories; {self.negative_images} "
                "images without a training box kept as negatives")


def training_categories(categories: list[dict], spec: str | None, source: str) -> tuple[list[dict], str]:
    """The training categories of an annotation file: those named by ``spec`` (a ``--classes`` spec) or the base
    split. Raises naming every listed name the file lacks."""
    from rclip_core.data.class_lists import name_key, resolve_classes

    if spec is None:
        from rclip_core.rpn.data import base_category_ids

        ids, rule = base_category_ids(categories)
        return [c for c in categories if int(c["id"]) in ids], rule
    wanted = resolve_classes(spec).names
    by_key = {name_key(c["name"]): c for c in categories}
    missing = [n for n in wanted if name_key(n) not in by_key]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise RclipError(f"finetune.train_classes: not among the categories of {source}: {shown}")
    return [by_key[name_key(n)] for n in wanted], f"finetune.train_classes {spec}"


def load_training_set(cfg: FinetuneCfg) -> TrainingSet:
    """Read ``cfg.annotations`` and keep the training categories' boxes (see the module docstring)."""
    from rclip_core.data.coco import load_detection_annotations

    records, categories, _ = load_detection_annotations(cfg.annotations)
    cats, rule = training_categories(categories, cfg.train_classes, str(cfg.annotations))
    index = {int(c["id"]): i for i, c in enumerate(cats)}
    out = TrainingSet([], [str(c["name"]) for c in cats], [int(c["id"]) for c in cats], rule, categories=categories)
    for rec in records:
        keep = torch.tensor([int(lab) in index for lab in rec.gt_labels.tolist()], dtype=torch.bool)
        out.boxes_removed += int((~keep).sum())
        rec.gt_boxes = rec.gt_boxes[keep]
        rec.gt_labels = torch.tensor([index[int(lab)] for lab in rec.gt_labels[keep].tolist()], dtype=torch.int64)
        out.boxes_kept += int(keep.sum())
        out.negative_images += int(rec.gt_labels.numel() == 0)
        out.records.append(rec)
    if out.boxes_kept == 0:
        raise RclipError(f"{cfg.annotations}: no box of a training category ({rule})")
    return out


def repeat_factor_indices(records: list[ImageRecord], num_classes: int, thresh: float, seed: int) -> list[int]:
    """LVIS repeat-factor sampling (Gupta et al. 2019; detectron2's ``RepeatFactorTrainingSampler``): image i is
    repeated r_i = max over its categories c of max(1, sqrt(thresh / f_c)) times, f_c the fraction of images holding
    c, rounded stochastically (by ``seed``). Returns the expanded index list (once, not per epoch as detectron2)."""
    counts = torch.zeros(num_classes)
    for rec in records:
        for c in set(rec.gt_labels.tolist()):
            counts[c] += 1
    freq = counts / max(1, len(records))
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, rec in enumerate(records):
        cats = set(rec.gt_labels.tolist())
        r = max([1.0] + [max(1.0, math.sqrt(thresh / float(freq[c]))) for c in cats])
        whole = int(r)
        n = whole + int(float(torch.rand((), generator=g)) < r - whole)
        out.extend([i] * n)
    return out


class IndexedDataset(torch.utils.data.Dataset):
    """``dataset`` seen through a list of indices (repeat-factor sampling)."""

    def __init__(self, dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self.dataset[(self.indices[key[0]], key[1])]
        return self.dataset[self.indices[key]]


# ---------------------------------------------------------------------------------------------------------------
# detector checkpoints


@dataclass
class DetectorParts:
    """The non-CLIP parts of a detector checkpoint (:func:`read_detector`)."""

    class_embeddings: Tensor  # (K, D) the training vocabulary
    class_names: list[str]
    bg_embedding: Tensor  # (D,)
    box_regressor: dict[str, Tensor]  # weight (4, D), bias (4,)
    recipe: dict


def is_detector_checkpoint(obj: object) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get(DETECTOR_KEY), dict) and isinstance(obj.get("model"), dict)


def read_detector(path: str | os.PathLike) -> DetectorParts | None:
    """The detector parts of ``path``, or None when it is not a detector checkpoint (a plain CLIP)."""
    from rclip_core.checkpoint import read_torch_file

    if str(path).endswith(".safetensors") or not Path(path).is_file():
        return None
    obj = read_torch_file(path, what="weights file")
    if not is_detector_checkpoint(obj):
        return None
    state = obj["model"]
    needed = ("classifier.class_embeddings", "classifier.bg_embedding", "box_regressor.weight", "box_regressor.bias")
    missing = [k for k in needed if k not in state]
    if missing:
        raise RclipError(f"{path}: a detector checkpoint without {', '.join(missing)}")
    return DetectorParts(class_embeddings=state["classifier.class_embeddings"].float(),
                         class_names=list(obj[DETECTOR_KEY].get("class_names") or []),
                         bg_embedding=state["classifier.bg_embedding"].float(),
                         box_regressor={"weight": state["box_regressor.weight"].float(),
                                        "bias": state["box_regressor.bias"].float()},
                         recipe=obj.get("recipe") or {})


def build_detector(clip: nn.Module, class_embeddings: Tensor, recipe: Recipe, proposal_generator: nn.Module,
                   parts: DetectorParts, *, box_deltas: bool | None = None):
    """A finetuned :class:`~rclip_core.detector.RegionDetector` over ``clip.visual`` with any test-time vocabulary
    (``class_embeddings`` (K', D)): the trained background embedding and box regressor of ``parts``, the recipe's
    ``zeroshot`` post-processing (soft-NMS, box deltas unless ``box_deltas`` says otherwise, score fusion)."""
    from rclip_core.data.transforms import clip_normalizer
    from rclip_core.detector import RegionDetector, RegionHeads

    zs = recipe.zeroshot
    visual = clip.visual
    head = RegionHead(visual.layer4, visual.attnpool, pooler_resolution=pooler_resolution_for(
        getattr(clip, "rclip_variant", recipe.model.variant), recipe.model.pooler_resolution), chunk=zs.roi_chunk)
    if class_embeddings.shape[1] != parts.bg_embedding.shape[0]:
        raise RclipError(f"class embeddings of dimension {class_embeddings.shape[1]} do not fit the detector's "
                         f"{parts.bg_embedding.shape[0]}")
    temperature = (parts.recipe.get("finetune") or {}).get("temperature", zs.temperature)
    classifier = CosineClassifier(class_embeddings, temperature=float(temperature), background=True,
                                  bg_embedding=parts.bg_embedding)
    reg = nn.Linear(head.out_dim, 4)
    reg.load_state_dict(parts.box_regressor)
    return RegionDetector(clip_normalizer(recipe.input.pixel_mean, recipe.input.pixel_std), CLIPTrunk(visual),
                          proposal_generator, RegionHeads(head, classifier, reg), score_fusion=zs.score_fusion,
                          score_thresh=zs.score_thresh, nms_thresh=zs.nms_thresh, max_dets=zs.max_dets, amp=zs.amp,
                          nms=zs.nms, soft_nms_sigma=zs.soft_nms_sigma, soft_nms_prune=zs.soft_nms_prune,
                          box_deltas=zs.box_deltas if box_deltas is None else box_deltas)


# ---------------------------------------------------------------------------------------------------------------
# evaluation and the forgetting check


def _eval_mode(model: FinetuneModel):
    """Context: the model in eval mode, restored to its previous mode after."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        was = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was)

    return ctx()


def evaluate_detection(model: FinetuneModel, recipe: Recipe, test_embeddings: Tensor, test_names: list[str], *,
                       device: str | torch.device = "cpu") -> dict:
    """Detections of the model being trained on ``finetune.val_annotations`` with the test-time vocabulary, scored
    (COCO: AP50 novel / base / all; LVIS: APr / APc / APf / AP; ``rclip_core.evaluation``)."""
    from rclip_core.data.coco import DetectionDataset, load_detection_annotations
    from rclip_core.evaluation import evaluate
    from rclip_core.inference import category_ids_for, run_detection
    from rclip_core.io import read_json

    cfg = recipe.finetune
    records, categories, _ = load_detection_annotations(cfg.val_annotations)
    if cfg.eval_limit is not None:
        records = records[: cfg.eval_limit]
    ids = category_ids_for(test_names, categories, cfg.test_embeddings or "finetune.val_annotations")
    w = model.weights
    parts = DetectorParts(test_embeddings, test_names, w.classifier.bg_embedding.detach(),
                          {k: v.detach() for k, v in w.box_regressor.state_dict().items()}, recipe_to_dict(recipe))
    with _eval_mode(model):
        detector = build_detector(w.clip, test_embeddings, recipe, model.detector.proposal_generator, parts)
        dataset = DetectionDataset(records, cfg.val_images, min_sizes=recipe.input.min_size,
                                   max_size=recipe.input.max_size)
        results, summary = run_detection(detector, dataset, category_ids=ids, device=device)
    model.to(device)
    gt = read_json(cfg.val_annotations)
    if cfg.eval_limit is not None:
        kept = {r.id for r in records}
        gt = {**gt, "images": [i for i in gt["images"] if i["id"] in kept],
              "annotations": [a for a in gt["annotations"] if a["image_id"] in kept]}
    scored = evaluate(gt, results)
    return {"metrics": scored["metrics"], "splits": scored["splits"], "images": summary.images,
            "detections": len(results)}


@dataclass
class RetainCheck:
    """GT-box zero-shot accuracy of held-out classes (an annotation file whose categories the finetuning does not
    train on): how much open-vocabulary recognition the finetuning keeps."""

    annotations: Path
    images: Path
    names: list[str]
    category_ids: list[int]
    embeddings: Tensor  # (K_h, D), of the model's (frozen) text tower

    def accuracy(self, model: FinetuneModel, recipe: Recipe, *, device: str | torch.device = "cpu") -> float:
        from rclip_core.data.coco import DetectionDataset, load_detection_annotations
        from rclip_core.data.transforms import clip_normalizer
        from rclip_core.detector import GivenBoxes, RegionDetector, RegionHeads
        from rclip_core.evaluation import gt_box_accuracy
        from rclip_core.inference import run_detection
        from rclip_core.io import read_json

        zs = recipe.zeroshot
        records, _, _ = load_detection_annotations(self.annotations)
        visual = model.clip.visual
        with _eval_mode(model):
            head = RegionHead(visual.layer4, visual.attnpool, pooler_resolution=pooler_resolution_for(
                model.clip.rclip_variant, recipe.model.pooler_resolution))
            # The paper's zero-shot GT-box protocol: no box regression, hard NMS, the zero-shot classifier.
            detector = RegionDetector(
                clip_normalizer(recipe.input.pixel_mean, recipe.input.pixel_std), CLIPTrunk(visual),
                GivenBoxes("boxes"), RegionHeads(head, CosineClassifier(self.embeddings, temperature=zs.temperature,
                                                                         background=zs.background)),
                score_fusion="none", score_thresh=zs.score_thresh, nms_thresh=zs.nms_thresh, max_dets=zs.max_dets,
                nms="hard", soft_nms_sigma=zs.soft_nms_sigma, soft_nms_prune=zs.soft_nms_prune)
            dataset = DetectionDataset(records, self.images, min_sizes=recipe.input.min_size,
                                       max_size=recipe.input.max_size)
            results, _ = run_detection(detector, dataset, category_ids=self.category_ids, device=device)
        model.to(device)
        return float(gt_box_accuracy(read_json(self.annotations), results)["accuracy"])


def load_retain_check(path: str | os.PathLike, images: str | os.PathLike, clip: nn.Module, recipe: Recipe,
                      trained: list[str]) -> RetainCheck:
    """The held-out classes of ``path`` embedded with ``clip``'s text tower; refuses a file naming a training
    category (it would not measure forgetting)."""
    from rclip_core.data.class_lists import name_key
    from rclip_core.data.coco import load_detection_annotations
    from rclip_core.text_embed import TEMPLATE_SETS, embed_names
    from rclip_core.text_encoder import TextEncoder

    _, categories, _ = load_detection_annotations(path)
    names = [str(c["name"]) for c in categories]
    overlap = sorted({name_key(n) for n in names} & {name_key(n) for n in trained})
    if overlap:
        raise RclipError(f"--retain-check {path}: its categories must be held out of training, but "
                         f"{', '.join(overlap[:5])} {'is' if len(overlap) == 1 else 'are'} trained on")
    emb = embed_names(TextEncoder(clip), names, templates=TEMPLATE_SETS[recipe.text.templates])
    return RetainCheck(Path(path), Path(images), names, [int(c["id"]) for c in categories], emb.embeddings)


class EvaluationHook:
    """After every ``eval_every`` steps and the last: detection AP on the validation set (when given) and the
    forgetting check (when given), written to ``OUT/eval_step{N}.json`` and kept in :attr:`results`."""

    def __init__(self, model: FinetuneModel, recipe: Recipe, out_dir: Path | None, *, device, test=None,
                 retain: RetainCheck | None = None, retain_before: float | None = None) -> None:
        self.model, self.recipe, self.out, self.device = model, recipe, out_dir, device
        self.test, self.retain, self.retain_before = test, retain, retain_before
        self.results: list[dict] = []

    def evaluate(self, step: int) -> dict:
        from rclip_core.io import write_json

        record: dict = {"step": step}
        if self.test is not None:
            record.update(evaluate_detection(self.model, self.recipe, self.test.embeddings, self.test.names,
                                             device=self.device))
        if self.retain is not None:
            acc = self.retain.accuracy(self.model, self.recipe, device=self.device)
            record["retain"] = {"annotations": str(self.retain.annotations), "accuracy": acc,
                                "before": self.retain_before, "change": acc - self.retain_before
                                if self.retain_before is not None else None}
        if self.out is not None:
            write_json(self.out / f"eval_step{step:07d}.json", record)
        self.results.append(record)
        return record

    def after_step(self, info: engine.StepInfo) -> None:
        every = self.recipe.finetune.eval_every
        if (self.test is None and self.retain is None) or not (
                info.step == info.total or (every and info.step % every == 0)):
            return
        self.evaluate(info.step)


# ---------------------------------------------------------------------------------------------------------------
# building the stage from a recipe


def input_paths(recipe: Recipe) -> dict[str, str | None]:
    """The files a finetuning recipe names (recipe key → path), for checking before any work starts."""
    cfg = recipe.finetune
    paths: dict[str, str | None] = {"finetune.annotations": cfg.annotations, "finetune.images": cfg.images,
                                    "finetune.rpn": cfg.rpn}
    for key in ("val_annotations", "val_images", "train_embeddings", "test_embeddings"):
        if getattr(cfg, key) is not None:
            paths[f"finetune.{key}"] = getattr(cfg, key)
    from rclip_core.pretrain import _is_local

    if recipe.model.weights is not None and _is_local(recipe.model.weights):
        paths["model.weights"] = recipe.model.weights
    return paths


def check_inputs(recipe: Recipe, retain_check: str | os.PathLike | None = None) -> None:
    """Refuse a recipe with missing or unset inputs, listing every one in one message."""
    cfg = recipe.finetune
    problems = []
    for key, path in input_paths(recipe).items():
        if path is None:
            problems.append(f"{key} is not set")
        elif not Path(path).exists():
            problems.append(f"{key}: {path} not found")
    if cfg.val_annotations is not None and cfg.val_images is None:
        problems.append("finetune.val_annotations needs finetune.val_images (the folder of its images)")
    if retain_check is not None:
        if not Path(retain_check).is_file():
            problems.append(f"--retain-check: {retain_check} not found")
        if cfg.val_images is None:
            problems.append("--retain-check reads its images from finetune.val_images, which is not set")
    if problems:
        raise RclipError("the recipe's inputs are not usable: " + "; ".join(problems))


def _select_rows(emb, names: list[str], source: str) -> Tensor:
    """The rows of an embedding file for ``names`` (by cleaned, case-folded name), refusing missing ones."""
    from rclip_core.data.class_lists import name_key

    rows = {name_key(n): i for i, n in enumerate(emb.names)}
    missing = [n for n in names if name_key(n) not in rows]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise RclipError(f"{source}: misses training categories {shown}")
    return emb.embeddings[[rows[name_key(n)] for n in names]]


@dataclass
class TestVocabulary:
    names: list[str]
    embeddings: Tensor


@dataclass
class Stage:
    model: FinetuneModel
    dataset: torch.utils.data.Dataset
    training_set: TrainingSet
    test: TestVocabulary | None
    rpn_checkpoint: dict  # {"model": state, "recipe": {"rpn": ...}} stored in detector checkpoints


def build_stage(recipe: Recipe) -> Stage:
    """Model, dataset and test vocabulary of a finetuning recipe (inputs checked first)."""
    from rclip_core.clip_backbone import create_clip
    from rclip_core.data.coco import DetectionDataset, load_detection_annotations
    from rclip_core.detector import RPNProposals
    from rclip_core.recipes import recipe_from_dict
    from rclip_core.rpn.convert import load_rpn_state, read_rpn_checkpoint
    from rclip_core.text_embed import TEMPLATE_SETS, embed_names, load_embeddings
    from rclip_core.text_encoder import TextEncoder

    check_inputs(recipe)
    cfg = recipe.finetune
    data = load_training_set(cfg)
    log.info("finetuning set: %s", data.summary())
    clip = create_clip(recipe.model.variant, recipe.model.weights, log_random_init=False)
    recipe.model.variant = clip.rclip_variant
    if clip.rclip_random_weights:
        log.warning("%s starts from random weights (no model.weights)", clip.rclip_variant)
    text = TextEncoder(clip)
    dim = int(clip.visual.attnpool.c_proj.out_features)
    templates = TEMPLATE_SETS[recipe.text.templates]
    if cfg.train_embeddings is not None:
        stored = load_embeddings(cfg.train_embeddings, dim=dim, fingerprint=text.fingerprint())
        train_emb = _select_rows(stored, data.class_names, f"finetune.train_embeddings {cfg.train_embeddings}")
    else:
        train_emb = embed_names(text, data.class_names, templates=templates).embeddings
    test = None
    if cfg.test_embeddings is not None:
        stored = load_embeddings(cfg.test_embeddings, dim=dim, fingerprint=text.fingerprint())
        test = TestVocabulary(stored.names, stored.embeddings)
    elif cfg.val_annotations is not None:
        _, val_cats, _ = load_detection_annotations(cfg.val_annotations)
        names = [str(c["name"]) for c in val_cats]
        test = TestVocabulary(names, embed_names(text, names, templates=templates).embeddings)
    state, stored_recipe = read_rpn_checkpoint(cfg.rpn)
    rpn_cfg = recipe_from_dict({"rpn": stored_recipe["rpn"]}).rpn
    rpn = load_rpn_state(state, rpn_cfg, str(cfg.rpn))
    model = FinetuneModel(clip, train_emb, RPNProposals(rpn, topk=cfg.rpn_topk), recipe)
    dataset = DetectionDataset(data.records, cfg.images, min_sizes=cfg.min_sizes, max_size=cfg.max_size,
                               hflip=cfg.hflip)
    if cfg.repeat_factor_thresh > 0:
        dataset = IndexedDataset(dataset, repeat_factor_indices(data.records, len(data.class_names),
                                                                cfg.repeat_factor_thresh, cfg.seed))
    return Stage(model, dataset, data, test, {"model": rpn.state_dict(), "recipe": {"rpn": recipe_to_dict(rpn_cfg)}})


@dataclass
class FinetuneResult:
    train: engine.TrainResult
    training_set: TrainingSet
    evaluations: list[dict]
    retain_before: float | None


RETAIN_BEFORE_NAME = "retain_before.json"


def run_finetune(recipe: Recipe, *, out_dir: str | os.PathLike, resume: bool = False,
                 device: str | torch.device = "cpu", hooks=(), retain_check: str | os.PathLike | None = None
                 ) -> FinetuneResult:
    """Build the stage of ``recipe`` and train it on the engine; ``out_dir/checkpoint.pt`` is a detector checkpoint
    (module docstring) that ``rclip zeroshot``, ``visualize`` and ``eval`` take with ``--weights``. With
    ``retain_check`` the held-out classes' GT-box accuracy is measured before training and at every evaluation."""
    from rclip_core.io import read_json, write_json

    stage = build_stage(recipe)
    out = Path(out_dir)
    retain = before = None
    if retain_check is not None:
        retain = load_retain_check(retain_check, recipe.finetune.val_images, stage.model.clip, recipe,
                                   stage.training_set.class_names)
        before_file = out / RETAIN_BEFORE_NAME
        if resume and before_file.is_file():
            before = float(read_json(before_file)["accuracy"])
        else:
            before = retain.accuracy(stage.model, recipe, device=device)
            out.mkdir(parents=True, exist_ok=True)
            write_json(before_file, {"annotations": str(retain_check), "accuracy": before})
    evaluation = EvaluationHook(stage.model, recipe, out, device=device, test=stage.test, retain=retain,
                                retain_before=before)
    extra = {DETECTOR_KEY: {"rpn": stage.rpn_checkpoint, "class_names": stage.training_set.class_names},
             "text_fingerprint": _fingerprint(stage.model.clip)}
    result = engine.train(stage.model, compute_losses, stage.dataset, recipe.finetune, out_dir=out,
                          recipe=recipe_to_dict(recipe), resume=resume, section="finetune", device=device,
                          checkpoint_module=stage.model.weights, checkpoint_extra=extra,
                          hooks=[*hooks, evaluation])
    return FinetuneResult(result, stage.training_set, evaluation.results, before)


def _fingerprint(clip: nn.Module) -> str | None:
    from rclip_core.text_encoder import TextEncoder

    return TextEncoder(clip).fingerprint()


# ---------------------------------------------------------------------------------------------------------------
# the original release's finetuned checkpoints

# regionclip_finetuned-*.pth box predictor (FastRCNNOutputLayers with text-embedding classifier, class-agnostic
# regression; regionclip_facts.md §1.1) -> DetectorWeights keys.
BOX_PREDICTOR_TABLE = {
    "roi_heads.box_predictor.cls_score.weight": "classifier.class_embeddings",  # (K, D), frozen text embeddings
    "roi_heads.box_predictor.cls_bg_score.weight": "classifier.bg_embedding",  # (1, D) -> (D,)
    "roi_heads.box_predictor.bbox_pred.weight": "box_regressor.weight",  # (4, D)
    "roi_heads.box_predictor.bbox_pred.bias": "box_regressor.bias",  # (4,)
}


def convert_release_detector(src: str | os.PathLike, dst: str | os.PathLike, *, variant: str | None = None,
                             text_from: str | None = None, force: bool = False) -> list[str]:
    """Turn an original finetuned checkpoint (``regionclip_finetuned-{coco,lvis}_{rn50,rn50x4}.pth``: ``backbone.*``,
    ``roi_heads.box_predictor.*``, ``offline_*``) into a detector checkpoint (module docstring), written atomically.

    The CLIP part goes through :func:`rclip_core.convert.convert_state_dict` (``text_from`` supplies the text tower
    these files lack); the box predictor through :data:`BOX_PREDICTOR_TABLE`; the offline RPN through
    :func:`rclip_core.rpn.convert.convert_rpn_state_dict` (architecture read from its keys). ``test_cls_score`` (a
    test vocabulary baked into the file) is dropped: rclip takes the test vocabulary at run time. A mask head (LVIS)
    is kept aside under ``mask_head``, unused. Returns report lines.
    """
    from rclip_core.checkpoint import read_state_dict, save_checkpoint
    from rclip_core.convert import convert_state_dict
    from rclip_core.io import check_writable
    from rclip_core.recipes import RpnCfg
    from rclip_core.rpn.convert import convert_rpn_state_dict, select_detectron2_rpn

    check_writable(dst, force=force)
    state = read_state_dict(src)
    converted = convert_state_dict(state, variant=variant, text_from=text_from, source=str(src))
    predictor = converted.extras.get("box_predictor") or {}
    missing = [k for k in BOX_PREDICTOR_TABLE if k not in predictor]
    if missing:
        raise RclipError(f"{src}: not a finetuned RegionCLIP checkpoint (no {', '.join(missing)})")
    shape = tuple(predictor["roi_heads.box_predictor.bbox_pred.weight"].shape)
    if shape[0] != 4:
        raise RclipError(f"{src}: class-specific box regression {shape}; only class-agnostic (4, D) is supported")
    model = {f"clip.{k}": v for k, v in converted.model.items()}
    for old, new in BOX_PREDICTOR_TABLE.items():
        model[new] = predictor[old].float()
    model["classifier.class_embeddings"] = nn.functional.normalize(model["classifier.class_embeddings"], dim=-1)
    model["classifier.bg_embedding"] = model["classifier.bg_embedding"].reshape(-1)
    report = converted.report
    lines = [line for line in report.lines() if not line.startswith("wrote")]
    detector: dict = {"class_names": []}
    if "offline_rpn" in converted.extras:
        rpn, rpn_cfg, rpn_report = convert_rpn_state_dict(
            select_detectron2_rpn(converted.extras["offline_rpn"], str(src)), RpnCfg(), source=f"{src} offline RPN")
        detector["rpn"] = {"model": rpn.state_dict(), "recipe": {"rpn": recipe_to_dict(rpn_cfg)}}
        lines += [f"offline RPN {line}" for line in rpn_report.lines()[1:]]
    else:
        lines.append("offline RPN none in the file: give regions with --rpn / --regions when detecting")
    if any(k.startswith("roi_heads.box_predictor.test_cls_score") for k in predictor):
        lines.append("dropped     test_cls_score (the test vocabulary is given at run time: --classes/--embeddings)")
    extra = {"mask_head": converted.extras["mask_head"]} if "mask_head" in converted.extras else {}
    # The original's test scripts use gaussian soft-NMS for finetuned detectors (their other test settings differ
    # between COCO and LVIS: give them with --recipe / --set).
    save_checkpoint(dst, model, recipe={"model": {"variant": report.variant}, "zeroshot": {"nms": "soft"}}, step=0,
                    force=force,
                    converted_from=str(src), text_source=report.text_source, **{DETECTOR_KEY: detector}, **extra)
    lines.append(f"detector    {int(model['classifier.class_embeddings'].shape[0])} training classes, "
                 "class-agnostic box regression, background embedding from cls_bg_score")
    lines.append(f"wrote       {dst}")
    return lines
