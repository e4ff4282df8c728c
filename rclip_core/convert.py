"""Conversion of original RegionCLIP (and OpenAI CLIP) checkpoints into rclip checkpoints.

Table-driven (design §4.8): every source key is matched on its *prefix* against :data:`KEY_TABLE` and either renamed
into the open_clip ``CLIP`` state dict, kept aside under a named entry of the output checkpoint, or dropped and
listed. Prefixes, not substrings: pretrained RegionCLIP files also hold ``teacher_backbone.*``, which a substring match
on ``backbone.`` would wrongly take as the student (regionclip_facts.md §1, §9).

Sources (regionclip_facts.md §1.2), bare or wrapped in ``{"model": ...}``:

- ``regionclip_pretrained-cc_{rn50,rn50x4}.pth``: ``backbone.*`` (student visual), ``lang_encoder.*`` (text tower),
  ``teacher_backbone.*`` (frozen CLIP visual) and possibly ``offline_backbone.*`` / ``offline_proposal_generator.*``.
- ``regionclip_finetuned-{coco,lvis}_*.pth``: ``backbone.*``, ``roi_heads.box_predictor.*`` (LVIS also
  ``roi_heads.mask_head.*``), probably ``offline_*``; **no text tower**.
- OpenAI-CLIP-style files (``teacher_RN50_student_..._OAI_CLIP.pth``, OpenAI's ``RN50.pt``, open_clip or rclip state
  dicts): ``visual.*`` and the text tower at the top level.

What the converter fills, because the release does not store it:

- ``num_batches_tracked`` of every batch norm: detectron2's ``FrozenBatchNorm2d`` has none; it is set to 0 (it only
  matters for training-mode momentum, which a frozen or finetuned CLIP trunk does not use).
- ``logit_scale``: RegionCLIP's text encoder has none and uses a fixed temperature of 0.01, so it is set to ln(100).

Checkpoints without a text tower (finetuned ones): every rclip checkpoint holds a *complete* ``CLIP`` state dict, so
that ``create_clip(variant, path)`` always loads it strictly. The text tower must therefore come from elsewhere,
named explicitly with ``text_from``: a file holding one (the pretrained RegionCLIP checkpoint or OpenAI CLIP of the
same variant, whose text towers are the same frozen weights), an open_clip pretrained tag such as ``"openai"``, or
``"random"`` (seeded random init) for detection with precomputed class-embedding files, where the text tower is never
run. Without ``text_from`` such a checkpoint is refused with a message saying so; the choice is recorded in the output
under ``"text_source"``.

Output: ``{"model": CLIP state dict, "recipe": {"model": {"variant": ...}}, "step": 0, "rclip_version": ...,
"converted_from": str, "text_source": str}`` plus, when present in the source, ``"teacher"`` (a state dict of the
teacher's ``clip.visual`` module, keys relative to it, batch-norm counters filled; ``"teacher_variant"`` says which
variant its shapes match), ``"offline_rpn"``, ``"box_predictor"`` and ``"mask_head"`` (the raw detectron2 keys and
tensors, for RPN loading and finetuning).

One file, read in sections on demand: every reader maps it (``torch.load(mmap=True)``), so a tensor's bytes come
from disk only when used. ``rclip zeroshot`` given class embeddings builds the visual tower alone and reads that
section: 179 MB of a converted RN50 release's 536 MB (teacher and text tower untouched), as much as from a file
holding the student alone (175 MB; tested in ``tests/test_startup.py``). So the teacher stays in the same file.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from rclip_core.checkpoint import check_state_dict, read_state_dict, save_checkpoint
from rclip_core.errors import RclipError

log = logging.getLogger(__name__)

MODEL = "model"  # destination: the open_clip CLIP state dict


class Rule(NamedTuple):
    """Rename keys starting with ``old`` (or equal to it, when ``old`` does not end in ".") to ``new`` + rest, into
    output entry ``dest``."""

    old: str
    dest: str
    new: str


# The one conversion table. Prefixes are disjoint, so the order only matters for readability.
KEY_TABLE: tuple[Rule, ...] = (
    # RegionCLIP (detectron2 CLIPFastRCNN / PretrainFastRCNN). Its ModifiedResNet and CLIPLangEncoder use the same
    # attribute names as OpenAI CLIP and open_clip, so only the prefix changes.
    Rule("backbone.", MODEL, "visual."),
    Rule("lang_encoder.", MODEL, ""),
    # OpenAI CLIP / open_clip / rclip layout: already ours.
    Rule("visual.", MODEL, "visual."),
    Rule("token_embedding.", MODEL, "token_embedding."),
    Rule("positional_embedding", MODEL, "positional_embedding"),
    Rule("transformer.", MODEL, "transformer."),
    Rule("ln_final.", MODEL, "ln_final."),
    Rule("text_projection", MODEL, "text_projection"),
    Rule("logit_scale", MODEL, "logit_scale"),
    # Not part of CLIP: kept aside for later stages. The teacher becomes a state dict of ``clip.visual``.
    Rule("teacher_backbone.", "teacher", ""),
    Rule("offline_backbone.", "offline_rpn", "offline_backbone."),
    Rule("offline_proposal_generator.", "offline_rpn", "offline_proposal_generator."),
    Rule("roi_heads.box_predictor.", "box_predictor", "roi_heads.box_predictor."),
    Rule("roi_heads.mask_head.", "mask_head", "roi_heads.mask_head."),
)

# Keys known to carry nothing we need; dropped and listed in the report.
DROPPED_KEYS: dict[str, str] = {
    "input_resolution": "OpenAI CLIP metadata",
    "context_length": "OpenAI CLIP metadata",
    "vocab_size": "OpenAI CLIP metadata",
    "ignore_others": "detectron2 RPN-loading marker",
    "pixel_mean": "detectron2 input normalisation (set by the recipe)",
    "pixel_std": "detectron2 input normalisation (set by the recipe)",
}

# Variant by the attention pool's positional embedding, (grid² + 1, res5 channels): a shape only each variant has.
ATTNPOOL_POS_SHAPES: dict[tuple[int, int], str] = {
    (50, 2048): "RN50",
    (82, 2560): "RN50x4",
    (17, 512): "tiny",
}
ATTNPOOL_POS_KEY = "attnpool.positional_embedding"  # relative to the visual module

LOGIT_SCALE = math.log(100.0)  # RegionCLIP's fixed temperature 0.01
RANDOM_TEXT = "random"  # text_from value: seeded random text tower


@dataclass
class SplitState:
    """A source state dict sorted by :data:`KEY_TABLE`: renamed CLIP keys, kept extras, dropped keys."""

    model: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # known, listed in DROPPED_KEYS
    unrecognised: list[str] = field(default_factory=list)  # matched by no rule; also dropped
    role_of: dict[str, str] = field(default_factory=dict)  # source key -> destination (or "dropped"/"unrecognised")


@dataclass
class ConversionReport:
    """What a conversion did, for the command line to print."""

    source: str
    out: str | None
    variant: str
    layout: str
    converted: int  # source keys renamed into the CLIP state dict
    filled: list[str]  # CLIP keys the source lacked and the converter filled
    text_source: str  # "source", a --text-from file/tag, or "random"
    extras: dict[str, int]  # output entry -> number of source keys kept there
    teacher_variant: str | None
    dropped: list[str]
    unrecognised: list[str]

    def lines(self) -> list[str]:
        """A human-readable summary, one fact per line."""
        counters = [k for k in self.filled if k.endswith(".num_batches_tracked")]
        out = [
            f"source      {self.source} ({self.layout} layout)",
            f"variant     {self.variant}",
            f"converted   {self.converted} keys into the CLIP state dict",
            f"text tower  {_describe_text_source(self.text_source)}",
        ]
        if counters:
            out.append(f"filled      {len(counters)} num_batches_tracked = 0 (FrozenBatchNorm stores none)")
        if "logit_scale" in self.filled:
            out.append(f"filled      logit_scale = ln(100) = {LOGIT_SCALE:.4f} (RegionCLIP's fixed temperature 0.01)")
        for name, count in self.extras.items():
            extra = f" (shapes match {self.teacher_variant or 'no known variant'})" if name == "teacher" else ""
            out.append(f"kept        {name}: {count} keys{extra}")
        if self.dropped:
            out.append(f"dropped     {len(self.dropped)} keys: {', '.join(self.dropped)}")
        if self.unrecognised:
            shown = ", ".join(self.unrecognised[:8]) + (", ..." if len(self.unrecognised) > 8 else "")
            out.append(f"unrecognised (dropped) {len(self.unrecognised)} keys: {shown}")
        if self.out:
            out.append(f"wrote       {self.out}")
        return out


def _describe_text_source(text_source: str) -> str:
    if text_source == "source":
        return "from the source"
    if text_source == RANDOM_TEXT:
        return "random (seeded; use only with precomputed class embeddings)"
    return f"from {text_source}"


@dataclass
class CheckpointSummary:
    """What :func:`inspect_checkpoint` finds: key counts per top-level prefix, their role, the inferred variant."""

    path: str
    num_keys: int
    layout: str
    variant: str | None
    teacher_variant: str | None
    prefixes: list[tuple[str, int, str]]  # (first dotted component, key count, role(s))

    def lines(self) -> list[str]:
        width = max([len(p) for p, _, _ in self.prefixes] + [6])
        out = [f"{self.path}: {self.num_keys} tensors, {self.layout} layout"]
        out += [f"  {p:<{width}}  {n:>5}  -> {role}" for p, n, role in self.prefixes]
        out.append(f"variant: {self.variant or 'unknown (no attention-pool positional embedding of a known shape)'}")
        if self.teacher_variant:
            out.append(f"teacher variant: {self.teacher_variant}")
        return out


def _match(rule: Rule, key: str) -> bool:
    return key.startswith(rule.old) if rule.old.endswith(".") else key == rule.old


def split_state_dict(state: dict[str, Tensor]) -> SplitState:
    """Sort every key of ``state`` by :data:`KEY_TABLE`; raise when two source keys map to the same new key."""
    split = SplitState()
    origin: dict[tuple[str, str], str] = {}  # (dest, new key) -> source key, to name collisions
    for key, value in state.items():
        rule = next((r for r in KEY_TABLE if _match(r, key)), None)
        if rule is None:
            known = key in DROPPED_KEYS
            (split.dropped if known else split.unrecognised).append(key)
            split.role_of[key] = "dropped" if known else "unrecognised (dropped)"
            continue
        new_key = rule.new + key[len(rule.old):]
        if (rule.dest, new_key) in origin:
            raise RclipError(f"keys {origin[rule.dest, new_key]} and {key} both convert to {new_key}; "
                             "the file mixes two layouts")
        origin[rule.dest, new_key] = key
        target = split.model if rule.dest == MODEL else split.extras.setdefault(rule.dest, {})
        target[new_key] = value
        split.role_of[key] = _role_name(rule.dest, new_key)
    return split


def _role_name(dest: str, new_key: str) -> str:
    if dest != MODEL:
        return dest
    if new_key.startswith("visual."):
        return "CLIP visual"
    return "logit_scale" if new_key == "logit_scale" else "CLIP text"


def _is_text_key(key: str) -> bool:
    """Whether a CLIP state-dict key belongs to the text tower (everything but ``visual.*`` and ``logit_scale``)."""
    return not key.startswith("visual.") and key != "logit_scale"


def infer_variant(visual_state: dict[str, Tensor], prefix: str = "visual.") -> str | None:
    """The variant whose attention-pool positional embedding has the shape found under ``prefix``, else None."""
    pos = visual_state.get(prefix + ATTNPOOL_POS_KEY)
    return None if pos is None else ATTNPOOL_POS_SHAPES.get(tuple(pos.shape))


def _layout(state: dict[str, Tensor]) -> str:
    if any(k.startswith(("backbone.", "lang_encoder.", "teacher_backbone.")) for k in state):
        return "RegionCLIP"
    return "OpenAI CLIP" if any(k.startswith("visual.") for k in state) else "unknown"


def fill_num_batches_tracked(state: dict[str, Tensor]) -> list[str]:
    """Add a zero ``num_batches_tracked`` beside every batch norm's ``running_mean`` that lacks one (in place).

    detectron2's FrozenBatchNorm2d has no counter, torch's BatchNorm2d (open_clip) has one; 0 is its value for a
    norm never trained in training mode. Returns the added keys.
    """
    added = []
    for key in list(state):
        if key.endswith(".running_mean"):
            counter = key[: -len("running_mean")] + "num_batches_tracked"
            if counter not in state:
                state[counter] = torch.zeros((), dtype=torch.long)
                added.append(counter)
    return added


def resolve_variant(model_state: dict[str, Tensor], variant: str | None, source: str) -> str:
    """Infer the variant from shapes and check it against ``variant`` when given."""
    inferred = infer_variant(model_state)
    pos = model_state.get("visual." + ATTNPOOL_POS_KEY)
    if variant is None:
        if inferred is None:
            found = "is missing" if pos is None else f"has shape {list(pos.shape)}"
            known = ", ".join(f"{list(s)} ({v})" for s, v in ATTNPOOL_POS_SHAPES.items())
            raise RclipError(f"{source}: cannot infer the variant: the attention pool's positional embedding "
                             f"(backbone./visual.{ATTNPOOL_POS_KEY}) {found}; known shapes: {known}")
        return inferred
    if inferred is not None and inferred != variant:
        raise RclipError(f"{source} holds a {inferred} model (visual.{ATTNPOOL_POS_KEY} {list(pos.shape)}), "
                         f"not {variant}; pass --variant {inferred} or leave it out")
    return variant


def load_text_tower(text_from: str, variant: str) -> dict[str, Tensor]:
    """The text-tower keys of a CLIP state dict for ``variant``, from a file, an open_clip tag, or ``"random"``.

    A file may be in any layout :func:`split_state_dict` reads (a pretrained RegionCLIP checkpoint, OpenAI CLIP, an
    rclip checkpoint). ``"random"`` is a fixed-seed initialisation, so two conversions give the same file.
    """
    from rclip_core.clip_backbone import create_clip

    if text_from == RANDOM_TEXT:
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
            torch.manual_seed(0)
            state = create_clip(variant).state_dict()
    elif Path(text_from).is_file():
        state = split_state_dict(read_state_dict(text_from)).model
    else:  # an open_clip pretrained tag; create_clip names a missing file or an unknown tag
        state = create_clip(variant, text_from).state_dict()
    text = {k: v for k, v in state.items() if _is_text_key(k)}
    if not text:
        raise RclipError(f"--text-from {text_from}: holds no text tower (no lang_encoder.* or token_embedding.* keys)")
    return text


@dataclass
class Converted:
    """The result of :func:`convert_state_dict`: the checkpoint entries and the report (``out`` still unset)."""

    model: dict[str, Tensor]
    extras: dict[str, object]
    report: ConversionReport


def convert_state_dict(state: dict[str, Tensor], *, variant: str | None = None, text_from: str | None = None,
                       source: str = "checkpoint") -> Converted:
    """Convert a RegionCLIP / OpenAI-CLIP state dict to an open_clip ``CLIP`` state dict, checked strictly.

    Args:
        state: the source tensors (already unwrapped from ``{"model": ...}``).
        variant: ``RN50``, ``RN50x4`` or ``tiny``; inferred from shapes when None, checked against them when given.
        text_from: where the text tower comes from when ``state`` has none (see the module docstring); refused
            when ``state`` has one.
        source: a name for messages.

    Returns:
        :class:`Converted`, whose ``model`` loads into ``create_clip(variant)`` with ``strict=True``.

    Raises:
        RclipError: unknown variant, colliding keys, no text tower and no ``text_from``, or keys/shapes that do not
            fit the variant's model (named by :func:`rclip_core.checkpoint.check_state_dict`).
    """
    from rclip_core.clip_backbone import create_clip, get_variant

    if variant is not None:
        get_variant(variant)  # rejects an unknown name with the valid list
    split = split_state_dict(state)
    variant = resolve_variant(split.model, variant, source)
    model_state = dict(split.model)
    has_text = any(_is_text_key(k) for k in model_state)
    label = source
    if has_text and text_from is not None:
        raise RclipError(f"{source} already holds a text tower; --text-from is only for checkpoints without one")
    if not has_text:
        if text_from is None:
            raise RclipError(f"{source} holds no text tower (no lang_encoder.* keys, e.g. a finetuned checkpoint): "
                             f"pass --text-from with the pretrained RegionCLIP or OpenAI CLIP {variant} file, an "
                             f"open_clip tag, or '{RANDOM_TEXT}' when only precomputed class embeddings will be used")
        model_state.update(load_text_tower(text_from, variant))
        label = f"{source} with the text tower from {text_from}"
    filled = fill_num_batches_tracked(model_state)
    if "logit_scale" not in model_state:
        model_state["logit_scale"] = torch.tensor(LOGIT_SCALE)
        filled.append("logit_scale")
        log.info("%s: no logit_scale; set to ln(100) (RegionCLIP's fixed temperature 0.01)", source)

    clip = create_clip(variant, log_random_init=False)  # its weights are replaced right below
    check_state_dict(clip, model_state, f"{label} (converted as {variant})")
    clip.load_state_dict(model_state, strict=True)  # casts to the model's dtypes (OpenAI files are fp16)

    kept = {name: len(part) for name, part in split.extras.items()}  # source keys, before filling the teacher's
    extras: dict[str, object] = {}
    teacher_variant = None
    for name, part in split.extras.items():
        if name == "teacher":
            fill_num_batches_tracked(part)
            teacher_variant = infer_variant(part, prefix="")
            extras["teacher_variant"] = teacher_variant
        extras[name] = part
    if split.unrecognised:
        log.warning("%s: %d keys match no conversion rule and are dropped: %s", source, len(split.unrecognised),
                    ", ".join(split.unrecognised[:8]))
    report = ConversionReport(
        source=source, out=None, variant=variant, layout=_layout(state),
        converted=len(split.model), filled=filled, text_source="source" if has_text else str(text_from),
        extras=kept, teacher_variant=teacher_variant,
        dropped=split.dropped, unrecognised=split.unrecognised,
    )
    return Converted(model=clip.state_dict(), extras=extras, report=report)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, variant: str | None = None,
                       text_from: str | None = None, force: bool = False) -> ConversionReport:
    """Read ``src``, convert it (:func:`convert_state_dict`) and write an rclip checkpoint to ``dst`` atomically.

    Example:
        >>> report = convert_checkpoint("regionclip_pretrained-cc_rn50.pth", "rn50_regionclip.pt")  # doctest: +SKIP
        >>> clip = create_clip(report.variant, "rn50_regionclip.pt")  # doctest: +SKIP

    Raises:
        RclipError: ``dst`` exists and not ``force``; ``src`` missing or not a checkpoint; see
            :func:`convert_state_dict`.
    """
    from rclip_core.io import check_writable

    check_writable(dst, force=force)  # fail before the slow part
    state = read_state_dict(src)
    converted = convert_state_dict(state, variant=variant, text_from=text_from, source=str(src))
    report = converted.report
    save_checkpoint(dst, converted.model, recipe={"model": {"variant": report.variant}}, step=0, force=force,
                    converted_from=str(src), text_source=report.text_source, **converted.extras)
    report.out = str(dst)
    return report


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointSummary:
    """Count a checkpoint's keys by top-level prefix, say what conversion would do with each, infer the variant."""
    state = read_state_dict(path)
    split = split_state_dict(state)
    counts: Counter[str] = Counter()
    roles: dict[str, list[str]] = {}
    for key in state:
        top = key.split(".", 1)[0]
        counts[top] += 1
        role = split.role_of[key]
        if role not in roles.setdefault(top, []):
            roles[top].append(role)
    prefixes = [(top, counts[top], ", ".join(roles[top])) for top in counts]
    teacher = split.extras.get("teacher", {})
    return CheckpointSummary(path=str(path), num_keys=len(state), layout=_layout(state),
                             variant=infer_variant(split.model),
                             teacher_variant=infer_variant(teacher, prefix="") if teacher else None,
                             prefixes=prefixes)
