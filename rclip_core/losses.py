"""Pure loss functions (RegionCLIP §3.2-3.3). No module state: every input, temperature included, is passed in.

Shapes: B images (or image-caption pairs), D embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def image_text_contrastive(image_emb: Tensor, text_emb: Tensor, temperature: float | Tensor) -> Tensor:
    """Symmetric InfoNCE between matched image and caption embeddings (RegionCLIP's ``loss_img_txt_level``).

    Row ``i`` of both inputs is a matched pair; every other row of the batch is a negative. Both sides are
    L2-normalised, the cosine matrix is divided by ``temperature``, and the cross-entropy over rows (image → text)
    and over columns (text → image) are averaged.

    Args:
        image_emb: (B, D) image embeddings, not necessarily normalised.
        text_emb: (B, D) caption embeddings, not necessarily normalised.
        temperature: a positive float, or a 0-dim tensor when the temperature is learned.

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
    if image_emb.shape[0] == 0:
        return image_emb.sum() * 0.0 + text_emb.sum() * 0.0
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = image_emb @ text_emb.t() / temperature  # (B, B): images in rows, captions in columns
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
