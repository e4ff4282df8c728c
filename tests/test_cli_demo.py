import json

from click.testing import CliRunner

from rclip_cli.main import cli


def test_demo_runs_the_whole_chain_on_a_tiny_world(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "2", "--set", "zeroshot.score_thresh=0", "--set",
            "toyworld.num_web=16", "--set", "toyworld.num_train=24", "--set", "toyworld.num_val=6", "--set",
            "demo.vocab_min_freq=1",
            "--set", 'demo.teacher_set=["pretrain.batch_size=8"]',
            "--set", 'demo.student_set=["pretrain.batch_size=4"]']
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    for name in ("teacher/checkpoint.pt", "student/checkpoint.pt", "rpn/checkpoint.pt", "concepts.pt", "concepts.txt",
                 "dets_teacher.json", "dets_student.json", "metrics.json", "demo.png"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["teacher"]["accuracy"] <= 1.0 and 0.0 <= metrics["student"]["accuracy"] <= 1.0
    assert "teacher" in res.output and "student" in res.output  # the side-by-side table
    assert "demo.student_set (pretrain.batch_size=4)" in res.output  # a shortened student is said to be one
    # the student checkpoint is an ordinary CLIP checkpoint that selects its own variant
    from rclip_core.clip_backbone import create_clip

    assert create_clip(None, str(out / "student" / "checkpoint.pt")).rclip_variant == "tiny"
    dets = {name: (out / f"dets_{name}.json").read_bytes() for name in ("teacher", "student")}
    assert json.loads(dets["teacher"])  # every box named (threshold 0): something to compare below
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "--force" in again.output
    (out / "mine.txt").write_text("a file of the user's")
    forced = CliRunner().invoke(cli, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "mine.txt").read_text() == "a file of the user's"  # --force replaces only the demo's files
    # the same command again gives the same numbers (every stage seeded by the recipe, none by the clock)
    again_metrics = json.loads((out / "metrics.json").read_text())
    assert {k: v for k, v in again_metrics.items() if k != "seconds"} == {
        k: v for k, v in metrics.items() if k != "seconds"}
    assert all((out / f"dets_{name}.json").read_bytes() == dets[name] for name in dets)  # bit for bit
    refused = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "x"), "--set", "pretrain.steps=3"])
    assert refused.exit_code == 1 and "demo.teacher_set" in refused.output
