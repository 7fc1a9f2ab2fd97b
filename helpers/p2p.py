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

Every attention resolution is a fraction of the latent side, so one setting serves the toy's 16×16 latents and SD's
64×64 ones. `PRESETS["reference"]` follows the real-image reference (google/prompt-to-prompt, `null_text_w_ptp`);
`PRESETS["course"]` departs from it where the toy model measured better on tuning scenes (`bench/prompt_to_prompt.py`
prints both, and each departure).

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

# Resolutions are fractions of the latent side (SD 1.x: 64, so 1/2 → 32×32 and 1/4 → 16×16; the toy: 16 → 8, 4).
# self_max: self-attention is replaced at layers whose side is at most this; blend_scales: the cross-attention
# resolutions the local-blend mask is built from; resize: how the mask reaches the latent grid; threshold: of the
# mask divided by its maximum.
PRESETS = {
    # null_text_w_ptp: self-attention replaced where queries <= 32² (SD's 64² latent); LocalBlend reads the
    # 16×16 maps (down_cross[2:4] + up_cross[:3]), 3×3 max-pool, nearest resize (F.interpolate's default), > 0.3.
    "reference": dict(self_max=1 / 2, blend_scales=(1 / 4,), resize="nearest", threshold=0.3),
    # chosen on tuning scenes of the toy model (held-out 5000…, `python bench/prompt_to_prompt.py`): the blend reads
    # the finest maps (latent/1; latent/4 is the toy's 4×4 mid block, which localises poorly) at 0.5, and
    # self-attention is shared up to latent/4. The blend kept the edited region's outside closer to the input there,
    # the cap a little closer in two of three edits. At latent/1 nothing is resized: the resize mode is the reference's.
    "course": dict(self_max=1 / 4, blend_scales=(1,), resize="nearest", threshold=0.5),
}


