"""Loading the original release's RPN checkpoints: detectron2 key names ⇄ :class:`rclip_core.rpn.model.RPNModel`.

Sources (regionclip_facts.md §1.1, §1.2), all read by :func:`read_rpn_source`:

- ``rpn_*.pth`` (``rpn_coco_48``, ``rpn_lvis_866``, ...): detectron2 Mask R-CNN checkpoints; the RPN is
  ``backbone.*`` + ``proposal_generator.*``, everything else (``roi_heads.*``, ``pixel_mean``, ...) is dropped.
- RegionCLIP checkpoints (``regionclip_*.pth``) holding the offline RPN as ``offline_backbone.*`` +
  ``offline_proposal_generator.*`` (their ``backbone.*`` is CLIP and is ignored when ``offline_*`` keys exist).
- rclip checkpoints written by ``rclip weights convert``, whose ``"offline_rpn"`` entry keeps those raw keys.

detectron2 key layout (detectron2/modeling/backbone/{resnet,fpn}.py, proposal_generator/rpn.py) → ours; the trunk
prefix is ``backbone.bottom_up.`` for FPN and ``backbone.`` for C4, ours is always ``backbone.body.``::

    stem.conv1.weight                         → conv1.weight
    stem.conv1.norm.{weight,bias,running_*}   → bn1.*
    res{2..5}.{b}.conv{k}.weight / .norm.*    → layer{1..4}.{b}.conv{k}.weight / .bn{k}.*
    res{2..5}.{b}.shortcut.weight / .norm.*   → layer{1..4}.{b}.downsample.0.weight / .downsample.1.*
    backbone.fpn_lateral{2..5}.* (.norm.*)    → backbone.fpn.inner_blocks.{0..3}.0.* (.1.*)
    backbone.fpn_output{2..5}.* (.norm.*)     → backbone.fpn.layer_blocks.{0..3}.0.* (.1.*)
    proposal_generator.rpn_head.conv.*        → rpn.head.conv.0.0.*   (two convs: conv.conv{k}.* → conv.{k}.0.*)
    proposal_generator.rpn_head.objectness_logits.*  → rpn.head.cls_logits.*
    proposal_generator.rpn_head.anchor_deltas.*      → rpn.head.bbox_pred.*

The head's output channels need no permutation: :class:`~rclip_core.rpn.model.Detectron2AnchorGenerator` lists
anchors in detectron2's size-major order. The layout, depth, number of head convs, FPN norm and width are read from
the keys; the rest of the ``rpn`` recipe (stride placement, anchors, input convention) must match how the weights
were trained — the detectron2 defaults, which are the recipe's. Loading is strict: keys or shapes that do not fit
the model raise one line naming them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from rclip_core.checkpoint import check_state_dict, read_torch_file, save_checkpoint
from rclip_core.errors import RclipError
from rclip_core.recipes import Recipe, RpnCfg, recipe_to_dict
from rclip_core.rpn.model import RPNModel, build_rpn

log = logging.getLogger(__name__)


class KeyRule(NamedTuple):
    """A key template on each side; ``{name}`` placeholders carry over (``stage`` and ``level`` are translated)."""

    ours: str
    detectron2: str


# Placeholder values that differ between the two sides: ours -> detectron2.
TRANSLATIONS: dict[str, dict[str, str]] = {
    "stage": {"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"},
    "level": {"0": "2", "1": "3", "2": "4", "3": "5"},
}
_INVERSE_TRANSLATIONS = {name: {v: k for k, v in table.items()} for name, table in TRANSLATIONS.items()}

# Relative to the ResNet trunk (torchvision ResNet / detectron2 ResNet). Bottleneck and basic blocks alike.
TRUNK_RULES: tuple[KeyRule, ...] = (
    KeyRule("conv1.weight", "stem.conv1.weight"),
    KeyRule("bn1.{rest}", "stem.conv1.norm.{rest}"),
    KeyRule("{stage}.{block}.conv{k}.weight", "{stage}.{block}.conv{k}.weight"),
    KeyRule("{stage}.{block}.bn{k}.{rest}", "{stage}.{block}.conv{k}.norm.{rest}"),
    KeyRule("{stage}.{block}.downsample.0.weight", "{stage}.{block}.shortcut.weight"),
    KeyRule("{stage}.{block}.downsample.1.{rest}", "{stage}.{block}.shortcut.norm.{rest}"),
)
# Relative to ``backbone.``; the norm rules come first so that ``fpn_lateral2.norm.weight`` finds its own rule.
FPN_RULES: tuple[KeyRule, ...] = (
    KeyRule("fpn.inner_blocks.{level}.1.{rest}", "fpn_lateral{level}.norm.{rest}"),
    KeyRule("fpn.inner_blocks.{level}.0.{rest}", "fpn_lateral{level}.{rest}"),
    KeyRule("fpn.layer_blocks.{level}.1.{rest}", "fpn_output{level}.norm.{rest}"),
    KeyRule("fpn.layer_blocks.{level}.0.{rest}", "fpn_output{level}.{rest}"),
)
# Relative to ``rpn.`` / ``proposal_generator.``.
HEAD_RULES: tuple[KeyRule, ...] = (
    KeyRule("head.cls_logits.{rest}", "rpn_head.objectness_logits.{rest}"),
    KeyRule("head.bbox_pred.{rest}", "rpn_head.anchor_deltas.{rest}"),
)
ONE_HEAD_CONV = KeyRule("head.conv.0.0.{rest}", "rpn_head.conv.{rest}")
SEVERAL_HEAD_CONVS = KeyRule("head.conv.{k}.0.{rest}", "rpn_head.conv.conv{k}.{rest}")

# Trunk prefix per layout: (ours, detectron2).
TRUNK_PREFIX: dict[str, tuple[str, str]] = {"c4": ("backbone.body.", "backbone."),
                                            "fpn": ("backbone.body.", "backbone.bottom_up.")}

# ResNet depth by block kind and the number of blocks in res2..res4 (C4 checkpoints stop at res4).
DEPTH_BY_BLOCKS: dict[tuple[str, tuple[int, int, int]], int] = {
    ("basic", (2, 2, 2)): 18, ("basic", (3, 4, 6)): 34,
    ("bottleneck", (3, 4, 6)): 50, ("bottleneck", (3, 4, 23)): 101,
}

# Fields of the ``rpn`` recipe read from the weights themselves.
INFERRED_FIELDS = ("layout", "depth", "head_convs", "fpn_norm", "fpn_channels")


def rpn_key_rules(layout: str, head_convs: int) -> tuple[KeyRule, ...]:
    """The full, prefixed rule table for one architecture (first match wins, in either direction)."""
    ours_trunk, d2_trunk = TRUNK_PREFIX[layout]
    rules = [KeyRule(ours_trunk + r.ours, d2_trunk + r.detectron2) for r in TRUNK_RULES]
    if layout == "fpn":
        rules += [KeyRule("backbone." + r.ours, "backbone." + r.detectron2) for r in FPN_RULES]
    head = (*HEAD_RULES, ONE_HEAD_CONV if head_convs == 1 else SEVERAL_HEAD_CONVS)
    rules += [KeyRule("rpn." + r.ours, "proposal_generator." + r.detectron2) for r in head]
    return tuple(rules)


def _pattern(template: str, side: str) -> re.Pattern:
    """Regex of a template: ``{rest}`` any suffix, translated placeholders their side's values, others digits."""
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        name = m.group(1)
        if name == "rest":
            body = r".+"
        elif name in TRANSLATIONS:
            values = TRANSLATIONS[name].keys() if side == "ours" else TRANSLATIONS[name].values()
            body = "|".join(re.escape(v) for v in values)
        else:
            body = r"\d+"
        out.append(f"(?P<{name}>{body})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + r"\Z")


def rename_keys(state: dict[str, Tensor], rules: tuple[KeyRule, ...], *, to: Literal["ours", "detectron2"]
                ) -> tuple[dict[str, Tensor], list[str]]:
    """Rename every key by the first matching rule; return (renamed, keys no rule matched)."""
    src_side = "detectron2" if to == "ours" else "ours"
    compiled = [(_pattern(getattr(r, src_side), src_side), getattr(r, to)) for r in rules]
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        for pattern, target in compiled:
            m = pattern.match(key)
            if m is None:
                continue
            groups = dict(m.groupdict())
            for name, table in (TRANSLATIONS if to == "detectron2" else _INVERSE_TRANSLATIONS).items():
                if name in groups:
                    groups[name] = table[groups[name]]
            new_key = target.format(**groups)
            if new_key in out:
                raise RclipError(f"keys {origin[new_key]} and {key} both convert to {new_key}")
            out[new_key], origin[new_key] = value, key
            break
        else:
            unmatched.append(key)
    return out, unmatched


# ---------------------------------------------------------------------------------------------------------------
# reading sources and inferring the architecture


def read_rpn_source(path: str | os.PathLike) -> dict[str, Tensor]:
    """The detectron2-named RPN tensors of a release file (``backbone.*`` + ``proposal_generator.*``, from
    ``offline_*`` keys when present), or of an rclip checkpoint's ``"offline_rpn"`` entry, with non-RPN keys left
    out. See the module docstring."""
    p = Path(path)
    obj: Any = read_torch_file(p, what="RPN checkpoint")
    if isinstance(obj, dict) and isinstance(obj.get("offline_rpn"), dict):
        obj = obj["offline_rpn"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RclipError(f"{p}: does not hold a state dict of tensors")
    return select_detectron2_rpn(obj, str(p))


def select_detectron2_rpn(state: dict[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """Keep the RPN's keys, renamed from ``offline_*`` when the file is a RegionCLIP checkpoint."""
    if any(k.startswith("offline_backbone.") for k in state):
        prefixes = {"offline_backbone.": "backbone.", "offline_proposal_generator.": "proposal_generator."}
    else:
        prefixes = {"backbone.": "backbone.", "proposal_generator.": "proposal_generator."}
    out = {}
    for key, value in state.items():
        for old, new in prefixes.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
    if not any(k.startswith(("backbone.stem.", "backbone.bottom_up.stem.")) for k in out):
        raise RclipError(f"{source} holds no detectron2 RPN backbone (no backbone.stem.* or backbone.bottom_up.stem.*"
                         " keys, nor offline_backbone.*)")
    return out


def infer_architecture(d2_state: dict[str, Tensor], source: str = "checkpoint") -> dict[str, Any]:
    """The ``rpn`` recipe fields fixed by the weights (:data:`INFERRED_FIELDS`) from detectron2 key names/shapes."""
    layout = "fpn" if any(k.startswith("backbone.bottom_up.") for k in d2_state) else "c4"
    trunk = TRUNK_PREFIX[layout][1]
    blocks: dict[str, set[int]] = {}
    bottleneck = False
    for key in d2_state:
        m = re.match(re.escape(trunk) + r"(res[2-5])\.(\d+)\.conv(\d)\.", key)
        if m:
            blocks.setdefault(m.group(1), set()).add(int(m.group(2)))
            bottleneck |= m.group(3) == "3"
    counts = tuple(len(blocks.get(f"res{i}", ())) for i in (2, 3, 4))
    kind = "bottleneck" if bottleneck else "basic"
    if (kind, counts) not in DEPTH_BY_BLOCKS:
        raise RclipError(f"{source}: a ResNet with {kind} blocks {list(counts)} in res2..res4 is not a known depth "
                         f"(known: {', '.join(f'{d} = {k} {list(c)}' for (k, c), d in DEPTH_BY_BLOCKS.items())})")
    convs = {m.group(1) for k in d2_state if (m := re.match(r"proposal_generator\.rpn_head\.conv\.conv(\d+)\.", k))}
    arch: dict[str, Any] = {"layout": layout, "depth": DEPTH_BY_BLOCKS[kind, counts], "head_convs": max(1, len(convs)),
                            "fpn_norm": any(k.startswith("backbone.fpn_lateral2.norm.") for k in d2_state)}
    lateral = d2_state.get("backbone.fpn_lateral2.weight")
    if lateral is not None:
        arch["fpn_channels"] = int(lateral.shape[0])
    return arch


# ---------------------------------------------------------------------------------------------------------------
# conversion


@dataclass
class RpnConversionReport:
    """What a conversion did, for the command line to print."""

    source: str
    out: str | None
    architecture: dict[str, Any]
    converted: int
    dropped: list[str] = field(default_factory=list)  # batch-norm counters the model has no use for
    filled: list[str] = field(default_factory=list)  # counters the model needs and the source lacks
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # recipe field -> (recipe's, weights')

    def lines(self) -> list[str]:
        arch = self.architecture
        desc = f"R{arch['depth']}-{arch['layout'].upper()}, {arch['head_convs']} head conv(s)"
        if arch["layout"] == "fpn":
            desc += f", FPN width {arch.get('fpn_channels')}{' with norm' if arch['fpn_norm'] else ''}"
        out = [f"source      {self.source}", f"architecture {desc} (read from the keys)",
               f"converted   {self.converted} keys (detectron2 names -> torchvision modules)"]
        for name, (old, new) in self.changed.items():
            out.append(f"recipe      rpn.{name}: {old} -> {new} (the weights decide)")
        if self.dropped:
            out.append(f"dropped     {len(self.dropped)} num_batches_tracked counters (frozen norms keep none)")
        if self.filled:
            out.append(f"filled      {len(self.filled)} num_batches_tracked = 0")
        if self.out:
            out.append(f"wrote       {self.out}")
        return out


def _fit_counters(model: RPNModel, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Drop batch-norm counters the model lacks (frozen norms), add zero ones it has (trainable BN)."""
    own = model.state_dict()
    dropped = [k for k in state if k.endswith(".num_batches_tracked") and k not in own]
    for k in dropped:
        del state[k]
    filled = [k for k in own if k.endswith(".num_batches_tracked") and k not in state]
    for k in filled:
        state[k] = torch.zeros((), dtype=torch.long)
    return dropped, filled


def convert_rpn_state_dict(d2_state: dict[str, Tensor], cfg: RpnCfg | None = None, *, infer: bool = True,
                           source: str = "checkpoint") -> tuple[RPNModel, RpnCfg, RpnConversionReport]:
    """Load detectron2-named RPN tensors into a new :class:`RPNModel`, strictly.

    Args:
        d2_state: ``backbone.*`` + ``proposal_generator.*`` tensors (see :func:`select_detectron2_rpn`).
        cfg: the ``rpn`` recipe to build (default: the recipe defaults, i.e. detectron2's).
        infer: replace the architecture fields of ``cfg`` (:data:`INFERRED_FIELDS`) by what the keys say; without
            it, weights of another architecture fail the strict check.
        source: a name for messages.

    Returns:
        (the loaded model in eval mode, the ``rpn`` config it was built from, a report).

    Raises:
        RclipError: an unknown depth, or keys/shapes that do not fit (named, first few of each kind).
    """
    cfg = dataclasses.replace(cfg or RpnCfg(), imagenet_init=False)
    changed: dict[str, tuple[Any, Any]] = {}
    arch = infer_architecture(d2_state, source)
    if infer:
        for name, value in arch.items():
            if getattr(cfg, name) != value:
                changed[name] = (getattr(cfg, name), value)
        cfg = dataclasses.replace(cfg, **arch)
    model = build_rpn(cfg, imagenet_init=False)
    state, unmatched = rename_keys(d2_state, rpn_key_rules(cfg.layout, cfg.head_convs), to="ours")
    for key in unmatched:  # keep them under their own name, so the strict check lists them as unexpected
        state[key] = d2_state[key]
    dropped, filled = _fit_counters(model, state)
    check_state_dict(model, state, f"{source} (as an R{cfg.depth}-{cfg.layout.upper()} RPN)")
    model.load_state_dict(state, strict=True)
    report = RpnConversionReport(source=source, out=None, architecture=arch, converted=len(d2_state) - len(unmatched),
                                 dropped=dropped, filled=filled, changed=changed)
    return model.eval(), cfg, report


def to_detectron2_state_dict(model: RPNModel, cfg: RpnCfg) -> dict[str, Tensor]:
    """The inverse mapping: our model's tensors under detectron2's names (what a released ``rpn_*.pth`` holds,
    FrozenBN style, without batch-norm counters)."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".num_batches_tracked")}
    out, unmatched = rename_keys(state, rpn_key_rules(cfg.layout, cfg.head_convs), to="detectron2")
    if unmatched:
        raise ValueError(f"no detectron2 name for: {', '.join(unmatched[:5])}")
    return out


def convert_rpn_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, recipe: Recipe | None = None,
                           force: bool = False) -> RpnConversionReport:
    """Convert a released RPN (or the offline RPN inside a RegionCLIP checkpoint) into an rclip RPN checkpoint.

    The output is ``{"model": RPNModel state dict, "recipe": the resolved recipe with the inferred architecture,
    "step": 0, "converted_from": str}``, loadable by :func:`load_rpn` and ``rclip rpn propose``.

    Example:
        >>> convert_rpn_checkpoint("rpn_lvis_866.pth", "rpn_lvis_866.rclip.pt")  # doctest: +SKIP
    """
    from rclip_core.io import check_writable

    check_writable(dst, force=force)
    recipe = recipe or Recipe()
    d2_state = read_rpn_source(src)
    model, cfg, report = convert_rpn_state_dict(d2_state, recipe.rpn, source=str(src))
    recipe = dataclasses.replace(recipe, rpn=cfg)
    save_checkpoint(dst, model, recipe=recipe_to_dict(recipe), step=0, force=force, converted_from=str(src))
    report.out = str(dst)
    log.info("converted %s -> %s", src, dst)
    return report


# ---------------------------------------------------------------------------------------------------------------
# our checkpoints


def read_rpn_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """(state dict, stored recipe dict) of an rclip RPN checkpoint (``rclip rpn train`` / ``rclip rpn convert``), or
    of the offline RPN inside a detector checkpoint (``rclip finetune``; its ``detector.rpn`` entry)."""
    p = Path(path)
    obj: Any = read_torch_file(p, what="RPN checkpoint")
    if isinstance(obj, dict) and isinstance(obj.get("detector"), dict) and isinstance(obj["detector"].get("rpn"), dict):
        obj = obj["detector"]["rpn"]
    if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("recipe"), dict)
            and isinstance(obj["recipe"].get("rpn"), dict)):
        hint = " (a detectron2 / RegionCLIP file? convert it with `rclip rpn convert`)" if isinstance(obj, dict) else ""
        raise RclipError(f"{p}: not an rclip RPN checkpoint (needs 'model' and a recipe with an 'rpn' section){hint}")
    return obj["model"], obj["recipe"]


def load_rpn_state(state: dict[str, Tensor], cfg: RpnCfg, source: str = "checkpoint") -> RPNModel:
    """Build the RPN of ``cfg`` and load ``state`` (our key names) into it strictly; eval mode."""
    model = build_rpn(cfg, imagenet_init=False)
    state = dict(state)
    _fit_counters(model, state)
    check_state_dict(model, state, f"{source} (as an R{cfg.depth}-{cfg.layout.upper()} RPN)")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_rpn(path: str | os.PathLike, cfg: RpnCfg | None = None) -> RPNModel:
    """Load an rclip RPN checkpoint into the RPN of ``cfg`` (default: the checkpoint's own recipe), strictly.

    Example:
        >>> model = load_rpn("runs/rpn/checkpoint.pt")  # doctest: +SKIP
        >>> out = propose(model, [to_uint8_tensor(img)])  # doctest: +SKIP
    """
    from rclip_core.recipes import recipe_from_dict

    state, recipe = read_rpn_checkpoint(path)
    if cfg is None:
        try:
            cfg = recipe_from_dict({"rpn": recipe["rpn"]}).rpn  # only its own section (others may be older)
        except RclipError as e:
            raise RclipError(f"{path}: stored recipe: {e}") from None
    return load_rpn_state(state, cfg, str(path))
