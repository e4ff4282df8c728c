"""Region-text pretraining (RegionCLIP §3.2-3.3; the original's ``PretrainFastRCNN``, regionclip_facts.md §4), as a
stage of the one engine: :class:`PretrainModel`, the pure :func:`compute_losses` and a
:class:`~rclip_core.data.captions.CaptionDataset`.

Per image: proposals from the base-category RPN (top ``rpn_topk`` after NMS ``rpn_nms_thresh``), of which
``regions_per_image`` are drawn at random, plus one whole-image ("global") box. The student (a CLIP visual encoder,
trained above res2, batch norm frozen) pools every box from its res4 map (RoIAlign → res5 → attention pool); the
frozen teacher pools the proposals from its own map and names them with concepts (``rclip_core.pseudo_labels``);
the frozen text tower embeds the caption (end-of-text token). Losses (``rclip_core.losses``, weights in the
recipe): KL distillation and the MIL region-concept contrastive loss on the kept regions, and the symmetric
image-text contrastive loss between the global box and the caption, all-gathered across processes.

With no concept pool (``pretrain.concepts`` null) the stage is image-text training alone; with ``train_text`` it
also trains the text tower — how the toy world's teacher learns from captions, as CLIP learns from the web.

Shapes: B images, P_i regions of image i, R = Σ P_i, K concepts, D embedding dim.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rclip_core import boxes as B
from rclip_core import distributed as D
from rclip_core import engine
from rclip_core.clip_backbone import CLIPRegionEncoder, CLIPTrunk, RegionHead, pooler_resolution_for
from rclip_core.data.transforms import ImageNormalizer, clip_normalizer
from rclip_core.errors import RclipError
from rclip_core.losses import concept_contrastive, image_text_contrastive, region_distillation
from rclip_core.pseudo_labels import CaptionConcepts, pseudo_labels
from rclip_core.recipes import PretrainCfg, Recipe, recipe_to_dict
from rclip_core.text_encoder import TextEncoder

log = logging.getLogger(__name__)


def reset_residual_scales(clip: nn.Module) -> int:
    """Set the last norm scale of every residual block of a ``ModifiedResNet`` (``bn3.weight``) to 1.

    open_clip initialises them to zero so each block starts as the identity, which suits long runs; in a run of a few
    hundred steps from random weights the residual branches then stay nearly silent (their gradients are scaled by
    the zero), and the trunk learns shapes several times slower. Returns how many scales were reset.
    """
    n = 0
    with torch.no_grad():
        # Only the bottlenecks of layer1..4: the stem also has a ``bn3``, which is not a residual scale.
        for layer in (clip.visual.layer1, clip.visual.layer2, clip.visual.layer3, clip.visual.layer4):
            for name, p in layer.named_parameters():
                if name.endswith("bn3.weight"):
                    p.fill_(1.0)
                    n += 1
    return n


@dataclass
class PretrainOutputs:
    """What :class:`PretrainModel` returns for a batch."""

    image_emb: Tensor  # (B, D) the student's global-box embeddings
    text_emb: Tensor  # (B, D) the captions' end-of-text embeddings
    caption_codes: Tensor  # (B,) int64 hash of each caption (same text, same code)
    student_regions: Tensor | None  # (R, D)
    teacher_regions: Tensor | None  # (R, D)
    allowed: Tensor | None = None  # (R, K) bool: concepts each region's caption mentions (caption_concepts)


class PretrainModel(nn.Module):
    """Student CLIP (+ its text tower), frozen teacher and region source for one pretraining step.

    Args:
        student: open_clip ``CLIP``; its visual tower trains (above ``cfg.freeze_at``), its text tower only with
            ``cfg.train_text``. The engine's checkpoints hold its state dict alone.
        cfg: the ``pretrain`` recipe section.
        pooler_resolution: RoIAlign size (14 RN50, 18 RN50x4).
        transform: the CLIP branch's normalisation.
        tokenizer: captions → token ids (N, 77).
        teacher: the frozen teacher's region encoder, or None (image-text only).
        concepts: (K, D) concept embeddings of the teacher's text tower (the pseudo labels' and the student's pool).
        rpn: a frozen proposal generator (``detector.RPNProposals``) when items carry no cached proposals.
        caption_concepts: with ``cfg.caption_concepts``, the matcher of captions to the pool's concepts.
    """

    def __init__(self, student: nn.Module, *, cfg: PretrainCfg, pooler_resolution: int, transform: ImageNormalizer,
                 tokenizer, teacher: CLIPRegionEncoder | None = None, concepts: Tensor | None = None,
                 rpn: nn.Module | None = None, caption_concepts: CaptionConcepts | None = None) -> None:
        super().__init__()
        if (teacher is None) != (concepts is None):
            raise ValueError("a teacher needs a concept pool and a concept pool needs a teacher")
        self.cfg = cfg
        # The student is registered whole (its checkpoint is a plain CLIP one); trunk and head reuse its modules.
        self.student = student
        self.transform = transform
        self.trunk = CLIPTrunk(student.visual)
        self.head = RegionHead(student.visual.layer4, student.visual.attnpool, pooler_resolution=pooler_resolution)
        self.text = TextEncoder(student, tokenizer)
        self.teacher = teacher.requires_grad_(False) if teacher is not None else None
        self.rpn = rpn
        if cfg.caption_concepts and teacher is not None and caption_concepts is None:
            raise ValueError("pretrain.caption_concepts needs a caption-to-concept matcher")
        self.caption_concepts = caption_concepts if cfg.caption_concepts else None
        self.register_buffer("concepts", concepts.float() if concepts is not None else None, persistent=False)
        self.trunk.freeze(cfg.freeze_at)
        if cfg.frozen_bn:  # FrozenBN, as the original: statistics and affine parameters stay as loaded
            for m in student.visual.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)
        if not cfg.train_text:
            self.text.requires_grad_(False)
        else:  # the text tower will change: a fingerprint read with the checkpoint would go stale
            self.text._stored_fingerprint = None
            if hasattr(student, "rclip_text_fingerprint"):
                del student.rclip_text_fingerprint
        student.logit_scale.requires_grad_(cfg.learn_temperature)

    def train(self, mode: bool = True) -> PretrainModel:
        super().train(mode)  # the trunk's own train() keeps its frozen stages' norms in eval mode
        if self.teacher is not None:
            self.teacher.eval()
        if self.rpn is not None:
            self.rpn.eval()
        if self.cfg.frozen_bn:  # last: the trunk shares these norms and would switch them back on
            for m in self.student.visual.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def temperature(self) -> Tensor | float:
        """τ of the student's losses: fixed, or learned (open_clip's ``logit_scale`` = log(1/τ), τ ≥ 0.01)."""
        if self.cfg.learn_temperature:
            return 1.0 / self.student.logit_scale.clamp(max=math.log(100)).exp()
        return self.cfg.temperature

    def _global_boxes(self, batch: list[dict], height: int, width: int, sizes: list[tuple[int, int]]) -> list[Tensor]:
        """One box per image: the whole padded image (the original's global proposal), or a random box covering at
        least ``global_box_min_scale`` of each side, drawn by the item's seed."""
        if self.cfg.global_box_min_scale >= 1:
            return [B.full_image_boxes(1, height, width) for _ in batch]
        out = []
        for item, (h, w) in zip(batch, sizes):
            g = torch.Generator().manual_seed(int(item["seed"]) % (2**63))
            out.append(B.random_boxes(1, h, w, self.cfg.global_box_min_scale, g))
        return out

    def _regions(self, batch: list[dict], sizes: list[tuple[int, int]]) -> list[Tensor]:
        """Per image, ``regions_per_image`` boxes drawn (by the item's seed) from its proposals or at random."""
        cfg = self.cfg
        if cfg.regions == "rpn":
            if all(item.get("proposals") is not None for item in batch):
                proposals = [item["proposals"][: cfg.rpn_topk] for item in batch]
            elif self.rpn is not None:
                proposals = [b[: cfg.rpn_topk] for b in self.rpn(batch, None, None).boxes]
            else:
                raise RclipError("pretrain.regions is 'rpn' but neither an RPN nor cached proposals were given")
        out = []
        for i, (item, (h, w)) in enumerate(zip(batch, sizes)):
            g = torch.Generator().manual_seed((int(item["seed"]) + 1) % (2**63))
            if cfg.regions == "random":
                out.append(random_grid_boxes(cfg.regions_per_image, h, w, g))
                continue
            p = proposals[i].float().cpu()
            out.append(p[torch.randperm(p.shape[0], generator=g)[: cfg.regions_per_image]])
        return out

    def forward(self, batch: list[dict]) -> PretrainOutputs:
        images = self.transform([item["image"] for item in batch])
        dev = images.tensors.device
        res4 = self.trunk(images.tensors)  # (B, C4, H/16, W/16)
        height, width = images.tensors.shape[-2:]
        boxes = self._global_boxes(batch, int(height), int(width), images.image_sizes)
        regions = self._regions(batch, images.image_sizes) if self.teacher is not None else None
        if regions is not None:
            boxes = [torch.cat([g, r]) for g, r in zip(boxes, regions)]
        feats = self.head(res4, [b.to(dev) for b in boxes])  # (B + R, D): each image's global box first
        counts = [int(b.shape[0]) for b in boxes]
        firsts = torch.tensor([0] + counts[:-1], device=dev).cumsum(0)
        image_emb = feats[firsts]  # (B, D)
        student_regions = teacher_regions = None
        if regions is not None:
            is_region = torch.ones(feats.shape[0], dtype=torch.bool, device=dev)
            is_region[firsts] = False
            student_regions = feats[is_region]  # (R, D)
            with torch.inference_mode():
                teacher_regions = self.teacher(images.tensors, [r.to(dev) for r in regions])  # (R, D)
            # An ordinary tensor again: the distillation target derived from it is saved for the backward pass.
            teacher_regions = teacher_regions.clone()
        captions = [str(item["caption"]) for item in batch]
        allowed = None
        if regions is not None and self.caption_concepts is not None:
            per_image = torch.tensor([int(r.shape[0]) for r in regions])
            allowed = self.caption_concepts.mask(captions).repeat_interleave(per_image, dim=0).to(dev)  # (R, K)
        tokens = self.text.tokenizer(captions).to(dev)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.train_text):
            text_emb = self.text.encode_tokens(tokens)  # (B, D)
        codes = torch.tensor([zlib.crc32(c.encode("utf-8")) for c in captions], dtype=torch.int64, device=dev)
        return PretrainOutputs(image_emb, text_emb, codes, student_regions, teacher_regions, allowed)


