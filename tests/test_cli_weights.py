"""``rclip weights convert`` / ``inspect`` through the real Click group, on a synthetic release-layout checkpoint."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from rclip_cli.main import cli


@pytest.fixture(scope="module")
def release_file(tmp_path_factory, tiny_clip):
    """A tiny checkpoint in the original release's layout: backbone.*, lang_encoder.*, teacher_backbone.*, extras."""
    state = {}
    for key, value in tiny_clip.state_dict().items():
        if key.endswith("num_batches_tracked") or key == "logit_scale":
            continue
        if key.startswith("visual."):
            state["backbone." + key[len("visual."):]] = value
            state["teacher_backbone." + key[len("visual."):]] = value
        else:
            state["lang_encoder." + key] = value
    state["offline_proposal_generator.rpn_head.conv.weight"] = torch.zeros(4, 4, 3, 3)
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(3, 32)
    path = tmp_path_factory.mktemp("weights") / "regionclip_pretrained-cc_tiny.pth"
    torch.save({"model": state}, path)
    return path


def test_convert_then_load(tmp_path, release_file):
    out = tmp_path / "tiny.pt"
    result = CliRunner().invoke(cli, ["weights", "convert", str(release_file), "--out", str(out), "--variant", "tiny"])
    assert result.exit_code == 0, result.output
    assert "variant     tiny" in result.output and "logit_scale = ln(100)" in result.output
    assert "kept        teacher" in result.output and "offline_rpn: 1 keys" in result.output
    from rclip_core.clip_backbone import create_clip

    create_clip("tiny", str(out))

    again = CliRunner().invoke(cli, ["weights", "convert", str(release_file), "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output and "--force" in again.output
    forced = CliRunner().invoke(cli, ["weights", "convert", str(release_file), "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variant", "RN50"], "holds a tiny model"),
        (["--variant", "RN101"], "unknown CLIP variant 'RN101'"),
        (["--text-from", "random"], "already holds a text tower"),
    ],
)
def test_convert_errors_are_one_line(tmp_path, release_file, args, message):
    result = CliRunner().invoke(cli, ["weights", "convert", str(release_file), "--out", str(tmp_path / "o.pt"), *args])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o.pt").exists()


def test_missing_source(tmp_path):
    result = CliRunner().invoke(cli, ["weights", "convert", str(tmp_path / "no.pth"), "--out", str(tmp_path / "o.pt")])
    assert result.exit_code == 1 and "Error: weights file not found" in result.output


def test_inspect(release_file):
    result = CliRunner().invoke(cli, ["weights", "inspect", str(release_file)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "RegionCLIP layout" in lines[0]
    rows = {line.split()[0]: line for line in lines[1:] if "->" in line}
    assert rows["backbone"].endswith("-> CLIP visual") and rows["teacher_backbone"].endswith("-> teacher")
    assert rows["offline_proposal_generator"].split()[1] == "1" and rows["roi_heads"].endswith("-> box_predictor")
    assert "variant: tiny" in lines and "teacher variant: tiny" in lines
