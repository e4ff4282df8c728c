"""The table of refused inputs: every case exits non-zero with one ``Error:`` line naming the culprit, and writes
nothing (no file, no folder) into the run's directory."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rclip_cli.main import cli


def _ann(**over) -> dict:
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20]}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    data.update(over)
    return data


ANNOTATION_CASES = {
    "duplicate category id": (_ann(categories=[{"id": 1, "name": "cat"}, {"id": 1, "name": "dog"}]),
                              "categories[1] repeats category id 1"),
    "unknown category": (_ann(annotations=[{"id": 1, "image_id": 1, "category_id": 9, "bbox": [0, 0, 5, 5]}]),
                         "annotations[0] has category_id 9, which is not in 'categories'"),
    "duplicate image id": (_ann(images=[{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}]),
                           "duplicate image id"),
    "bbox of three numbers": (_ann(annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5]}]),
                              "'bbox' must be four numbers"),
    "negative size": (_ann(annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, -5, 5]}]),
                      "negative width or height"),
    "NaN size": (_ann(annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, math.nan, 5]}]),
                 "non-finite value"),
    "no boxes at all": (_ann(annotations=[]), "no boxes to name"),
}


@pytest.fixture()
def run_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(images / "a.png")
    (tmp_path / "ann.json").write_text(json.dumps(_ann()))
    (tmp_path / "broken.json").write_text('{"images": [')
    (tmp_path / "exists.json").write_text("[]")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "corrupt.jpg").write_bytes(b"not a picture")
    (tmp_path / "bad.yaml").write_text("zeroshot: [unclosed\n")
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "crashed").mkdir()  # a run that died before its first checkpoint
    (tmp_path / "crashed" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return tmp_path


def cases(d):
    zs = ["zeroshot", "--images", d / "images", "--variant", "tiny", "--out", d / "new" / "dets.json"]
    gt = [*zs, "--gt-boxes", d / "ann.json", "--classes", "cat,dog"]
    vis = ["visualize", d / "images" / "a.png", "--variant", "tiny", "--out", d / "vis"]
    return {
        "missing image folder": (["zeroshot", "--images", d / "nope", "--gt-boxes", d / "ann.json", "--classes", "cat",
                                  "--out", d / "new" / "o.json"], "--images: folder not found"),
        "existing output": ([*gt[:-4], "--out", d / "exists.json", "--gt-boxes", d / "ann.json", "--classes", "cat"],
                            "exists.json already exists; pass --force"),
        "missing annotation file": ([*zs, "--gt-boxes", d / "none.json", "--classes", "cat"], "file not found"),
        "malformed JSON": ([*zs, "--gt-boxes", d / "broken.json", "--classes", "cat"], "malformed JSON at line 1"),
        "unknown recipe key": ([*gt, "--set", "zeroshot.nope=1"], "unknown recipe key 'zeroshot.nope'"),
        "out-of-range recipe value": ([*gt, "--set", "zeroshot.nms_thresh=7"], "must be in [0, 1], got 7"),
        "malformed YAML": ([*gt, "--recipe", d / "bad.yaml"], "malformed YAML"),
        "score threshold above 1 (recipe)": ([*gt, "--set", "zeroshot.score_thresh=1.5"], "must be in [0, 1], got 1.5"),
        "negative limit": ([*gt, "--limit", "-1"], "Invalid value for '--limit'"),
        "zero limit": ([*gt, "--limit", "0"], "Invalid value for '--limit'"),
        "empty class list": ([*zs, "--gt-boxes", d / "ann.json", "--classes", ",,"], "the class list is empty"),
        "empty names file": ([*zs, "--gt-boxes", d / "ann.json", "--classes", d / "empty.txt"], "no names"),
        "missing embeddings": ([*zs, "--gt-boxes", d / "ann.json", "--embeddings", d / "none.pt"],
                               "--embeddings: file not found"),
        "wrong checkpoint": ([*gt, "--weights", d / "garbage.pt"], "not a readable weights file"),
        "checkpoint of another variant": ([*gt[:3], "--out", d / "new" / "dets.json", "--gt-boxes", d / "ann.json",
                                           "--classes", "cat,dog", "--weights", d / "tiny.pt", "--variant", "RN50"],
                                          "is a tiny checkpoint, but the variant asked for is RN50"),
        "unknown region source": ([*zs, "--regions", "magic", "--classes", "cat"], "unknown region source 'magic'"),
        "two region sources": ([*gt, "--rpn", d / "garbage.pt"], "give one region source"),
        "torchvision RPN weights absent": ([*zs, "--regions", "torchvision-rpn", "--classes", "cat"],
                                           "weights are not in torch's cache"),
        "torchvision RPN weights file missing": ([*vis, "--regions", f"torchvision-rpn:{d / 'none.pth'}"],
                                                 "--regions: file not found"),
        "negative topk": ([*vis, "--topk", "-1"], "Invalid value for '--topk'"),
        "threshold above 1": ([*vis, "--score-thresh", "2"], "Invalid value for '--score-thresh'"),
        "unknown built-in list": (["embed", "--builtin", "coco81", "--variant", "tiny", "--out", d / "e.pt"],
                                  "coco81"),
        "missing RPN checkpoint": (["rpn", "propose", "--images", d / "images", "--rpn", d / "none.pt", "--out",
                                    d / "p.json"], "not found"),
        "missing ground truth": (["eval", "--gt", d / "none.json", "--dets", d / "exists.json"], "not found"),
        "malformed ground truth, new output folder": (["eval", "--gt", d / "broken.json", "--dets", d / "exists.json",
                                                       "--out", d / "new" / "m.json"], "malformed JSON"),
        "missing image folder for proposals": (["rpn", "propose", "--images", d / "nope", "--rpn", d / "garbage.pt",
                                                "--out", d / "new" / "p.json"], "--images: folder not found"),
        "unreadable RPN checkpoint": (["rpn", "propose", "--images", d / "images", "--rpn", d / "garbage.pt",
                                       "--out", d / "new" / "p.json"], "garbage.pt"),
        "missing captions": (["vocab", "build", d / "none.txt", "--out", d / "new" / "concepts.txt"], "none.txt"),
        "not a checkpoint to convert": (["weights", "convert", d / "garbage.pt", "--out", d / "new" / "w.pt"],
                                        "garbage.pt"),
        "empty class list, new picture folder": ([*vis, "--classes", " , "], "the class list is empty"),
        "missing picture": (["visualize", d / "nope.jpg", "--variant", "tiny", "--out", d / "vis"],
                            "no such image or folder"),
        "no readable picture": (["visualize", d / "corrupt.jpg", "--variant", "tiny", "--out", d / "vis"],
                                "no image could be read or used: "),
        "run folder of a crashed run": (["rpn", "train", "--recipe", "rpn_r10c4_toyworld_base", "--annotations",
                                         d / "ann.json", "--images", d / "images", "--out", d / "crashed"],
                                        "already holds a run"),
        "malformed training annotations": (["rpn", "train", "--recipe", "rpn_r10c4_toyworld_base", "--annotations",
                                            d / "broken.json", "--images", d / "images", "--out", d / "new" / "run"],
                                           "malformed JSON"),
        "training images missing": (["rpn", "train", "--recipe", "rpn_r10c4_toyworld_base", "--annotations",
                                     d / "case_0.json", "--images", d / "vocab_only", "--out", d / "new" / "run"],
                                    "folder not found"),
        "pretrain recipe without its inputs": (["pretrain", "demo_tiny_toyworld", "--out", d / "run"],
                                               "pretrain.captions is not set"),
        "finetune recipe without its inputs": (["finetune", "finetune_tiny_toyworld", "--out", d / "run"],
                                               "finetune.annotations is not set"),
        "finetune held-out file missing": (["finetune", "finetune_tiny_toyworld", "--out", d / "run",
                                            "--retain-check", d / "nope.json"], "--retain-check: "),
        "finetune in a crashed run's folder": (["finetune", "finetune_tiny_toyworld", "--out", d / "crashed"],
                                               "already holds a run"),
        **{f"annotation: {k}": ([*zs, "--gt-boxes", d / f"case_{i}.json", "--classes", "cat,dog"], frag)
           for i, (k, (_, frag)) in enumerate(ANNOTATION_CASES.items())},
    }


CASE_NAMES = list(cases(__import__("pathlib").Path("/x")))
# The culprit is the model's own file, or pictures, which are decoded as the model runs (so that reading overlaps
# recognising): found after the model is built, still before anything is written.
MODEL_CASES = {"wrong checkpoint", "checkpoint of another variant", "no readable picture"}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_line_and_writes_nothing(run_dir, name, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(run_dir / "torch-home"))  # an empty torch cache (no torchvision weights)
    for i, (data, _) in enumerate(ANNOTATION_CASES.values()):
        (run_dir / f"case_{i}.json").write_text(json.dumps(data))
    if name == "checkpoint of another variant":
        from rclip_core.checkpoint import save_checkpoint
        from rclip_core.clip_backbone import create_clip

        save_checkpoint(run_dir / "tiny.pt", create_clip("tiny"), recipe={"model": {"variant": "tiny"}})
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    args, fragment = cases(run_dir)[name]
    import rclip_core.clip_backbone as cb

    built = []
    create_clip = cb.create_clip
    monkeypatch.setattr(cb, "create_clip", lambda *a, **k: built.append(a) or create_clip(*a, **k))
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if name not in MODEL_CASES:  # inputs are read and checked before any model is built
        assert built == [], result.output
    assert result.exit_code != 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert "Traceback" not in result.output
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # nothing written, no folder made


def test_existing_outputs_are_refused_before_torch_is_imported(tmp_path):
    """Every command refuses an existing output before importing torch or building a model (the refusal is then
    a fraction of a second; measured: 0.3-0.5 s for each command below on 2 busy cores, against 6-10 s after the
    torch import). Checked by what was imported, in a fresh interpreter, not by a clock."""
    import subprocess
    import sys

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "vis").mkdir()
    for name in ("a.png", "demo.png"):
        (tmp_path / "vis" / name).write_bytes(b"")
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "a.png")
    for name in ("exists.json", "ann.json", "caps.txt", "concepts.txt"):
        (tmp_path / name).write_text("[]")
    d, e = str(tmp_path), str(tmp_path / "exists.json")
    commands = [
        ["visualize", f"{d}/a.png", "--out", f"{d}/vis"],
        ["zeroshot", "--images", d, "--classes", "cat", "--out", e],
        ["embed", "--classes", "cat", "--out", e],
        ["eval", "--gt", f"{d}/ann.json", "--dets", e, "--out", e],
        ["pretrain", "pretrain_tiny_toyworld", "--out", f"{d}/run"],
        ["finetune", "finetune_tiny_toyworld", "--out", f"{d}/run"],
        ["rpn", "train", "--annotations", f"{d}/ann.json", "--images", d, "--out", f"{d}/run"],
        ["rpn", "propose", "--images", d, "--rpn", e, "--out", e],
        ["rpn", "convert", e, "--out", e],
        ["weights", "convert", e, "--out", e],
        ["demo", "--out", f"{d}/vis"],
        ["vocab", "build", f"{d}/caps.txt", "--out", f"{d}/concepts.txt"],
    ]
    code = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from rclip_cli.main import cli\n"
        f"results = [CliRunner().invoke(cli, args) for args in {commands!r}]\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'results': [[r.exit_code, r.output] for r in results]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for args, (code_, output) in zip(commands, report["results"]):
        assert code_ == 1 and ("already exists" in output or "already holds a run" in output), (args, output)
    assert report["torch"] is False


def test_a_panorama_too_thin_for_the_pooler_is_skipped_and_counted(run_dir):
    """A 10000×50 panorama resizes to 1333×7, thinner than the RoI grid needs: skipped with a warning and counted
    like an unreadable image, while the other images' results are kept (exit 0)."""
    Image.fromarray(np.full((50, 10000, 3), 90, np.uint8)).save(run_dir / "images" / "panorama.png")
    out = run_dir / "out" / "dets.json"
    res = CliRunner().invoke(cli, ["zeroshot", "--images", str(run_dir / "images"), "--classes", "cat,dog",
                                   "--variant", "tiny", "--out", str(out)])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())  # the log wraps long lines
    assert "too small or too elongated (10000×50 resizes to 1333×7, below 32 pixels)" in said
    summary = json.loads(out.with_name("dets.summary.json").read_text())
    assert summary["images"] == 1 and len(summary["images_skipped"]) == 1 and summary["regions"] > 0
    assert "panorama.png" in summary["images_skipped"][0]


