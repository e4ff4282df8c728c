"""Pure loss functions (RegionCLIP §3.2-3.3). No module state: every input, temperature included, is passed in.

Shapes: B images (or image-caption pairs), D embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def image_text_contrastive(image_emb: Tensor, text_emb: Tensor, temperature: float | Tensor, *,
                           positives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE between matched image and caption embeddings (RegionCLIP's ``loss_img_txt_level``).

    Row ``i`` of both inputs is a matched pair; every other row of the batch is a negative. Both sides are
    L2-normalised, the cosine matrix is divided by ``temperature``, and the cross-entropy over rows (image → text)
    and over columns (text → image) are averaged.

    Args:
        image_emb: (B, D) image embeddings, not necessarily normalised.
        text_emb: (B, D) caption embeddings, not necessarily normalised.
        temperature: a positive float, or a 0-dim tensor when the temperature is learned.
        positives: optional (B, B) bool, ``positives[i, j]`` = caption ``j`` also describes image ``i`` (e.g. the
            same caption text twice in a batch); must hold the diagonal. Each row and column then uses the
            multiple-instance form of RegionCLIP's concept loss, ``-log`` of the summed probability of its positives,
            instead of treating an identical caption as a negative. None = the diagonal only (plain InfoNCE).

    Returns:
        0-dim loss. For B = 0 a zero that is still connected to both inputs, so ``backward()`` works on an empty
        batch. For B = 1 the loss is 0 (the only candidate is the right one).

    Example:
        >>> e = torch.eye(3)
        >>> round(float(image_text_contrastive(e, e, 1.0)), 4)  # log(1 + 2/e) -- cosine 1 vs 0, twice over
        0.5514
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"expected two (B, D) tensors of the same shape, got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    b = image_emb.shape[0]
    if b == 0:
        return image_emb.sum() * 0.0 + text_emb.sum() * 0.0
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = image_emb @ text_emb.t() / temperature  # (B, B): images in rows, captions in columns
    if positives is None:
        target = torch.arange(b, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    if positives.shape != (b, b) or not bool(positives.diagonal().all()):
        raise ValueError(f"positives must be a ({b}, {b}) bool mask that holds the diagonal")
    masked = logits.masked_fill(~positives, float("-inf"))  # only positives survive the logsumexp
    rows = torch.logsumexp(logits, dim=1) - torch.logsumexp(masked, dim=1)  # (B,) image → text
    cols = torch.logsumexp(logits, dim=0) - torch.logsumexp(masked, dim=0)  # (B,) text → image
    return 0.5 * (rows.mean() + cols.mean())


def region_distillation(student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """KL(teacher ‖ student) over the concept pool, averaged over regions (RegionCLIP's ``loss_region_distill``:
    ``F.kl_div(log p_student, p_teacher, reduction="batchmean")``).

    Args:
        student_logits: (R, K) the student's cosine similarities to the concepts / τ.
        teacher_probs: (R, K) the teacher's softmax over the same concepts (rows sum to 1).

    Returns:
        0-dim loss; for R = 0 a zero still connected to ``student_logits``.
    """
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher probabilities "
                         f"{tuple(teacher_probs.shape)} differ in shape")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    return F.kl_div(F.log_softmax(student_logits, dim=1), teacher_probs, reduction="batchmean")


def concept_contrastive(region_emb: Tensor, target_emb: Tensor, target_ids: Tensor, temperature: float) -> Tensor:
    """Region-concept contrastive loss (RegionCLIP's ``loss_concept_contrastive``, MIL cross-entropy).

    Row ``i`` is region ``i``; column ``j`` is the pseudo concept of region ``j`` (so an [R, R] matrix of the
    regions of one process, not gathered). Every column whose concept equals region ``i``'s is a positive; the loss
    of a row is ``-log`` of the *summed* softmax probability of its positives, averaged over rows (region → text
    only, as the original).

    Args:
        region_emb: (R, D) student region embeddings (normalised here).
        target_emb: (R, D) the concept embedding of each region's pseudo label (normalised here).
        target_ids: (R,) the pseudo label's concept index.
        temperature: τ.

    Returns:
        0-dim loss; for R = 0 a zero still connected to ``region_emb``.
    """
    r = region_emb.shape[0]
    if target_emb.shape[0] != r or target_ids.shape != (r,):
        raise ValueError("one target embedding and one concept id per region are needed")
    if r == 0:
        return region_emb.sum() * 0.0
    logits = F.normalize(region_emb, dim=-1) @ F.normalize(target_emb, dim=-1).t() / temperature  # (R, R)
    positives = target_ids[:, None] == target_ids[None, :]  # (R, R), holds the diagonal
    masked = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(masked, dim=1)).mean()


def fast_rcnn_losses(class_logits: Tensor, box_deltas: Tensor | None, gt_classes: Tensor,
                     regression_targets: Tensor | None, *, bg_weight: float | None = None,
                     focal_gamma: float | None = None, smooth_l1_beta: float = 0.0) -> dict[str, Tensor]:
    """Fast R-CNN losses of the finetuned detector, as the original's ``FastRCNNOutputLayers.losses`` computes them
    (RegionCLIP §3.4; regionclip_facts.md §2 "Open-vocabulary transfer").

    Classification, over K classes + background (the last column, label ``K``):

    - ``focal_gamma`` None: cross-entropy averaged over the sampled regions; with ``bg_weight`` the background
      class's weight in torch's *weighted* mean (``sum w_i l_i / sum w_i``), the original's LVIS setting;
    - ``focal_gamma`` γ: per-region cross-entropy × (1 − p_t)^γ (p_t the softmax probability of the true class),
      background regions × ``bg_weight``, then the *plain* mean over regions — the original's focal path (COCO),
      which multiplies the weights in and divides by R, not by their sum. p_t is capped one float step below 1,
      where the original's gradient is NaN.

    Box regression: class-agnostic smooth-L1 (``smooth_l1_beta`` 0 is L1, detectron2's default) between the
    predicted and target deltas of foreground regions only, summed and divided by the number of sampled regions R
    (detectron2's normalisation: each foreground region has the same influence whatever the batch holds).

    Args:
        class_logits: (R, K + 1) logits (cosine / τ), background last.
        box_deltas: (R, 4) predicted deltas, or None (no regressor: no ``loss_box_reg``).
        gt_classes: (R,) int64 in 0..K, K = background.
        regression_targets: (R, 4) target deltas (only foreground rows are read); None without a regressor.
        bg_weight: the background class's loss weight (0.2 COCO, 0.8 LVIS), None = 1.
        focal_gamma: γ of the focal scaling (0.5 COCO), None = plain cross-entropy.
        smooth_l1_beta: where smooth-L1 turns from quadratic to linear.

    Returns:
        ``{"loss_cls": 0-dim, "loss_box_reg"?: 0-dim}``; for R = 0 zeros still connected to the inputs.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])  # K = 2, background last
        >>> out = fast_rcnn_losses(logits, None, torch.tensor([0, 2]), None)
        >>> round(float(out["loss_cls"]), 4)
        0.1672
    """
    r, k1 = class_logits.shape
    if gt_classes.shape != (r,):
        raise ValueError(f"one label per region is needed: {r} logits rows, labels of shape {tuple(gt_classes.shape)}")
    losses: dict[str, Tensor] = {}
    if r == 0:
        losses["loss_cls"] = class_logits.sum() * 0.0
        if box_deltas is not None:
            losses["loss_box_reg"] = box_deltas.sum() * 0.0
        return losses
    logits = class_logits.float()
    bg = k1 - 1
    if focal_gamma is None:
        weight = None
        if bg_weight is not None:
            weight = torch.ones(k1, device=logits.device)
            weight[bg] = bg_weight
        losses["loss_cls"] = F.cross_entropy(logits, gt_classes, weight=weight)
    else:
        ce = F.cross_entropy(logits, gt_classes, reduction="none")  # (R,)
        p_t = logits.softmax(dim=1).gather(1, gt_classes[:, None])[:, 0]  # (R,)
        # A region named with certainty (p_t rounds to 1: a logit margin over ~17, a cosine margin of 0.17 at
        # τ 0.01) would make (1 - p_t)^γ's derivative infinite and the whole step NaN; the original computes it
        # unclamped. Capping p_t one float step below 1 keeps the gradient finite and changes only the loss of such
        # regions, whose cross-entropy is already under 1.2e-7.
        p_t = p_t.clamp(max=1 - torch.finfo(p_t.dtype).eps)
        loss = ce * (1 - p_t) ** focal_gamma
        if bg_weight is not None:
            loss = torch.where(gt_classes == bg, loss * bg_weight, loss)
        losses["loss_cls"] = loss.mean()
    if box_deltas is not None:
        if regression_targets is None or regression_targets.shape != (r, 4) or box_deltas.shape != (r, 4):
            raise ValueError("class-agnostic regression needs (R, 4) predicted and target deltas")
        fg = gt_classes < bg
        pred, target = box_deltas[fg].float(), regression_targets[fg].float()
        if smooth_l1_beta > 0:
            per = F.smooth_l1_loss(pred, target, beta=smooth_l1_beta, reduction="sum")
        else:
            per = (pred - target).abs().sum()
        losses["loss_box_reg"] = per / r
    return losses
