"""Drawing detections and the HTML index (pure: images + detections → images / HTML text).

Boxes are outlined in their class colour; each label sits on a filled band of that colour, in black or white
(whichever contrasts more), in Pillow's scalable default font sized to the picture, so labels stay legible on a
640-pixel photo and on a zoomed 128-pixel toy scene alike. Pictures made with random weights carry a red band with
the notice above the picture (added, so it hides no box or label).
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from rclip_core.data.files import picture_names  # noqa: F401  (its home; importable here as before)

RIGHT, WRONG = (40, 170, 60), (220, 40, 40)
RANDOM_WEIGHTS_NOTICE = "RANDOM WEIGHTS - labels are meaningless"


def class_color(index: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per class index (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``background`` (relative luminance, WCAG)."""
    def lin(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    lum = 0.2126 * lin(background[0]) + 0.7152 * lin(background[1]) + 0.0722 * lin(background[2])
    return (0, 0, 0) if lum > 0.179 else (255, 255, 255)


def font_for(image_size: tuple[int, int]) -> ImageFont.ImageFont:
    """Pillow's scalable default font, about 1/30 of the picture's shorter side (at least 11 px)."""
    return ImageFont.load_default(size=max(11, round(min(image_size) / 30)))


def draw_labeled_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str],
                       colors: Sequence[tuple[int, int, int]], *, width: int | None = None) -> Image.Image:
    """Outline ``boxes`` (``xyxy`` pixels) and write each label on a filled band of its colour; a new image."""
    out = image.convert("RGB").copy()
    if not len(boxes):
        return out
    draw = ImageDraw.Draw(out)
    font = font_for(out.size)
    width = width or max(1, round(min(out.size) / 200))
    for box, color in zip(boxes, colors):  # every outline first, so no outline crosses a label
        draw.rectangle(tuple(float(v) for v in box), outline=color, width=width)
    placed: list[tuple[float, float, float, float]] = []
    for box, label, color in zip(boxes, labels, colors):
        if not label:
            continue
        x0, y0, x1, y1 = (float(v) for v in box)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left + 4, bottom - top + 4
        tx = min(max(0.0, x0), max(0.0, out.width - tw))
        # Above the box; else inside it at the top, inside at the bottom, below it: the first spot that fits in
        # the picture and covers no label already drawn (crowded scenes), else the first that fits.
        spots = [y for y in (y0 - th, y0, y1 - th, y1) if 0 <= y <= out.height - th] or [max(0.0, y0)]
        ty = next((y for y in spots if not any(tx < r[2] and r[0] < tx + tw and y < r[3] and r[1] < y + th
                                               for r in placed)), spots[0])
        placed.append((tx, ty, tx + tw, ty + th))
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=color)
        draw.text((tx + 2 - left, ty + 2 - top), label, fill=text_color(color), font=font)
    return out


def draw_banner(image: Image.Image, text: str, color: tuple[int, int, int] = WRONG) -> Image.Image:
    """``text`` on a band of ``color`` added above the picture (e.g. the random-weights notice): a new, taller
    image; the picture itself, its boxes and their labels stay whole and visible below the band."""
    image = image.convert("RGB")
    font = font_for(image.size)
    left, top, right, bottom = ImageDraw.Draw(image).textbbox((0, 0), text, font=font)
    band = bottom - top + 8
    out = Image.new("RGB", (image.width, image.height + band), color)
    out.paste(image, (0, band))
    ImageDraw.Draw(out).text((4 - left, 4 - top), text, fill=text_color(color), font=font)
    return out


def draw_detections(image: Tensor, boxes: Tensor, names: list[str], scores: Tensor | None = None,
                    class_indices: list[int] | None = None, *, width: int = 2) -> Tensor:
    """Draw labelled boxes on a tensor image.

    Args:
        image: (3, H, W) uint8.
        boxes: (N, 4) ``xyxy`` pixels of ``image``.
        names: N label texts.
        scores: (N,) appended to the labels as ``name 0.87``.
        class_indices: N ints choosing colours (default: one colour per distinct name).

    Returns:
        (3, H, W) uint8, a new tensor.
    """
    if boxes.shape[0] == 0:
        return image.clone()
    if class_indices is None:
        order = {n: i for i, n in enumerate(dict.fromkeys(names))}
        class_indices = [order[n] for n in names]
    labels = [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist())] if scores is not None else list(names)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    out = draw_labeled_boxes(pil, boxes.tolist(), labels, [class_color(i) for i in class_indices], width=width)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


def tile(images: list[Tensor], nrow: int = 4, padding: int = 4) -> Tensor:
    """Lay out (3, H, W) uint8 images of one size in a grid → (3, H', W') uint8."""
    from torchvision.utils import make_grid  # here: drawing detections alone never imports torchvision (tvops.py)

    return make_grid(torch.stack(images), nrow=nrow, padding=padding, pad_value=255)


