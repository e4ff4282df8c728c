"""`rclip zeroshot` against the plain eager path: the shared machinery of ``zeroshot_gtbox.py`` (100 GT boxes per
image) and ``zeroshot_proposals.py`` (1000 proposals per image from a proposals file).

ours  = the shipped command, ``python -m rclip_cli.main zeroshot ...``, in a fresh process: given embeddings, the
        visual tower alone (no open_clip import, no text tower; torchvision's compiled ops without its Python
        package, so no ``torch._dynamo``), meta-device build and a memory-mapped checkpoint, batch norms folded,
        channels-last, RoI head in chunks, the attention pool's query for the kept token alone,
        ``torch.inference_mode``;
plain = the same modules and the same steps with none of that, kept here as the reference: the whole CLIP built
        with random initialisation, then the checkpoint read whole (no mmap) and copied in (``load_state_dict``),
        batch norms as they are, contiguous (NCHW) tensors, every region through res5 at once, open_clip's own
        attention pool (every token queries, the first is kept), autograd on (what a
        straightforward eager port runs), images decoded in the main process.

Reported, best of interleaved repeats:
- ``*_cmd``: the whole command, start-up included (interpreter, imports, model build, weights, embeddings, every
  image, the JSON written), each run in a fresh subprocess; its peak resident memory (VmHWM, read by ``_peak.py``)
  beside it;
- ``*_forward``: the forward alone (normalise → res4 → regions → probabilities → NMS) on images decoded and resized
  beforehand, both detectors in this process;
- ``max |Δprob|`` between the two paths' class probabilities, and between the two commands' written scores;
- with ``--options``, the recipe options that are off by default against the default path: ``zeroshot.compile``
  (forward after compiling, the first call's compile time, the whole command with a fresh inductor cache) and
  ``zeroshot.amp=bf16`` (forward and max |Δprob| against float32; said when the CPU has no bfloat16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench_line  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# data


def make_data(root: Path, n_images: int, n_boxes: int, n_classes: int, n_proposals: int) -> None:
    """640×480 JPEGs (smooth blobs on noise), ``n_boxes`` GT boxes and ``n_proposals`` proposals per image."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:480, 0:640]
    images, anns, props = [], [], []
    for i in range(n_images):
        img = rng.normal(120, 20, (480, 640, 3))
        for _ in range(8):
            cx, cy, r = rng.uniform(0, 640), rng.uniform(0, 480), rng.uniform(20, 120)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"{i}.jpg", quality=90)
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 640, "height": 480})
        for _ in range(n_boxes):
            x, y = rng.uniform(0, 500), rng.uniform(0, 350)
            w, h = rng.uniform(20, 140), rng.uniform(20, 130)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, n_classes + 1)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        x1, y1 = rng.uniform(0, 560, n_proposals), rng.uniform(0, 400, n_proposals)
        w, h = rng.uniform(16, 320, n_proposals), rng.uniform(16, 240, n_proposals)
        boxes = np.stack([x1, y1, np.minimum(x1 + w, 640), np.minimum(y1 + h, 480)], 1).round(2)
        # positive raw logits: the original's sqrt(p * logit) fusion keeps every row
        props.append({"image_id": i + 1, "file_name": f"{i}.jpg", "boxes": boxes.tolist(),
                      "objectness": rng.uniform(0.5, 6.0, n_proposals).round(4).tolist()})
    cats = [{"id": k + 1, "name": f"class {k}"} for k in range(n_classes)]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (root / "proposals.json").write_text(json.dumps(props))


def make_weights(root: Path, variant: str) -> tuple[Path, Path]:
    """A random-weight checkpoint of ``variant`` (an ordinary rclip checkpoint) and class embeddings from its text
    tower, written once."""
    from rclip_core.checkpoint import save_checkpoint
    from rclip_core.clip_backbone import create_clip
    from rclip_core.data.coco import load_detection_annotations
    from rclip_core.text_embed import embed_names, save_embeddings
    from rclip_core.text_encoder import TextEncoder

    weights, emb = root / f"{variant}.pt", root / f"{variant}_classes.pt"
    if not weights.exists():
        clip = create_clip(variant, log_random_init=False)
        save_checkpoint(weights, clip, recipe={"model": {"variant": variant}})
        _, cats, _ = load_detection_annotations(root / "ann.json")
        save_embeddings(embed_names(TextEncoder(clip), [c["name"] for c in cats], templates=["a photo of a {}."]),
                        emb)
        del clip
    return weights, emb


# ---------------------------------------------------------------------------------------------------------------
# the plain eager path (the reference)


