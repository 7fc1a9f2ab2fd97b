"""DiffSeg (Tian et al., 2023): segment any image, without labels or training, from one UNet pass's self-attention.

The four steps, each a function here (notebook 05 builds them one by one):

1. `capture`: encode the image, run the UNet once on the *clean* latent at timestep 300 with the empty prompt, keep
   the self-attention of every layer, averaged over heads and, per resolution, over layers.
2. `aggregate`: bring every resolution to the largest one — upsample each map's key dimension (bilinear) and
   renormalise it to sum 1, repeat the query dimension — and add them up, weighted in proportion to their side
   (SD 1.x: 64:32:16:8 → 8/15, 4/15, 2/15, 1/15). The result: for each query cell, a probability map over cells.
3. `merge`: anchors on a regular grid (`anchor_grid`); iteration 0 averages, for every anchor, all query maps within
   a symmetric-KL threshold of it; later iterations merge those proposals greedily; 3 iterations in the reference.
   The KL is computed in chunks with two matrix products, so memory stays bounded (`kl_matrix`, `kl_within`).
4. `nms`: upsample the proposals to image size and take the argmax per pixel: one segment id per pixel.

`label_segments` names segments with the caption's nouns (their cross-attention); `kmeans_colours`,
`kmeans_features` and `cross_argmax` are the baselines the notebook measures DiffSeg against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .attention import AttentionStore, capture_attention, cross_maps
from .images import check_size, encode, pil_to_tensor
from .text import embed, token_positions

REFERENCE_T = 300                 # timestep of the single UNet pass
REFERENCE_ANCHORS = 16            # anchors per side of the grid (16 × 16 = 256 anchors)
REFERENCE_ITERATIONS = 3
REFERENCE_THRESHOLD = {"cocostuff27": 1.1, "cityscapes": 0.9}


# -- 1. capture ------------------------------------------------------------------------------------------------------
@dataclass
class Capture:
    """What one UNet pass gives DiffSeg and its baselines, for a batch of B images."""
    self_maps: dict                  # (h, w) -> B × Q × K self-attention, mean over heads and layers
    image_hw: tuple[int, int]
    cross: torch.Tensor | None = None     # B × tokens × H × W cross-attention at image size (with captions only)
    features: torch.Tensor | None = None  # B × C × h × w output of the UNet's last up-block
    captions: list[str] | None = None
    layers: dict = field(default_factory=dict)  # (h, w) -> number of self-attention layers averaged


def _as_batch(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images if images.ndim == 4 else images[None]
    images = images if isinstance(images, (list, tuple)) else [images]
    return torch.cat([pil_to_tensor(i) for i in images])


@torch.no_grad()
def capture(pipe, images, t: int = REFERENCE_T, captions=None, features: bool = False) -> Capture:
    """One UNet pass on the clean VAE latents of `images` at timestep `t` with the empty prompt.

    images: PIL images, uint8 H×W×3 arrays or a [-1, 1] tensor. With `captions`, the same latents also go through the
    UNet conditioned on their captions, in the same batched call, for the cross-attention that names segments.
    With `features`, the last up-block's output is kept for the UNet-feature k-means baseline.
    """
    x = _as_batch(images)
    check_size(pipe, *x.shape[-2:])  # a clear error for sizes the VAE and UNet cannot take
    n = x.shape[0]
    if captions is not None:
        captions = [captions] if isinstance(captions, str) else list(captions)
        if len(captions) != n:
            raise ValueError(f"{len(captions)} captions for {n} images; give one caption per image")
    lat = encode(pipe, x)
    emb = embed(pipe, [""] * n)
    if captions is not None:
        lat, emb = torch.cat([lat, lat]), torch.cat([emb, embed(pipe, captions)])
    kinds = ("self", "cross") if captions is not None else ("self",)
    feats = {}
    hook = None
    if features:
        hook = pipe.unet.up_blocks[-1].register_forward_hook(lambda m, a, out: feats.__setitem__("x", out))
    try:
        with capture_attention(pipe.unet, kinds=kinds) as store:
            pipe.unet(lat, t, encoder_hidden_states=emb)
    finally:
        if hook is not None:
            hook.remove()
    out = Capture(self_maps=self_attention(store, n), image_hw=tuple(x.shape[-2:]), captions=captions,
                  layers={k[1]: len(store.layers_seen[k]) for k in store.keys() if k[0] == "self"})
    if captions is not None:
        out.cross = cross_maps(store, size=out.image_hw)[n:]
    if features:
        out.features = feats["x"][:n].float()
    return out


def self_attention(store, n: int | None = None) -> dict:
    """{(h, w): B × Q × K} self-attention maps of a store (first n batch elements), or a clear error if it has none."""
    if isinstance(store, dict):
        maps = store
    elif isinstance(store, AttentionStore):
        maps = {res: store.get(kind, res) for kind, res in store.keys() if kind == "self"}
    else:
        raise TypeError(f"expected an AttentionStore or a dict of self-attention maps, got {type(store).__name__}")
    if not maps:
        held = store.keys() if isinstance(store, AttentionStore) else []
        raise ValueError(f"no self-attention was captured (the store holds {held or 'nothing'}); DiffSeg reads "
                         "self-attention: capture with AttentionStore(kinds=('self',)) or helpers.diffseg.capture")
    return {res: (m[:n] if n is not None else m) for res, m in maps.items()}


# -- 2. aggregate ----------------------------------------------------------------------------------------------------
def resolution_weights(resolutions) -> dict:
    """The reference's weights: proportional to each resolution's side (64:32:16:8 → 8/15, 4/15, 2/15, 1/15)."""
    sides = {r: float(np.sqrt(r[0] * r[1])) for r in resolutions}
    total = sum(sides.values())
    return {r: s / total for r, s in sides.items()}


def aggregate(maps, weights=None, dtype=torch.float32) -> torch.Tensor:
    """Self-attention of all resolutions brought to the largest one: B × Q × K with Q = K = cells at that resolution.

    maps: {(h, w): B × h·w × h·w} (or an AttentionStore). Each map's key dimension is upsampled bilinearly to the
    largest resolution and renormalised to sum 1; each query's map is repeated over the cells it covers; resolutions
    are added with `weights` (default: `resolution_weights`). Built in place in one output tensor: the extra memory
    is one upsampled resolution at a time.
    """
    maps = self_attention(maps)
    weights = weights or resolution_weights(maps)
    big = max(maps, key=lambda r: r[0] * r[1])
    H, W = big
    b = next(iter(maps.values())).shape[0]
    out = torch.zeros(b, H * W, H * W, dtype=dtype, device=next(iter(maps.values())).device)
    for (h, w), m in maps.items():
        if H % h or W % w:
            raise ValueError(f"attention at {h}×{w} does not divide the largest resolution {H}×{W}; use an image "
                             "whose side is a multiple of helpers.images.size_multiple(pipe)")
        if m.shape[-2:] != (h * w, h * w):
            raise ValueError(f"the map at {h}×{w} has shape {tuple(m.shape)}; expected B × {h * w} × {h * w}")
        up = m.to(dtype).reshape(b * h * w, 1, h, w)
        if (h, w) != (H, W):
            up = F.interpolate(up, size=(H, W), mode="bilinear", align_corners=False)
        up = up.reshape(b, h, 1, w, 1, H * W)
        up = up / up.sum(-1, keepdim=True)
        out.view(b, h, H // h, w, W // w, H * W).add_(up, alpha=weights[(h, w)])
        del up
    return out


# -- 3. merge --------------------------------------------------------------------------------------------------------
def anchor_grid(res, n: int = REFERENCE_ANCHORS) -> torch.Tensor:
    """Flat query indices of an n × n grid of anchors on a res = (h, w) grid, spaced as the reference spaces them.

    The reference puts 16 points on SD's 64-cell side at 1, 5, …, 61 (step ⌊63/15⌋ = 4, centred). On the toy
    model's 16-cell side the same rule gives step 1: every cell is an anchor.
    """
    h, w = (res, res) if isinstance(res, int) else tuple(res)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the number of anchors per side must be a positive integer, got {n!r}")
    if n > min(h, w):
        raise ValueError(f"{n} × {n} = {n * n} anchors asked for, but the attention has only {h} × {w} = {h * w} "
                         f"query cells ({min(h, w)} per side); use at most {min(h, w)} anchors per side")

    def axis(size):
        if n == 1:
            return np.array([(size - 1) // 2])
        step = (size - 1) // (n - 1)
        start = (size - 1 - step * (n - 1)) // 2
        return start + step * np.arange(n)

    ys, xs = np.meshgrid(axis(h), axis(w), indexing="ij")
    return torch.from_numpy((ys * w + xs).ravel()).long()


def _dots(x, y):
    """Row-wise dot products of two n × K tensors, without an n × K temporary."""
    return (x.unsqueeze(1) @ y.unsqueeze(2)).reshape(-1)


def kl_matrix(a: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Symmetric KL, ½·KL(a‖b) + ½·KL(b‖a), between every row of a (m × K) and every row of b (n × K): m × n.

    ½·Σ (a − b)(log a − log b) = ½·(Σ a log a + Σ b log b − a·log bᵀ − log a·bᵀ): two matrix products instead of an
    m × n × K tensor. b is processed `chunk` rows at a time, so the extra memory is about m·K + chunk·K + m·n numbers.
    """
    tiny = torch.finfo(a.dtype).tiny
    la = a.clamp_min(tiny).log_()
    ha = _dots(a, la)[:, None]
    out = torch.empty(a.shape[0], b.shape[0], dtype=a.dtype, device=a.device)
    for s in range(0, b.shape[0], chunk):
        bc = b[s:s + chunk]
        lb = bc.clamp_min(tiny).log_()
        blk = torch.addmm(ha + _dots(bc, lb)[None], a, lb.T, alpha=-1)
        out[:, s:s + chunk] = blk.addmm_(la, bc.T, alpha=-1).mul_(0.5)
        del lb, blk
    return out


