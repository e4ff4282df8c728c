"""``rclip eval``: COCO / LVIS box AP of a detections file, with the open-vocabulary breakdown; or the
class-agnostic recall of a proposals file."""

from __future__ import annotations

from pathlib import Path

import click

from rclip_cli.common import console, force_option

_SPLIT_LABELS = {"AP50_novel": ("AP50 novel", "novel"), "AP50_base": ("AP50 base", "base"),
                 "AP50_all": ("AP50 all", "all"), "AP_rare": ("AP rare", "rare"),
                 "AP_base": ("AP base (c+f)", "base")}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def metrics_table(result: dict):
    """A rich table of an :func:`rclip_core.evaluation.evaluate` result (also used by `rclip demo`)."""
    from rich.table import Table

    table = Table(title=f"{result['format'].upper()} box AP")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        table.add_row(key, _fmt(value))
    if result["splits"]:
        table.add_section()
        for key, value in result["splits"].items():
            label, split = _SPLIT_LABELS.get(key, (key, ""))
            size = result["split_sizes"].get(split)
            table.add_row(f"{label} ({size} classes)" if size is not None else label, _fmt(value))
    return table


def recall_table(result: dict):
    """A rich table of an :func:`rclip_core.evaluation.evaluate_proposals` result: one column per group."""
    from rich.table import Table

    groups = list(result["recall"])
    table = Table(title="Proposal recall (class-agnostic, %)")
    table.add_column("metric")
    for g in groups:
        table.add_column(f"{g} ({result['num_boxes'][g]} boxes)", justify="right")
    for key in result["recall"]["all"]:
        table.add_row(key, *(_fmt(result["recall"][g][key]) for g in groups))
    return table


@click.command("eval")
@click.option("--annotations", "--gt", "gt_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Ground truth: COCO- or LVIS-format instances JSON (--gt is its old name).")
@click.option("--dets", "dets_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Detections: COCO results JSON (image_id, category_id, bbox xywh, score).")
@click.option("--proposals", "proposals_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Instead of --dets: a proposals JSON (`rclip rpn propose`); reports class-agnostic recall.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Metrics JSON. Default: beside DETS (or PROPOSALS), named STEM.metrics.json.")
@force_option
def eval_cmd(gt_path: Path, dets_path: Path | None, proposals_path: Path | None, out: Path | None,
             force: bool) -> None:
    """Compute box AP of detections (or recall of proposals) against ground truth, print a table and write the
    metrics as JSON.

    \b
    COCO ground truth (pycocotools): AP (IoU .50:.95), AP50, AP75, APs/APm/APl and per-category AP. When the
    ground truth holds the COCO open-vocabulary classes (65- or 80-class files), also AP50 over the 17 novel,
    48 base and all 65 classes, as RegionCLIP reports (AP50_split_target/base/all). Categories may instead
    carry "split": "base"/"novel" to define their own split.
    LVIS ground truth (categories with "frequency"; lvis package, 300 detections per image): AP, AP50, AP75,
    APs/APm/APl, APr/APc/APf, and AP of rare (novel) vs common+frequent (base) classes.
    Proposals: AR@100/300/1000 (mean recall over IoU .50:.95, as COCO AR) and R50@k (recall at IoU 0.5), for all
    boxes and for base vs novel categories, with detectron2's one-to-one proposal matching.
    All values are percentages (0-100); n/a means no ground truth falls in that group.

    \b
    Examples:
      rclip eval --annotations instances_val2017.json --dets dets.json    # dets.metrics.json
      rclip eval --annotations instances_val2017.json --proposals p.json  # p.metrics.json
    """
    from rich.console import Console

    from rclip_core.errors import RclipError
    from rclip_core.evaluation import evaluate_files, evaluate_proposal_files
    from rclip_core.io import check_writable, write_json

    if (dets_path is None) == (proposals_path is None):
        raise RclipError("give exactly one of --dets or --proposals")
    source = dets_path or proposals_path
    out = out or source.with_name(f"{source.stem}.metrics.json")
    check_writable(out, force=force)  # fail before a long evaluation, not after
    stdout = Console()  # the table goes to stdout so it can be piped; logs and the note below go to stderr
    if proposals_path is not None:
        result = evaluate_proposal_files(gt_path, proposals_path)
        stdout.print(recall_table(result))
        stdout.print(f"{result['num_images']} images ({result['num_images_with_proposals']} with proposals)")
    else:
        result = evaluate_files(gt_path, dets_path)
        stdout.print(metrics_table(result))
        stdout.print(f"{result['num_detections']} detections, {result['num_images']} images, "
                     f"{result['num_categories']} categories")
    write_json(out, result, force=force)
    console.print(f"wrote {out}")