def plain_clip(variant: str, weights: Path) -> torch.nn.Module:
    """The whole CLIP built with random initialisation, then the checkpoint read whole and copied in."""
    import open_clip

    from rclip_core.clip_backbone import _TINY_CONFIG_DIR, get_variant

    spec = get_variant(variant)
    if variant == "tiny":
        open_clip.add_model_config(_TINY_CONFIG_DIR)
    model = open_clip.create_model(spec.open_clip_name, pretrained=None)
    obj = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(obj["model"], strict=True)
    return model.eval()


def build_detector(clip, embeddings: torch.Tensor, variant: str, regions: str, *, plain: bool):
    """The zero-shot detector over ``clip`` as the command builds it; ``plain``: no RoI chunking."""
    from rclip_core.detector import GivenBoxes, build_region_detector
    from rclip_core.recipes import load_recipe

    recipe = load_recipe(None, [f"model.variant={variant}"])
    gen = GivenBoxes("boxes") if regions == "gt" else GivenBoxes("proposals", topk=recipe.zeroshot.num_proposals)
    det = build_region_detector(clip, embeddings, recipe, gen).eval()
    if plain:
        det.roi_heads.head.chunk = None  # every region through res5 at once
        det.roi_heads.head.full_attention = True  # open_clip's attention pool: every token queries
    return recipe, det


def plain_detect(det, batch: list[dict]) -> tuple[list[dict], list[torch.Tensor]]:
    """``RegionDetector.detect`` written out in autograd mode (no ``inference_mode``, no ``no_grad``): detections and
    the class probabilities per image."""
    from rclip_core.detector import fuse_scores, postprocess

    out = det(batch)
    probs = det.region_probs(out)
    dets = []
    for i, (boxes, p) in enumerate(zip(out.proposals, probs)):
        obj = out.objectness[i] if out.objectness is not None else None
        scores = fuse_scores(p.detach(), obj, det.score_fusion)
        d = postprocess(boxes.float(), scores, score_thresh=det.score_thresh, nms_thresh=det.nms_thresh,
                        max_dets=det.max_dets)
        dets.append({**d, "num_regions": int(boxes.shape[0])})
    return dets, [p.detach() for p in probs]


def dataset_of(root: Path, recipe, regions: str):
    from rclip_core.data.coco import BoxStats, DetectionDataset, attach_proposals, load_detection_annotations

    records, cats, _ = load_detection_annotations(root / "ann.json")
    if regions == "proposals":
        attach_proposals(records, root / "proposals.json", BoxStats())
    ds = DetectionDataset(records, root / "images", min_sizes=recipe.input.min_size, max_size=recipe.input.max_size)
    return ds, [c["id"] for c in cats]


def plain_command(root: Path, variant: str, regions: str, out: Path) -> None:
    """The whole zero-shot run on the plain path, as one process does it (the reference for ``*_cmd``)."""
    from rclip_core.inference import to_coco_results

    weights, emb_path = root / f"{variant}.pt", root / f"{variant}_classes.pt"
    clip = plain_clip(variant, weights)
    emb = torch.load(emb_path, map_location="cpu", weights_only=True)["embeddings"]
    recipe, det = build_detector(clip, emb, variant, regions, plain=True)
    ds, cat_ids = dataset_of(root, recipe, regions)
    results = []
    for i in range(len(ds)):
        item = ds[i]
        d, _ = plain_detect(det, [item])
        results.extend(to_coco_results(item["image_id"], d[0], item["scale"], cat_ids))
    out.write_text(json.dumps(results))


def ours_command(root: Path, variant: str, regions: str, out: Path) -> list[str]:
    weights, emb = root / f"{variant}.pt", root / f"{variant}_classes.pt"
    given = ["--gt-boxes", str(root / "ann.json")] if regions == "gt" else \
        ["--proposals", str(root / "proposals.json"), "--annotations", str(root / "ann.json")]
    return [sys.executable, "-m", "rclip_cli.main", "zeroshot", *given, "--images", str(root / "images"),
            "--embeddings", str(emb), "--weights", str(weights), "--out", str(out), "--force"]


def timed_subprocess(cmd: list[str], peak_file: Path, env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of one fresh process running ``cmd`` (``[python, ...]``), its peak read
    by ``_peak.py`` from its own address space; ``env``: added to the environment."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           **(env or {})}
    cmd = [cmd[0], str(Path(__file__).parent / "_peak.py"), str(peak_file), *cmd[1:]]
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout.decode(errors='replace')}")
    return seconds, float(peak_file.read_text())


