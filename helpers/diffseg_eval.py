"""DiffSeg evaluated the way its paper does it: per-image Hungarian matching, mIoU and pixel accuracy over a dataset.

Two entry points:

* `toy_table(pipe, n)`: DiffSeg against baselines on held-out toy scenes (notebook 05's table, bench/diffseg_toy.py).
* `python -m helpers.diffseg_eval --data PATH --dataset cocostuff27|cityscapes`: a real dataset, on as many GPUs as
  `accelerate launch --num_processes N -m helpers.diffseg_eval ...` starts (each process takes its own share of the
  images, each image once; the confusion counts are summed across processes at the end). On CPUs, for testing:
  `accelerate launch --multi_gpu --num_processes 2 -m helpers.diffseg_eval ...` (accelerate's `--cpu` flag alone
  starts only one process without MPI; this script switches to CPU by itself where there is no GPU).

Expected file layouts (the reference implementation's; nothing else is read):

    cocostuff27/                          COCO-Stuff, 27 coarse classes (the PiCIE/STEGO/DiffSeg protocol)
      val2017/<id>.jpg                    COCO 2017 validation images
      annotation_val2017/<id>.png         stuffthingmaps_trainval2017.zip's val2017/ folder, renamed: 8-bit PNGs
                                          whose pixels are fine class ids 0–181, 255 = unlabelled
      [Coco164kFull_Stuff_Coarse_7.txt]   optional list of image ids (the reference's 2175-image curated subset);
                                          without it (or --list) every image with a label PNG is used
    cityscapes/
      leftImg8bit/val/<city>/<name>_leftImg8bit.png
      gtFine/val/<city>/<name>_gtFine_labelIds.png     label ids 7–33 → classes 0–26, every other id ignored

Labels: COCO-Stuff fine ids go to 27 coarse classes with `COCO_FINE_TO_COARSE` (the table PiCIE and STEGO use);
unlabelled pixels (255, or ids outside the mapping) are ignored. Images and labels are centre-cropped to a square
and resized to the model's native size (512 px for SD 1.x): images bilinearly, labels by nearest neighbour, as the
reference does. Files are paired by name and sorted, never by two separate directory listings.

Scores: the reference's counting (google/diffseg `hungarian_matching`, run with `REFINEMENT=False`), which is
`helpers.metrics.SegmentationScore`'s default: per image, a class × segment overlap histogram over all n classes of
the data set, Hungarian matching maximising overlap, true/false positives and false negatives per class; mIoU = mean
over classes of TP / (TP + FP + FN), accuracy = TP / labelled pixels. Because every class is matched, a surplus
segment may go to a class absent from the image and count as its false positives. Beside it, for comparison only,
the same counts when each image's segments are matched only to the classes present in it (`present_only=True`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import diffseg as ds
from .metrics import SegmentationScore, hungarian_counts

# COCO-Stuff fine class id (0–181) -> coarse class (0–26), as in PiCIE and STEGO; 255 (unlabelled) -> ignored.
COCO_FINE_TO_COARSE = {
    0: 9, 1: 11, 2: 11, 3: 11, 4: 11, 5: 11, 6: 11, 7: 11, 8: 11, 9: 8, 10: 8, 11: 8, 12: 8, 13: 8, 14: 8, 15: 7,
    16: 7, 17: 7, 18: 7, 19: 7, 20: 7, 21: 7, 22: 7, 23: 7, 24: 7, 25: 6, 26: 6, 27: 6, 28: 6, 29: 6, 30: 6, 31: 6,
    32: 6, 33: 10, 34: 10, 35: 10, 36: 10, 37: 10, 38: 10, 39: 10, 40: 10, 41: 10, 42: 10, 43: 5, 44: 5, 45: 5, 46: 5,
    47: 5, 48: 5, 49: 5, 50: 5, 51: 2, 52: 2, 53: 2, 54: 2, 55: 2, 56: 2, 57: 2, 58: 2, 59: 2, 60: 2, 61: 3, 62: 3,
    63: 3, 64: 3, 65: 3, 66: 3, 67: 3, 68: 3, 69: 3, 70: 3, 71: 0, 72: 0, 73: 0, 74: 0, 75: 0, 76: 0, 77: 1, 78: 1,
    79: 1, 80: 1, 81: 1, 82: 1, 83: 4, 84: 4, 85: 4, 86: 4, 87: 4, 88: 4, 89: 4, 90: 4, 91: 17, 92: 17, 93: 22,
    94: 20, 95: 20, 96: 22, 97: 15, 98: 25, 99: 16, 100: 13, 101: 12, 102: 12, 103: 17, 104: 17, 105: 23, 106: 15,
    107: 15, 108: 17, 109: 15, 110: 21, 111: 15, 112: 25, 113: 13, 114: 13, 115: 13, 116: 13, 117: 13, 118: 22,
    119: 26, 120: 14, 121: 14, 122: 15, 123: 22, 124: 21, 125: 21, 126: 24, 127: 20, 128: 22, 129: 15, 130: 17,
    131: 16, 132: 15, 133: 22, 134: 24, 135: 21, 136: 17, 137: 25, 138: 16, 139: 21, 140: 17, 141: 22, 142: 16,
    143: 21, 144: 21, 145: 25, 146: 21, 147: 26, 148: 21, 149: 24, 150: 20, 151: 17, 152: 14, 153: 21, 154: 26,
    155: 15, 156: 23, 157: 20, 158: 21, 159: 24, 160: 15, 161: 24, 162: 22, 163: 25, 164: 15, 165: 20, 166: 17,
    167: 17, 168: 22, 169: 14, 170: 18, 171: 18, 172: 18, 173: 18, 174: 18, 175: 18, 176: 18, 177: 26, 178: 26,
    179: 19, 180: 19, 181: 24}
CITYSCAPES_ID_TO_CLASS = {i: i - 7 for i in range(7, 34)}
DATASETS = {"cocostuff27": (COCO_FINE_TO_COARSE, 27), "cityscapes": (CITYSCAPES_ID_TO_CLASS, 27)}
IGNORE = -1


def lookup_table(mapping: dict) -> np.ndarray:
    """A 256-entry array: label PNG value -> class, IGNORE for values outside the mapping (255 included)."""
    lut = np.full(256, IGNORE, dtype=np.int64)
    for k, v in mapping.items():
        lut[k] = v
    return lut


# -- files -----------------------------------------------------------------------------------------------------------
def list_files(root, dataset: str, id_list=None) -> list[tuple[Path, Path]]:
    """(image, label) path pairs of a dataset in the layout above, sorted by name; clear errors for missing files."""
    root = Path(root)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    if not root.is_dir():
        raise FileNotFoundError(f"no dataset folder at {root}")
    if dataset == "cocostuff27":
        img_dir, lab_dir = root / "val2017", root / "annotation_val2017"
        for d in (img_dir, lab_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"{d} is missing; expected {root}/val2017/<id>.jpg and "
                                        f"{root}/annotation_val2017/<id>.png (see helpers/diffseg_eval.py)")
        default_list = root / "Coco164kFull_Stuff_Coarse_7.txt"
        id_list = id_list or (default_list if default_list.exists() else None)
        if id_list is not None:
            ids = [s.strip() for s in Path(id_list).read_text().splitlines() if s.strip()]
        else:
            ids = sorted(p.stem for p in lab_dir.glob("*.png"))
        pairs = [(img_dir / f"{i}.jpg", lab_dir / f"{i}.png") for i in ids]
    else:
        img_dir, lab_dir = root / "leftImg8bit" / "val", root / "gtFine" / "val"
        if not img_dir.is_dir():
            raise FileNotFoundError(f"{img_dir} is missing; expected leftImg8bit/val/<city>/*_leftImg8bit.png and "
                                    "gtFine/val/<city>/*_gtFine_labelIds.png")
        pairs = [(p, lab_dir / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
                 for p in sorted(img_dir.glob("*/*_leftImg8bit.png"))]
    missing = [str(p) for pair in pairs for p in pair if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} file(s) missing, e.g. {missing[:3]}")
    if not pairs:
        raise FileNotFoundError(f"no images found under {root} for {dataset}")
    return sorted(pairs)


def load_pair(image_path, label_path, size: int, lut: np.ndarray):
    """Image as a 3 × size × size tensor in [-1, 1] and labels as size × size classes (IGNORE = -1), centre-cropped."""
    from PIL import Image
    img = np.asarray(Image.open(image_path).convert("RGB"))
    lab = np.asarray(Image.open(label_path))
    if lab.ndim == 3:
        lab = lab[..., 0]
    if lab.shape != img.shape[:2]:
        raise ValueError(f"{label_path} is {lab.shape[1]}×{lab.shape[0]} but {image_path} is "
                         f"{img.shape[1]}×{img.shape[0]}; labels must match their images pixel for pixel")
    h, w = lab.shape
    c = min(h, w)
    y0, x0 = (h - c) // 2, (w - c) // 2
    img, lab = img[y0:y0 + c, x0:x0 + c], lab[y0:y0 + c, x0:x0 + c]
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)[0] / 127.5 - 1
    y = torch.from_numpy(lut[lab])[None, None].float()
    y = F.interpolate(y, size=(size, size), mode="nearest-exact")[0, 0].long().numpy()
    return x.clamp(-1, 1), y


# -- scores ----------------------------------------------------------------------------------------------------------
class Counts:
    """Confusion counts of a data set, as one vector that processes can add up: the reference's (tp, fp, fn per
    class; `hungarian_counts`), the same with matching restricted to each image's classes, labelled pixels, images."""

    def __init__(self, n_class: int):
        self.n = n_class
        self.vec = np.zeros(6 * n_class + 2)

    def add(self, pred, label):
        n, v = self.n, self.vec
        label = np.where((label >= 0) & (label < n), label, IGNORE)   # as the reference: other ids are unlabelled
        ref = hungarian_counts(pred, label, n, IGNORE)
        present = hungarian_counts(pred, label, n, IGNORE, present_only=True)
        for i, a in enumerate(ref[:3] + present[:3]):
            v[i * n:(i + 1) * n] += a
        v[6 * n:] += [ref[3], 1]
        return self

    def summary(self) -> dict:
        n, v = self.n, self.vec
        labelled, images = v[6 * n:]
        out = {"images": int(images)}
        for key, off in (("reference", 0), ("present_classes_only", 3)):
            tp, fp, fn = (v[(off + i) * n:(off + i + 1) * n] for i in range(3))
            with np.errstate(invalid="ignore", divide="ignore"):
                iou = tp / (tp + fp + fn)
            out[key] = {"miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
                        "accuracy": float(tp.sum() / max(labelled, 1)),
                        "per_class_iou": [None if np.isnan(x) else float(x) for x in iou]}
        return out