def select_detections(results: list[dict], *, score_thresh: float = 0.0, topk: int | None = None,
                      one_per_box: bool = False) -> list[dict]:
    """Pick what to draw from one image's COCO result records: above ``score_thresh``, best first, at most ``topk``;
    with ``one_per_box`` only the best class of each box (GT-box mode, where every box gets every class)."""
    dets = sorted((d for d in results if d["score"] >= score_thresh), key=lambda d: -d["score"])
    if one_per_box:
        best: dict[tuple, dict] = {}
        for d in dets:
            best.setdefault(tuple(d["bbox"]), d)
        dets = list(best.values())
    return dets[:topk] if topk is not None else dets


def _zoomed(image: Image.Image, zoom: int) -> Image.Image:
    return image.resize((image.width * zoom, image.height * zoom), Image.NEAREST) if zoom > 1 else image


def render(image: Image.Image, dets: list[dict], names: dict[int, str], *, zoom: int = 1, width: int | None = None,
           notice: str | None = None) -> Image.Image:
    """Draw COCO result records (``bbox`` xywh in ``image`` pixels) on a PIL RGB image → a new PIL image.

    ``zoom`` enlarges small images (nearest neighbour) first so labels stay legible; ``notice`` adds a banner.
    """
    image = _zoomed(image.convert("RGB"), zoom)
    from rclip_core.boxes import scale_boxes, xywh_to_xyxy

    boxes = scale_boxes(xywh_to_xyxy(torch.tensor([d["bbox"] for d in dets], dtype=torch.float64).reshape(-1, 4)),
                        zoom, zoom).tolist()
    labels = [f"{names.get(d['category_id'], str(d['category_id']))} {float(d['score']):.2f}" for d in dets]
    out = draw_labeled_boxes(image, boxes, labels, [class_color(int(d["category_id"])) for d in dets], width=width)
    return draw_banner(out, notice) if notice else out