def max_score_diff(a: Path, b: Path) -> float:
    """Max |Δscore| between two results files' detections, matched by (image, category, rounded box)."""
    def index(p: Path) -> dict:
        return {(r["image_id"], r["category_id"], tuple(round(v, 1) for v in r["bbox"])): r["score"]
                for r in json.loads(p.read_text())}

    ia, ib = index(a), index(b)
    common = ia.keys() & ib.keys()
    return max((abs(ia[k] - ib[k]) for k in common), default=float("nan"))


# ---------------------------------------------------------------------------------------------------------------
# the run


def forward_pair(root: Path, variant: str, regions: str, repeats: int) -> tuple[float, float, float]:
    """(ours img/s, plain img/s, max |Δprob|) of the forward alone, both detectors in this process."""
    from rclip_core.clip_backbone import create_clip, prepare_for_inference

    weights, emb_path = root / f"{variant}.pt", root / f"{variant}_classes.pt"
    emb = torch.load(emb_path, map_location="cpu", weights_only=True)["embeddings"]
    recipe, plain = build_detector(plain_clip(variant, weights), emb, variant, regions, plain=True)
    ours_clip = prepare_for_inference(create_clip(variant, str(weights)))
    _, ours = build_detector(ours_clip, emb, variant, regions, plain=False)
    ds, _ = dataset_of(root, recipe, regions)
    items = [ds[i] for i in range(len(ds))]
    diff = 0.0
    for item in items:
        _, (p_plain,) = plain_detect(plain, [item])
        with torch.inference_mode():
            p_ours = ours.region_probs(ours([item]))[0]
        diff = max(diff, float((p_ours - p_plain).abs().max()))
    best_ours = best_plain = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            plain_detect(plain, [item])
        best_plain = min(best_plain, time.perf_counter() - start)
        start = time.perf_counter()
        for item in items:
            ours.detect([item])
        best_ours = min(best_ours, time.perf_counter() - start)
    return len(items) / best_ours, len(items) / best_plain, diff


def _probs(det, item, *, amp: str = "off") -> torch.Tensor:
    """Class probabilities (P, K) of one image through a prepared detector, in ``inference_mode`` (``amp``: the
    detector's autocast, logits back in float32 as ``detect`` does)."""
    det.amp = amp
    with torch.inference_mode(), det._autocast():
        out = det([item])
    out.class_logits = out.class_logits.float()
    return det.region_probs(out)[0]


