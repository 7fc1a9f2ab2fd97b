"""Prompt-to-prompt editing (Hertz et al. 2022) of an inverted image, through the one attention hook.

Sample a batch of two from the inversion's noise — the source prompt and the edited prompt — and, while the UNet
runs, let the edited sample *borrow the source's attention*: its cross-attention maps (so every word keeps its
place in the image) for the first `cross_steps` of the steps, and the coarse self-attention (so the layout stays) for
the first `self_steps`. Three kinds of edit differ only in how the edited prompt's tokens map onto the source's:

- word swap ("circle" → "square"): same number of tokens, position i takes the source's map of position i;
- refinement (adding words, e.g. a colour): tokens are aligned, new tokens keep their own maps;
- re-weighting: the same prompt, one word's attention scaled by a factor.

Local blending keeps everything outside the edited word's region identical to the source: after each step, a mask
from the word's accumulated cross-attention (max-pooled, normalised, thresholded) decides where the edited latent
may differ from the source latent.

The controller is an `AttentionStore` installed with `helpers.attention.capture_attention`: a diffusers attention
processor, set and removed by a context manager, never a patched class. It edits the probabilities the store is
handed before they are applied to the values, and keeps running means of the cross-attention it needs for blending.
"""
from __future__ import annotations

from dataclasses import dataclass
from difflib import SequenceMatcher

import torch
import torch.nn.functional as F

from .attention import AttentionStore, _hw, capture_attention
from .inversion import Inversion, reconstruct
from .text import _check_length, token_positions

MODES = ("swap", "refine", "reweight")


def _ids(tokenizer, prompt: str) -> list[int]:
    _check_length(tokenizer, prompt)
    return tokenizer(prompt).input_ids  # start … end, no padding


