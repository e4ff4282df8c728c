"""Start-up of the zero-shot commands given class embeddings (issue 11): no open_clip, no torchvision Python package
(and so no ``torch._dynamo``), no text tower; torchvision's compiled ops loaded alone; the visual tower built without
open_clip from its own config, equal to open_clip's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rclip_core import boxes as B
from rclip_core import tvops

REPO = Path(__file__).resolve().parent.parent


# ---- torchvision's ops without torchvision -----------------------------------------------------------------------


def _random_boxes(n: int, size: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size * 0.8
    wh = 1 + torch.rand(n, 2, generator=g) * size * 0.3
    return torch.cat([xy, xy + wh], dim=1)


def test_roi_align_equals_torchvisions_for_box_lists_rows_and_gradients():
    from torchvision.ops import roi_align as tv_roi_align

    feats = torch.randn(2, 8, 20, 30)
    boxes = [_random_boxes(5, 400, 0), _random_boxes(0, 400, 1), _random_boxes(3, 400, 2)]
    feats3 = torch.randn(3, 8, 20, 30)
    kw = dict(output_size=7, spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
    with torch.inference_mode():
        assert torch.equal(tvops.roi_align(feats3, boxes, **kw), tv_roi_align(feats3, boxes, **kw))
        rows = torch.cat([torch.cat([torch.full((b.shape[0], 1), float(i)), b], 1) for i, b in enumerate(boxes[:1])])
        assert torch.equal(tvops.roi_align(feats, rows, **kw), tv_roi_align(feats, rows, **kw))


def test_roi_align_with_gradients_in_a_process_without_torchvision():
    """torchvision's autograd formula for the op is registered by its Python package: a call that needs a gradient
    must get it (checked in a fresh process, where nothing has imported torchvision yet)."""
    code = """