def preset_settings(preset: str = "course", **overrides) -> dict:
    """A preset's settings (see `PRESETS`), with any non-None override applied."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, not {preset!r}")
    out = dict(PRESETS[preset])
    unknown = set(overrides) - set(out)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; known: {sorted(out)}")
    out.update({k: v for k, v in overrides.items() if v is not None})
    if out["resize"] not in ("nearest", "bilinear"):
        raise ValueError(f"resize must be 'nearest' (the reference) or 'bilinear', not {out['resize']!r}")
    if not 0 < out["self_max"] <= 1 or any(not 0 < f <= 1 for f in out["blend_scales"]):
        raise ValueError(f"self_max and blend_scales are fractions of the latent side in (0, 1]; got "
                         f"{out['self_max']!r} and {out['blend_scales']!r} (e.g. 1/4 is 16×16 on SD's 64×64 latent)")
    return out


def side_of(latent_hw, fraction: float) -> int:
    """The attention side at `fraction` of the latent side (latent 64: 1/4 → 16; latent 16: 1/4 → 4)."""
    return max(1, round(max(latent_hw) * fraction))


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
    self_max: self-attention is replaced at layers whose side is at most this fraction of the latent side (the
    reference: 1/2, i.e. 32×32 on SD's 64×64 latent); self_max_res: the same as an absolute side (overrides);
    blend_scales (fractions of the latent side) or blend_resolutions (absolute): where cross-attention is kept for
    blending (None: every resolution).
    """

    def __init__(self, mapping, weights=None, cross_steps: int = 40, self_steps: int = 25, self_max_res=None,
                 blend_resolutions=None, cfg: bool = True, self_max: float = 1 / 2, blend_scales=None):
        super().__init__(kinds=("cross", "self"), resolutions=None, half="cond" if cfg else "all")
        self.mapping, self.weights = mapping, weights
        self.cross_steps, self.self_steps, self.self_max_res = cross_steps, self_steps, self_max_res
        self.self_max = self_max
        self.blend_resolutions = None if blend_resolutions is None else {_hw(r) for r in blend_resolutions}
        self.blend_scales = None if blend_scales is None else tuple(blend_scales)
        self.cfg = cfg

    def _self_max(self):
        return self.self_max_res if self.self_max_res is not None else side_of(self.latent_hw, self.self_max)

    def blend_sides(self):
        """The cross-attention resolutions kept for blending ((h, w) set), or None for all."""
        if self.blend_resolutions is not None:
            return self.blend_resolutions
        if self.blend_scales is not None:
            return {_hw(side_of(self.latent_hw, f)) for f in self.blend_scales}
        return None

    def _keep(self, info, res):
        sides = self.blend_sides()
        return info.is_cross and (sides is None or res in sides)

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
               pool: int = 3, resolutions=None, scales=None, resize: str = "nearest") -> torch.Tensor:
    """Local-blend mask (batch × 1 × h × w, bool) from the accumulated cross-attention of each sample's words.

    positions[b]: the token positions whose maps are summed for sample b. As the reference: mean over the kept
    layers and heads, max-pool `pool`×`pool`, resize to the latent grid (`resize`: "nearest" as the reference, or
    "bilinear"), divide by the maximum, > threshold. scales (fractions of the latent side) or resolutions
    (absolute sides): use only these of the kept cross-attention resolutions (None: all kept).
    """
    if resize not in ("nearest", "bilinear"):
        raise ValueError(f"resize must be 'nearest' (the reference) or 'bilinear', not {resize!r}")
    maps = []
    if scales is not None:
        resolutions = [side_of(latent_hw, f) for f in scales]
    want = None if resolutions is None else {_hw(r) for r in resolutions}
    for key in [k for k in store.keys() if k[0] == "cross" and (want is None or k[1] in want)]:
        m = store.get(*key)                             # batch × queries × keys
        h, w = key[1]
        n = len(store.layers_seen[key])
        words = torch.stack([m[b][:, pos].sum(-1) for b, pos in enumerate(positions)]).reshape(-1, 1, h, w)
        words = F.max_pool2d(words, pool, 1, pool // 2) if pool > 1 else words
        kw = dict(mode="bilinear", align_corners=False) if resize == "bilinear" else dict(mode="nearest")
        maps.append((n, F.interpolate(words, size=tuple(latent_hw), **kw)))
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
    settings: dict | None = None       # the resolved preset: self_max, blend_scales, resize, threshold


def _word_positions(tokenizer, prompt: str, words, changed=()) -> list[int]:
    """Token positions of `words` in `prompt`. A word that occurs several times keeps only the occurrences that
    touch a `changed` position (in "a green square … a red square", the swapped square, not the green one); when
    none does, every occurrence."""
    out = []
    for w in [words] if isinstance(words, str) else list(words):
        every, first = token_positions(tokenizer, prompt, w), token_positions(tokenizer, prompt, w, occurrence=0)
        occ = [token_positions(tokenizer, prompt, w, occurrence=k) for k in range(len(every) // len(first))]
        hit = [o for o in occ if set(o) & set(changed)]
        out += [p for o in (hit or occ) for p in o]
    return out


def _changed(tokenizer, source: str, target: str, mapping) -> tuple[set, set]:
    """Positions whose tokens the edit changes: (in the source, in the target)."""
    s, t = _ids(tokenizer, source), _ids(tokenizer, target)
    if len(s) == len(t):
        diff = {i for i in range(len(s)) if s[i] != t[i]}
        return diff, diff
    m = mapping[:len(t)].tolist()
    return {i for i in range(len(s)) if i not in m}, {i for i in range(len(t)) if m[i] < 0}


def edit(pipe, inv: Inversion, target: str, mode: str = "swap", blend=None, weights: dict | None = None,
         cross_steps: float = 0.8, self_steps: float = 0.5, self_max_res=None, blend_resolutions=None,
         threshold: float | None = None, blend_start: float = 0.2, guidance: float | None = None,
         steps: int | None = None, use_blend: bool = True, preset: str = "course", self_max: float | None = None,
         blend_scales=None, resize: str | None = None) -> Edit:
    """Prompt-to-prompt edit of an inverted image: sample [inv.prompt, target] from inv's noise, attention shared.

    mode: "swap", "refine" or "reweight" (see the module doc). blend: (source words, target words) whose
    cross-attention defines the local-blend region (None: no blending); a repeated word counts only where the edit
    changes it. weights: {word of target: factor}. cross_steps, self_steps, blend_start: fractions of the sampling
    steps. steps: if given, must equal inv.steps. use_blend=False keeps the blend words' attention (in `Edit.store`,
    at every resolution unless blend_resolutions= says otherwise) without blending, to measure masks.
    preset: "course" or "reference" (`PRESETS`: self-attention cap, blend resolutions, resize, threshold, all
    relative to the latent side); self_max, blend_scales, resize, threshold override it one by one, and
    self_max_res / blend_resolutions (absolute sides) override those.
    """
    cfg = preset_settings(preset, self_max=self_max, blend_scales=blend_scales, resize=resize, threshold=threshold)
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
                         cfg=guidance != 1.0, self_max=cfg["self_max"],
                         blend_scales=cfg["blend_scales"] if use_blend else None)
    positions = None
    if blend is not None:
        if not (isinstance(blend, (tuple, list)) and len(blend) == 2):
            raise ValueError(f"blend is (source words, target words), e.g. ('circle', 'square'); got {blend!r}")
        src_words, tgt_words = blend
        ch_s, ch_t = _changed(tok, source, target, mapping)
        if w is not None:
            ch_t = ch_s = {int(i) for i in torch.nonzero(w != 1).flatten()}
        positions = [_word_positions(tok, source, src_words, ch_s), _word_positions(tok, target, tgt_words, ch_t)]
    last = {}

    def callback(i, t, x):
        if positions is None or not use_blend or i < round(blend_start * n):
            return None
        mask = blend_mask(ctrl, positions, x.shape[-2:], cfg["threshold"], resize=cfg["resize"])
        mask = mask[:1] | mask[1:]  # source region ∪ edited region
        last["mask"] = mask
        return torch.cat([x[:1], x[:1] + mask.to(x.dtype) * (x[1:] - x[:1])])

    with capture_attention(pipe.unet, ctrl):
        x = reconstruct(pipe, inv, [source, target], guidance, callback=callback, steps=steps)
    return Edit(x[:1], x[1:], last.get("mask"), (source, target), ctrl, positions, cfg)


def edit_scores(pipe, e: Edit, image, region, colour: str | None = None, old_colour: str | None = None,
                shape: str | None = None, away: bool = False) -> dict:
    """How an edit did, from the toy world's ground truth: the input `image` (uint8) and the edited object's `region`.

    outside: PSNR (dB) of the edited image against the input outside the region (preservation); outside_vs_source:
    the same against the source branch (what local blending controls, free of the inversion's error); inside_change:
    PSNR inside the region between edited and source branch (low = the object changed); with `colour`, the share of
    the region's pixels of that toy colour in the source and in the edit (and likewise for `old_colour`).
    success / reason: the toy world's detector on the edit (`toyworld.edit_verdict`: an object in the region, of
    `colour` and/or `shape`; "no object in the region" when none). away=True (re-weighting a colour word down):
    success is an object still in the region whose colour is no longer `old_colour`. found: the detected object.
    """
    import numpy as np
    from .images import decode_pil
    from .metrics import psnr
    from .toyworld import colour_fraction, edit_verdict, object_in
    src, out = np.asarray(decode_pil(pipe, e.source)[0]), np.asarray(decode_pil(pipe, e.edited)[0])
    region = np.asarray(region, bool)
    s = dict(outside=psnr(out, image, mask=~region), outside_vs_source=psnr(out, src, mask=~region),
             inside_change=psnr(out, src, mask=region), images=(src, out))
    for key, c in (("colour", colour), ("old_colour", old_colour)):
        if c is not None:
            s[f"{key}_before"], s[f"{key}_after"] = colour_fraction(src, region, c), colour_fraction(out, region, c)
    if away:
        if old_colour is None:
            raise ValueError("away=True checks that the object lost its colour: pass old_colour=")
        f = object_in(out, region)
        ok = f is not None and f.colour != old_colour
        why = ("no object in the region" if f is None else
               f"the object there is still {old_colour}" if not ok else f"the object there is now {f.colour}")
        s.update(success=ok, reason=why, found=f)
    elif colour is not None or shape is not None:
        v = edit_verdict(out, region, colour=colour, shape=shape)
        s.update(success=v.success, reason=v.reason, found=v.found)
    return s