# -- the toy world ---------------------------------------------------------------------------------------------------
TOY_SWEEP = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.1, 1.5)
TUNE_START = 5000  # held-out scenes 5000… pick the toy threshold; the table is measured on scenes 0…n−1


def toy_classes() -> int:
    """Classes of the toy world's semantic map: background + one per shape."""
    from .toyworld import SHAPES
    return 1 + len(SHAPES)


@torch.no_grad()
def _toy_batches(pipe, scenes, batch: int, progress: bool, desc: str, t: int = ds.REFERENCE_T, extras=True):
    from tqdm.auto import tqdm
    for b in tqdm(range(0, len(scenes), batch), desc=desc, disable=not progress, leave=False):
        part = scenes[b:b + batch]
        cap = ds.capture(pipe, [s.image for s in part], t=t, captions=[s.caption for s in part] if extras else None,
                         features=extras)
        yield part, cap, ds.aggregate(cap.self_maps)


def toy_sweep(pipe, scenes, thresholds=TOY_SWEEP, anchors: int = ds.REFERENCE_ANCHORS, batch: int | None = None,
              progress: bool = False, t: int = ds.REFERENCE_T) -> dict:
    """{threshold: {"miou", "accuracy", "miou_present", "segments"}} of DiffSeg on toy scenes (semantic ground
    truth): mIoU and accuracy in the reference's protocol, miou_present with matching to each image's classes only."""
    n_cls = toy_classes()
    scores = {th: SegmentationScore(n_cls) for th in thresholds}
    present = {th: SegmentationScore(n_cls, present_only=True) for th in thresholds}
    segs = {th: [] for th in thresholds}
    batch = batch or (10 if scenes[0].image.shape[0] <= 128 else 2)
    for part, cap, agg in _toy_batches(pipe, scenes, batch, progress, "sweep", t, extras=False):
        for th in thresholds:
            for s, p in zip(part, ds.segment(agg, cap.image_hw, th, anchors)):
                scores[th].add(p, s.semantic)
                present[th].add(p, s.semantic)
                segs[th].append(len(np.unique(p)))
    return {th: {"miou": scores[th].miou, "accuracy": scores[th].accuracy, "miou_present": present[th].miou,
                 "segments": float(np.mean(segs[th]))} for th in thresholds}