def draw_gt_verdicts(image: Image.Image, record, dets: list[dict], names: dict[int, str], *,
                     title: str | None = None, size: int = 256, is_right=None,
                     true_names: dict[int, str] | None = None) -> Tensor:
    """Each ground-truth box of ``record`` with the best class the model gave it: green when right, red when wrong
    (the label then reads ``predicted (true: name)``). The picture is zoomed to about ``size`` pixels.

    ``is_right(pred_id, true_id)`` decides a verdict (default: equal ids); ``true_names`` names the true ids
    (default ``names``).

    Returns:
        (3, H, W) uint8.
    """
    from rclip_core.boxes import xyxy_to_xywh

    zoom = max(1, size // max(image.size))
    best: dict[tuple, dict] = {}
    for d in sorted(dets, key=lambda d: -d["score"]):
        best.setdefault(tuple(round(v, 3) for v in d["bbox"]), d)
    boxes, labels, colors = [], [], []
    for box, cat in zip(record.gt_boxes.tolist(), record.gt_labels.tolist()):
        key = tuple(round(v, 3) for v in xyxy_to_xywh(torch.tensor([box], dtype=torch.float64))[0].tolist())
        pred = best.get(key)
        right = pred is not None and (is_right(int(pred["category_id"]), int(cat)) if is_right is not None
                                      else int(pred["category_id"]) == int(cat))
        pred_name = names.get(int(pred["category_id"]), "?") if pred is not None else "none"
        boxes.append([zoom * v for v in box])
        labels.append(pred_name if right else f"{pred_name} (true: {(true_names or names).get(int(cat), cat)})")
        colors.append(RIGHT if right else WRONG)
    out = draw_labeled_boxes(_zoomed(image.convert("RGB"), zoom), boxes, labels, colors)
    if title:
        out = draw_banner(out, title, color=(60, 60, 60))
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


def render_pictures(records, image_dir, results: list[dict], names: dict[int, str], out_dir, *,
                    png_names: dict[str, str], score_thresh: float, topk: int | None, one_per_box: bool,
                    skipped_ids: set[int], force: bool, notice: str | None = None,
                    gt_names: dict[int, str] | None = None) -> tuple[list[dict], int]:
    """Draw each record's detections and write ``out_dir/<png_names[file_name]>`` atomically (names from
    :func:`rclip_core.data.files.picture_outputs`, checked by the command before any work).

    With ``gt_names`` (annotation category id → name; GT-box mode) every ground-truth box is drawn with its best
    class, green when that name is the box's true category, red with the true name otherwise.

    Returns:
        (entries for :func:`html_index`, images without detections drawn).
    """
    from rclip_core.data.class_lists import name_key
    from rclip_core.data.transforms import read_image
    from rclip_core.io import atomic_open

    by_image: dict[int, list[dict]] = {}
    for d in results:
        by_image.setdefault(d["image_id"], []).append(d)
    pngs = {r.id: png_names[r.file_name] for r in records}
    entries, empty = [], 0
    if gt_names is not None:
        # Verdicts compare names: classes are numbered by row, the annotation file has its own ids.
        truth = {i: name_key(n) for i, n in gt_names.items()}
        by_name = {k: name_key(n) for k, n in names.items()}

        def is_right(pred: int, true: int) -> bool:
            return by_name.get(pred) == truth.get(true)
    for rec in records:
        if rec.id in skipped_ids:
            continue
        dets = select_detections(by_image.get(rec.id, []), score_thresh=score_thresh, topk=topk,
                                 one_per_box=one_per_box)
        empty += not dets
        image = read_image(Path(image_dir) / rec.file_name)
        if gt_names is not None:
            picture = draw_gt_verdicts(image, rec, by_image.get(rec.id, []), names, is_right=is_right,
                                       true_names=gt_names)
            pil = Image.fromarray(picture.permute(1, 2, 0).numpy())
            pil = draw_banner(pil, notice) if notice else pil
        else:
            pil = render(image, dets, names, zoom=max(1, 256 // max(image.size)), notice=notice)
        with atomic_open(Path(out_dir) / pngs[rec.id], "wb", force=force) as f:
            pil.save(f, format="PNG")
        shown = select_detections(by_image.get(rec.id, []), score_thresh=0.0, topk=100,
                                  one_per_box=one_per_box)
        entries.append({"image": pngs[rec.id], "source": str(rec.file_name), "size": list(image.size),
                        "thumbnail": _thumbnail_uri(image),
                        "detections": [{"name": names.get(d["category_id"], str(d["category_id"])),
                                        "score": round(float(d["score"]), 4), "bbox": d["bbox"],
                                        "color": class_color(int(d["category_id"]))} for d in shown],
                        "labels": [f"{names.get(d['category_id'], d['category_id'])} {d['score']:.2f}" for d in dets]})
    return entries, empty


def write_visualization(out_dir: str | Path, images, results: list[dict], summary, *, class_names: list[str],
                        png_names: dict[str, str], region_source: str, notice: str | None, score_thresh: float,
                        topk: int | None, gt_mode: bool, html: bool, force: bool) -> tuple[int, int]:
    """``rclip visualize``'s outputs in ``out_dir``: a picture per readable image, ``detections.json`` (classes,
    images, COCO results, region source, random-weights flag, run summary) and, with ``html``, ``index.html``.

    Args:
        images: the run's :class:`rclip_core.zeroshot.ImageSet`; ``results`` and ``summary`` from ``run_zeroshot``.
        class_names: the K class names (row k is category ``images.category_ids[k]``).
        gt_mode: ground-truth boxes were named: each is drawn right (green) or wrong (red, with its true name).
        notice: the random-weights notice, drawn on every picture and the page (None with trained weights).

    Returns:
        (pictures written, pictures without a detection drawn).
    """
    from rclip_core.data.files import DETECTIONS_FILE, INDEX_FILE
    from rclip_core.io import write_json, write_text

    out_dir = Path(out_dir)
    names = dict(zip(images.category_ids, class_names))
    gt_names = {c["id"]: c["name"] for c in images.categories} if gt_mode else None
    entries, empty = render_pictures(images.records, images.image_dir, results, names, out_dir, png_names=png_names,
                                     score_thresh=score_thresh, topk=topk, one_per_box=gt_mode,
                                     skipped_ids=set(summary.skipped_ids), force=force, notice=notice,
                                     gt_names=gt_names)
    write_json(out_dir / DETECTIONS_FILE, {"region_source": region_source, "random_weights": notice is not None,
                                           "classes": list(class_names), "images": images.skeleton()["images"],
                                           "detections": results, "summary": summary.to_dict()}, force=force)
    if html:
        write_text(out_dir / INDEX_FILE, html_index(entries, source=region_source, notice=notice,
                                                    score_thresh=score_thresh), force=force)
    return len(entries), empty


def _thumbnail_uri(image: Image.Image, side: int = 420) -> str:
    """The picture without boxes as a JPEG data URI (the page draws boxes itself, so the slider can change them)."""
    import base64
    import io

    thumb = image.convert("RGB").copy()
    thumb.thumbnail((side, side))
    if max(thumb.size) < side // 2:  # toy scenes: enlarge crisply
        z = max(1, side // 2 // max(thumb.size))
        thumb = thumb.resize((thumb.width * z, thumb.height * z), Image.NEAREST)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_PAGE_SCRIPT = """
const slider = document.getElementById('thresh'), shown = document.getElementById('thresh-value');
const filter = document.getElementById('cls');
function update() {
  const t = parseFloat(slider.value), c = filter.value;
  shown.textContent = t.toFixed(2);
  document.querySelectorAll('[data-score]').forEach(el => {
    const on = parseFloat(el.dataset.score) >= t && (c === '' || el.dataset.name === c);
    el.style.display = on ? '' : 'none';
  });
}
slider.addEventListener('input', update); filter.addEventListener('change', update); update();
"""


def html_index(entries: list[dict], title: str = "rclip detections", *, source: str | None = None,
               notice: str | None = None, score_thresh: float = 0.3) -> str:
    """A self-contained HTML page: every picture as a thumbnail (a link to the full PNG, relative paths only) with
    its boxes drawn by the page, a score-threshold slider and a per-class filter that work in the page itself.

    Args:
        entries: from :func:`render_pictures` (``image``, ``source``, ``size``, ``thumbnail``, ``detections``).
        source: the region source, said at the top; ``notice``: a warning banner (random weights).
    """
    import json
    from html import escape

    classes = sorted({d["name"] for e in entries for d in e.get("detections", [])})
    figures = []
    for e in entries:
        w, h = e.get("size", [1, 1])
        rects = []
        for d in e.get("detections", []):
            x, y, bw, bh = d["bbox"]
            rgb = tuple(d.get("color") or class_color(sum(map(ord, d["name"]))))  # as the picture colours it
            color, ink = ("#{:02x}{:02x}{:02x}".format(*c) for c in (rgb, text_color(rgb)))
            text = f"{d['name']} {d['score']:.2f}"
            # The label on a filled band of the box colour (the picture's style); its width estimated from the
            # font size, as the page has no text metrics before it is drawn.
            fs = max(10.0, min(w, h) / 25)
            lw, lh = 0.58 * fs * len(text) + 0.4 * fs, 1.25 * fs
            ly = y - lh if y - lh >= 0 else y
            rects.append(f'<g data-score="{d["score"]}" data-name="{escape(d["name"])}"><rect x="{x}" y="{y}" '
                         f'width="{bw}" height="{bh}" fill="none" stroke="{color}" stroke-width="{max(w, h) / 200:.1f}"'
                         f'/><rect x="{x}" y="{ly:.1f}" width="{lw:.1f}" height="{lh:.1f}" fill="{color}"/>'
                         f'<text x="{x + 0.2 * fs:.1f}" y="{ly + 0.95 * fs:.1f}" font-size="{fs:.0f}" '
                         f'fill="{ink}">{escape(text)}</text></g>')
        items = "".join(f'<li data-score="{d["score"]}" data-name="{escape(d["name"])}">{escape(d["name"])} '
                        f'{d["score"]:.2f}</li>' for d in e.get("detections", []))
        figures.append(
            f'<figure><a href="{escape(e["image"])}" title="open the full picture"><div class="pic">'
            f'<img src="{e.get("thumbnail", escape(e["image"]))}" alt="{escape(Path(e["source"]).name)}">'
            f'<svg viewBox="0 0 {w} {h}" preserveAspectRatio="none">{"".join(rects)}</svg></div></a>'
            f'<figcaption><b>{escape(Path(e["source"]).name)}</b><ul>{items or "<li>no detections</li>"}</ul>'
            f"</figcaption></figure>")
    options = "".join(f'<option value="{escape(c)}">{escape(c)}</option>' for c in classes)
    style = ("body{font-family:sans-serif;margin:1em}figure{display:inline-block;vertical-align:top;margin:.5em;"
             "width:420px}.pic{position:relative}.pic img{width:100%;display:block;border:1px solid #ccc}"
             ".pic svg{position:absolute;left:0;top:0;width:100%;height:100%}figcaption{font-size:13px}"
             "ul{margin:.2em 0;padding-left:1.2em;max-height:9em;overflow:auto}"
             ".notice{background:#dc2828;color:#fff;padding:.5em;font-weight:bold}")
    banner = f'<p class="notice">{escape(notice)}</p>' if notice else ""
    about = f"<p>Regions: {escape(source)}.</p>" if source else ""
    controls = (f'<p><label>score ≥ <input id="thresh" type="range" min="0" max="1" step="0.01" '
                f'value="{score_thresh}"> <span id="thresh-value"></span></label> &nbsp; <label>class <select '
                f'id="cls"><option value="">all</option>{options}</select></label></p>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{style}</style>"
            f"</head><body><h1>{escape(title)}</h1>{banner}{about}{controls}\n" + "\n".join(figures)
            + f"\n<script>{_PAGE_SCRIPT}</script>\n<!-- {json.dumps(len(entries))} pictures -->\n</body></html>\n")
