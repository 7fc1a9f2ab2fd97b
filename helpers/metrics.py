"""Metrics: IoU, Hungarian-matched mIoU and pixel accuracy (the DiffSeg/PiCIE protocol), PSNR.

The UNet-evaluation counter lives in `helpers.sampling.UNetCounter`.
"""
from __future__ import annotations

import numpy as np
import torch


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def iou(pred, gt) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 when both are empty)."""
    p, g = _np(pred).astype(bool), _np(gt).astype(bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: prediction {p.shape} vs ground truth {g.shape}; resize the prediction "
                         "to the ground truth's size first (e.g. helpers.metrics.resize_mask)")
    union = np.logical_or(p, g).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, g).sum() / union)


def resize_mask(mask, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize an H×W map (mask or heat map) to `size` (h, w); returns a float tensor."""
    m = torch.as_tensor(_np(mask), dtype=torch.float32)[None, None]
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return torch.nn.functional.interpolate(m, size=size, mode=mode, **kw)[0, 0]


def psnr(a, b, data_range: float | None = None, mask=None) -> float:
    """Peak signal-to-noise ratio in dB between two images (uint8 arrays, PIL images or tensors in [-1, 1]).

    `mask` (H×W bool) restricts the comparison to those pixels, e.g. outside an edited object.
    """
    x, y = _np(np.asarray(a) if not isinstance(a, torch.Tensor) else a), _np(
        np.asarray(b) if not isinstance(b, torch.Tensor) else b)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    if data_range is None:
        data_range = 255.0 if x.dtype == np.uint8 else 2.0
    x, y = x.astype(np.float64), y.astype(np.float64)
    d = (x - y) ** 2
    if mask is not None:
        m = _np(mask).astype(bool)
        if d.ndim == 3 and d.shape[-1] in (1, 3) and m.shape == d.shape[:2]:
            d = d[m]
        elif d.ndim >= 3 and m.shape == d.shape[-2:]:
            d = d[..., m]
        else:
            raise ValueError(f"mask of shape {m.shape} does not fit images of shape {x.shape}")
        if d.size == 0:
            raise ValueError("the mask selects no pixels")
    mse = d.mean()
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def _matching_input(pred, gt, ignore: int, n_classes: int | None):
    p, g = _np(pred), _np(gt)
    if p.shape != g.shape:
        raise ValueError(f"segmentation {p.shape} and ground truth {g.shape} differ in shape; resize first")
    for name, a in (("segment ids", p), ("ground-truth classes", g)):
        if a.size and not np.issubdtype(a.dtype, np.integer) and not (a == np.round(a)).all():
            raise ValueError(f"{name} must be integers, got values such as {a.ravel()[a.ravel() % 1 != 0][:3]}")
    p, g = p.astype(np.int64), g.astype(np.int64)
    valid = g != ignore
    if n_classes is not None:
        if not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
            raise ValueError(f"n_classes must be a positive integer (all classes of the data set), got {n_classes!r}")
        bad = np.unique(g[valid & ((g < 0) | (g >= n_classes))])
        if bad.size:
            raise ValueError(f"ground-truth class(es) {bad[:5].tolist()} outside 0…{n_classes - 1}; give the "
                             f"data set's number of classes as n_classes, or mark unlabelled pixels with "
                             f"ignore={ignore}")
        if p.size and p.min() < 0:
            raise ValueError("segment ids must be ≥ 0 for the reference matching (they index the overlap histogram's "
                             "columns); renumber them first, e.g. with helpers.diffseg.relabel")
    return p, g, valid


def hungarian_counts(pred, gt, n_classes: int | None = None, ignore: int = -1, present_only: bool = False):
    """One image's Hungarian matching of segments to classes, as per-class counts: (tp, fp, fn, labelled).

    Default (`present_only=False`), the reference's protocol (google/diffseg `hungarian_matching`, after PiCIE): an
    overlap histogram of all `n_classes` classes of the data set (rows) × segment ids (columns, at least n_classes,
    so id s is column s), matched one-to-one maximising the overlap. Every class gets a segment, so a surplus segment
    may be matched to a class *absent* from the image and count as its false positives.
    `present_only=True`: segments are matched only to the classes present in the image; surplus segments match
    nothing and only cost their pixels' true classes (false negatives).

    tp, fp, fn: float arrays of length n_classes (present_only without n_classes: 1 + the largest class seen);
    a class's TP is its matched segment's overlap with it, FN the rest of the class, FP the matched segment's pixels
    of other classes. labelled: the number of pixels with gt != ignore.
    """
    from scipy.optimize import linear_sum_assignment
    if n_classes is None and not present_only:
        raise ValueError("the reference matching needs n_classes, the number of classes of the whole data set (the "
                         "toy world: 5, background + 4 shapes); or pass present_only=True to match each image's "
                         "segments only to the classes it contains")
    p, g, valid = _matching_input(pred, gt, ignore, n_classes)
    gv, pv = g[valid], p[valid]
    if present_only:
        n = n_classes or (int(gv.max()) + 1 if gv.size else 0)
        ps, gs = np.unique(pv), np.unique(gv)
        overlap = np.zeros((len(ps), len(gs)))
        np.add.at(overlap, (np.searchsorted(ps, pv), np.searchsorted(gs, gv)), 1)
        rows, cols = linear_sum_assignment(overlap, maximize=True)
        tp, fp = np.zeros(n), np.zeros(n)
        tp[gs[cols]] = overlap[rows, cols]
        fp[gs[cols]] = overlap[rows].sum(1) - overlap[rows, cols]
        fn = np.bincount(gv, minlength=n).astype(np.float64) - tp
        return tp, fp, fn, float(valid.sum())
    n = int(n_classes)
    width = max(n, int(p.max()) + 1 if p.size else 0)
    hist = np.bincount(width * gv + pv, minlength=n * width).reshape(n, width).astype(np.float64)
    rows, cols = linear_sum_assignment(hist, maximize=True)   # rows = 0…n−1: every class gets a column
    tp = hist[rows, cols]
    return tp, hist[:, cols].sum(0) - tp, hist.sum(1) - tp, float(hist.sum())


