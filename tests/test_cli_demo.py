import json

from click.testing import CliRunner

from rclip_cli.main import cli


def test_demo_runs_the_whole_chain_on_a_tiny_world(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "2", "--set", "toyworld.num_train=40", "--set",
            "toyworld.num_val=6", "--set", "train.batch_size=8"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    for name in ("model.pt", "classes.pt", "dets.json", "metrics.json", "demo.png", "dets.json.recipe.yaml"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"AP50_novel", "AP50_base", "AP50_all"}
    assert 0.0 <= metrics["region_accuracy"]["accuracy"] <= 1.0
    # the checkpoint loads back strictly as a tiny CLIP
    from rclip_core.clip_backbone import create_clip

    create_clip("tiny", str(out / "model.pt"))
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "--force" in again.output
