"""rclip_core.losses: golden values on hand-made cases, edge batch sizes, symmetry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rclip_core.losses import image_text_contrastive


def test_identity_embeddings_known_value():
    # Cosines are 1 on the diagonal and 0 elsewhere: each row is -log(e / (e + 2)) at temperature 1.
    e = torch.eye(3)
    assert float(image_text_contrastive(e, e, 1.0)) == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)


def test_hand_made_asymmetric_case():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalises to e1, e2
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # normalises to e1, (e1 + e2) / sqrt 2
    c = 1 / math.sqrt(2)
    t = 0.5
    # Cosine matrix [[1, c], [0, c]] / t. Rows: image → text; columns: text → image.
    row0 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(c / t)))
    row1 = -math.log(math.exp(c / t) / (math.exp(0) + math.exp(c / t)))
    col0 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0)))
    col1 = -math.log(math.exp(c / t) / (math.exp(c / t) + math.exp(c / t)))
    expected = 0.5 * ((row0 + row1) / 2 + (col0 + col1) / 2)
    assert float(image_text_contrastive(image, text, t)) == pytest.approx(expected, abs=1e-6)


def test_perfect_alignment_gives_low_loss_and_mismatch_high():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(8, 16), dim=-1)
    aligned = float(image_text_contrastive(x, x, 0.01))
    shuffled = float(image_text_contrastive(x, x.roll(1, dims=0), 0.01))
    assert aligned < 1e-3
    assert shuffled > 5.0


def test_empty_batch_returns_connected_zero():
    image = torch.zeros(0, 4, requires_grad=True)
    text = torch.zeros(0, 4, requires_grad=True)
    loss = image_text_contrastive(image, text, 0.07)
    assert loss.dim() == 0 and float(loss) == 0.0
    loss.backward()  # the graph is kept, so an empty batch does not break the training step
    assert image.grad is not None and image.grad.shape == (0, 4)


def test_single_pair_is_zero():
    image = torch.randn(1, 8, requires_grad=True)
    loss = image_text_contrastive(image, torch.randn(1, 8), 0.07)
    assert float(loss) == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert torch.isfinite(image.grad).all()


def test_symmetric_and_scale_invariant():
    torch.manual_seed(1)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    ab = image_text_contrastive(a, b, 0.1)
    assert torch.allclose(ab, image_text_contrastive(b, a, 0.1), atol=1e-6)
    assert torch.allclose(ab, image_text_contrastive(3 * a, 0.5 * b, 0.1), atol=1e-5)


def test_learned_temperature_gets_a_gradient():
    torch.manual_seed(2)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = image_text_contrastive(torch.randn(4, 8), torch.randn(4, 8), 1 / log_scale.exp())
    loss.backward()
    assert log_scale.grad is not None and log_scale.grad != 0


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="same shape"):
        image_text_contrastive(torch.randn(3, 8), torch.randn(4, 8), 0.07)


def test_positives_none_equals_the_diagonal():
    torch.manual_seed(3)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    plain = image_text_contrastive(a, b, 0.1)
    assert torch.allclose(plain, image_text_contrastive(a, b, 0.1, positives=torch.eye(6, dtype=torch.bool)),
                          atol=1e-6)


def test_repeated_caption_counts_as_a_match():
    # Images 0 and 1 show the same thing and got the same caption text: with the plain loss each is pushed away
    # from the other's (identical) caption; as positives the pair is no longer penalised.
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = image.clone()
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    plain = float(image_text_contrastive(image, text, 0.05))
    multi = float(image_text_contrastive(image, text, 0.05, positives=same))
    assert plain == pytest.approx(2 / 3 * math.log(2), abs=1e-4)  # rows 0, 1 split their mass over two captions
    assert multi == pytest.approx(0.0, abs=1e-4)


def test_positives_must_hold_the_diagonal():
    with pytest.raises(ValueError, match="diagonal"):
        image_text_contrastive(torch.randn(2, 4), torch.randn(2, 4), 0.1, positives=torch.zeros(2, 2, dtype=bool))
