import pytest
import torch

from rclip_core.clip_backbone import VARIANTS, CLIPRegionEncoder, build_region_encoder, create_clip, get_variant
from rclip_core.errors import RclipError


def test_variant_table():
    assert get_variant("RN50").pooler_resolution == 14
    assert get_variant("RN50x4").pooler_resolution == 18
    assert set(VARIANTS) >= {"RN50", "RN50x4", "tiny"}
    with pytest.raises(RclipError, match="available: RN50, RN50x4, tiny"):
        get_variant("RN101")


def test_random_init_is_reproducible():
    a, b = create_clip("tiny"), create_clip("tiny")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_region_shapes_and_zero_boxes(tiny_clip):
    enc = build_region_encoder(tiny_clip, "tiny")
    images = torch.randn(2, 3, 160, 208)
    res4 = enc.trunk(images)
    assert res4.shape == (2, enc.trunk.out_channels, 10, 13) and enc.trunk.stride == 16
    boxes = [torch.tensor([[0.0, 0.0, 50.0, 60.0], [10.0, 20.0, 200.0, 150.0]]), torch.tensor([[5.0, 5.0, 30.0, 30.0]])]
    with torch.no_grad():
        out = enc.head(res4, boxes)
        assert out.shape == (3, enc.out_dim)
        assert enc.head(res4, [torch.zeros(0, 4), torch.zeros(0, 4)]).shape == (0, enc.out_dim)
        # An image without boxes next to one with boxes keeps the order right.
        mixed = enc.head(res4, [torch.zeros(0, 4), boxes[1]])
    assert torch.allclose(mixed[0], out[2], atol=1e-5)


def test_full_image_box_equals_clip_image_encoder(tiny_clip):
    """At the nominal size (128 px for tiny), RoIAlign (aligned, 8×8) of the whole image samples res4 at its pixels,
    so the region path must reproduce CLIP's own image embedding: the pooling parameters are right."""
    enc = build_region_encoder(tiny_clip, "tiny")
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ours = enc.encode_image(images)
        ref = tiny_clip.encode_image(images)
    assert torch.allclose(ours, ref, atol=1e-4)


def test_wrong_pooler_resolution_is_rejected(tiny_clip):
    with pytest.raises(RclipError, match="use 8"):
        CLIPRegionEncoder(tiny_clip.visual, pooler_resolution=7)


def test_local_weight_files_load_strictly(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    from rclip_core.checkpoint import save_checkpoint

    torch.manual_seed(3)
    src = create_clip("tiny")
    for p in src.parameters():
        p.data.add_(torch.randn_like(p) * 0.01)
    save_checkpoint(tmp_path / "ours.pt", src)
    torch.save(src.state_dict(), tmp_path / "bare.pth")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    for name in ("ours.pt", "bare.pth", "w.safetensors"):
        loaded = create_clip("tiny", str(tmp_path / name))
        assert torch.equal(loaded.visual.conv1.weight, src.visual.conv1.weight), name
    sd = src.state_dict()
    sd.pop("visual.attnpool.c_proj.bias")
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(RclipError, match="missing: visual.attnpool.c_proj.bias"):
        create_clip("tiny", str(tmp_path / "partial.pth"))
    with pytest.raises(RclipError, match="shape mismatch"):
        create_clip("RN50", str(tmp_path / "bare.pth"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RclipError, match="not a readable weights file .not a PyTorch file"):
        create_clip("tiny", str(tmp_path / "junk.pt"))
    with pytest.raises(RclipError, match="not found"):
        create_clip("tiny", str(tmp_path / "missing.pt"))


def _bilinear(fmap, y, x):
    """detectron2/torchvision's bilinear sample of one (C, H, W) map at (y, x); zero outside [-1, H] × [-1, W]."""
    c, h, w = fmap.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return torch.zeros(c, dtype=torch.float64)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * fmap[:, y0, x0] + (1 - ly) * lx * fmap[:, y0, x1]
            + ly * (1 - lx) * fmap[:, y1, x0] + ly * lx * fmap[:, y1, x1])


def reference_roi_align_v2(fmap, box, out, scale):
    """ROIAlignV2 written out with loops: half-pixel offset (aligned), ceil(bin size) samples per bin (adaptive
    sampling ratio 0), averaged. The original's pooler; an independent statement of it."""
    import math

    x1, y1, x2, y2 = (float(v) * scale - 0.5 for v in box)
    bin_h, bin_w = (y2 - y1) / out, (x2 - x1) / out
    ny, nx = math.ceil((y2 - y1) / out), math.ceil((x2 - x1) / out)
    result = torch.zeros(fmap.shape[0], out, out, dtype=torch.float64)
    for i in range(out):
        for j in range(out):
            acc = torch.zeros(fmap.shape[0], dtype=torch.float64)
            for a in range(ny):
                for b in range(nx):
                    acc += _bilinear(fmap, y1 + i * bin_h + (a + 0.5) * bin_h / ny,
                                     x1 + j * bin_w + (b + 0.5) * bin_w / nx)
            result[:, i, j] = acc / (ny * nx)
    return result


def test_region_pooling_is_roi_align_v2_on_res4(tiny_clip):
    """On a synthetic res4 map with structure everywhere (a random model's res4 is nearly constant, so a wrong
    offset or sample count would pass unnoticed there): pooling equals the written-out ROIAlignV2 at scale 1/16."""
    enc = build_region_encoder(tiny_clip, "tiny")
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(1, 3, 9, 11, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[5.0, 7.0, 130.0, 101.0], [40.3, 2.2, 61.9, 139.0], [0.0, 0.0, 176.0, 144.0]],
                         dtype=torch.float64)
    ours = enc.head.pool(fmap, [boxes])  # (3, C, 14, 14)
    for k in range(3):
        ref = reference_roi_align_v2(fmap[0], boxes[k], enc.head.pooler_resolution, 1 / 16)
        assert torch.allclose(ours[k], ref, atol=1e-9), k



def test_a_checkpoint_selects_its_own_variant(tmp_path):
    from rclip_core.checkpoint import save_checkpoint

    src = create_clip("tiny")
    save_checkpoint(tmp_path / "tiny.pt", src, recipe={"model": {"variant": "tiny"}})
    torch.save(src.state_dict(), tmp_path / "bare.pth")
    assert create_clip(None, str(tmp_path / "tiny.pt")).rclip_variant == "tiny"  # recorded in the recipe
    assert create_clip(None, str(tmp_path / "bare.pth")).rclip_variant == "tiny"  # identified by its shapes
    with pytest.raises(RclipError, match="is a tiny checkpoint, but the variant asked for is RN50"):
        create_clip("RN50", str(tmp_path / "tiny.pt"))
    assert create_clip("tiny").rclip_random_weights
    assert not create_clip(None, str(tmp_path / "tiny.pt")).rclip_random_weights


def test_an_open_clip_tag_fails_at_once_offline(monkeypatch):
    """Uncached weights on an offline machine: one line saying what to do, before any download is attempted."""
    import socket

    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("tried the network"))
    with pytest.raises(RclipError, match="not in huggingface_hub's cache.*--weights FILE"):
        create_clip("RN50", "openai")
    with pytest.raises(RclipError, match="no weights 'nonsense'"):
        create_clip("RN50", "nonsense")
