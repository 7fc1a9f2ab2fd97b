"""Metrics: IoU, Hungarian-matched mIoU and pixel accuracy (PiCIE protocol), PSNR.

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


def match_segments(pred, gt, ignore: int = -1) -> dict[int, int]:
    """Hungarian matching of predicted segment ids to ground-truth class ids, maximising total overlap.

    Pixels where gt == ignore do not count. Returns {pred id: gt class}; unmatched predictions map to nothing.
    """
    from scipy.optimize import linear_sum_assignment
    p, g = _np(pred).astype(np.int64), _np(gt).astype(np.int64)
    if p.shape != g.shape:
        raise ValueError(f"segmentation {p.shape} and ground truth {g.shape} differ in shape; resize first")
    valid = g != ignore
    ps, gs = np.unique(p[valid]), np.unique(g[valid])
    overlap = np.zeros((len(ps), len(gs)))
    pi, gi = np.searchsorted(ps, p[valid]), np.searchsorted(gs, g[valid])
    np.add.at(overlap, (pi, gi), 1)
    rows, cols = linear_sum_assignment(-overlap)
    return {int(ps[r]): int(gs[c]) for r, c in zip(rows, cols)}


class SegmentationScore:
    """Accumulates per-image Hungarian-matched segmentations into dataset-level mIoU and pixel accuracy (PiCIE).

    score = SegmentationScore(); score.add(pred, gt) for each image; score.miou, score.accuracy.
    Each image's segments are matched to its own ground-truth classes; unmatched segments count as wrong.
    """

    def __init__(self, n_classes: int | None = None, ignore: int = -1):
        self.ignore = ignore
        self.inter: dict[int, float] = {}
        self.union: dict[int, float] = {}
        self.correct = 0
        self.total = 0
        self.n_classes = n_classes

    def add(self, pred, gt):
        p, g = _np(pred).astype(np.int64), _np(gt).astype(np.int64)
        mapping = match_segments(p, g, self.ignore)
        valid = g != self.ignore
        lab = np.full(p.shape, -2, dtype=np.int64)  # -2: matched to nothing
        for s, c in mapping.items():
            lab[p == s] = c
        for c in np.unique(np.concatenate([g[valid], lab[valid & (lab >= 0)]])):
            pm, gm = (lab == c) & valid, (g == c) & valid
            self.inter[c] = self.inter.get(c, 0) + float((pm & gm).sum())
            self.union[c] = self.union.get(c, 0) + float((pm | gm).sum())
        self.correct += int(((lab == g) & valid).sum())
        self.total += int(valid.sum())
        return self

    @property
    def per_class(self) -> dict[int, float]:
        return {c: self.inter[c] / self.union[c] for c in sorted(self.union) if self.union[c] > 0}

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
