"""Every inference optimisation keeps the plain eager path's numbers: batch norms folded into convolutions,
channels-last memory order, the RoI head in chunks, ``torch.inference_mode`` (issue 11: within 1e-4 of the plain
path's probabilities). The plain path is the same modules, unfolded, contiguous, all regions at once, autograd on.

Random batch-norm statistics (not open_clip's identity init: mean 0, var 1, residual scales 0) make every norm and
every residual branch matter, so a wrong fold (a wrong epsilon, a norm applied twice) changes the outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rclip_core.clip_backbone import create_clip, prepare_for_inference
from rclip_core.detector import GivenBoxes, build_region_detector
from rclip_core.recipes import load_recipe

TOL = 1e-4


def randomise_norms(clip: nn.Module, seed: int = 0) -> nn.Module:
    """Give every visual batch norm realistic statistics and affine parameters (small variances, where the epsilon
    counts), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in clip.visual.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.05 + 0.002)
                m.weight.copy_(torch.rand(n, generator=g) * 0.2 + 0.05)
                m.bias.copy_(torch.randn(n, generator=g) * 0.05)
    return clip.eval()


def detector(clip: nn.Module, variant: str, embeddings: torch.Tensor, *, chunk: int | None, temperature: float,
             full_attention: bool = False):
    recipe = load_recipe(None, [f"model.variant={variant}", f"zeroshot.temperature={temperature}"])
    det = build_region_detector(clip, embeddings, recipe, GivenBoxes("boxes")).eval()
    det.roi_heads.head.chunk = chunk
    det.roi_heads.head.full_attention = full_attention
    return det


def plain_detector(clip: nn.Module, variant: str, embeddings: torch.Tensor, *, temperature: float):
    """The plain path: unfolded, contiguous, all regions at once, open_clip's own attention pool."""
    return detector(clip, variant, embeddings, chunk=None, temperature=temperature, full_attention=True)


def batch_of(sizes: list[tuple[int, int]], n_boxes: int, seed: int = 0) -> list[dict]:
    """uint8 images of the given (h, w) with ``n_boxes`` random boxes each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        x1, y1 = torch.rand(n_boxes, generator=g) * (w - 24), torch.rand(n_boxes, generator=g) * (h - 24)
        bw = 16 + torch.rand(n_boxes, generator=g) * (w / 2)
        bh = 16 + torch.rand(n_boxes, generator=g) * (h / 2)
        boxes = torch.stack([x1, y1, (x1 + bw).clamp(max=w), (y1 + bh).clamp(max=h)], 1)
        out.append({"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), "boxes": boxes})
    return out


def plain_outputs(det, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(region features (R, D), probabilities (R, K)) in autograd mode, as a plain eager run computes them."""
    assert torch.is_grad_enabled()
    out = det(batch)
    assert out.region_features.requires_grad  # really the autograd path
    return out.region_features.detach(), torch.cat(det.region_probs(out)).detach()


def outputs(det, batch, *, inference_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ctx = torch.inference_mode() if inference_mode else torch.enable_grad()
    with ctx:
        out = det(batch)
        return out.region_features.detach().clone(), torch.cat(det.region_probs(out)).detach().clone()


def compare(feats, probs, ref_feats, ref_probs) -> None:
    scale = ref_feats.abs().max()
    assert float((feats - ref_feats).abs().max() / scale) < TOL, "region features differ (relative)"
    assert float((probs - ref_probs).abs().max()) < TOL, "probabilities differ"


_OFF = dict(fold_bn=False, channels_last=False, chunk=None, inference_mode=False, full_attention=True)
OPTIMISATIONS = {
    "fold": {**_OFF, "fold_bn": True},
    "channels_last": {**_OFF, "channels_last": True},
    "chunk": {**_OFF, "chunk": 5},
    "inference_mode": {**_OFF, "inference_mode": True},
    "first_token_attention": {**_OFF, "full_attention": False},
    "all": dict(fold_bn=True, channels_last=True, chunk=5, inference_mode=True, full_attention=False),
}


@pytest.fixture(scope="module")
def tiny_setup():
    torch.manual_seed(0)
    clip = randomise_norms(create_clip("tiny", log_random_init=False))
    # Class embeddings near some regions' own features, and τ = 1, so the probabilities are spread out (a saturated
    # softmax would hide differences); τ = 0.01 (the default) is checked too.
    det = plain_detector(clip, "tiny", torch.randn(6, 32), temperature=1.0)
    batch = batch_of([(128, 160), (96, 128)], n_boxes=7)
    with torch.no_grad():
        feats = det(batch).region_features
    emb = torch.cat([feats[:4], torch.randn(2, 32)])
    emb = emb / emb.norm(dim=1, keepdim=True)
    return clip, emb, batch


@pytest.mark.parametrize("temperature", [1.0, 0.01])
@pytest.mark.parametrize("name", list(OPTIMISATIONS))
def test_each_optimisation_keeps_the_plain_paths_probabilities(tiny_setup, name, temperature):
    clip, emb, batch = tiny_setup
    ref_feats, ref_probs = plain_outputs(plain_detector(copy.deepcopy(clip), "tiny", emb, temperature=temperature),
                                         batch)
    opt = OPTIMISATIONS[name]
    fast = prepare_for_inference(copy.deepcopy(clip), fold_bn=opt["fold_bn"], channels_last=opt["channels_last"])
    if opt["fold_bn"]:
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.visual.modules())  # really folded
    if opt["channels_last"]:
        assert fast.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    det = detector(fast, "tiny", emb, chunk=opt["chunk"], temperature=temperature,
                   full_attention=opt["full_attention"])
    feats, probs = outputs(det, batch, inference_mode=opt["inference_mode"])
    compare(feats, probs, ref_feats, ref_probs)
    if temperature == 1.0:  # the comparison has power: the probabilities are not one-hot
        assert float(ref_probs.max(dim=1).values.min()) < 0.9