@pytest.mark.parametrize("command", ["embed", "zeroshot", "visualize"])
def test_duplicate_class_names_after_cleaning_are_merged_with_a_warning(run_dir, command):
    """'Cat', 'cat ' and 'cat' (case-folded, cleaned) are one class, the same in every command that takes
    --classes; LVIS-style 'bible_(book)' and 'bible book' too."""
    classes = "cat,Cat , dog,bible_(book),bible book"
    args = {"embed": ["embed", "--out", run_dir / "e.pt"],
            "zeroshot": ["zeroshot", "--images", run_dir / "images", "--out", run_dir / "z" / "dets.json"],
            "visualize": ["visualize", run_dir / "images", "--out", run_dir / "vis"]}[command]
    res = CliRunner().invoke(cli, [str(a) for a in args] + ["--classes", classes, "--variant", "tiny"])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())  # the log wraps long lines
    assert "class name 'Cat' repeats an earlier one" in said and "class name 'bible book' repeats" in said
    if command == "embed":
        import torch

        assert torch.load(run_dir / "e.pt", weights_only=True)["names"] == ["cat", "dog", "bible_(book)"]
    elif command == "visualize":
        assert json.loads((run_dir / "vis" / "detections.json").read_text())["classes"] == ["cat", "dog",
                                                                                           "bible_(book)"]
    else:
        images = json.loads((run_dir / "z" / "dets.images.json").read_text())
        assert [c["name"] for c in images["categories"]] == ["cat", "dog", "bible_(book)"]


