"""Pretraining's region losses and pseudo labels (RegionCLIP §3.2, regionclip_facts.md §4) against independent,
plainly written computations (Python loops over rows and columns, ``math`` instead of torch's fused kernels), on
fixed-seed inputs, plus their empty cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import skip_unless_ci

from rclip_core.errors import RclipError
from rclip_core.losses import concept_contrastive, region_distillation
from rclip_core.pseudo_labels import pseudo_labels


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def test_distillation_is_batchmean_kl_of_teacher_to_student():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 7, generator=g) * 3
    teacher = torch.randn(5, 7, generator=g).softmax(dim=1)
    expected = 0.0
    for r in range(5):
        p_s = _softmax(logits[r].tolist())
        for k in range(7):
            t = float(teacher[r, k])
            expected += t * (math.log(t) - math.log(p_s[k]))
    expected /= 5  # batchmean: summed over concepts, averaged over regions
    assert float(region_distillation(logits, teacher)) == pytest.approx(expected, rel=1e-5)


def test_distillation_is_zero_when_the_student_matches_and_rejects_shape_mismatch():
    logits = torch.randn(3, 4)
    assert float(region_distillation(logits, logits.softmax(1))) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        region_distillation(torch.zeros(3, 4), torch.zeros(3, 5))


def test_concept_contrastive_is_mil_cross_entropy_with_summed_positives():
    g = torch.Generator().manual_seed(2)
    regions = torch.randn(6, 5, generator=g)
    concepts = torch.randn(4, 5, generator=g)
    ids = torch.tensor([0, 2, 0, 3, 2, 2])  # regions 0/2 and 1/4/5 share a pseudo concept
    tau = 0.07
    targets = concepts[ids]
    expected = 0.0
    for i in range(6):
        row = [_cos(regions[i].tolist(), targets[j].tolist()) / tau for j in range(6)]
        probs = _softmax(row)
        positive = sum(p for j, p in enumerate(probs) if int(ids[j]) == int(ids[i]))  # summed, not averaged
        expected += -math.log(positive)
    expected /= 6  # rows averaged; region -> text direction only
    assert float(concept_contrastive(regions, targets, ids, tau)) == pytest.approx(expected, rel=1e-5)


def test_concept_contrastive_counts_every_same_concept_column_as_positive():
    # Two regions with the same concept and identical embeddings: with both columns positive, a perfectly aligned
    # row loses nothing; were only the diagonal positive, it would lose log 2.
    e = torch.eye(3)
    regions = torch.stack([e[0], e[0], e[1]])
    ids = torch.tensor([0, 0, 1])
    loss = float(concept_contrastive(regions, e[ids], ids, 0.01))
    assert loss == pytest.approx(0.0, abs=1e-6)


def test_region_losses_on_zero_regions_are_connected_zeros():
    student = torch.zeros(0, 8, requires_grad=True)
    for loss in (region_distillation(student, torch.zeros(0, 8)),
                 concept_contrastive(student, torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), 0.01)):
        assert loss.dim() == 0 and float(loss.detach()) == 0.0
        loss.backward()  # an image without proposals must not break the step
    assert student.grad is not None and student.grad.shape == (0, 8)


def test_pseudo_labels_keep_confident_regions_with_argmax_and_full_distribution():
    g = torch.Generator().manual_seed(3)
    concepts = torch.randn(5, 6, generator=g)
    regions = torch.randn(7, 6, generator=g)
    tau, thresh = 0.5, 0.4
    pl = pseudo_labels(regions, concepts, temperature=tau, threshold=thresh)
    keep, targets, probs = [], [], []
    for r in range(7):
        p = _softmax([_cos(regions[r].tolist(), concepts[k].tolist()) / tau for k in range(5)])
        best = max(range(5), key=lambda k: p[k])
        keep.append(p[best] > thresh)
        if keep[-1]:
            targets.append(best)
            probs.append(p)
    assert pl.keep.tolist() == keep
    assert 0 < sum(keep) < 7  # the case exercises both sides of the threshold
    assert pl.targets.tolist() == targets
    assert torch.allclose(pl.teacher_probs, torch.tensor(probs), atol=1e-6)


def test_pseudo_labels_keep_every_region_when_none_passes_and_handle_zero_regions():
    regions = F.normalize(torch.randn(4, 6), dim=-1)
    pl = pseudo_labels(regions, torch.randn(10, 6), temperature=100.0, threshold=0.9)  # flat: nothing passes
    assert pl.keep.all() and pl.num_kept == 4 and pl.teacher_probs.shape == (4, 10)
    empty = pseudo_labels(torch.zeros(0, 6), torch.randn(10, 6), temperature=0.01, threshold=0.1)
    assert empty.num_kept == 0 and empty.teacher_probs.shape == (0, 10) and empty.keep.shape == (0,)


def test_pseudo_labels_restricted_to_caption_concepts_softmax_over_the_allowed_ones():
    g = torch.Generator().manual_seed(4)
    concepts = torch.randn(5, 6, generator=g)
    regions = torch.randn(6, 6, generator=g)
    allowed = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0],
                            [1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    tau = 0.5
    pl = pseudo_labels(regions, concepts, temperature=tau, threshold=0.0, allowed=allowed)
    targets, probs = [], []
    for r in range(6):
        ks = [k for k in range(5) if allowed[r, k]] or list(range(5))  # none allowed: the whole pool
        p = _softmax([_cos(regions[r].tolist(), concepts[k].tolist()) / tau for k in ks])
        full = [0.0] * 5
        for k, v in zip(ks, p):
            full[k] = v
        targets.append(max(range(5), key=lambda k: full[k]))
        probs.append(full)
    assert pl.targets.tolist() == targets
    assert torch.allclose(pl.teacher_probs, torch.tensor(probs), atol=1e-6)
    free = pseudo_labels(regions, concepts, temperature=tau, threshold=0.0)
    assert pl.targets.tolist() != free.targets.tolist()  # the restriction changes some labels here


def test_caption_concepts_finds_the_pool_concepts_a_caption_names():
    from rclip_core.pseudo_labels import CaptionConcepts
    from rclip_core.vocab.extract import load_extractor

    try:
        extractor = load_extractor()
    except RclipError as e:
        skip_unless_ci(f"no trained spaCy pipeline: {e}")
    match = CaptionConcepts(["circle", "star", "heart", "photo"], extractor)
    mask = match.mask(["two red stars and a circle.", "a photo of a heart.", "a green triangle.", "two red stars "
                       "and a circle."])
    assert mask.tolist() == [[True, True, False, False], [False, False, True, True], [False, False, False, False],
                             [True, True, False, False]]