def toy_table(pipe, n: int = 50, start: int = 0, threshold: float | None = None, thresholds=TOY_SWEEP,
              anchors: int = ds.REFERENCE_ANCHORS, n_tune: int = 50, batch: int | None = None, seed: int = 0,
              size: int | None = None, t: int = ds.REFERENCE_T, progress: bool = False) -> dict:
    """DiffSeg against baselines on held-out toy scenes start…start+n−1, all measured in this one run.

    threshold None: the toy threshold is the sweep's best mIoU on `n_tune` *other* held-out scenes (TUNE_START…),
    so the table's scenes never choose it. Rows: DiffSeg at that threshold and at the reference's 1.1; k-means on
    pixel colours and on UNet features with k = DiffSeg's segment count on each image; colour k-means with k = the
    image's number of ground-truth classes (an oracle k); cross-attention argmax over the caption's tokens; one
    segment per image. Ground truth: the semantic map (background + 4 shape classes), Hungarian-matched per image
    against all of them as the reference does ("miou", "accuracy"), and against each image's own classes only
    ("miou_present", for comparison).
    """
    from . import toyworld as tw
    from .images import native_size
    size = size or native_size(pipe)
    batch = batch or (10 if size <= 128 else 2)  # SD: 2 images = 4 UNet samples with every self-attention map kept
    tuned = None
    if threshold is None:
        tuned = toy_sweep(pipe, [tw.heldout_scene(TUNE_START + i, size=size) for i in range(n_tune)], thresholds,
                          anchors, batch, progress, t)
        threshold = max(tuned, key=lambda th: tuned[th]["miou"])
    ref = ds.REFERENCE_THRESHOLD["cocostuff27"]
    sweep = sorted(set(thresholds) | {threshold, ref})
    names = [f"DiffSeg, KL threshold {threshold:g} (toy)", f"DiffSeg, KL threshold {ref:g} (reference)",
             "k-means on pixel colours, k = DiffSeg's count", "k-means on UNet features, k = DiffSeg's count",
             "cross-attention argmax over caption tokens", "k-means on pixel colours, k = true classes (oracle)",
             "one segment per image"]
    evals = dict(zip(names, [1, 1, 0, 1, 1, 0, 0]))
    n_cls = toy_classes()
    scores = {k: SegmentationScore(n_cls) for k in names}
    present = {k: SegmentationScore(n_cls, present_only=True) for k in names}
    sweep_scores = {th: SegmentationScore(n_cls) for th in sweep}
    sweep_present = {th: SegmentationScore(n_cls, present_only=True) for th in sweep}
    count = {k: [] for k in names}
    sweep_count = {th: [] for th in sweep}
    seconds = {k: 0.0 for k in names}
    scenes = [tw.heldout_scene(start + i, size=size) for i in range(n)]
    for part, cap, agg in _toy_batches(pipe, scenes, batch, progress, "toy table", t):
        by_th = {}
        for th in sweep:
            t0 = time.perf_counter()
            by_th[th] = ds.segment(agg, cap.image_hw, th, anchors)
            if th in (threshold, ref):
                seconds[names[0] if th == threshold else names[1]] += time.perf_counter() - t0
        for i, s in enumerate(part):
            gt = s.semantic
            for th in sweep:
                sweep_scores[th].add(by_th[th][i], gt)
                sweep_present[th].add(by_th[th][i], gt)
                sweep_count[th].append(len(np.unique(by_th[th][i])))
            k = len(np.unique(by_th[threshold][i]))
            preds = {}
            for name, fn in ((names[0], lambda: by_th[threshold][i]), (names[1], lambda: by_th[ref][i]),
                             (names[2], lambda: ds.kmeans_colours(s.image, k, seed)),
                             (names[3], lambda: ds.kmeans_features(cap.features[i], k, cap.image_hw, seed)),
                             (names[4], lambda: ds.cross_argmax(cap.cross[i], pipe.tokenizer, s.caption)),
                             (names[5], lambda: ds.kmeans_colours(s.image, len(np.unique(gt)), seed)),
                             (names[6], lambda: np.zeros_like(gt))):
                t0 = time.perf_counter()
                preds[name] = fn()
                if name not in names[:2]:
                    seconds[name] += time.perf_counter() - t0
                scores[name].add(preds[name], gt)
                present[name].add(preds[name], gt)
                count[name].append(len(np.unique(preds[name])))
    rows = {k: {"miou": scores[k].miou, "accuracy": scores[k].accuracy, "miou_present": present[k].miou,
                "segments": float(np.mean(count[k])), "unet_evals": evals[k],
                "ms_per_image": 1000 * seconds[k] / n} for k in names}
    return {"rows": rows, "threshold": threshold, "tuned": tuned, "n": n, "start": start, "n_tune": n_tune,
            "sweep": {th: {"miou": sweep_scores[th].miou, "accuracy": sweep_scores[th].accuracy,
                           "miou_present": sweep_present[th].miou,
                           "segments": float(np.mean(sweep_count[th]))} for th in sweep}}