def test_library_warnings_never_reach_the_terminal(run_dir):
    """torch's, torchvision's and open_clip's warnings (deprecations, notices) are for developers: a command run
    as a user runs it (a fresh interpreter, Python's default warning filters plus -W always) shows none of them,
    while its own one-line error still comes through."""
    import subprocess
    import sys

    code = (
        "import warnings\n"
        "import rclip_core.region_spec as rs\n"
        "parse = rs.RegionSource.parse\n"
        "def noisy(spec):\n"
        "    for module in ('torch.nn.modules.module', 'torchvision.ops', 'open_clip.factory'):\n"
        "        for cat in (UserWarning, FutureWarning, DeprecationWarning):\n"
        "            warnings.warn_explicit(f'LEAK {cat.__name__}', cat, module + '.py', 1, module=module)\n"
        "    return parse(spec)\n"
        "rs.RegionSource.parse = staticmethod(noisy)\n"
        "from rclip_cli.main import cli\n"
        f"cli(['zeroshot', '--images', {str(run_dir / 'images')!r}, '--classes', 'cat', '--out', "
        f"{str(run_dir / 'exists.json')!r}])\n"
    )
    res = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.startswith("Error: ") and "already exists" in res.stderr, res.stderr
    assert "LEAK" not in res.stdout + res.stderr