def test_detect_runs_without_autograd_and_matches_the_plain_detections(tiny_setup):
    """``detect`` (the command's call) is the plain path's detections: same boxes, labels and scores."""
    from rclip_core.detector import fuse_scores, postprocess

    clip, emb, batch = tiny_setup
    plain = plain_detector(copy.deepcopy(clip), "tiny", emb, temperature=1.0)
    out = plain(batch)
    fast = detector(prepare_for_inference(copy.deepcopy(clip)), "tiny", emb, chunk=5, temperature=1.0)
    dets = fast.detect(batch)
    for i, p in enumerate(plain.region_probs(out)):
        ref = postprocess(out.proposals[i], fuse_scores(p.detach(), None, "none"), score_thresh=fast.score_thresh,
                          nms_thresh=fast.nms_thresh, max_dets=fast.max_dets)
        assert torch.equal(dets[i]["labels"], ref["labels"])
        assert torch.allclose(dets[i]["scores"], ref["scores"], atol=TOL)
        assert not dets[i]["scores"].requires_grad and dets[i]["scores"].is_inference()


def test_chunks_that_cross_images_keep_each_region_with_its_image(tiny_setup):
    """Chunks of 3 over 7 + 7 regions: a chunk holds regions of both images (the image index column matters)."""
    clip, emb, batch = tiny_setup
    ref = outputs(detector(copy.deepcopy(clip), "tiny", emb, chunk=None, temperature=1.0), batch,
                  inference_mode=True)
    for chunk in (1, 3, 13, 14, 100):
        got = outputs(detector(copy.deepcopy(clip), "tiny", emb, chunk=chunk, temperature=1.0), batch,
                      inference_mode=True)
        compare(*got, *ref)


@pytest.mark.slow
def test_rn50_at_real_size_keeps_the_plain_paths_probabilities():
    """RN50 (random weights, realistic norms), one 480×640 image, 40 boxes: all optimisations together within
    1e-4 of the plain path, at the default τ = 0.01."""
    torch.manual_seed(0)
    clip = randomise_norms(create_clip("RN50", log_random_init=False))
    batch = batch_of([(480, 640)], n_boxes=40)
    plain = plain_detector(copy.deepcopy(clip), "RN50", torch.randn(4, 1024), temperature=0.01)
    with torch.no_grad():
        feats = plain(batch).region_features
    emb = torch.cat([feats[:3], torch.randn(1, 1024)])
    emb = emb / emb.norm(dim=1, keepdim=True)
    plain = plain_detector(clip, "RN50", emb, temperature=0.01)
    ref = plain_outputs(plain, batch)
    fast = detector(prepare_for_inference(copy.deepcopy(clip)), "RN50", emb, chunk=16, temperature=0.01)
    compare(*outputs(fast, batch, inference_mode=True), *ref)


def test_first_token_attention_pool_equals_open_clips_forward_and_gradients(tiny_setup):
    """:func:`attention_pool` (the mean token's query alone) is open_clip's ``AttentionPool2d`` forward: same
    outputs and same gradients (the student trains through it)."""
    from rclip_core.clip_backbone import attention_pool

    clip, _, _ = tiny_setup
    pool = copy.deepcopy(clip.visual.attnpool)
    x = torch.randn(5, pool.k_proj.in_features, 4, 4, requires_grad=True)
    ref = pool(x)
    ref.square().sum().backward()
    ref_grads = [x.grad.clone()] + [p.grad.clone() for p in pool.parameters()]
    x.grad = None
    pool.zero_grad()
    ours = attention_pool(pool, x)
    ours.square().sum().backward()
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    # k_proj.bias gets no gradient here: its term is the same for every key and cancels in the softmax (open_clip's
    # gradient for it is zero to rounding).
    grads = [x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in pool.parameters()]
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # compiling the tiny trunk and res5 takes 30-60 s on 2 cores
def test_torch_compile_keeps_the_plain_paths_probabilities(tiny_setup):
    """``zeroshot.compile``: the trunk and res5 under ``torch.compile`` (really compiled, not fallen back), within
    1e-4 of the plain path."""
    from rclip_core.inference import compile_detector

    clip, emb, batch = tiny_setup
    ref = plain_outputs(plain_detector(copy.deepcopy(clip), "tiny", emb, temperature=1.0), batch)
    det = compile_detector(detector(prepare_for_inference(copy.deepcopy(clip)), "tiny", emb, chunk=5,
                                    temperature=1.0))
    compare(*outputs(det, batch, inference_mode=True), *ref)
    for part in (det.backbone, det.roi_heads.head.layer4):
        assert part.compiled is not None and not part.failed
