"""`rclip weights convert --detector`: an original finetuned checkpoint (``backbone.*``,
``roi_heads.box_predictor.{cls_score, cls_bg_score, bbox_pred}``, ``offline_*``) synthesized with random weights
becomes a detector checkpoint whose boxes and scores equal a plainly written reference forward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from click.testing import CliRunner
from torchvision.ops import roi_align

from rclip_cli.main import cli
from rclip_core.errors import RclipError
from rclip_core.recipes import CLIP_MEAN, CLIP_STD, RpnCfg, load_recipe


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * (0.05 if "weight" in name else 0.02)
                        + (1.0 if name.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "running_var")) else 0))
    return module.eval()


def _image() -> torch.Tensor:
    return torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))


def _global_feature(clip) -> torch.Tensor:
    x = _image().float() / 255
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    with torch.no_grad():
        return clip.visual(torch.nn.functional.interpolate(x[None], size=(128, 128)))  # (1, D)


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_clip):
    from rclip_core.rpn.convert import to_detectron2_state_dict
    from rclip_core.rpn.model import build_rpn

    root = tmp_path_factory.mktemp("release")
    student = _randomize(copy.deepcopy(tiny_clip), 11)
    rpn_cfg = RpnCfg(layout="c4", depth=18, imagenet_init=False, post_nms_topk_test=30)
    rpn = build_rpn(rpn_cfg, imagenet_init=False, seed=3).eval()
    g = torch.Generator().manual_seed(4)
    state = {"backbone." + k: v.clone() for k, v in student.visual.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    predictor = {"cls_score.weight": torch.randn(5, 32, generator=g),
                 # Nonzero, and near the image's features: its logit rivals the classes' (its path is checked).
                 "cls_bg_score.weight": 0.4 * torch.nn.functional.normalize(_global_feature(student), dim=1),
                 "bbox_pred.weight": torch.randn(4, 32, generator=g) * 0.05,
                 "bbox_pred.bias": torch.randn(4, generator=g) * 0.1,
                 "test_cls_score.weight": torch.randn(7, 32, generator=g)}
    state.update({"roi_heads.box_predictor." + k: v for k, v in predictor.items()})
    state.update({"offline_" + k: v for k, v in to_detectron2_state_dict(rpn, rpn_cfg).items()})
    src = root / "regionclip_finetuned-coco_tiny.pth"
    torch.save({"model": state, "iteration": 90000}, src)
    return {"root": root, "src": src, "student": student, "rpn": rpn, "predictor": predictor}


def _reference(visual, predictor, image: torch.Tensor, boxes: torch.Tensor, text: torch.Tensor):
    """The original's CLIPRes5ROIHeads + FastRCNNOutputLayers inference, written out: (boxes (R, 4), probs (R, K))."""
    x = image.float() / 255
    x = ((x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None])[None]
    with torch.no_grad():
        v = visual
        x = v.act1(v.bn1(v.conv1(x)))
        x = v.act2(v.bn2(v.conv2(x)))
        x = v.avgpool(v.act3(v.bn3(v.conv3(x))))
        res4 = v.layer3(v.layer2(v.layer1(x)))
        rois = roi_align(res4, [boxes], output_size=8, spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
        feats = v.attnpool(v.layer4(rois))  # (R, D)
        unit = feats / feats.norm(dim=1, keepdim=True)
        cls = text / text.norm(dim=1, keepdim=True)
        logits = torch.cat([unit @ cls.T, unit @ predictor["cls_bg_score.weight"].T], dim=1) / 0.01
        probs = logits.softmax(dim=1)[:, :-1]
        d = feats @ predictor["bbox_pred.weight"].T + predictor["bbox_pred.bias"]
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dx, dy = d[:, 0] / 10, d[:, 1] / 10
    dw = (d[:, 2] / 5).clamp(max=math.log(1000 / 16))
    dh = (d[:, 3] / 5).clamp(max=math.log(1000 / 16))
    px, py, pw, ph = dx * w + cx, dy * h + cy, torch.exp(dw) * w, torch.exp(dh) * h
    img_h, img_w = image.shape[-2:]
    out = torch.stack([(px - 0.5 * pw).clamp(0, img_w), (py - 0.5 * ph).clamp(0, img_h),
                       (px + 0.5 * pw).clamp(0, img_w), (py + 0.5 * ph).clamp(0, img_h)], dim=1)
    return out, probs


def test_converted_detector_equals_a_plain_reference_forward(release):
    from rclip_core.clip_backbone import create_clip
    from rclip_core.detector import GivenBoxes, postprocess
    from rclip_core.finetune import build_detector, convert_release_detector, read_detector
    from rclip_core.roi_heads import decode_boxes
    from rclip_core.rpn import load_rpn

    dst = release["root"] / "det.pt"
    lines = convert_release_detector(release["src"], dst, text_from="random")
    assert any("test_cls_score" in line for line in lines) and any("offline RPN" in line for line in lines)
    clip = create_clip(None, str(dst))
    parts = read_detector(dst)
    assert clip.rclip_variant == "tiny" and parts.class_embeddings.shape == (5, 32)
    image = _image()
    # The offline RPN came along unchanged: the same proposals as the source RPN.
    with torch.no_grad():
        theirs = release["rpn"]([image])
        ours = load_rpn(dst)([image])
    assert torch.equal(theirs.boxes[0], ours.boxes[0]) and torch.equal(theirs.objectness[0], ours.objectness[0])
    boxes, obj = ours.boxes[0], ours.objectness[0]
    assert boxes.shape[0] > 5
    text = torch.randn(6, 32, generator=torch.Generator().manual_seed(9))  # a test-time vocabulary, any size
    recipe = load_recipe(None, ["model.variant=tiny", "zeroshot.nms=soft", "zeroshot.score_fusion=none"])
    det = build_detector(clip, text, recipe, GivenBoxes("proposals"), parts).eval()
    batch = [{"image": image, "proposals": boxes, "objectness": obj}]
    with torch.no_grad():
        out = det(batch)
    ref_boxes, ref_probs = _reference(release["student"].visual, release["predictor"], image, boxes, text)
    got_boxes = decode_boxes(out.box_deltas, out.proposals[0], out.image_sizes[0])
    assert torch.allclose(got_boxes, ref_boxes, atol=1e-3)
    assert torch.allclose(det.region_probs(out)[0], ref_probs, atol=1e-5)
    assert not torch.allclose(got_boxes, boxes, atol=1e-2)  # the regression did move the proposals
    assert float(ref_probs.sum(dim=1).min()) < 0.99  # the background column took a visible share
    dets = det.detect(batch)[0]
    expected = postprocess(ref_boxes, ref_probs, score_thresh=0.001, nms_thresh=0.5, max_dets=100, nms="soft")
    assert torch.allclose(dets["boxes"], expected["boxes"], atol=1e-3)
    assert torch.allclose(dets["scores"], expected["scores"], atol=1e-5)
    assert torch.equal(dets["labels"], expected["labels"])


def test_weights_convert_detector_command_and_refusals(release, tmp_path):
    out = tmp_path / "det.pt"
    r = CliRunner().invoke(cli, ["weights", "convert", str(release["src"]), "--detector", "--text-from", "random",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "5 training classes" in r.output and out.is_file()
    again = CliRunner().invoke(cli, ["weights", "convert", str(release["src"]), "--detector", "--text-from",
                                     "random", "--out", str(out)])
    assert again.exit_code != 0 and "exists" in again.output
    plain = tmp_path / "plain.pth"
    state = torch.load(release["src"], weights_only=True)["model"]
    torch.save({k: v for k, v in state.items() if not k.startswith("roi_heads.")}, plain)
    from rclip_core.finetune import convert_release_detector

    with pytest.raises(RclipError, match="not a finetuned RegionCLIP checkpoint"):
        convert_release_detector(plain, tmp_path / "x.pt", text_from="random")
    with pytest.raises(RclipError, match="RN50"):
        convert_release_detector(release["src"], tmp_path / "y.pt", text_from="random", variant="RN50")
