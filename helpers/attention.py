"""One attention hook: a diffusers attention processor that hands attention probabilities to a store.

`AttentionStore` is installed on a UNet by a context manager (`capture_attention`) and removed on exit, restoring
the processors that were there before. It keeps running means of the maps it was asked for — self and/or cross,
chosen resolutions, chosen steps, the conditional half of a classifier-free-guidance batch — so memory is bounded by
the options, not by the number of steps. Layers and steps it does not want run through PyTorch's fused attention,
so capturing costs little more than a bare UNet call.

The same processor also serves training (`keep_graph=True`): the maps are kept with their autograd graph, so a loss
can be put on attention (the bundled toy model is trained that way).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
import math

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LayerInfo:
    name: str          # the processor's name in unet.attn_processors, e.g. "up_blocks.1.attentions.0...attn2.processor"
    is_cross: bool     # attn2 (cross-attention on text) or attn1 (self-attention)
    place: str         # "down", "mid" or "up"

    @property
    def kind(self) -> str:
        return "cross" if self.is_cross else "self"


def layer_infos(unet) -> list[LayerInfo]:
    """Every attention layer of a UNet2DConditionModel, in forward order."""
    out = []
    for name in unet.attn_processors:
        place = "down" if name.startswith("down") else "mid" if name.startswith("mid") else "up"
        out.append(LayerInfo(name, name.endswith("attn2.processor"), place))
    return out


class StoreProcessor:
    """Computes attention exactly as diffusers' `AttnProcessor`, handing the probabilities to `store` if it wants them."""

    def __init__(self, store: "AttentionStore", info: LayerInfo):
        self.store, self.info = store, info

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, n_query, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        heads = attn.heads
        q = query.view(batch, -1, heads, query.shape[-1] // heads).transpose(1, 2)
        k = key.view(batch, -1, heads, key.shape[-1] // heads).transpose(1, 2)
        v = value.view(batch, -1, heads, value.shape[-1] // heads).transpose(1, 2)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
        res = self.store.resolution_of(n_query)
        if self.store.wants(self.info, res):
            scores = (q @ k.transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(-1).to(q.dtype)  # batch × heads × queries × keys
            self.store.take(self.info, res, probs)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, heads * v.shape[-1]).to(q.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class AttentionStore:
    """Running means of attention maps, per (kind, resolution) — or, with `keep_graph`, every map of the last call.

    kinds: ("cross",), ("self",) or both. resolutions: latent-grid sizes (h, w) or ints (square) to keep; None keeps
    all. steps: which UNet calls (0, 1, 2, … in order) to keep; None keeps all. half: "cond" keeps the second half of
    a classifier-free-guidance batch (the text-conditioned one, as diffusers' pipelines order it), "uncond" the first,
    "all" everything. Maps are averaged over heads, layers and kept steps; shape: batch × queries × keys.
    """

    def __init__(self, kinds=("cross",), resolutions=None, steps=None, half="all", keep_graph=False):
        kinds = tuple([kinds] if isinstance(kinds, str) else kinds)
        if not kinds or any(k not in ("cross", "self") for k in kinds):
            raise ValueError(f"kinds must be a non-empty subset of ('cross', 'self'), not {kinds}")
        if half not in ("cond", "uncond", "all"):
            raise ValueError(f"half must be 'cond', 'uncond' or 'all', not {half!r}")
        self.kinds = kinds
        self.resolutions = None if resolutions is None else {_hw(r) for r in resolutions}
        self.steps = None if steps is None else set(steps)
        self.half, self.keep_graph = half, keep_graph
        self.step = -1
        self.latent_hw: tuple[int, int] | None = None
        self.sums: dict[tuple[str, tuple[int, int]], torch.Tensor] = {}
        self.counts: dict[tuple[str, tuple[int, int]], int] = {}
        self.maps: list[tuple[LayerInfo, tuple[int, int], torch.Tensor]] = []  # keep_graph only
        self.layers_seen: dict[tuple[str, tuple[int, int]], set[str]] = {}

    # -- called by the UNet hook and the processors ------------------------------------------------------------------
    def begin_call(self, sample: torch.Tensor):
        self.step += 1
        self.latent_hw = tuple(sample.shape[-2:])
        if self.keep_graph:
            self.maps = []

    def resolution_of(self, n_query: int) -> tuple[int, int]:
        h, w = self.latent_hw
        f = math.sqrt(h * w / n_query)
        return (round(h / f), round(w / f))

    def wants(self, info: LayerInfo, res) -> bool:
        return (info.kind in self.kinds and (self.resolutions is None or res in self.resolutions)
                and (self.steps is None or self.step in self.steps))

    def take(self, info: LayerInfo, res, probs: torch.Tensor):
        if self.half != "all":
            n = probs.shape[0] // 2
            probs = probs[n:] if self.half == "cond" else probs[:n]
        key = (info.kind, res)
        self.layers_seen.setdefault(key, set()).add(info.name)
        if self.keep_graph:
            self.maps.append((info, res, probs))
            return
        m = probs.detach().float().mean(1)  # average heads
        if key in self.sums:
            self.sums[key] += m
        else:
            self.sums[key] = m.clone()
        self.counts[key] = self.counts.get(key, 0) + 1

    # -- what a learner reads --------------------------------------------------------------------------------------
    def keys(self):
        return sorted(self.sums)

    def get(self, kind: str, res) -> torch.Tensor:
        """Mean map (batch × queries × keys) of one kind at one resolution, over heads, layers and kept steps."""
        key = (kind, _hw(res))
        if key not in self.sums:
            raise KeyError(f"no {kind}-attention was captured at {_hw(res)}; captured: {self.keys() or 'nothing'} "
                           "(check kinds=, resolutions= and steps= of the store)")
        return self.sums[key] / self.counts[key]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())

    def reset(self):
        self.sums.clear(); self.counts.clear(); self.maps = []; self.step = -1


def _hw(r) -> tuple[int, int]:
    return (r, r) if isinstance(r, int) else tuple(r)


@contextmanager
def capture_attention(unet, store: AttentionStore | None = None, **store_kw):
    """Install `store`'s processor on every attention layer of `unet`; restore the old processors on exit.

    with capture_attention(pipe.unet, kinds=("cross",), half="cond") as store:
        pipe(prompt)
    store.get("cross", 16)
    """
    store = store if store is not None else AttentionStore(**store_kw)
    old = unet.attn_processors
    infos = layer_infos(unet)
    unet.set_attn_processor({i.name: StoreProcessor(store, i) for i in infos})
    handle = unet.register_forward_pre_hook(lambda mod, args, kwargs: store.begin_call(
        args[0] if args else kwargs["sample"]), with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()
        unet.set_attn_processor(old)


def cross_maps(store: AttentionStore, size: tuple[int, int] | int | None = None, resolutions=None) -> torch.Tensor:
    """Cross-attention per token as images: batch × tokens × H × W.

    Each captured resolution's mean map is upsampled (bicubic, clamped at 0) to `size` (default: the largest
    captured resolution) and the resolutions are averaged, each weighted by its number of layers — the same as
    averaging every captured layer and head.
    """
    keys = [k for k in store.keys() if k[0] == "cross" and (resolutions is None or k[1] in {_hw(r) for r in resolutions})]
    if not keys:
        raise KeyError(f"no cross-attention in the store (captured: {store.keys() or 'nothing'}); capture with "
                       "kinds=('cross',)")
    size = _hw(size) if size is not None else max(k[1] for k in keys)
    total, weight = 0, 0
    for key in keys:
        m = store.get(*key)  # B × Q × K
        h, w = key[1]
        img = m.transpose(1, 2).reshape(m.shape[0], m.shape[2], h, w)
        if (h, w) != size:
            img = F.interpolate(img, size=size, mode="bicubic", align_corners=False).clamp(min=0)
        n = len(store.layers_seen[key])
        total, weight = total + n * img, weight + n
    return total / weight


def word_heatmap(store: AttentionStore, tokenizer, prompt: str, word: str, size=None, resolutions=None,
                 index: int = 0, occurrence: int | None = None) -> torch.Tensor:
    """H × W heat map of a word of the prompt (mean over its tokens), for batch element `index`."""
    from .text import token_positions
    pos = token_positions(tokenizer, prompt, word, occurrence)
    return cross_maps(store, size, resolutions)[index, pos].mean(0)