import sys, torch
from rclip_core import tvops
kw = dict(output_size=7, spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
torch.manual_seed(0)
feats, boxes = torch.randn(1, 4, 20, 30), [torch.tensor([[10., 20., 200., 150.], [0., 0., 60., 90.]])]
with torch.inference_mode():
    tvops.roi_align(feats, boxes, **kw)
assert "torchvision" not in sys.modules
x = feats.clone().requires_grad_(True)
tvops.roi_align(x, boxes, **kw).square().sum().backward()
from torchvision.ops import roi_align
y = feats.clone().requires_grad_(True)
roi_align(y, boxes, **kw).square().sum().backward()
assert x.grad is not None and torch.allclose(x.grad, y.grad) and y.grad.abs().sum() > 0
print("OK")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("n", [40, 2000])  # 2000 × 4 coordinates: past torchvision's switch to per-class NMS
def test_batched_nms_equals_torchvisions_in_both_regimes(n):
    from torchvision.ops import batched_nms, nms

    g = torch.Generator().manual_seed(1)
    # crowded: jittered copies of a few boxes, so boxes of one class and of different classes overlap
    base = _random_boxes(max(3, n // 40), 600, n)
    boxes = base[torch.randint(0, base.shape[0], (n,), generator=g)] + torch.randn(n, 4, generator=g) * 4
    scores, classes = torch.rand(n, generator=g), torch.randint(0, 7, (n,), generator=g)
    assert torch.equal(tvops.batched_nms(boxes, scores, classes, 0.5), batched_nms(boxes, scores, classes, 0.5))
    assert torch.equal(tvops.nms(boxes, scores, 0.3), nms(boxes, scores, 0.3))
    assert tvops.batched_nms(boxes[:0], scores[:0], classes[:0], 0.5).shape == (0,)


def test_box_conversions_and_clip_equal_torchvisions():
    from torchvision.ops import box_convert, clip_boxes_to_image

    b = _random_boxes(50, 300, 3) - 20
    assert torch.equal(B.xyxy_to_xywh(b), box_convert(b, "xyxy", "xywh"))
    assert torch.equal(B.xywh_to_xyxy(b), box_convert(b, "xywh", "xyxy"))
    assert torch.equal(B.clip_boxes(b, 200.0, 150.0), clip_boxes_to_image(b, (150, 200)))


# ---- the visual tower without open_clip ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["RN50", "RN50x4", "tiny"])
def test_visual_tower_has_open_clips_keys_and_shapes(variant):
    import open_clip

    from rclip_core.clip_backbone import _TINY_CONFIG_DIR, get_variant
    from rclip_core.clip_visual import build_visual, model_config

    name = get_variant(variant).open_clip_name
    if variant == "tiny":
        open_clip.add_model_config(_TINY_CONFIG_DIR)
    with torch.device("meta"):
        ours = build_visual(model_config(name, _TINY_CONFIG_DIR)).state_dict()
        theirs = open_clip.create_model(name, device="meta").visual.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_visual_only_clip_computes_open_clips_features(tiny_clip, tmp_path):
    import copy

    from rclip_core.checkpoint import save_checkpoint
    from rclip_core.clip_backbone import CLIPTrunk, create_clip
    from rclip_core.clip_visual import VisualCLIP
    from tests.test_inference_optimisations import randomise_norms

    clip = randomise_norms(copy.deepcopy(tiny_clip))
    path = save_checkpoint(tmp_path / "w.pt", clip, recipe={"model": {"variant": "tiny"}})
    lean = create_clip(None, str(path), visual_only=True)
    assert isinstance(lean, VisualCLIP) and lean.rclip_variant == "tiny" and not lean.rclip_random_weights
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(lean.visual(x), clip.visual(x), atol=1e-5)  # stem, blocks and attention pool
        assert torch.equal(CLIPTrunk(lean.visual)(x), CLIPTrunk(clip.visual)(x))
    # what embedding files are checked against: the text tower of the file, without building it
    from rclip_core.text_encoder import TextEncoder

    assert lean.text.out_dim == 32 and lean.text.fingerprint() == TextEncoder(clip).fingerprint()


def test_visual_only_clip_hashes_the_text_tower_when_the_file_stores_no_fingerprint(tiny_clip, tmp_path):
    from rclip_core.clip_backbone import create_clip
    from rclip_core.text_encoder import TextEncoder

    torch.save({"model": tiny_clip.state_dict()}, tmp_path / "old.pt")  # a checkpoint from before fingerprints
    lean = create_clip("tiny", str(tmp_path / "old.pt"), visual_only=True)
    assert lean.text.fingerprint() == TextEncoder(tiny_clip).fingerprint()


def test_visual_only_clip_names_a_file_that_does_not_fit(tiny_clip, tmp_path):
    from rclip_core.clip_backbone import create_clip
    from rclip_core.errors import RclipError

    state = dict(tiny_clip.state_dict())
    del state["visual.layer4.0.conv1.weight"]
    torch.save(state, tmp_path / "cut.pt")
    with pytest.raises(RclipError, match="missing: visual.layer4.0.conv1.weight"):
        create_clip("tiny", str(tmp_path / "cut.pt"), visual_only=True)


# ---- the command -----------------------------------------------------------------------------------------------


@pytest.fixture()
def weights_and_embeddings(tiny_clip, small_coco):
    from rclip_core.checkpoint import save_checkpoint
    from rclip_core.text_embed import embed_names, save_embeddings
    from rclip_core.text_encoder import TextEncoder

    weights = save_checkpoint(small_coco["dir"] / "tiny.pt", tiny_clip, recipe={"model": {"variant": "tiny"}})
    emb = small_coco["dir"] / "classes.pt"
    save_embeddings(embed_names(TextEncoder(tiny_clip), ["cat", "dog"], templates=["a photo of a {}."]), emb)
    return weights, emb


def _zeroshot_args(small_coco, weights, emb, out: Path, *extra: str) -> list[str]:
    return ["zeroshot", "--gt-boxes", str(small_coco["ann"]), "--images", str(small_coco["images"]),
            "--embeddings", str(emb), "--weights", str(weights), "--out", str(out), "--set", "input.min_size=96",
            "--set", "zeroshot.score_thresh=0.0", *extra]


@pytest.mark.parametrize("command", ["zeroshot", "visualize"])
def test_commands_given_embeddings_import_neither_open_clip_nor_torchvision(small_coco, weights_and_embeddings,
                                                                           command):
    weights, emb = weights_and_embeddings
    args = _zeroshot_args(small_coco, weights, emb, small_coco["dir"] / "dets.json")
    if command == "visualize":
        args = ["visualize", str(small_coco["images"] / "1.png"), "--regions", f"gt:{small_coco['ann']}",
                "--embeddings", str(emb), "--weights", str(weights), "--out", str(small_coco["dir"] / "pictures"),
                "--set", "input.min_size=96"]
    code = ("import sys\nfrom rclip_cli.main import cli\n"
            f"try:\n    cli.main({args!r}, standalone_mode=False)\nfinally:\n"
            "    heavy = ('open_clip', 'torchvision', 'torch._dynamo', 'timm')\n"
            "    print('LOADED', [m for m in heavy if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout, proc.stdout
    if command == "zeroshot":
        assert json.loads((small_coco["dir"] / "dets.json").read_text())
    else:
        assert list((small_coco["dir"] / "pictures").glob("*.png"))


def test_zeroshot_with_embeddings_gives_the_whole_clips_scores(small_coco, weights_and_embeddings, monkeypatch):
    """The visual-only start-up changes nothing in the output: the same detections as with the whole CLIP built."""
    import rclip_cli.common as common
    from rclip_cli.main import cli

    weights, emb = weights_and_embeddings
    runner = CliRunner()
    lean_out, whole_out = small_coco["dir"] / "lean.json", small_coco["dir"] / "whole.json"
    res = runner.invoke(cli, _zeroshot_args(small_coco, weights, emb, lean_out))
    assert res.exit_code == 0, res.output
    real = common.load_clip
    monkeypatch.setattr(common, "load_clip", lambda recipe, device, visual_only=False: real(recipe, device))
    res = runner.invoke(cli, _zeroshot_args(small_coco, weights, emb, whole_out))
    assert res.exit_code == 0, res.output
    lean, whole = json.loads(lean_out.read_text()), json.loads(whole_out.read_text())
    assert len(lean) == len(whole) > 0
    for a, b in zip(lean, whole):
        assert a["bbox"] == b["bbox"] and a["category_id"] == b["category_id"]
        assert abs(a["score"] - b["score"]) < 1e-5


def test_zeroshot_visual_only_still_rejects_embeddings_of_another_text_tower(small_coco, weights_and_embeddings,
                                                                            tmp_path):
    from rclip_cli.main import cli
    from rclip_core.text_embed import Embeddings, save_embeddings

    weights, _ = weights_and_embeddings
    save_embeddings(Embeddings(["cat", "dog"], torch.randn(2, 32), ["{}."], "D32-deadbeef"), tmp_path / "other.pt")
    res = CliRunner().invoke(cli, _zeroshot_args(small_coco, weights, tmp_path / "other.pt", tmp_path / "d.json"))
    assert res.exit_code == 1 and "text tower D32-deadbeef" in res.output


# ---- only the visual tower is read from a converted checkpoint ---------------------------------------------------


def _resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (Linux ``mincore`` on a fresh mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size, page = path.stat().st_size, os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        assert libc.mincore(addr, size, vec) == 0
        libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) * page


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-cache residency is read with Linux mincore")
def test_zeroshot_reads_only_the_visual_tower_of_a_converted_release_checkpoint(tiny_clip, small_coco):
    """A converted pretrained release keeps its teacher (and the text tower) in the same file; the memory-mapped,
    visual-only start-up reads neither from disk."""
    from rclip_cli.main import cli
    from rclip_core.convert import convert_checkpoint
    from rclip_core.text_embed import embed_names, save_embeddings
    from rclip_core.text_encoder import TextEncoder
    from tests.test_convert import release_layout

    src = small_coco["dir"] / "release.pth"
    state = release_layout(tiny_clip, tiny_clip, extras=False)
    state["teacher_backbone.padding"] = torch.randn(12_000_000)  # 48 MB: a teacher as large as it is in RN50 files
    torch.save({"model": state}, src)
    dst = small_coco["dir"] / "converted.pt"
    convert_checkpoint(src, dst)
    emb = small_coco["dir"] / "classes.pt"
    save_embeddings(embed_names(TextEncoder(tiny_clip), ["cat", "dog"], templates=["a photo of a {}."]), emb)
    student_bytes = sum(v.numel() * v.element_size() for v in tiny_clip.state_dict().values())
    # Page faults and header reads pull in the kernel's read-ahead window around them (8 MB on the dev machine).
    ahead = max([int(p.read_text()) for p in Path("/sys/block").glob("*/queue/read_ahead_kb")] or [8192]) << 10
    if student_bytes + 2 * ahead > 0.8 * dst.stat().st_size:
        pytest.skip("the read-ahead window is too large to tell what is read")
    _evict(dst)
    if _resident_bytes(dst) > 1 << 20:
        pytest.skip("the page cache did not drop the file (cannot measure what is read)")
    res = CliRunner().invoke(cli, _zeroshot_args(small_coco, dst, emb, small_coco["dir"] / "d.json"))
    assert res.exit_code == 0, res.output
    read = _resident_bytes(dst)
    assert read < student_bytes + 2 * ahead, (read, student_bytes, dst.stat().st_size)


@pytest.mark.parametrize("visual_only", [False, True])
def test_half_precision_weights_load_as_float32(tiny_clip, tmp_path, visual_only):
    """OpenAI's released files are fp16; loading without random init (``assign``) must not make the model fp16."""
    from rclip_core.clip_backbone import create_clip

    torch.save({k: v.half() if v.is_floating_point() else v for k, v in tiny_clip.state_dict().items()},
               tmp_path / "half.pt")
    clip = create_clip("tiny", str(tmp_path / "half.pt"), visual_only=visual_only)
    assert {p.dtype for p in clip.parameters()} == {torch.float32}
    with torch.no_grad():
        out = clip.visual(torch.randn(1, 3, 128, 128))
        ref = tiny_clip.visual(torch.randn(1, 3, 128, 128))
    assert out.dtype == torch.float32 and out.shape == ref.shape
