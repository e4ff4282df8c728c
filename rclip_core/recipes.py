"""Recipes: typed, nested dataclasses loaded strictly from YAML, with ``--set a.b=value`` overrides.

Each default is defined once, here. A recipe file lists only what differs. Loading rejects an unknown key with its
dotted path and the valid keys, and a value of the wrong type with the expected type; the resolved recipe is saved
beside every output (:func:`save_recipe`) and inside checkpoints.

Defaults follow the original RegionCLIP release (see the README's "Differences" section for where we deviate):
CLIP pixel mean/std, shorter side 800 / longer at most 1333 at test time, temperature 0.01, an all-zero background
column in the softmax, score threshold 0.001, class-specific NMS 0.5 and 100 detections per image (COCO zero-shot).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from rclip_core.errors import RclipError

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class ModelCfg:
    """Which CLIP and which weights.

    ``variant`` is a name from ``clip_backbone.VARIANTS`` (RN50, RN50x4, tiny). ``weights`` is an open_clip pretrained
    tag (``openai``), a local ``.pt``/``.pth``/``.safetensors`` file (ours, OpenAI's, or a converted RegionCLIP one),
    or ``null`` for random initialisation.
    """

    variant: str = "RN50"
    weights: str | None = None
    # RoIAlign output size; null = the variant's native attention-pool grid × 2 (14 for RN50, 18 for RN50x4).
    pooler_resolution: int | None = None


@dataclass
class InputCfg:
    """Detection-style preprocessing (detectron2 ResizeShortestEdge at test time, CLIP normalisation)."""

    min_size: int = 800
    max_size: int = 1333
    pixel_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    pixel_std: list[float] = field(default_factory=lambda: list(CLIP_STD))


@dataclass
class TextCfg:
    """Prompting for ``rclip embed``: ``single`` ("a photo of a {}.") or ``ensemble`` (the original's 81 templates)."""

    templates: Literal["single", "ensemble"] = "single"
    batch_size: int = 256
    # Cut token sequences after the longest end-of-text position in a batch: same features, far less compute.
    truncate: bool = True


@dataclass
class ZeroShotCfg:
    """Region classification and post-processing (regionclip_facts.md §3)."""

    temperature: float = 0.01
    # Append the all-zero background embedding (logit 0) to the softmax, as the original does.
    background: bool = True
    score_thresh: float = 0.001
    nms_thresh: float = 0.5
    max_dets: int = 100
    # How RPN objectness joins class probability when proposals are given: sqrt(p * raw logit) as the original
    # ("raw_logit", can give NaN rows that are dropped, or scores above 1), sqrt(p * sigmoid) ("sigmoid"), or "none".
    score_fusion: Literal["raw_logit", "sigmoid", "none"] = "raw_logit"
    # Top-N proposals per image (by objectness) when proposals are given.
    num_proposals: int = 1000
    batch_size: int = 1
    num_workers: int = 0


@dataclass
class TrainCfg:
    """The demo's short image-text contrastive training (full pretraining recipes come with the pretrain stage)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.07
    image_size: int = 128
    seed: int = 0


@dataclass
class ToyWorldCfg:
    """The synthetic scenes of ``rclip_core.data.toyworld``."""

    num_train: int = 1200
    num_val: int = 150
    image_size: int = 128
    seed: int = 0


@dataclass
class Recipe:
    """All sections; each stage reads the ones it needs."""

    model: ModelCfg = field(default_factory=ModelCfg)
    input: InputCfg = field(default_factory=InputCfg)
    text: TextCfg = field(default_factory=TextCfg)
    zeroshot: ZeroShotCfg = field(default_factory=ZeroShotCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    toyworld: ToyWorldCfg = field(default_factory=ToyWorldCfg)


T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (after string annotations are resolved); return it converted."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RclipError(f"recipe key '{path}' must be a mapping of {sorted(_field_types(tp))}, got {value!r}")
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except RclipError as e:
                errors.append(str(e))
        raise RclipError(f"recipe key '{path}' expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise RclipError(f"recipe key '{path}' must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise RclipError(f"recipe key '{path}' expects a list, got {value!r}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise RclipError(f"recipe key '{path}' expects true/false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise RclipError(f"recipe key '{path}' expects int, got {value!r}")
    if not isinstance(value, tp):
        raise RclipError(f"recipe key '{path}' expects {_type_name(tp)}, got {value!r}")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type[T], data: dict, path: str = "") -> T:
    fields = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise RclipError(f"unknown recipe key '{dotted}'; valid keys{' under ' + path if path else ''}: "
                             f"{', '.join(fields)}")
        kwargs[key] = _coerce(value, fields[key], dotted)
    return cls(**kwargs)


def recipe_from_dict(data: dict | None, cls: type[T] = Recipe) -> T:
    """Build ``cls`` from a nested dict, rejecting unknown keys and wrong types with the key's dotted path."""
    return _build(cls, data or {})


def recipe_to_dict(recipe: Any) -> dict:
    """The resolved recipe as plain data (for YAML files and checkpoints)."""
    return dataclasses.asdict(recipe)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RclipError(f"--set expects key=value (e.g. zeroshot.nms_thresh=0.3), got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...], cls: type = Recipe) -> dict:
    """Apply ``a.b=value`` strings to a nested dict; the key must exist in ``cls`` (checked here, typed at build)."""
    data = dict(data)
    for item in overrides:
        keys, value = _parse_override(item)
        node_cls, node = cls, data
        for i, k in enumerate(keys):
            fields = _field_types(node_cls)
            dotted = ".".join(keys[: i + 1])
            if k not in fields:
                raise RclipError(f"--set {item}: unknown recipe key '{dotted}'; valid keys: {', '.join(fields)}")
            if i == len(keys) - 1:
                node[k] = value
            else:
                node_cls = fields[k]
                if not dataclasses.is_dataclass(node_cls):
                    raise RclipError(f"--set {item}: '{dotted}' is a value, not a section")
                node[k] = dict(node.get(k) or {})
                node = node[k]
    return data


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                cls: type[T] = Recipe) -> T:
    """Load a recipe YAML (or only defaults when ``path`` is None) and apply ``--set`` overrides.

    Example:
        >>> r = load_recipe(None, ["zeroshot.nms_thresh=0.3", "model.variant=tiny"])
        >>> r.zeroshot.nms_thresh, r.model.variant
        (0.3, 'tiny')
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RclipError(f"recipe not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise RclipError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise RclipError(f"{p}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return recipe_from_dict(apply_overrides(data, overrides, cls), cls)
    except RclipError as e:
        raise RclipError(f"{path}: {e}" if path else str(e)) from None


def save_recipe(recipe: Any, path: str | os.PathLike, *, force: bool = True) -> Path:
    """Write the resolved recipe as YAML, atomically."""
    from rclip_core.io import write_text

    return write_text(path, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), force=force)
