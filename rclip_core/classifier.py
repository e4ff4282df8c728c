"""Cosine classifier over text embeddings, with a background column (RegionCLIP §3.1, §3.2; facts §3).

Shapes: R regions, K classes, D embedding dim.

Zero-shot uses the original's rule: logits are cosine similarities divided by a temperature τ = 0.01, with a
background logit that is the dot product with an all-zero embedding (always 0) appended before the softmax; the
background column is then dropped, so a row sums to slightly less than 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CosineClassifier(nn.Module):
    """Scores regions against fixed class embeddings.

    Args:
        class_embeddings: (K, D) text embeddings (normalised here; stored as a buffer, never trained).
        temperature: τ; logits are cos / τ (the original's 0.01 is the recipe default, ``zeroshot.temperature``).
        background: append a background column before the softmax.
        bg_embedding: (D,) background embedding; default all-zero (logit 0), the original's zero-shot choice.
        learn_background: make the background embedding a trained parameter (a finetuning recipe option; the
            original keeps it frozen at zero).

    Example:
        >>> clf = CosineClassifier(torch.eye(3), temperature=0.01, background=True)
        >>> clf(torch.tensor([[1.0, 0.0, 0.0]])).argmax(dim=1)
        tensor([0])
    """

    def __init__(self, class_embeddings: Tensor, *, temperature: float, background: bool,
                 bg_embedding: Tensor | None = None, learn_background: bool = False) -> None:
        super().__init__()
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.float(), dim=-1))  # (K, D)
        self.temperature = temperature
        self.background = background
        d = class_embeddings.shape[1]
        bg = bg_embedding.detach().float().clone() if bg_embedding is not None else torch.zeros(d)
        if learn_background:
            self.bg_embedding = nn.Parameter(bg)
        else:
            self.register_buffer("bg_embedding", bg)

    @property
    def num_classes(self) -> int:
        return int(self.class_embeddings.shape[0])

    def logits(self, region_features: Tensor) -> Tensor:
        """(R, D) → (R, K [+1]) logits; the last column is the background when ``background``."""
        feats = F.normalize(region_features.float(), dim=-1)
        logits = feats @ self.class_embeddings.T  # (R, K)
        if self.background:
            # No normalisation of the background vector: all-zero gives logit 0, as in the original.
            logits = torch.cat([logits, (feats @ self.bg_embedding)[:, None]], dim=1)  # (R, K+1)
        return logits / self.temperature

    def probs(self, logits: Tensor) -> Tensor:
        """Logits (R, K [+1]) from :meth:`logits` → class probabilities (R, K), the background column dropped after
        the softmax (so a row sums to slightly less than 1)."""
        return logits.softmax(dim=-1)[:, : self.num_classes]

    def forward(self, region_features: Tensor) -> Tensor:
        """(R, D) → class probabilities (R, K), background column dropped after the softmax."""
        return self.probs(self.logits(region_features))
