"""Checkpoint conversion (rclip_core.convert): a synthetic checkpoint in the original release's key layout, built from
a random tiny CLIP, converts into a file that ``create_clip`` loads strictly and that gives identical features."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rclip_core.clip_backbone import create_clip
from rclip_core.convert import (
    LOGIT_SCALE,
    RANDOM_TEXT,
    convert_checkpoint,
    convert_state_dict,
    infer_variant,
    inspect_checkpoint,
    split_state_dict,
)
from rclip_core.errors import RclipError


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values for every float parameter and buffer, so that no weight (open_clip zero-inits bn3) nor batch
    norm statistic is trivial and parity really tests the mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * 0.1
                t.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise)
    return model


@pytest.fixture(scope="module")
def source_clips(tiny_clip):
    """(student, teacher): two differently randomized tiny CLIPs."""
    return _randomize(copy.deepcopy(tiny_clip), 1), _randomize(copy.deepcopy(tiny_clip), 2)


def release_layout(student, teacher=None, *, text: bool = True, extras: bool = True) -> dict[str, torch.Tensor]:
    """A state dict laid out like the original release: detectron2 prefixes, FrozenBatchNorm (no counters), no
    logit_scale, plus teacher / offline RPN / box predictor keys."""
    out = {}
    for key, value in student.state_dict().items():
        if key.endswith("num_batches_tracked") or key == "logit_scale":
            continue
        if key.startswith("visual."):
            out["backbone." + key[len("visual."):]] = value.clone()
        elif text:
            out["lang_encoder." + key] = value.clone()
    if teacher is not None:
        for key, value in teacher.visual.state_dict().items():
            if not key.endswith("num_batches_tracked"):
                out["teacher_backbone." + key] = value.clone()
    if extras:
        g = torch.Generator().manual_seed(3)
        out["offline_backbone.bottom_up.stem.conv1.weight"] = torch.randn(64, 3, 7, 7, generator=g)
        out["offline_backbone.bottom_up.stem.conv1.norm.running_mean"] = torch.randn(64, generator=g)
        out["offline_backbone.fpn_lateral2.weight"] = torch.randn(256, 256, 1, 1, generator=g)
        out["offline_proposal_generator.rpn_head.conv.weight"] = torch.randn(256, 256, 3, 3, generator=g)
        out["offline_proposal_generator.rpn_head.objectness_logits.weight"] = torch.randn(3, 256, 1, 1, generator=g)
        out["roi_heads.box_predictor.cls_score.weight"] = torch.randn(5, 32, generator=g)
        out["roi_heads.box_predictor.cls_bg_score.weight"] = torch.zeros(1, 32)
        out["roi_heads.box_predictor.bbox_pred.weight"] = torch.randn(4, 32, generator=g)
        out["roi_heads.box_predictor.bbox_pred.bias"] = torch.zeros(4)
        out["pixel_mean"] = torch.zeros(3, 1, 1)
    return out


def _save(obj, path):
    torch.save(obj, path)
    return path


def _assert_same_features(a, b) -> None:
    torch.manual_seed(5)
    images = torch.randn(2, 3, 128, 128)
    tokens = torch.randint(1, 49407, (3, 77))
    tokens[:, 9] = 49407  # an end-of-text token: the highest id, where CLIP pools
    tokens[:, 10:] = 0
    with torch.no_grad():
        assert torch.equal(a.encode_image(images), b.encode_image(images))
        assert torch.equal(a.encode_text(tokens), b.encode_text(tokens))


def test_release_checkpoint_converts_with_parity(tmp_path, source_clips):
    student, teacher = source_clips
    src = _save({"model": release_layout(student, teacher), "iteration": 7}, tmp_path / "regionclip_pretrained.pth")
    report = convert_checkpoint(src, tmp_path / "out.pt")

    assert report.variant == "tiny" and report.layout == "RegionCLIP" and report.text_source == "source"
    loaded = create_clip("tiny", str(tmp_path / "out.pt"))  # strict loading
    _assert_same_features(student, loaded)
    assert loaded.logit_scale.item() == pytest.approx(math.log(100.0))
    assert "logit_scale" in report.filled
    n_bn = sum(k.endswith("num_batches_tracked") for k in student.state_dict())
    assert sum(k.endswith("num_batches_tracked") for k in report.filled) == n_bn
    assert report.converted == sum(k != "logit_scale" and not k.endswith("num_batches_tracked")
                                   for k in student.state_dict())
    assert report.extras == {"teacher": len(teacher.visual.state_dict()) - n_bn, "offline_rpn": 5, "box_predictor": 4}
    assert report.dropped == ["pixel_mean"] and report.unrecognised == []
    assert any("ln(100)" in line for line in report.lines())

    ckpt = torch.load(tmp_path / "out.pt", weights_only=True)
    assert ckpt["recipe"] == {"model": {"variant": "tiny"}} and ckpt["step"] == 0 and ckpt["rclip_version"]
    assert ckpt["offline_rpn"]["offline_proposal_generator.rpn_head.conv.weight"].shape == (256, 256, 3, 3)
    assert set(ckpt["box_predictor"]) == {"roi_heads.box_predictor." + k for k in
                                          ("cls_score.weight", "cls_bg_score.weight", "bbox_pred.weight",
                                           "bbox_pred.bias")}


def test_teacher_is_kept_apart_and_does_not_leak_into_visual(tmp_path, source_clips):
    student, teacher = source_clips
    converted = convert_state_dict(release_layout(student, teacher))
    # The student's weights, not the teacher's, are in visual.* (a substring match on "backbone." would mix them).
    for key, value in student.visual.state_dict().items():
        assert torch.equal(converted.model["visual." + key], value), key
    assert not any("teacher" in k for k in converted.model)
    # The teacher is a complete, loadable state dict of clip.visual.
    fresh = copy.deepcopy(student)
    fresh.visual.load_state_dict(converted.extras["teacher"], strict=True)
    for key, value in teacher.visual.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(fresh.visual.state_dict()[key], value), key
    assert converted.extras["teacher_variant"] == "tiny"


def test_openai_style_and_bare_state_dicts_convert(tmp_path, source_clips):
    student, _ = source_clips
    state = {k: v.clone() for k, v in student.state_dict().items()}
    state["input_resolution"] = torch.tensor(224)  # metadata in OpenAI's files
    src = _save(state, tmp_path / "teacher_RN50_student_RN50_OAI_CLIP.pth")  # bare, no {"model": ...}
    report = convert_checkpoint(src, tmp_path / "out.pt", variant="tiny")
    assert report.layout == "OpenAI CLIP" and report.filled == [] and report.dropped == ["input_resolution"]
    loaded = create_clip("tiny", str(tmp_path / "out.pt"))
    _assert_same_features(student, loaded)
    assert torch.equal(loaded.logit_scale, student.logit_scale)  # present in the source, so kept


def test_checkpoint_without_text_tower_needs_text_from(tmp_path, source_clips):
    student, _ = source_clips
    finetuned = _save({"model": release_layout(student, text=False)}, tmp_path / "regionclip_finetuned.pth")
    with pytest.raises(RclipError, match="no text tower.*--text-from"):
        convert_checkpoint(finetuned, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()

    pretrained = _save({"model": release_layout(student)}, tmp_path / "pretrained.pth")
    report = convert_checkpoint(finetuned, tmp_path / "out.pt", text_from=str(pretrained))
    assert report.text_source == str(pretrained)
    _assert_same_features(student, create_clip("tiny", str(tmp_path / "out.pt")))

    report = convert_checkpoint(finetuned, tmp_path / "rand.pt", text_from=RANDOM_TEXT)
    assert report.text_source == RANDOM_TEXT
    ckpt = torch.load(tmp_path / "rand.pt", weights_only=True)
    assert ckpt["text_source"] == RANDOM_TEXT
    assert torch.equal(ckpt["model"]["visual.conv1.weight"], student.visual.conv1.weight)

    with pytest.raises(RclipError, match="already holds a text tower"):
        convert_checkpoint(pretrained, tmp_path / "x.pt", text_from=RANDOM_TEXT)
    with pytest.raises(RclipError, match="not found"):
        convert_checkpoint(finetuned, tmp_path / "x.pt", text_from=str(tmp_path / "missing.pth"))


def test_variant_is_inferred_by_shape_and_checked(source_clips):
    student, _ = source_clips
    state = release_layout(student, extras=False)
    assert infer_variant(split_state_dict(state).model) == "tiny"
    for shape, name in (((50, 2048), "RN50"), ((82, 2560), "RN50x4")):
        assert infer_variant({"visual.attnpool.positional_embedding": torch.zeros(shape)}) == name
    with pytest.raises(RclipError, match=r"holds a tiny model.*not RN50x4"):
        convert_state_dict(state, variant="RN50x4")
    with pytest.raises(RclipError, match="unknown CLIP variant 'RN101'.*available"):
        convert_state_dict(state, variant="RN101")


def test_altered_shapes_are_named(source_clips):
    student, _ = source_clips
    state = release_layout(student, extras=False)
    state["backbone.layer2.0.conv2.weight"] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(RclipError, match=r"shape mismatch: visual\.layer2\.0\.conv2\.weight"):
        convert_state_dict(state)
    state = release_layout(student, extras=False)
    state["backbone.attnpool.positional_embedding"] = torch.zeros(37, 512)
    with pytest.raises(RclipError, match=r"cannot infer the variant.*\[37, 512\]"):
        convert_state_dict(state)
    with pytest.raises(RclipError, match=r"shape mismatch: visual\.attnpool\.positional_embedding"):
        convert_state_dict(state, variant="tiny")


def test_truncated_state_dict_names_missing_keys(source_clips):
    student, _ = source_clips
    state = release_layout(student, extras=False)
    del state["backbone.layer4.0.conv3.weight"], state["lang_encoder.ln_final.bias"]
    with pytest.raises(RclipError, match=r"missing: .*visual\.layer4\.0\.conv3\.weight.*ln_final\.bias"):
        convert_state_dict(state)


def test_unrecognised_and_colliding_keys(source_clips):
    student, _ = source_clips
    state = release_layout(student, extras=False)
    state["roi_heads.something_new.weight"] = torch.zeros(1)
    report = convert_state_dict(state).report
    assert report.unrecognised == ["roi_heads.something_new.weight"]
    state = release_layout(student, extras=False)
    state["visual.conv1.weight"] = state["backbone.conv1.weight"]
    with pytest.raises(RclipError, match=r"backbone\.conv1\.weight and visual\.conv1\.weight both convert"):
        convert_state_dict(state)


def test_bad_inputs_and_overwrite(tmp_path, source_clips):
    student, _ = source_clips
    with pytest.raises(RclipError, match="not found"):
        convert_checkpoint(tmp_path / "nope.pth", tmp_path / "out.pt")
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    with pytest.raises(RclipError, match="not a readable checkpoint"):
        convert_checkpoint(tmp_path / "notes.pth", tmp_path / "out.pt")
    _save({"model": [1, 2, 3]}, tmp_path / "list.pth")
    with pytest.raises(RclipError, match="does not hold a state dict"):
        convert_checkpoint(tmp_path / "list.pth", tmp_path / "out.pt")

    src = _save({"model": release_layout(student)}, tmp_path / "src.pth")
    (tmp_path / "out.pt").write_text("keep me")
    with pytest.raises(RclipError, match="already exists.*--force"):
        convert_checkpoint(src, tmp_path / "out.pt")
    assert (tmp_path / "out.pt").read_text() == "keep me"
    convert_checkpoint(src, tmp_path / "out.pt", force=True)
    create_clip("tiny", str(tmp_path / "out.pt"))


def test_inspect_lists_prefixes_and_variant(tmp_path, source_clips):
    student, teacher = source_clips
    src = _save({"model": release_layout(student, teacher)}, tmp_path / "src.pth")
    summary = inspect_checkpoint(src)
    table = {p: (n, role) for p, n, role in summary.prefixes}
    assert summary.variant == "tiny" and summary.teacher_variant == "tiny" and summary.layout == "RegionCLIP"
    assert table["backbone"][1] == "CLIP visual" and table["teacher_backbone"][1] == "teacher"
    assert table["lang_encoder"][1] == "CLIP text" and table["offline_proposal_generator"] == (2, "offline_rpn")
    assert table["roi_heads"] == (4, "box_predictor") and table["pixel_mean"] == (1, "dropped")
    assert summary.num_keys == sum(n for n, _ in table.values())
    assert LOGIT_SCALE == pytest.approx(4.60517, abs=1e-5)
