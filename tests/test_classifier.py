import torch

from rclip_core.classifier import CosineClassifier


def test_background_column_is_in_the_softmax_and_dropped_after():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    clf = CosineClassifier(text, temperature=0.01, background=True)
    region = torch.tensor([[2.0, 0.0]])  # cos = (1, 0), background logit 0
    probs = clf(region)
    logits = torch.tensor([100.0, 0.0, 0.0])
    assert torch.allclose(probs, logits.softmax(0)[:2][None], atol=1e-6)
    warm = CosineClassifier(text, temperature=1.0, background=True)(region)  # at τ = 1 the background mass is visible
    assert torch.allclose(warm, torch.tensor([1.0, 0.0, 0.0]).softmax(0)[:2][None]) and warm.sum() < 0.9
    no_bg = CosineClassifier(text, temperature=0.01, background=False)(region)
    assert torch.allclose(no_bg.sum(), torch.tensor(1.0))


def test_background_matters_when_all_similarities_are_low():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    region = torch.tensor([[-1.0, -1.0]])  # negative cosine to every class: the zero background wins
    probs = CosineClassifier(text, temperature=0.01, background=True)(region)
    assert probs.sum() < 1e-6
    assert torch.allclose(CosineClassifier(text, temperature=0.01, background=False)(region).sum(), torch.tensor(1.0))


def test_scale_invariance_and_empty_input():
    text = torch.randn(5, 8)
    clf = CosineClassifier(text * 7.0, temperature=0.01, background=True)
    r = torch.randn(3, 8)
    assert torch.allclose(clf(r), CosineClassifier(text, temperature=0.01, background=True)(r * 0.1), atol=1e-5)
    assert clf(torch.zeros(0, 8)).shape == (0, 5)
    assert clf.logits(r).shape == (3, 6)


def test_temperature_and_background_are_required_and_the_recipe_holds_the_originals():
    import inspect

    import pytest

    from rclip_core.recipes import load_recipe

    # No default to drift from the recipe's: each of the two is required on its own.
    params = inspect.signature(CosineClassifier).parameters
    assert params["temperature"].default is inspect.Parameter.empty
    assert params["background"].default is inspect.Parameter.empty
    with pytest.raises(TypeError):
        CosineClassifier(torch.eye(2), background=True)
    with pytest.raises(TypeError):
        CosineClassifier(torch.eye(2), temperature=0.01)
    zs = load_recipe(None).zeroshot
    assert zs.temperature == 0.01 and zs.background is True  # CLSS_TEMP and the zero background of the original