def _best_detect(det, items, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            det.detect([item])
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def options_pair(root: Path, variant: str, regions: str, repeats: int, name: str, what: str) -> None:
    """The recipe options that are off by default, each against the default path (ours) in this process:
    ``zeroshot.compile`` (forward after compiling, and the compile time: the first call) and ``zeroshot.amp bf16``
    (forward, and max |Δprob| against float32)."""
    from rclip_core.clip_backbone import create_clip, prepare_for_inference
    from rclip_core.engine import resolve_amp
    from rclip_core.inference import compile_detector

    weights, emb_path = root / f"{variant}.pt", root / f"{variant}_classes.pt"
    emb = torch.load(emb_path, map_location="cpu", weights_only=True)["embeddings"]
    recipe, ours = build_detector(prepare_for_inference(create_clip(variant, str(weights), visual_only=True)), emb,
                                  variant, regions, plain=False)
    _, compiled = build_detector(prepare_for_inference(create_clip(variant, str(weights), visual_only=True)), emb,
                                 variant, regions, plain=False)
    compile_detector(compiled)
    ds, _ = dataset_of(root, recipe, regions)
    items = [ds[i] for i in range(len(ds))]
    start = time.perf_counter()
    p_comp = _probs(compiled, items[0])  # the first call compiles
    compile_s = time.perf_counter() - start
    diff = max(float((_probs(compiled, it) - _probs(ours, it)).abs().max()) for it in items)
    fell_back = compiled.backbone.failed or compiled.roi_heads.head.layer4.failed
    del p_comp
    f_ours, f_comp = _best_detect(ours, items, repeats), _best_detect(compiled, items, repeats)
    print(bench_line(f"{name}_compile_forward", f_comp, f_ours, "img/s", baseline="eager")
          + f"  [{what}; zeroshot.compile vs default, compiled beforehand (first call {compile_s:.0f} s)"
          + f"{'; FELL BACK to eager' if fell_back else ''}; max |dprob| {diff:.1e}]", flush=True)
    amp = resolve_amp("bf16", "cpu", what="inference")
    if amp == "off":
        print("# amp bf16: no native bfloat16 on this CPU, the option falls back to float32 (nothing to measure)")
        return
    diff = max(float((_probs(ours, it, amp="bf16") - _probs(ours, it)).abs().max()) for it in items)
    ours.amp = "bf16"
    f_bf16 = _best_detect(ours, items, repeats)
    print(bench_line(f"{name}_bf16_forward", f_bf16, f_ours, "img/s", baseline="fp32")
          + f"  [{what}; zeroshot.amp=bf16 vs off; max |dprob| {diff:.1e}]", flush=True)


def main(regions: str, default_boxes: int) -> None:
    ap = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or "") + __doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 images, a fifth of the regions, 1 repeat (a smoke run)")
    ap.add_argument("--variant", default="RN50", choices=["RN50", "RN50x4", "tiny"])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--regions", type=int, default=default_boxes, help="GT boxes or proposals per image")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip", choices=["cmd", "forward"], help="measure only one of the two comparisons")
    ap.add_argument("--options", action="store_true",
                    help="also measure the options that are off by default (zeroshot.compile, amp bf16) against "
                         "the default path: forward, compile time, the command with compile, max |dprob|")
    ap.add_argument("--plain-child", type=Path, help=argparse.SUPPRESS)  # internal: run the plain command here
    args = ap.parse_args()
    if args.plain_child is not None:
        torch.manual_seed(0)
        return plain_command(args.plain_child, args.variant, regions, args.plain_child / "plain.json")
    n_images, n_regions, repeats = args.images, args.regions, args.repeats
    if args.quick:
        n_images, n_regions, repeats = 2, max(1, args.regions // 5), 1
    import tempfile

    name = f"zeroshot_{'gtbox' if regions == 'gt' else 'proposals'}_{args.variant.lower()}"
    what = f"{n_images} images 640x480, {n_regions} {'GT boxes' if regions == 'gt' else 'proposals'}/image"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root, n_images, n_boxes=n_regions if regions == "gt" else 5, n_classes=65,
                  n_proposals=n_regions if regions == "proposals" else 5)
        make_weights(root, args.variant)
        print(f"# {what}; load {os.getloadavg()[0]:.2f}", flush=True)
        if args.skip != "forward":
            f_ours, f_plain, diff = forward_pair(root, args.variant, regions, repeats)
            print(bench_line(f"{name}_forward", f_ours, f_plain, "img/s", baseline="plain")
                  + f"  [{what}; max |dprob| {diff:.1e}]", flush=True)
        if args.skip != "cmd":
            plain_cmd = [sys.executable, str(Path(sys.modules["__main__"].__file__).resolve()), "--variant",
                         args.variant, "--plain-child", str(root)]
            ours_cmd = ours_command(root, args.variant, regions, root / "ours.json")
            t_ours = t_plain = float("inf")
            m_ours = m_plain = 0.0
            for _ in range(repeats):
                s, m = timed_subprocess(plain_cmd, root / "peak.txt")
                t_plain, m_plain = min(t_plain, s), max(m_plain, m)
                s, m = timed_subprocess(ours_cmd, root / "peak.txt")
                t_ours, m_ours = min(t_ours, s), max(m_ours, m)
            dscore = max_score_diff(root / "ours.json", root / "plain.json")
            print(bench_line(f"{name}_cmd", n_images / t_ours, n_images / t_plain, "img/s", baseline="plain")
                  + f"  [whole command, start-up included; {what}; max |dscore| {dscore:.1e}]")
            print(bench_line(f"{name}_cmd_peak_mem", m_ours, m_plain, "MiB", baseline="plain")
                  + f"  [peak RSS of each command; {what}]")
        if args.options:
            options_pair(root, args.variant, regions, repeats, name, what)
            t_def = t_comp = float("inf")
            for _ in range(repeats):
                # a fresh inductor cache each time: the first run of a compiled command, compile included
                cache = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=tmp)}
                t_comp = min(t_comp, timed_subprocess(
                    ours_command(root, args.variant, regions, root / "compiled.json")
                    + ["--set", "zeroshot.compile=true"], root / "peak.txt", env=cache)[0])
                t_def = min(t_def, timed_subprocess(ours_command(root, args.variant, regions, root / "ours.json"),
                                                    root / "peak.txt")[0])
            print(bench_line(f"{name}_compile_cmd", n_images / t_comp, n_images / t_def, "img/s", baseline="eager")
                  + f"  [whole command with zeroshot.compile=true vs default, compile included (fresh cache); "
                  f"{what}; max |dscore| {max_score_diff(root / 'compiled.json', root / 'ours.json'):.1e}]")
        print(f"# load {os.getloadavg()[0]:.2f} at the end", flush=True)
