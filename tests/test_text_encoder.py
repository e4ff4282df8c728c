import copy

import torch

from rclip_core.text_encoder import TextEncoder

PROMPTS = ["a photo of a cat.", "a photo of a very large dog sitting on a red sofa in the living room.", "tv."]


def test_truncation_gives_the_same_features_as_open_clip(tiny_clip):
    enc = TextEncoder(tiny_clip)
    tokens = enc.tokenizer(PROMPTS)
    with torch.no_grad():
        reference = tiny_clip.encode_text(tokens)
        full = enc.encode_tokens(tokens, truncate=False)
        short = enc.encode_tokens(tokens, truncate=True)
    assert torch.allclose(full, reference, atol=1e-5)
    assert torch.allclose(short, reference, atol=1e-5)
    assert short.shape == (3, enc.out_dim)


def test_single_prompt_and_empty_batch(tiny_clip):
    enc = TextEncoder(tiny_clip)
    with torch.no_grad():
        one = enc(["a photo of a cat."])
        assert one.shape == (1, enc.out_dim)
        assert enc.encode_tokens(torch.zeros((0, 77), dtype=torch.long)).shape == (0, enc.out_dim)


def test_fingerprint_tracks_text_weights_only(tiny_clip):
    enc = TextEncoder(tiny_clip)
    other = copy.deepcopy(tiny_clip)
    with torch.no_grad():
        other.visual.conv1.weight.add_(1.0)
    assert TextEncoder(other).fingerprint() == enc.fingerprint()
    with torch.no_grad():
        other.ln_final.bias.add_(1e-3)
    assert TextEncoder(other).fingerprint() != enc.fingerprint()
    assert enc.fingerprint().startswith(f"D{enc.out_dim}-")
