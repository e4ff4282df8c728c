"""Class lists from ``--classes`` (the same flag, the same meaning in ``embed``, ``zeroshot``, ``visualize`` and
``vocab``): a built-in list name, a names file, a COCO/LVIS annotation file's categories, or a comma list; cleaned
and de-duplicated the same way everywhere. No torch: commands resolve the list before building a model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from rclip_core.errors import RclipError

log = logging.getLogger(__name__)

BUILTIN_LISTS = ("coco80", "coco65", "coco48", "coco17", "lvis1203", "lvis866")


def clean_name(name: str) -> str:
    """Class name → prompt word(s), as the original does: LVIS '_' → ' ', parentheses dropped, commas dropped,
    '+' → ' ' (e.g. ``"bible_(book)"`` → ``"bible book"``)."""
    name = name.replace("_", " ").replace("(", "").replace(")", "").replace(",", "").replace("+", " ")
    return " ".join(name.split())


def names_from_text(path: str | os.PathLike) -> list[str]:
    """One name per line; text after the first comma is ignored (the original's concept files may carry counts)."""
    p = Path(path)
    if not p.is_file():
        raise RclipError(f"names file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise RclipError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    names = [ln.split(",")[0].strip() for ln in lines]
    names = [n for n in names if n]
    if not names:
        raise RclipError(f"{p}: no names (the file is empty)")
    return names


def categories_from_json(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """Names and ids of a COCO/LVIS annotation file's ``categories``, in id order."""
    from rclip_core.io import read_json

    data = read_json(path, what="annotation file")
    cats = data.get("categories") if isinstance(data, dict) else None
    if not cats:
        raise RclipError(f"{path}: no 'categories' list")
    try:
        cats = sorted(cats, key=lambda c: c["id"])
        return [c["name"] for c in cats], [int(c["id"]) for c in cats]
    except (KeyError, TypeError) as e:
        raise RclipError(f"{path}: a category lacks key {e}") from None


def builtin_names(which: str) -> tuple[list[str], list[int]]:
    """Built-in class lists: ``coco80``, ``coco65`` (open-vocabulary 48+17), ``coco48``, ``coco17``, ``lvis1203``,
    ``lvis866`` (LVIS base: common + frequent)."""
    from rclip_core.data import categories as C

    # The base/novel rule is data.categories.category_splits, used here as by evaluation and training.
    subsets = {"coco80": (C.coco_categories, None), "coco65": (C.coco_categories, ("base", "novel")),
               "coco48": (C.coco_categories, ("base",)), "coco17": (C.coco_categories, ("novel",)),
               "lvis1203": (C.lvis_categories, None), "lvis866": (C.lvis_categories, ("base",))}
    if which not in subsets:
        raise RclipError(f"unknown built-in class list '{which}'; available: {', '.join(BUILTIN_LISTS)}")
    everything, want = subsets[which]
    cats = everything()
    if want is not None:
        split = C.category_splits(cats)
        cats = [c for c in cats if split[int(c["id"])] in want]
    return [c["name"] for c in cats], [int(c["id"]) for c in cats]



def name_key(name: str) -> str:
    """What makes two class names the same class: cleaned (:func:`clean_name`) and case-folded, so
    ``"Traffic_Light"`` and ``"traffic light"`` are one."""
    return clean_name(name).casefold()


def _first_occurrences(names: list[str]) -> list[int]:
    seen: set[str] = set()
    keep = []
    for i, n in enumerate(names):
        key = name_key(n)
        if key in seen:
            log.warning("class name %r repeats an earlier one; it is kept once", n)
            continue
        seen.add(key)
        keep.append(i)
    return keep


@dataclass
class ClassList:
    """Class names with their category ids (None when the source has none) and where they came from."""

    names: list[str]
    category_ids: list[int] | None
    source: str


def resolve_classes(spec: str) -> ClassList:
    """``--classes``: a built-in list name (``coco80``, ``lvis1203``, ...), a names file (one per line), a COCO/LVIS
    annotation ``.json`` (its categories, ids kept), or a comma-separated list ("cat,dog,traffic light"). Repeated
    names (after cleaning, case-folded) are kept once, with a warning.

    Raises:
        RclipError: an empty list, or a file that cannot be read.
    """
    spec = spec.strip()
    ids: list[int] | None = None
    if spec in BUILTIN_LISTS or spec.startswith("builtin:"):
        spec = spec.removeprefix("builtin:")
        names, ids = builtin_names(spec)
        source = f"built-in list {spec}"
    elif spec.lower().endswith(".json") and "," not in spec:
        names, ids = categories_from_json(spec)
        source = f"categories of {spec}"
    elif Path(spec).is_file():
        names, source = names_from_text(spec), f"names file {spec}"
    elif spec.lower().endswith((".txt", ".json")) and "," not in spec:
        raise RclipError(f"--classes: names file not found: {spec}")
    else:
        names, source = [c.strip() for c in spec.split(",") if c.strip()], "the --classes list"
    if not names:
        raise RclipError("--classes: the class list is empty")
    keep = _first_occurrences(names)
    return ClassList([names[i] for i in keep], [ids[i] for i in keep] if ids is not None else None, source)


def class_source(classes: str | None, embeddings: str | os.PathLike | None, *,
                 default: str | None = None) -> ClassList | None:
    """What a command's ``--classes`` / ``--embeddings`` pair asks for, checked before any model is built: the
    resolved class list, or None when a cached embeddings file is given (checked to exist). ``default`` (a
    ``--classes`` spec) is used when neither is given, said in the log; without one, neither is an error."""
    if classes is not None and embeddings is not None:
        raise RclipError("give one of --classes or --embeddings, not both")
    if embeddings is not None:
        if not Path(embeddings).is_file():
            raise RclipError(f"--embeddings: file not found: {embeddings}")
        return None
    if classes is None:
        if default is None:
            raise RclipError("give the classes: --classes LIST|FILE|NAME or --embeddings FILE")
        log.info("no --classes given: using the %s class names", default)
        classes = default
    return resolve_classes(classes)