def match_segments(pred, gt, ignore: int = -1, n_classes: int | None = None) -> dict[int, int]:
    """Hungarian matching of predicted segment ids to ground-truth class ids, maximising total overlap.

    Without n_classes: each image's segments against the classes present in it. With n_classes: the reference's
    matching against all classes of the data set (see `hungarian_counts`). Pixels where gt == ignore do not count.
    Returns {segment id: class} for the segments that appear in `pred` and got a class.
    """
    from scipy.optimize import linear_sum_assignment
    p, g, valid = _matching_input(pred, gt, ignore, n_classes)
    if n_classes is not None:
        width = max(n_classes, int(p.max()) + 1 if p.size else 0)
        hist = np.bincount(width * g[valid] + p[valid], minlength=n_classes * width).reshape(n_classes, width)
        rows, cols = linear_sum_assignment(hist, maximize=True)
        seen = set(np.unique(p).tolist())
        return {int(s): int(c) for c, s in zip(rows, cols) if int(s) in seen}
    ps, gs = np.unique(p[valid]), np.unique(g[valid])
    overlap = np.zeros((len(ps), len(gs)))
    np.add.at(overlap, (np.searchsorted(ps, p[valid]), np.searchsorted(gs, g[valid])), 1)
    rows, cols = linear_sum_assignment(-overlap)
    return {int(ps[r]): int(gs[c]) for r, c in zip(rows, cols)}


class SegmentationScore:
    """Accumulates per-image Hungarian-matched segmentations into data-set mIoU and pixel accuracy.

    score = SegmentationScore(n_classes); score.add(pred, gt) for each image; score.miou, score.accuracy.
    Default: the reference's protocol (google/diffseg's `hungarian_matching`): each image's segments are matched
    against **all** n_classes classes of the data set, so surplus segments may become false positives of classes
    absent from the image; per class IoU = TP / (TP + FP + FN) summed over the set; mIoU = mean over the classes
    seen (as a prediction or in the ground truth); accuracy = TP / labelled pixels.
    `present_only=True`: match only the classes present in each image (surplus segments are merely wrong pixels);
    n_classes may then be omitted. Pixel accuracy is the same under both (the absent classes' rows are empty, so the
    best total overlap is the same); mIoU is not.
    """

    def __init__(self, n_classes: int | None = None, ignore: int = -1, present_only: bool = False):
        if n_classes is None and not present_only:
            raise ValueError("SegmentationScore needs n_classes, the number of classes of the whole data set (the "
                             "toy world: 5, background + 4 shapes), to match segments as the reference does; or "
                             "SegmentationScore(present_only=True) to match only each image's own classes")
        self.n_classes, self.ignore, self.present_only = n_classes, ignore, present_only
        self.tp: dict[int, float] = {}
        self.fp: dict[int, float] = {}
        self.fn: dict[int, float] = {}
        self.correct = 0.0   # sum of TP over classes: correctly labelled pixels
        self.total = 0.0     # labelled pixels

    def add(self, pred, gt):
        tp, fp, fn, labelled = hungarian_counts(pred, gt, self.n_classes, self.ignore, self.present_only)
        for c in range(len(tp)):
            if tp[c] or fp[c] or fn[c]:
                self.tp[c] = self.tp.get(c, 0.0) + float(tp[c])
                self.fp[c] = self.fp.get(c, 0.0) + float(fp[c])
                self.fn[c] = self.fn.get(c, 0.0) + float(fn[c])
        self.correct += float(tp.sum())
        self.total += labelled
        return self

    @property
    def per_class(self) -> dict[int, float]:
        """{class: IoU = TP / (TP + FP + FN)} over the set, for the classes seen."""
        return {c: self.tp[c] / (self.tp[c] + self.fp[c] + self.fn[c]) for c in sorted(self.tp)}

    @property
    def miou(self) -> float:
        v = list(self.per_class.values())
        return float(np.mean(v)) if v else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)


def normalise(heat) -> torch.Tensor:
    """Min-max normalise a map (or each map of a stack along dim 0) to [0, 1], in float32."""
    h = torch.as_tensor(heat, dtype=torch.float32)
    flat = h.reshape(h.shape[0], -1) if h.ndim == 3 else h.reshape(1, -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    shape = (-1, 1, 1) if h.ndim == 3 else ()
    return (h - lo.reshape(shape)) / (hi - lo).clamp(min=1e-12).reshape(shape)


def binarise(heat, threshold: float | str = 0.5) -> np.ndarray:
    """Normalise a heat map to [0, 1] (min-max) and threshold it; threshold "otsu" picks it by Otsu's method."""
    h = _np(heat).astype(np.float64)
    h = (h - h.min()) / (h.max() - h.min() + 1e-12)
    if threshold == "otsu":
        threshold = otsu(h)
    return h > threshold


def otsu(values, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1]: maximises the between-class variance."""
    hist, edges = np.histogram(_np(values).ravel(), bins=bins, range=(0, 1))
    p = hist / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centres)
    w1 = 1 - w0
    between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1 + 1e-12)
    return float(edges[1:][np.argmax(between)])