def default_chunk(x: torch.Tensor) -> int:
    """Rows per block: 1/32 of the rows, at least 32 (SD 1.x: 128 of 4096; the toy model: 32 of 256), so merging's
    working memory stays below twice the attention tensor at every size (`bench/diffseg_merge.py` measures it)."""
    return min(x.shape[0], max(32, x.shape[0] // 32))


def kl_within(a: torch.Tensor, b: torch.Tensor, threshold: float, chunk: int | None = None) -> torch.Tensor:
    """Boolean m × n: symmetric KL between rows of a and rows of b below `threshold`, in chunks of both a and b.

    a may also be a (tensor, row indices) pair, so anchors are taken from b's rows chunk by chunk without a copy.
    Working memory: the m × n booleans plus a few chunk × K blocks (chunk default: `default_chunk`).
    """
    src, rows = a if isinstance(a, tuple) else (a, None)
    m = len(rows) if rows is not None else src.shape[0]
    chunk = chunk or default_chunk(b)
    out = torch.empty(m, b.shape[0], dtype=torch.bool, device=b.device)
    for s in range(0, m, chunk):
        part = src[rows[s:s + chunk]] if rows is not None else src[s:s + chunk]
        out[s:s + chunk] = kl_matrix(part, b, chunk) < threshold
    return out


def _mean_rows(sel: torch.Tensor, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(sel as 0/1) @ x / row counts, `chunk` rows of sel at a time: the mean of the selected rows of x."""
    out = torch.empty(sel.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    for s in range(0, sel.shape[0], chunk):
        w = sel[s:s + chunk].to(x.dtype)
        torch.matmul(w, x, out=out[s:s + chunk])
        out[s:s + chunk] /= w.sum(1, keepdim=True)
    return out


def _thresholds(threshold, iterations):
    th = [float(threshold)] * iterations if np.isscalar(threshold) else [float(v) for v in threshold]
    if not th:
        raise ValueError("at least one merging iteration is needed")
    bad = [v for v in th if not v > 0]
    if bad:
        raise ValueError(f"KL thresholds must be > 0 (got {bad}); the reference uses 1.1 (COCO-Stuff) or 0.9 "
                         "(Cityscapes), and 0 would merge nothing")
    return th


def merge(attn: torch.Tensor, res, threshold=REFERENCE_THRESHOLD["cocostuff27"], anchors: int = REFERENCE_ANCHORS,
          iterations: int = REFERENCE_ITERATIONS, chunk: int | None = None, dtype=None,
          history: list | None = None):
    """Iterative attention merging of one image's aggregated attention (Q × K) → proposals (M × K).

    threshold: one KL threshold for every iteration, or one per iteration. Iteration 0: for each anchor, the mean of
    all query maps within the threshold of it. Iterations ≥ 1: greedily, in order, each proposal not yet taken
    absorbs every proposal within the threshold (as the reference does, ones taken earlier included) and is
    replaced by their mean. Pass a list as `history` to receive the proposals after each iteration.
    """
    th = _thresholds(threshold, iterations)
    if attn.ndim != 2 or attn.shape[0] != attn.shape[1]:
        raise ValueError(f"merge takes one image's aggregated attention, Q × Q; got shape {tuple(attn.shape)}")
    x = attn if dtype is None else attn.to(dtype)
    grid = anchor_grid(res, anchors).to(x.device)
    if grid.max() >= x.shape[0]:
        raise ValueError(f"the attention has {x.shape[0]} queries but res={res} implies more")
    chunk = chunk or default_chunk(x)
    close = kl_within((x, grid), x, th[0], chunk)                      # anchors × queries
    props = _mean_rows(close, x, chunk)
    del close
    if history is not None:
        history.append(props)
    for t in th[1:]:
        close = kl_within(props, props, t, chunk).cpu().numpy()        # M × M, small
        taken = np.zeros(len(close), dtype=bool)
        rows = []
        for i in range(len(close)):
            if taken[i]:
                continue
            taken[i] = True
            if close[i].any():
                taken |= close[i]
                rows.append(close[i])
        props = _mean_rows(torch.from_numpy(np.stack(rows)).to(x.device), props, chunk)
        if history is not None:
            history.append(props)
    return props


# -- 4. NMS ----------------------------------------------------------------------------------------------------------
def nms(proposals: torch.Tensor, res, size) -> torch.Tensor:
    """Upsample proposals (M × K, K = h·w cells) bilinearly to `size` and take the argmax per pixel: H × W ids."""
    h, w = (res, res) if isinstance(res, int) else tuple(res)
    size = (size, size) if isinstance(size, int) else tuple(size)
    up = F.interpolate(proposals.float().reshape(1, -1, h, w), size=size, mode="bilinear", align_corners=False)
    return up[0].argmax(0)


def relabel(labels) -> np.ndarray:
    """Segment ids renumbered 0, 1, 2, … in order of first appearance (row-major)."""
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    _, first, inv = np.unique(lab.ravel(), return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inv].reshape(lab.shape)


def latent_res(attn: torch.Tensor, image_hw) -> tuple[int, int]:
    """The (h, w) grid of an aggregated attention of Q cells for an image of image_hw pixels."""
    H, W = image_hw
    q = attn.shape[-1]
    f = np.sqrt(H * W / q)
    h, w = round(H / f), round(W / f)
    if h * w != q:
        raise ValueError(f"{q} attention cells do not tile a {H}×{W} image")
    return h, w


def segment(attn: torch.Tensor, image_hw, threshold=REFERENCE_THRESHOLD["cocostuff27"],
            anchors: int = REFERENCE_ANCHORS, iterations: int = REFERENCE_ITERATIONS, chunk: int | None = None,
            dtype=None) -> np.ndarray:
    """Merging + NMS for a batch of aggregated attention (B × Q × K) → B × H × W segment ids (0, 1, … per image)."""
    res = latent_res(attn, image_hw)
    return np.stack([relabel(nms(merge(a, res, threshold, anchors, iterations, chunk, dtype), res, image_hw))
                     for a in attn])


def diffseg(pipe, images, threshold=REFERENCE_THRESHOLD["cocostuff27"], anchors: int = REFERENCE_ANCHORS,
            iterations: int = REFERENCE_ITERATIONS, t: int = REFERENCE_T) -> np.ndarray:
    """The whole method: images → B × H × W segment ids."""
    cap = capture(pipe, images, t=t)
    return segment(aggregate(cap.self_maps), cap.image_hw, threshold, anchors, iterations)


# -- semantic labels -------------------------------------------------------------------------------------------------
def noun_maps(cross: torch.Tensor, tokenizer, caption: str, nouns) -> torch.Tensor:
    """Each noun's cross-attention (N × H × W), as the reference prepares it: normalised over tokens per pixel, then
    each noun's map divided by its L2 norm over pixels. `cross`: tokens × H × W for this caption."""
    if not nouns:
        raise ValueError(f"no nouns to label segments with; give the nouns of {caption!r} (e.g. from a tagger)")
    x = cross / cross.sum(0, keepdim=True).clamp_min(1e-12)
    m = torch.stack([x[token_positions(tokenizer, caption, w)].mean(0) for w in nouns])
    return m / m.flatten(1).norm(dim=1)[:, None, None].clamp_min(1e-12)


def label_segments(labels, cross: torch.Tensor, tokenizer, caption: str, nouns) -> dict[int, str]:
    """{segment id: noun}: each segment takes the noun whose (normalised) cross-attention is highest inside it."""
    maps = noun_maps(cross, tokenizer, caption, nouns)
    lab = torch.as_tensor(np.asarray(labels)).to(maps.device)
    out = {}
    for s in torch.unique(lab).tolist():
        out[int(s)] = nouns[int(maps[:, lab == s].mean(1).argmax())]
    return out


def toy_nouns(caption: str) -> list[str]:
    """The toy world's nouns (its shape words) in caption order, each once."""
    from .toyworld import SHAPES
    words = caption.replace(",", " ").split()
    return list(dict.fromkeys(w for w in words if w in SHAPES))


# -- baselines -------------------------------------------------------------------------------------------------------
def kmeans(x, k: int, seed: int = 0) -> np.ndarray:
    """k-means labels of the rows of x (N × D), k-means++ start (scipy), standardised features."""
    from scipy.cluster.vq import kmeans2
    x = np.asarray(x, dtype=np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    k = max(1, min(int(k), len(np.unique(x, axis=0))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns when a cluster empties; the labels are still valid
        _, lab = kmeans2(x, k, minit="++", seed=seed)
    return lab


def kmeans_colours(image, k: int, seed: int = 0) -> np.ndarray:
    """Baseline: k-means on the pixels' RGB colours → H × W labels."""
    a = np.asarray(image)
    return kmeans(a.reshape(-1, a.shape[-1]), k, seed).reshape(a.shape[:2])


def kmeans_features(features: torch.Tensor, k: int, size, seed: int = 0) -> np.ndarray:
    """Baseline: k-means on UNet features (C × h × w) per latent cell, upsampled (nearest) to `size` → H × W labels."""
    c, h, w = features.shape
    lab = kmeans(features.reshape(c, -1).T.cpu().numpy(), k, seed).reshape(h, w)
    lab = torch.from_numpy(lab)[None, None].float()
    return F.interpolate(lab, size=size, mode="nearest")[0, 0].long().numpy()


def cross_argmax(cross: torch.Tensor, tokenizer, caption: str) -> np.ndarray:
    """Baseline: each pixel takes the caption token (start token included, end and padding not) it attends most."""
    n = len(tokenizer(caption).input_ids) - 1  # start token + the caption's tokens
    return cross[:n].argmax(0).cpu().numpy()


def synthetic_attention(side: int, regions: int = 6, sharpness: float = 6.0, noise: float = 1.0, seed: int = 0,
                        dtype=torch.float64, chunk: int = 256) -> torch.Tensor:
    """A random but structured Q × Q attention (Q = side²) for tests and benchmarks: cells in the same random region
    (a Voronoi cell of random centres) attend to each other more, plus random logits; rows are softmax-normalised.
    Built `chunk` rows at a time, so making it needs little more memory than the result."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(regions, 2, generator=g) * side
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    cells = torch.stack([yy.ravel(), xx.ravel()], 1).float() + 0.5
    region = torch.cdist(cells, centres).argmin(1)
    q = side * side
    out = torch.empty(q, q, dtype=dtype)
    for s in range(0, q, chunk):
        r = region[s:s + chunk]
        logits = sharpness * (r[:, None] == region[None]).to(dtype)
        logits += noise * torch.randn(len(r), q, generator=g, dtype=dtype)
        out[s:s + chunk] = logits.softmax(-1)
    return out