def random_grid_boxes(n: int, height: int, width: int, generator: torch.Generator, grid: int = 8) -> Tensor:
    """(n, 4) random boxes with corners on a ``grid``-pixel lattice (the original's RANDOM region type)."""
    cols, rows = max(1, width // grid), max(1, height // grid)
    x0 = torch.randint(cols, (n,), generator=generator)
    y0 = torch.randint(rows, (n,), generator=generator)
    x1 = x0 + 1 + (torch.rand(n, generator=generator) * (cols - x0)).long()
    y1 = y0 + 1 + (torch.rand(n, generator=generator) * (rows - y0)).long()
    return torch.stack([x0, y0, x1, y1], dim=1).float() * grid


def compute_losses(model: nn.Module, batch: list[dict]) -> dict[str, Tensor]:
    """The pretraining losses of one batch (weights from the recipe; a zero weight leaves a loss out)."""
    inner: PretrainModel = D.unwrap(model)
    cfg = inner.cfg
    out = model(batch)
    tau = inner.temperature()
    losses: dict[str, Tensor] = {}
    if cfg.loss_image_text > 0:
        image_emb = D.all_gather(out.image_emb, grad=cfg.gather_grad)  # the global batch, as the original
        text_emb = D.all_gather(out.text_emb, grad=cfg.gather_grad if cfg.train_text else "local")
        positives = None
        if cfg.same_caption_positive:
            codes = D.all_gather(out.caption_codes, grad="local")
            positives = codes[:, None] == codes[None, :]
        losses["loss_img_txt"] = cfg.loss_image_text * image_text_contrastive(image_emb, text_emb, tau,
                                                                               positives=positives)
    if out.student_regions is not None:
        pl = pseudo_labels(out.teacher_regions, inner.concepts, temperature=cfg.teacher_temperature,
                           threshold=cfg.concept_thresh, allowed=out.allowed)
        kept = out.student_regions[pl.keep]  # (R_k, D)
        if cfg.loss_region_distill > 0:
            logits = nn.functional.normalize(kept, dim=-1) @ nn.functional.normalize(inner.concepts, dim=-1).t() / tau
            losses["loss_region_distill"] = cfg.loss_region_distill * region_distillation(logits, pl.teacher_probs)
        if cfg.loss_concept_contrastive > 0:
            losses["loss_concept_contrastive"] = cfg.loss_concept_contrastive * concept_contrastive(
                kept, inner.concepts[pl.targets], pl.targets, tau)
    if not losses:
        raise RclipError("every pretraining loss has weight 0 (pretrain.loss_*)")
    # Unreadable images this step (each replaced by the next readable pair, so batches stay full).
    losses[engine.COUNT_PREFIX + "images_skipped"] = torch.tensor(float(sum(int(i.get("skipped", 0)) for i in batch)))
    return losses


def param_groups(model: PretrainModel) -> list[dict]:
    """Trainable parameters: the student's visual tower at ``lr``; its text tower (with ``train_text``) and the
    learned temperature at ``lr * text_lr_scale``. Norms, biases, embeddings and the temperature are not decayed."""
    cfg = model.cfg
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.student.named_parameters():
        if not p.requires_grad:
            continue
        visual = name.startswith("visual.")
        decay = p.ndim >= 2 and "embedding" not in name
        groups.setdefault((visual, decay), []).append(p)
    return [{"params": ps, "lr_scale": 1.0 if visual else cfg.text_lr_scale,
             **({} if decay else {"weight_decay": 0.0})} for (visual, decay), ps in sorted(groups.items())[::-1]]


# ---------------------------------------------------------------------------------------------------------------
# building the stage from a recipe


def input_paths(cfg: PretrainCfg, recipe: Recipe) -> dict[str, str]:
    """The files a pretraining recipe names (recipe key → path), for checking before any work starts."""
    paths = {"pretrain.captions": cfg.captions, "pretrain.images": cfg.images}
    if cfg.concepts is not None:
        paths["pretrain.concepts"] = cfg.concepts
        if cfg.regions == "rpn":
            paths["pretrain.rpn"] = cfg.rpn
        if cfg.teacher is not None and _is_local(cfg.teacher):
            paths["pretrain.teacher"] = cfg.teacher
    if recipe.model.weights is not None and _is_local(recipe.model.weights):
        paths["model.weights"] = recipe.model.weights
    return paths


def _is_local(spec: str) -> bool:
    return spec.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.sep in spec or os.path.exists(spec)


def check_inputs(recipe: Recipe) -> None:
    """Refuse a recipe with missing or unset inputs, listing every one in one message."""
    cfg = recipe.pretrain
    problems = []
    for key, path in input_paths(cfg, recipe).items():
        if path is None:
            problems.append(f"{key} is not set")
        elif not Path(path).exists():
            problems.append(f"{key}: {path} not found")
    if problems:
        raise RclipError("the recipe's inputs are not usable: " + "; ".join(problems))
    if cfg.regions_per_image < 1 or cfg.rpn_topk < 1:
        raise RclipError("pretrain.regions_per_image and pretrain.rpn_topk must be at least 1")
    if not 0 <= cfg.concept_thresh <= 1 or not 0 < cfg.rpn_nms_thresh <= 1:
        raise RclipError("pretrain.concept_thresh must be in [0, 1] and pretrain.rpn_nms_thresh in (0, 1]")
    if cfg.temperature <= 0 or cfg.teacher_temperature <= 0:
        raise RclipError("pretrain.temperature and pretrain.teacher_temperature must be positive")


def build_stage(recipe: Recipe, *, device: str | torch.device = "cpu", cache_proposals: str | os.PathLike | None = None,
                progress=None) -> tuple[PretrainModel, torch.utils.data.Dataset]:
    """The model and dataset of a pretraining recipe (inputs checked first)."""
    import open_clip

    from rclip_core.clip_backbone import create_clip
    from rclip_core.data.captions import CaptionDataset, open_captions
    from rclip_core.text_embed import load_embeddings

    check_inputs(recipe)
    cfg = recipe.pretrain
    source = open_captions(cfg.captions, cfg.images)
    source.check_images()
    # Training from random weights is what a from-scratch stage does (the toy world's teacher), not a warning.
    student = create_clip(recipe.model.variant, recipe.model.weights, log_random_init=False)
    variant = recipe.model.variant = student.rclip_variant
    if student.rclip_random_weights:
        log.info("%s student starts from random weights (no model.weights)", variant)
    if cfg.scratch_init:
        reset_residual_scales(student)
    teacher = concepts = rpn = cache = matcher = None
    if cfg.concepts is not None:
        teacher_clip = create_clip(variant, cfg.teacher if cfg.teacher is not None else recipe.model.weights)
        teacher = build_teacher(teacher_clip, variant, recipe.model.pooler_resolution)
        text = TextEncoder(teacher_clip)
        pool = load_embeddings(cfg.concepts, dim=teacher.out_dim, fingerprint=text.fingerprint())
        concepts = pool.embeddings
        if cfg.caption_concepts:
            matcher = CaptionConcepts(pool.names)
        if concepts.shape[0] < 2:
            raise RclipError(f"{cfg.concepts}: a concept pool needs at least 2 concepts, got {concepts.shape[0]}")
        del text
        if cfg.regions == "rpn":
            rpn_model = load_pretrain_rpn(cfg)
            if cache_proposals is not None:
                from rclip_core.proposal_cache import ensure_proposal_cache

                cache = ensure_proposal_cache(cache_proposals, source, rpn_model, cfg, device=device,
                                              progress=progress)
            else:
                from rclip_core.detector import RPNProposals

                rpn = RPNProposals(rpn_model)
    model = PretrainModel(student, cfg=cfg, pooler_resolution=pooler_resolution_for(
        variant, recipe.model.pooler_resolution), transform=clip_normalizer(recipe.input.pixel_mean,
                                                                             recipe.input.pixel_std),
        tokenizer=open_clip.get_tokenizer("RN50"), teacher=teacher, concepts=concepts, rpn=rpn,
        caption_concepts=matcher)
    dataset = CaptionDataset(source, min_sizes=cfg.min_sizes, max_size=cfg.max_size, proposals=cache,
                             cache_images=cfg.cache_images)
    return model, dataset


def build_teacher(clip: nn.Module, variant: str, pooler_resolution: int | None = None) -> CLIPRegionEncoder:
    """The frozen teacher's region encoder over ``clip.visual``, prepared for inference as ``rclip zeroshot`` is
    (batch norms folded into the convolutions, channels-last; the same pseudo labels to float rounding, tested): it
    never trains and is never saved. Its text tower is untouched (the concept pool's fingerprint is read from it)."""
    from rclip_core.clip_backbone import build_region_encoder, prepare_for_inference

    prepare_for_inference(clip)
    return build_region_encoder(clip, variant, pooler_resolution).requires_grad_(False).eval()


def load_pretrain_rpn(cfg: PretrainCfg) -> nn.Module:
    """The base-category RPN of ``cfg.rpn`` with pretraining's NMS and top-k (the original's 0.5 and 300)."""
    from rclip_core.recipes import recipe_from_dict
    from rclip_core.rpn.convert import load_rpn_state, read_rpn_checkpoint

    state, stored = read_rpn_checkpoint(cfg.rpn)
    rpn_cfg = recipe_from_dict({"rpn": stored["rpn"]}).rpn
    rpn_cfg.nms_thresh, rpn_cfg.post_nms_topk_test = cfg.rpn_nms_thresh, cfg.rpn_topk
    return load_rpn_state(state, rpn_cfg, str(cfg.rpn))


def run_pretrain(recipe: Recipe, *, out_dir: str | os.PathLike, resume: bool = False,
                 device: str | torch.device = "cpu", hooks=(), cache_proposals: str | os.PathLike | None = None,
                 progress=None) -> engine.TrainResult:
    """Build the stage of ``recipe`` and train it on the engine; ``out_dir/checkpoint.pt`` is a plain CLIP checkpoint
    (the student) that ``rclip zeroshot``, ``visualize`` and ``embed`` load with ``--weights``."""
    model, dataset = build_stage(recipe, device=device, cache_proposals=cache_proposals, progress=progress)
    return engine.train(model, compute_losses, dataset, recipe.pretrain, out_dir=out_dir,
                        recipe=recipe_to_dict(recipe), resume=resume, section="pretrain", device=device,
                        param_groups=param_groups(model), checkpoint_module=model.student, hooks=hooks)