def token_mapping(tokenizer, source: str, target: str, mode: str) -> torch.Tensor:
    """For each position of the encoded target prompt, the source position whose attention it takes (−1: its own).

    swap: the prompts must have the same number of tokens (position i ↔ i); refine: the prompts' tokens are aligned
    (longest matching blocks) and tokens new in the target get −1; reweight: identity. Padding after the end token
    is aligned from the end token on.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    n = tokenizer.model_max_length
    s, t = _ids(tokenizer, source), _ids(tokenizer, target)
    if mode == "reweight" and s != t:
        raise ValueError(f"re-weighting keeps the prompt; got {source!r} and {target!r} — to change words as well, use "
                         "mode='swap' or 'refine' with weights=")
    if mode in ("swap", "reweight"):
        if len(s) != len(t):
            raise ValueError(f"a word swap needs prompts with the same number of tokens: {source!r} has {len(s) - 2}, "
                             f"{target!r} has {len(t) - 2}; the swapped words tokenise differently — use "
                             "mode='refine', which aligns the tokens and lets new ones keep their own attention")
        return torch.arange(n)
    m = torch.full((n,), -1, dtype=torch.long)
    for a, b, size in SequenceMatcher(None, s[1:-1], t[1:-1], autojunk=False).get_matching_blocks():
        m[1 + b:1 + b + size] = torch.arange(1 + a, 1 + a + size)
    m[0] = 0
    tail = torch.arange(len(t) - 1, n)  # end token and padding
    src = tail - len(t) + len(s)
    m[tail[src < n]] = src[src < n]
    return m


class P2PController(AttentionStore):
    """Edits the attention of sample 1 (the edited prompt) from sample 0 (the source) in each half of the batch.

    mapping: target position → source position or −1 (see `token_mapping`); weights: a keys-long factor per target
    token (re-weighting), or None; cross_steps / self_steps: how many sampling steps replace cross / self attention;
    self_max_res: self-attention is replaced at latent resolutions up to this side (default: the latent side / 4,
    16×16 for SD's 64×64 latents, as the reference); blend_resolutions: where cross-attention is kept for blending.
    """

    def __init__(self, mapping, weights=None, cross_steps: int = 40, self_steps: int = 25, self_max_res=None,
                 blend_resolutions=None, cfg: bool = True):
        super().__init__(kinds=("cross", "self"), resolutions=None, half="cond" if cfg else "all")
        self.mapping, self.weights = mapping, weights
        self.cross_steps, self.self_steps, self.self_max_res = cross_steps, self_steps, self_max_res
        self.blend_resolutions = None if blend_resolutions is None else {_hw(r) for r in blend_resolutions}
        self.cfg = cfg

    def _self_max(self):
        return self.self_max_res if self.self_max_res is not None else max(self.latent_hw) // 4

    def _keep(self, info, res):
        return info.is_cross and (self.blend_resolutions is None or res in self.blend_resolutions)

    def wants(self, info, res) -> bool:
        if info.is_cross:
            return self.step < self.cross_steps or self._keep(info, res)
        return self.step < self.self_steps and max(res) <= self._self_max()

    def take(self, info, res, probs):
        b = probs.shape[0]
        halves = [slice(b // 2, b)] if self.cfg else [slice(0, b)]  # the reference edits the conditional half only
        for h in halves:
            p = probs[h]
            if p.shape[0] != 2:
                raise ValueError(f"prompt-to-prompt runs a batch of 2 (source, edit); got {p.shape[0]}")
            if info.is_cross:
                edited = p[1]
                if self.step < self.cross_steps:
                    mapped = (self.mapping >= 0).to(p.device)
                    edited = torch.where(mapped, p[0][..., self.mapping.clamp(min=0)], p[1])
                    if self.weights is not None:  # as the reference: scaled inside the replacement window only
                        edited = edited * self.weights.to(p.device, p.dtype)
                    p[1] = edited  # in place: the processor applies these probabilities to the values
            elif self.step < self.self_steps and max(res) <= self._self_max():
                p[1] = p[0]
        if self._keep(info, res):
            super().take(info, res, probs)


def blend_mask(store: AttentionStore, positions: list[list[int]], latent_hw, threshold: float = 0.3,
               pool: int = 3, resolutions=None) -> torch.Tensor:
    """Local-blend mask (batch × 1 × h × w, bool) from the accumulated cross-attention of each sample's words.

    positions[b]: the token positions whose maps are summed for sample b. As the reference: mean over the kept
    layers and heads, max-pool `pool`×`pool`, resize to the latent grid, divide by the maximum, > threshold.
    resolutions: use only these of the kept cross-attention resolutions (None: all kept).
    """
    maps = []
    want = None if resolutions is None else {_hw(r) for r in resolutions}
    for key in [k for k in store.keys() if k[0] == "cross" and (want is None or k[1] in want)]:
        m = store.get(*key)                             # batch × queries × keys
        h, w = key[1]
        n = len(store.layers_seen[key])
        words = torch.stack([m[b][:, pos].sum(-1) for b, pos in enumerate(positions)]).reshape(-1, 1, h, w)
        words = F.max_pool2d(words, pool, 1, pool // 2) if pool > 1 else words
        maps.append((n, F.interpolate(words, size=tuple(latent_hw), mode="bilinear", align_corners=False)))
    if not maps:
        raise KeyError(f"no cross-attention at {sorted(want) if want else 'any resolution'} was kept for blending "
                       f"(kept: {store.keys() or 'nothing'}); check blend_resolutions against the UNet's resolutions")
    total = sum(n * m for n, m in maps) / sum(n for n, _ in maps)
    total = total / total.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None, None]
    return total > threshold


@dataclass
class Edit:
    source: torch.Tensor   # latents of the source prompt's sample (the reconstruction, with attention hooked)
    edited: torch.Tensor   # latents of the edited prompt's sample
    mask: torch.Tensor | None  # the last local-blend mask (1 × 1 × h × w bool) or None
    prompts: tuple[str, str]
    store: P2PController       # the controller, with the running means of the kept cross-attention (cond half)
    positions: list[list[int]] | None  # the blend words' token positions in the source and the edited prompt


def _word_positions(tokenizer, prompt: str, words) -> list[int]:
    words = [words] if isinstance(words, str) else list(words)
    return [p for w in words for p in token_positions(tokenizer, prompt, w)]


def edit(pipe, inv: Inversion, target: str, mode: str = "swap", blend=None, weights: dict | None = None,
         cross_steps: float = 0.8, self_steps: float = 0.5, self_max_res=None, blend_resolutions=None,
         threshold: float = 0.3, blend_start: float = 0.2, guidance: float | None = None,
         steps: int | None = None, use_blend: bool = True) -> Edit:
    """Prompt-to-prompt edit of an inverted image: sample [inv.prompt, target] from inv's noise, attention shared.

    mode: "swap", "refine" or "reweight" (see the module doc). blend: (source words, target words) whose
    cross-attention defines the local-blend region (None: no blending). weights: {word of target: factor}.
    cross_steps, self_steps, blend_start: fractions of the sampling steps. steps: if given, must equal inv.steps.
    use_blend=False keeps the blend words' attention (in `Edit.store`) without blending, to measure masks.
    """
    if steps is not None and steps != inv.steps:
        raise ValueError(f"the image was inverted with {inv.steps} DDIM steps but the edit asks for {steps}; the "
                         f"inverted noise and null embeddings belong to the {inv.steps}-step schedule: invert again "
                         f"with steps={steps}, or edit with steps={inv.steps}")
    tok = pipe.tokenizer
    source = inv.prompt
    mapping = token_mapping(tok, source, target, mode)
    w = None
    if weights:
        w = torch.ones(tok.model_max_length)
        for word, factor in weights.items():
            w[token_positions(tok, target, word)] = float(factor)
    elif mode == "reweight":
        raise ValueError("mode='reweight' needs weights={word: factor}, e.g. weights={'red': 2.0}")
    guidance = inv.guidance if guidance is None else guidance
    n = inv.steps
    ctrl = P2PController(mapping, w, round(cross_steps * n), round(self_steps * n), self_max_res, blend_resolutions,
                         cfg=guidance != 1.0)
    positions = None
    if blend is not None:
        if not (isinstance(blend, (tuple, list)) and len(blend) == 2):
            raise ValueError(f"blend is (source words, target words), e.g. ('circle', 'square'); got {blend!r}")
        src_words, tgt_words = blend
        positions = [_word_positions(tok, source, src_words), _word_positions(tok, target, tgt_words)]
    last = {}

    def callback(i, t, x):
        if positions is None or not use_blend or i < round(blend_start * n):
            return None
        mask = blend_mask(ctrl, positions, x.shape[-2:], threshold)
        mask = mask[:1] | mask[1:]  # source region ∪ edited region
        last["mask"] = mask
        return torch.cat([x[:1], x[:1] + mask.to(x.dtype) * (x[1:] - x[:1])])

    with capture_attention(pipe.unet, ctrl):
        x = reconstruct(pipe, inv, [source, target], guidance, callback=callback, steps=steps)
    return Edit(x[:1], x[1:], last.get("mask"), (source, target), ctrl, positions)


def edit_scores(pipe, e: Edit, image, region, colour: str | None = None, old_colour: str | None = None) -> dict:
    """How an edit did, from the toy world's ground truth: the input `image` (uint8) and the edited object's `region`.

    outside: PSNR (dB) of the edited image against the input outside the region (preservation); outside_vs_source:
    the same against the source branch (what local blending controls, free of the inversion's error); inside_change:
    PSNR inside the region between edited and source branch (low = the object changed); with `colour`, the share of
    the region's pixels of that toy colour in the source and in the edit (and likewise for `old_colour`).
    """
    import numpy as np
    from .images import decode_pil
    from .metrics import psnr
    from .toyworld import colour_fraction
    src, out = np.asarray(decode_pil(pipe, e.source)[0]), np.asarray(decode_pil(pipe, e.edited)[0])
    region = np.asarray(region, bool)
    s = dict(outside=psnr(out, image, mask=~region), outside_vs_source=psnr(out, src, mask=~region),
             inside_change=psnr(out, src, mask=region), images=(src, out))
    for key, c in (("colour", colour), ("old_colour", old_colour)):
        if c is not None:
            s[f"{key}_before"], s[f"{key}_after"] = colour_fraction(src, region, c), colour_fraction(out, region, c)
    return s