def table_text(result: dict) -> str:
    """The toy table and the threshold sweep as markdown."""
    lines = [f"{result['n']} held-out toy scenes; mIoU and pixel accuracy over the set, each image's segments "
             f"Hungarian-matched to all {toy_classes()} classes of the semantic map (background + shapes), as the "
             "reference "
             "scores; last mIoU column: matched only to the classes present in each image (not the reference's)", "",
             "| method | mIoU | pixel accuracy | segments / image | UNet evaluations / image "
             "| mIoU, present classes only |", "|---|---|---|---|---|---|"]
    for k, r in result["rows"].items():
        lines.append(f"| {k} | {r['miou']:.3f} | {r['accuracy']:.3f} | {r['segments']:.1f} | {r['unet_evals']} "
                     f"| {r['miou_present']:.3f} |")
    lines += ["", "| KL threshold | " + " | ".join(f"{th:g}" for th in result["sweep"]) + " |",
              "|---" * (len(result["sweep"]) + 1) + "|"]
    for key, name, fmt in (("miou", "mIoU", "{:.3f}"), ("accuracy", "pixel accuracy", "{:.3f}"),
                           ("segments", "segments / image", "{:.1f}"),
                           ("miou_present", "mIoU, present classes only", "{:.3f}")):
        lines.append(f"| {name} | " + " | ".join(fmt.format(v[key]) for v in result["sweep"].values()) + " |")
    if result.get("tuned"):
        best, tuned = result["threshold"], result["tuned"]
        loose = max(tuned, key=lambda th: tuned[th]["miou_present"])
        lines += ["", f"Tuning sweep on {result.get('n_tune', 'other')} other held-out scenes ({TUNE_START}…):", "",
                  "| KL threshold | " + " | ".join(f"{th:g}" for th in tuned) + " |", "|---" * (len(tuned) + 1) + "|"]
        for key, name in (("miou", "mIoU"), ("miou_present", "mIoU, present classes only")):
            lines.append(f"| {name} | " + " | ".join(f"{v[key]:.3f}" for v in tuned.values()) + " |")
        lines += ["", f"Toy threshold {best:g}: the best mIoU ({tuned[best]['miou']:.3f}) on the tuning scenes, not "
                  f"the table's; the present-classes rule would have picked {loose:g}."]
    return "\n".join(lines)


