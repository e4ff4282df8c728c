from pathlib import Path

import pytest
import yaml

from rclip_core.errors import RclipError
from rclip_core.recipes import Recipe, load_recipe, recipe_from_dict, recipe_to_dict, save_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_defaults_match_the_original_zero_shot_config():
    r = load_recipe(None)
    assert (r.zeroshot.temperature, r.zeroshot.score_thresh, r.zeroshot.nms_thresh, r.zeroshot.max_dets) == (
        0.01, 0.001, 0.5, 100)
    assert (r.input.min_size, r.input.max_size) == (800, 1333)
    assert r.zeroshot.background is True


def test_unknown_key_names_dotted_path_and_valid_keys(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("zeroshot:\n  nms_treshold: 0.3\n")
    with pytest.raises(RclipError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "zeroshot.nms_treshold" in msg and "nms_thresh" in msg and str(p) in msg


def test_wrong_types_are_rejected():
    with pytest.raises(RclipError, match="zeroshot.max_dets"):
        recipe_from_dict({"zeroshot": {"max_dets": "many"}})
    with pytest.raises(RclipError, match="true/false"):
        recipe_from_dict({"zeroshot": {"background": "yes please"}})
    with pytest.raises(RclipError, match="one of"):
        recipe_from_dict({"zeroshot": {"score_fusion": "mean"}})
    with pytest.raises(RclipError, match="mapping"):
        recipe_from_dict({"zeroshot": 3})


def test_int_is_accepted_for_float_and_null_for_optional():
    r = recipe_from_dict({"zeroshot": {"nms_thresh": 1}, "model": {"weights": None}})
    assert r.zeroshot.nms_thresh == 1.0 and isinstance(r.zeroshot.nms_thresh, float)
    assert r.model.weights is None


def test_set_overrides_are_typed_and_checked():
    r = load_recipe(None, ["zeroshot.nms_thresh=0.3", "model.variant=tiny", "input.pixel_mean=[0.5,0.5,0.5]"])
    assert r.zeroshot.nms_thresh == 0.3 and r.model.variant == "tiny" and r.input.pixel_mean == [0.5, 0.5, 0.5]
    with pytest.raises(RclipError, match="unknown recipe key 'zeroshot.nope'"):
        load_recipe(None, ["zeroshot.nope=1"])
    with pytest.raises(RclipError, match="key=value"):
        load_recipe(None, ["zeroshot.nms_thresh"])
    with pytest.raises(RclipError, match="not a section"):
        load_recipe(None, ["zeroshot.nms_thresh.x=1"])
    with pytest.raises(RclipError, match="zeroshot.max_dets"):
        load_recipe(None, ["zeroshot.max_dets=0.5"])
    for section in ("pretrain", "finetune", "rpn.train"):  # the training stages share SolverCfg's ranges
        with pytest.raises(RclipError, match=rf"'{section}.num_workers' must be in \[0, inf\], got -1"):
            load_recipe(None, [f"{section}.num_workers=-1"])


def test_malformed_and_missing_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("zeroshot: [1, 2\n")
    with pytest.raises(RclipError, match="malformed YAML"):
        load_recipe(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(RclipError, match="mapping"):
        load_recipe(p)
    with pytest.raises(RclipError, match="not found"):
        load_recipe(tmp_path / "none.yaml")


def test_saved_recipe_round_trips(tmp_path):
    r = load_recipe(None, ["zeroshot.max_dets=300", "model.variant=RN50x4"])
    save_recipe(r, tmp_path / "r.yaml")
    again = load_recipe(tmp_path / "r.yaml")
    assert recipe_to_dict(again) == recipe_to_dict(r)
    assert yaml.safe_load((tmp_path / "r.yaml").read_text())["zeroshot"]["max_dets"] == 300


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    assert isinstance(load_recipe(path), Recipe)


def test_recipes_folder_is_not_empty():
    assert len(RECIPES) >= 4


def test_shipped_recipes_by_name_from_any_folder_and_packaged(tmp_path, monkeypatch):
    """`--recipe zeroshot_rn50_coco_gt` works outside the repository: names resolve to the package's own files,
    which the wheel ships (package-data), not to a recipes/ folder in the working directory."""
    from pathlib import Path

    import tomllib

    from rclip_core.recipes import RECIPE_DIR, shipped_recipes

    monkeypatch.chdir(tmp_path)
    assert load_recipe("zeroshot_rn50_coco_gt").model.variant == "RN50"
    assert load_recipe("rpn_r10c4_toyworld_base.yaml").rpn.depth == 10
    assert {p.stem for p in RECIPE_DIR.glob("*.yaml")} == set(shipped_recipes()) >= {"zeroshot_rn50_coco_gt"}
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]["rclip_core"]
    assert RECIPE_DIR.relative_to(Path(__import__("rclip_core").__file__).parent).as_posix() + "/*.yaml" in package_data
