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
