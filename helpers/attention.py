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

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
import math
import warnings

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


def layer_resolutions(unet, latent_hw=None) -> dict[str, tuple[int, int]]:
    """{processor name: (h, w)} — the grid each attention layer of a UNet2DConditionModel works at, read from its
    structure, no call needed.

    latent_hw: the latent grid the UNet will see (default: its config's sample_size). Down block i works at the
    latent size halved once per down-sampler before it; the mid block at the smallest size; up block i mirrors down
    block N−1−i.
    """
    h, w = _hw(latent_hw if latent_hw is not None else unet.config.sample_size)
    down = []
    for block in unet.down_blocks:
        down.append((h, w))
        if getattr(block, "downsamplers", None):
            h, w = -(-h // 2), -(-w // 2)  # stride-2 convolution with padding 1: ceil(h / 2)
    out = {}
    for info in layer_infos(unet):
        if info.place == "mid":
            out[info.name] = (h, w)
        else:
            i = int(info.name.split(".")[1])
            out[info.name] = down[i] if info.place == "down" else down[len(down) - 1 - i]
    return out


def attention_layout(unet, latent_hw=None) -> dict[tuple[str, tuple[int, int]], int]:
    """{(kind, (h, w)): number of attention layers} of a UNet, from its structure (see `layer_resolutions`).
    `capture_attention` on a real call finds the same layers (tested for the toy model and SD 1.x)."""
    res = layer_resolutions(unet, latent_hw)
    return dict(Counter((info.kind, res[info.name]) for info in layer_infos(unet)))


class EmptyStoreError(RuntimeError):
    """An attention store was read before any UNet call ran inside `capture_attention`."""


class SplitWordWarning(UserWarning):
    """A word of the prompt is several tokens; its heat map is the mean of their maps."""


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
    per_step: keep one running mean per kept step as well (memory × kept steps), so `get(..., steps=[i, j])` can
    average any subset of them afterwards (e.g. IoU over timesteps).

    The memory a store will hold is known before running: `store.expected_nbytes(unet, batch, latent_hw, n_tokens)`
    equals `store.nbytes()` after the calls.
    """

    def __init__(self, kinds=("cross",), resolutions=None, steps=None, half="all", keep_graph=False,
                 per_step: bool = False):
        kinds = tuple([kinds] if isinstance(kinds, str) else kinds)
        if not kinds or any(k not in ("cross", "self") for k in kinds):
            raise ValueError(f"kinds must be a non-empty subset of ('cross', 'self'), not {kinds}")
        if half not in ("cond", "uncond", "all"):
            raise ValueError(f"half must be 'cond', 'uncond' or 'all', not {half!r}")
        self.kinds = kinds
        self.resolutions = None if resolutions is None else {_hw(r) for r in resolutions}
        self.steps = None if steps is None else set(steps)
        if per_step and keep_graph:
            raise ValueError("per_step keeps running means; keep_graph keeps every map of the last call: choose one")
        self.half, self.keep_graph, self.per_step = half, keep_graph, per_step
        self.step = -1
        self.latent_hw: tuple[int, int] | None = None
        self.sums: dict[tuple[str, tuple[int, int]], torch.Tensor] = {}
        self.counts: dict[tuple[str, tuple[int, int]], int] = {}
        self.maps: list[tuple[LayerInfo, tuple[int, int], torch.Tensor]] = []  # keep_graph only
        self.layers_seen: dict[tuple[str, tuple[int, int]], set[str]] = {}
        self.step_sums: dict[tuple[str, tuple[int, int], int], torch.Tensor] = {}  # per_step only
        self.step_counts: dict[tuple[str, tuple[int, int], int], int] = {}

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
        sums, counts = (self.step_sums, self.step_counts) if self.per_step else (self.sums, self.counts)
        if self.per_step:
            key = (*key, self.step)
        if key in sums:
            sums[key] += m
        else:
            sums[key] = m.clone()
        counts[key] = counts.get(key, 0) + 1

    # -- what a learner reads --------------------------------------------------------------------------------------
    def keys(self):
        if self.per_step:
            return sorted({k[:2] for k in self.step_sums})
        return sorted(self.sums)

    def steps_kept(self) -> list[int]:
        """The UNet calls (0, 1, …) whose maps the store holds one by one (per_step=True)."""
        return sorted({k[2] for k in self.step_sums})

    def check_ran(self):
        """Raise a clear error if no UNet call has run through the store yet."""
        if self.step < 0:
            raise EmptyStoreError(
                "the attention store is empty: no UNet call has run inside `capture_attention` yet. Call the pipeline "
                "(or the UNet) inside the `with capture_attention(...) as store:` block, then read the store.")

    def get(self, kind: str, res, steps=None) -> torch.Tensor:
        """Mean map (batch × queries × keys) of one kind at one resolution, over heads, layers and kept steps.

        steps: with per_step=True, average only these UNet calls (0-based); None averages all kept steps.
        """
        self.check_ran()
        key = (kind, _hw(res))
        if key not in self.keys():
            raise KeyError(f"no {kind}-attention was captured at {_hw(res)}; captured: {self.keys() or 'nothing'} "
                           f"in {self.step + 1} UNet call(s) (check kinds=, resolutions= and steps="
                           f"{sorted(self.steps) if self.steps is not None else None} of the store)")
        if not self.per_step:
            if steps is not None:
                raise ValueError("this store averaged its steps as they ran; to read single steps, capture with "
                                 "AttentionStore(..., per_step=True)")
            return self.sums[key] / self.counts[key]
        kept = self.steps_kept()
        want = kept if steps is None else sorted({int(s) for s in steps})
        missing = [s for s in want if s not in kept]
        if missing or not want:
            raise KeyError(f"steps {missing or want} were not kept; the store holds steps {kept}")
        total = sum(self.step_sums[(*key, s)] for s in want)
        return total / sum(self.step_counts[(*key, s)] for s in want)

    def nbytes(self) -> int:
        """Bytes held by the store's running means."""
        return sum(t.numel() * t.element_size() for d in (self.sums, self.step_sums) for t in d.values())

    def expected_nbytes(self, unet, batch: int, latent_hw=None, n_tokens: int | None = None,
                        n_steps: int | None = None) -> int:
        """What `nbytes()` will be after running `unet` on batches of `batch` (both guidance halves counted) at
        `latent_hw` (default: the UNet's sample_size), with prompts of `n_tokens` tokens (the tokenizer's
        model_max_length), for `n_steps` UNet calls (needed with per_step=True; None: every kept step runs).

        Maps are float32, averaged over heads and layers: one batch × queries × keys tensor per (kind, resolution),
        times the kept steps with per_step=True.
        """
        if self.keep_graph:
            raise ValueError("a keep_graph store keeps every map of the last call with its graph; its size is not a "
                             "running mean's — predict it for keep_graph=False")
        if "cross" in self.kinds and n_tokens is None:
            raise ValueError("cross-attention maps have one column per token: pass n_tokens "
                             "(pipe.tokenizer.model_max_length, 77 for Stable Diffusion)")
        kept_batch = {"all": batch, "cond": batch - batch // 2, "uncond": batch // 2}[self.half]
        n_kept = 1
        if self.per_step:
            if self.steps is None and n_steps is None:
                raise ValueError("with per_step=True and steps=None the store keeps every call: pass n_steps")
            n_kept = len(self.steps if n_steps is None else
                         [s for s in range(n_steps) if self.steps is None or s in self.steps])
        elif self.steps is not None and n_steps is not None and not any(s < n_steps for s in self.steps):
            return 0
        total = 0
        for (kind, (h, w)), _n in attention_layout(unet, latent_hw).items():
            if kind in self.kinds and (self.resolutions is None or (h, w) in self.resolutions):
                q = h * w
                total += kept_batch * q * (n_tokens if kind == "cross" else q) * 4 * n_kept
        return total

    def reset(self):
        self.sums.clear(); self.counts.clear(); self.maps = []; self.step = -1
        self.step_sums.clear(); self.step_counts.clear()


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


def cross_maps(store: AttentionStore, size: tuple[int, int] | int | None = None, resolutions=None,
               steps=None, tokens: int | None = None) -> torch.Tensor:
    """Cross-attention per token as images: batch × tokens × H × W.

    Each captured resolution's mean map is upsampled (bicubic, clamped at 0) to `size` (default: the largest
    captured resolution) and the resolutions are averaged, each weighted by its number of layers — the same as
    averaging every captured layer and head. steps: a subset of the kept steps (stores with per_step=True).
    tokens: keep only the first `tokens` token positions (the prompt's, start token included) — upsampling the
    padding's maps is most of the work for short prompts.
    """
    store.check_ran()
    keys = [k for k in store.keys() if k[0] == "cross" and (resolutions is None or k[1] in {_hw(r) for r in resolutions})]
    if not keys:
        raise KeyError(f"no cross-attention in the store (captured: {store.keys() or 'nothing'}); capture with "
                       "kinds=('cross',)")
    size = _hw(size) if size is not None else max(k[1] for k in keys)
    total, weight = 0, 0
    for key in keys:
        m = store.get(*key, steps=steps) if steps is not None else store.get(*key)  # B × Q × K
        if tokens is not None:
            m = m[..., :tokens]
        h, w = key[1]
        img = m.transpose(1, 2).reshape(m.shape[0], m.shape[2], h, w)
        if (h, w) != size:
            img = F.interpolate(img, size=size, mode="bicubic", align_corners=False).clamp(min=0)
        n = len(store.layers_seen[key])
        total, weight = total + n * img, weight + n
    return total / weight


def word_heatmap(store: AttentionStore, tokenizer, prompt: str, word: str, size=None, resolutions=None,
                 index: int = 0, occurrence: int | None = None, steps=None, maps: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """H × W heat map of a word of the prompt (mean over its tokens), for batch element `index`.

    A word the tokenizer splits into several tokens gets the mean of their maps, with a `SplitWordWarning` naming
    the tokens. maps: `cross_maps(store, …)` computed once, to reuse for many words.
    """
    from .text import token_positions, word_tokens
    store.check_ran()
    pos = token_positions(tokenizer, prompt, word, occurrence)
    split = [(w, t) for w, t in word_tokens(tokenizer, word) if len(t) > 1]
    if split:
        warnings.warn("; ".join(f"'{w}' is {len(t)} tokens {t}" for w, t in split) +
                      f" — its heat map is the mean of their maps (token positions {pos})", SplitWordWarning,
                      stacklevel=2)
    if maps is None:
        maps = cross_maps(store, size, resolutions, steps)
    return maps[index, pos].mean(0)

