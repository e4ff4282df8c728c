"""Pseudo labels for regions from a frozen teacher (RegionCLIP §3.2 "region-text pairs from the teacher";
the original's ``get_psuedo_concept_labels``, regionclip_facts.md §4).

The teacher pools each proposal from its own feature map (RoIAlign → res5 → attention pool, not image crops),
scores it against the concept pool by cosine / τ (τ = 0.01) with a softmax, and a region is kept when its best
concept's probability exceeds the threshold (0.1) — all regions of the batch when none does. The pseudo concept is
the argmax; the teacher's full distribution is kept for distillation.

Shapes: R regions (all images of the batch on this process), K concepts, D embedding dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PseudoLabels:
    """Per region of the batch: whether it is kept, and for the kept ones (R_k of them) the pseudo concept and the
    teacher's distribution over the pool."""

    keep: Tensor  # (R,) bool
    targets: Tensor  # (R_k,) concept indices
    teacher_probs: Tensor  # (R_k, K)

    @property
    def num_kept(self) -> int:
        return int(self.targets.shape[0])


@torch.no_grad()
def pseudo_labels(teacher_regions: Tensor, concepts: Tensor, *, temperature: float, threshold: float,
                  allowed: Tensor | None = None) -> PseudoLabels:
    """Label regions with concepts.

    Args:
        teacher_regions: (R, D) the teacher's region embeddings (normalised here).
        concepts: (K, D) the teacher's concept embeddings (normalised here).
        temperature: τ of the softmax over concepts.
        threshold: keep a region whose best probability exceeds this; keep all when none does.
        allowed: (R, K) bool, the concepts each region may be named with (``pretrain.caption_concepts``: those its
            image's caption mentions; not the original's): the softmax runs over them alone. A row with none
            allowed keeps the whole pool.

    Example:
        >>> pl = pseudo_labels(torch.eye(3), torch.eye(3), temperature=0.01, threshold=0.1)
        >>> pl.targets.tolist(), pl.keep.tolist()
        ([0, 1, 2], [True, True, True])
    """
    logits = F.normalize(teacher_regions.float(), dim=-1) @ F.normalize(concepts.float(), dim=-1).t() / temperature
    if allowed is not None:
        logits = logits.masked_fill(~allowed & allowed.any(dim=1, keepdim=True), float("-inf"))
    probs = logits.softmax(dim=1)  # (R, K)
    best, idx = probs.max(dim=1) if probs.shape[0] else (probs.new_zeros(0), probs.new_zeros(0, dtype=torch.long))
    keep = best > threshold
    if not bool(keep.any()):
        keep = torch.ones_like(keep)  # the original then keeps every region (max probability > 0)
    return PseudoLabels(keep=keep, targets=idx[keep], teacher_probs=probs[keep])


class CaptionConcepts:
    """Which pool concepts a caption mentions, found with ``rclip vocab build``'s extractor (spaCy nouns,
    lemmatized), so that a caption's "two red stars" meets the pool's "star". Captions repeat (the toy world's,
    COCO's several per image): each is parsed once, up to ``cache_size`` remembered."""

    def __init__(self, names: list[str], extractor=None, *, cache_size: int = 100_000) -> None:
        from functools import lru_cache

        from rclip_core.vocab.extract import load_extractor

        self.index = {n: i for i, n in enumerate(names)}
        self.extractor = extractor or load_extractor()
        self._ids = lru_cache(maxsize=cache_size)(self._parse)

    def _parse(self, caption: str) -> tuple[int, ...]:
        found = self.extractor.concepts(self.extractor.nlp(caption))
        return tuple(sorted({self.index[c] for c in found if c in self.index}))

    def mask(self, captions: list[str]) -> Tensor:
        """(B, K) bool: concept k is mentioned by caption b."""
        out = torch.zeros(len(captions), len(self.index), dtype=torch.bool)
        for b, c in enumerate(captions):
            out[b, list(self._ids(c))] = True
        return out
