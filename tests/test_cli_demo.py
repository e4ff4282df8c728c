import json

from click.testing import CliRunner

from rclip_cli.main import cli


def test_demo_runs_the_whole_chain_on_a_tiny_world(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "2", "--set", "toyworld.num_train=40", "--set",
            "toyworld.num_val=6", "--set", "pretrain.batch_size=8"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    for name in ("teacher/checkpoint.pt", "dets_teacher.json", "metrics.json", "demo.png"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["teacher"]["accuracy"] <= 1.0
    # the checkpoint loads back strictly as a tiny CLIP
    from rclip_core.clip_backbone import create_clip

    create_clip("tiny", str(out / "teacher" / "checkpoint.pt"))
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "--force" in again.output