# -- the dataset run -------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_files(pipe, pairs, dataset: str, threshold=None, anchors: int = ds.REFERENCE_ANCHORS,
                   t: int = ds.REFERENCE_T, size: int | None = None, batch: int = 1, progress: bool = False) -> Counts:
    """DiffSeg on (image, label) pairs → Counts."""
    from tqdm.auto import tqdm
    from .images import native_size
    mapping, n_class = DATASETS[dataset]
    lut = lookup_table(mapping)
    size = size or native_size(pipe)
    threshold = threshold if threshold is not None else ds.REFERENCE_THRESHOLD[dataset]
    counts = Counts(n_class)
    for b in tqdm(range(0, len(pairs), batch), desc="DiffSeg", disable=not progress):
        loaded = [load_pair(i, lab, size, lut) for i, lab in pairs[b:b + batch]]
        x = torch.stack([im for im, _ in loaded]).to(pipe.device, pipe.unet.dtype)
        cap = ds.capture(pipe, x, t=t)
        seg = ds.segment(ds.aggregate(cap.self_maps), cap.image_hw, threshold, anchors)
        for pred, (_, lab) in zip(seg, loaded):
            counts.add(pred, lab)
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder (layout: see helpers/diffseg_eval.py)")
    ap.add_argument("--dataset", default="cocostuff27", choices=sorted(DATASETS))
    ap.add_argument("--list", default=None, help="COCO-Stuff: file of image ids to use")
    ap.add_argument("--model", default=None, help="model name, hub id or folder (default: the loader's rule)")
    ap.add_argument("--threshold", type=float, default=None, help="KL threshold (default 1.1 COCO, 0.9 Cityscapes)")
    ap.add_argument("--anchors", type=int, default=ds.REFERENCE_ANCHORS, help="anchors per side (16)")
    ap.add_argument("--t", type=int, default=ds.REFERENCE_T, help="timestep of the UNet pass (300)")
    ap.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    ap.add_argument("--n", type=int, default=None, help="only the first n images")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process")
    ap.add_argument("--json", default=None, help="write the result here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from accelerate import PartialState
    from accelerate.utils import gather_object, reduce
    from .loading import load_pipeline
    state = PartialState(cpu=not torch.cuda.is_available())
    pairs = list_files(a.data, a.dataset, a.list)[:a.n]
    pipe = load_pipeline(a.model, device=str(state.device))
    start = time.time()
    with state.split_between_processes(pairs) as mine:
        counts = evaluate_files(pipe, list(mine), a.dataset, a.threshold, a.anchors, a.t, a.size, a.batch_size,
                                progress=state.is_main_process)
        names = [img.name for img, _ in mine]
    vec = torch.from_numpy(counts.vec)
    if state.num_processes > 1:
        vec = reduce(vec.to(state.device), "sum").cpu()
        names = gather_object([names])
    else:
        names = [names]
    counts.vec = vec.numpy()
    if state.is_main_process:
        seen = [n for part in names for n in part]
        if sorted(seen) != sorted(p.name for p, _ in pairs):
            raise RuntimeError("the processes did not cover every image exactly once")
        out = counts.summary()
        out.update(dataset=a.dataset, processes=state.num_processes, images_per_process=[len(p) for p in names],
                   threshold=a.threshold if a.threshold is not None else ds.REFERENCE_THRESHOLD[a.dataset],
                   anchors=a.anchors, t=a.t, seconds=round(time.time() - start, 1))
        print(f"{a.dataset}: {out['images']} images on {state.num_processes} process(es): mIoU "
              f"{out['reference']['miou']:.3f}, pixel accuracy {out['reference']['accuracy']:.3f} "
              "(the reference's counting); matched to each image's classes only: mIoU "
              f"{out['present_classes_only']['miou']:.3f}")
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
