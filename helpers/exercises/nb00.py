"""Checks of notebook 00 (a tour of Stable Diffusion): exercises 00.1-00.5.

Each check recomputes its reference with the course's helpers, the way the notebook's own cells do (section 8's
guided loop, section 9's img2img edit, section 10's `shape_heatmap_iou`), on fixed held-out scenes, and caches it
per pipeline.
"""
from __future__ import annotations

import numpy as np
import torch

from ._common import _call, _keys_hint, _need_pipe, _number, _store, _verdict

# only the checks go into `helpers.exercises`; the references stay here (exercises.nb00.adherence_rates, …)
__all__ = ["check_00_1", "check_00_2", "check_00_3", "check_00_4", "check_00_5"]

GUIDANCES_00_1 = (1.0, 2.0, 4.0, 7.5, 15.0)
CAPTIONS_00_1 = range(200, 208)   # exercise 00.1 generates the captions of held-out scenes 200…207
STEPS_00_1 = 5                    # a quick sampler: the scan over scales stays cheap, and its failures show
SECTION_STEPS = 25                # the notebook's STEPS (sections 8 and 9), a usual slip in 00.1
PROMPT_00_2, NEGATIVE_00_2 = "a blue square", "a red circle"
TIMESTEPS_00_3 = (100, 300, 500, 700, 900)
SCENES_00_3 = range(300, 308)     # exercises 00.3 and 00.4: the first object of held-out scenes 300…307
SECTION_SCENES = range(300, 316)  # section 10's 16 scenes
KINDS_00_4 = ("shape", "colour", "phrase")
T_00_4 = 500
SCENES_00_5 = range(3, 8)         # exercise 00.5: section 9's edit on held-out scenes 3…7
STRENGTHS_00_5 = tuple(round(0.05 * k, 2) for k in range(1, 21))
TURNED = 0.5                      # section 9: an object "takes its new colour" when half of its region has it
IOU_TOL = 1e-3                    # mean IoU: one pixel more or less in one scene moves it by ~3e-4


def _rate_hint(v, where: str) -> str | None:
    """A hint when v is not a share in [0, 1]."""
    if not _number(v):
        return f"{where}: expected a number, got {v!r}"
    if 1 < float(v) <= 100:
        return f"{where}: {float(v):g} looks like a percentage; give a fraction in [0, 1]"
    if not 0 <= float(v) <= 1:
        return f"{where}: {float(v):g} is not a fraction (those lie in [0, 1])"
    return None


# -- 00.1 guidance -----------------------------------------------------------------------------------------------
def adherence(pipe, guidance: float, seed: int = 0, steps: int = STEPS_00_1, captions=CAPTIONS_00_1) -> list[bool]:
    """Exercise 00.1's reference: does each caption's image (one batch of `random_latents(pipe, n, seed)`, `steps`
    DDIM steps at `guidance`) contain exactly the colours its caption names (`tw.adheres`)? Cached."""
    from .. import toyworld as tw
    from ..images import decode_pil
    from ..sampling import denoise, random_latents
    caps = [tw.heldout_scene(i).caption for i in captions]
    key = ("00.1", float(guidance), int(seed), int(steps), tuple(captions))
    store = _store(pipe)
    if key not in store:
        with torch.no_grad():
            lat = denoise(pipe, random_latents(pipe, len(caps), seed), caps, steps=steps, guidance=guidance)
        store[key] = [tw.adheres(np.asarray(im), c) for c, im in zip(caps, decode_pil(pipe, lat))]
    return store[key]


def adherence_rates(pipe, seed: int = 0, steps: int = STEPS_00_1, captions=CAPTIONS_00_1,
                    guidances=GUIDANCES_00_1) -> dict:
    """{guidance: share of the captions whose image adheres} (exercise 00.1's reference)."""
    return {float(g): float(np.mean(adherence(pipe, g, seed, steps, captions))) for g in guidances}


def check_00_1(answer, pipe=None, seed: int = 0, strict: bool = False, captions=CAPTIONS_00_1,
               steps: int = STEPS_00_1):
    """00.1 Guidance. answer: {g: adherence rate} for g in GUIDANCES_00_1: the captions of held-out scenes 200…207,
    generated in one batch from `random_latents(pipe, 8, seed)` with `steps` (5) DDIM steps at guidance g."""
    n = len(captions)

    def grade(ans):
        _need_pipe(pipe, "exercises.check_00_1(answer, pipe, SEED)")
        value, hint = _keys_hint(ans, GUIDANCES_00_1, "the guidance scales", "{g: adherence rate}")
        if hint:
            return hint
        for g in GUIDANCES_00_1:
            hint = _rate_hint(value[g], f"at g = {g:g}")
            if hint:
                return hint
        ref = adherence_rates(pipe, seed, steps, captions)
        if len({round(float(v), 9) for v in value.values()}) == 1 and len(set(ref.values())) > 1:
            return (f"your rate is {float(value[1.0]):.3f} at every scale, but the scales differ: did you pass "
                    "guidance=g to each run?")
        for g in GUIDANCES_00_1:
            v, exp = float(value[g]), ref[g]
            if abs(v - exp) < 1e-9:
                continue
            k = v * n
            if abs(k - round(k)) > 1e-6:
                return (f"at g = {g:g}: {v:.4f} is not a count out of the {n} captions (k/{n}): score every "
                        f"caption of held-out scenes {captions.start}…{captions.stop - 1}")
            got = f"at g = {g:g} your rate is {v:.3f} ({round(k)}/{n} captions adhere)"
            if steps != SECTION_STEPS and abs(v - float(np.mean(adherence(pipe, g, seed, SECTION_STEPS,
                                                                          captions)))) < 1e-9:
                return (f"{got}: that is the rate with section 8's {SECTION_STEPS} steps; the exercise uses "
                        f"steps={steps}")
            return (f"{got}; the reference has {round(exp * n)}/{n}. Generate all {n} captions in one batch from "
                    f"random_latents(pipe, {n}, SEED), with steps={steps} and guidance={g:g}, decode them "
                    "(decode_pil) and score each image with tw.adheres(np.asarray(image), caption)")
        return None
    return _verdict("00.1", answer, grade, strict)


# -- 00.2 negative prompts ---------------------------------------------------------------------------------------
def negative_sample(pipe, prompt: str, negative: str = "", steps: int = 25, seed: int = 0,
                    guidance: float = 7.5) -> torch.Tensor:
    """Exercise 00.2's reference: section 8's `sample` with `negative` in place of the empty prompt (latents)."""
    from ..sampling import denoise, random_latents
    key = ("00.2", prompt, negative, int(steps), int(seed), float(guidance))
    store = _store(pipe)
    if key not in store:
        with torch.no_grad():
            store[key] = denoise(pipe, random_latents(pipe, 1, seed), prompt, steps=steps, guidance=guidance,
                                 negative=negative)
    return store[key]


def _latents(out, like: torch.Tensor):
    """(tensor, None) or (None, a hint) for what a student's sampler returned."""
    if not isinstance(out, torch.Tensor):
        return None, (f"expected latents (a tensor of shape {tuple(like.shape)}, as section 8's sample returns), "
                      f"got {type(out).__name__}")
    if tuple(out.shape) != tuple(like.shape):
        extra = " (an image? return the latents, before decoding)" if out.ndim >= 3 and out.shape[-1] != \
            like.shape[-1] else ""
        return None, f"expected latents of shape {tuple(like.shape)}, got {tuple(out.shape)}{extra}"
    out = out.detach().to(like.device, like.dtype)
    if not torch.isfinite(out).all():
        return None, "your latents contain NaN or inf"
    return out, None


def check_00_2(answer, pipe=None, steps: int = 25, seed: int = 0, strict: bool = False, atol: float = 1e-3):
    """00.2 Negative prompts. answer: sample_neg(prompt, negative) -> latents: section 8's sample (guidance 7.5,
    `steps` steps, `seed`) with the empty prompt replaced by `negative`."""
    p, n = PROMPT_00_2, NEGATIVE_00_2

    def same(a, b):
        return torch.allclose(a, b, atol=atol, rtol=0)

    def grade(fn):
        _need_pipe(pipe, "exercises.check_00_2(answer, pipe, STEPS, SEED)")
        ref = negative_sample(pipe, p, n, steps, seed)
        out, hint = _call(fn, p, n)
        if hint:
            return hint
        out, hint = _latents(out, ref)
        if hint:
            return hint
        call = f"sample_neg({p!r}, {n!r})"
        if not same(out, ref):
            if same(out, negative_sample(pipe, p, "", steps, seed)):
                return (f"{call} gives section 8's plain sample: the negative prompt is not used. Embed it in "
                        "place of the empty prompt: e_neg from embed(pipe, negative)")
            if same(out, negative_sample(pipe, n, p, steps, seed)):
                return (f"{call} gives the sample of {n!r} with the negative {p!r}: prompt and negative are "
                        "swapped (ε = ε_neg + g·(ε_text − ε_neg); the UNet's batch is [negative, prompt])")
            if same(out, negative_sample(pipe, p, n, steps, seed, guidance=1.0)):
                return (f"{call} gives the unguided sample (g = 1): apply the guidance "
                        "ε_neg + g·(ε_text − ε_neg) with g = 7.5")
            return (f"{call} differs from the reference by up to {float((out - ref).abs().max()):.3g}: start from "
                    f"section 8's sample (seed SEED, {steps} steps, guidance 7.5) and change only the empty prompt")
        out, hint = _call(fn, p, "")
        if hint:
            return f"with an empty negative, {hint}"
        out, hint = _latents(out, ref)
        if hint:
            return f"with an empty negative: {hint}"
        if not same(out, negative_sample(pipe, p, "", steps, seed)):
            return (f"sample_neg({p!r}, '') should be section 8's plain sample, and is not: is the negative "
                    "prompt fixed inside your function instead of taken from its argument?")
        return None
    return _verdict("00.2", answer, grade, strict)


# -- 00.3 and 00.4 heat maps -------------------------------------------------------------------------------------
def _word(obj, kind: str) -> str:
    return {"shape": obj.shape, "colour": obj.colour, "phrase": obj.phrase}[kind]


def heatmap_iou(pipe, scene_index: int, t: int = 500, kind: str = "shape", seed: int = 0) -> float:
    """Section 10's `shape_heatmap_iou` of held-out scene `scene_index`'s first object, for its shape word, its
    colour word or its phrase (`kind`): cross-attention of one UNet pass on the scene noised to t, thresholded at half
    its range, IoU with the object's mask. Cached."""
    from .. import toyworld as tw
    from ..attention import capture_attention, word_heatmap
    from ..images import encode, native_size
    from ..metrics import binarise, iou
    from ..sampling import add_noise
    from ..text import embed
    if kind not in KINDS_00_4:
        raise ValueError(f"kind must be one of {KINDS_00_4}, not {kind!r}")
    store = _store(pipe)
    key = ("heat", int(scene_index), int(t), int(seed))
    if key not in store:
        scene = tw.heldout_scene(int(scene_index), size=native_size(pipe))
        z0 = encode(pipe, scene.image)
        with capture_attention(pipe.unet, kinds=("cross",)) as cap, torch.no_grad():
            pipe.unet(add_noise(pipe, z0, int(t), seed=seed), int(t),
                      encoder_hidden_states=embed(pipe, scene.caption))
        store[key] = (scene, cap)
    scene, cap = store[key]
    o = scene.objects[0]
    word = _word(o, kind)
    occurrence = scene.occurrence(0, word) if kind == "shape" else None
    heat = word_heatmap(cap, pipe.tokenizer, scene.caption, word, size=scene.image.shape[:2], occurrence=occurrence)
    return iou(binarise(heat, 0.5), o.mask)


def mean_heatmap_iou(pipe, t: int = 500, kind: str = "shape", seed: int = 0, scenes=SCENES_00_3) -> float:
    """Mean of `heatmap_iou` over held-out `scenes` (exercises 00.3 and 00.4: 300…307)."""
    store = _store(pipe)
    key = ("mean heat", int(t), kind, int(seed), tuple(scenes))
    if key not in store:
        store[key] = float(np.mean([heatmap_iou(pipe, i, t, kind, seed) for i in scenes]))
    return store[key]


def _diagnose_iou(value, exp: float, where: str, others: dict) -> str:
    hint = _rate_hint(value, where)
    if hint:
        return hint.replace("fraction", "mean IoU")
    for label, fn in others.items():
        if abs(float(value) - fn()) < IOU_TOL:
            return f"{where}: {float(value):.3f} is {label}"
    return (f"{where}: {float(value):.3f} is not the mean IoU of held-out scenes {SCENES_00_3.start}…"
            f"{SCENES_00_3.stop - 1} (each scene's first object, shape_heatmap_iou of section 10, seed SEED)")


def check_00_3(answer, pipe=None, seed: int = 0, strict: bool = False):
    """00.3 Timesteps and localisation. answer: {t: mean IoU} for t in TIMESTEPS_00_3, section 10's
    `shape_heatmap_iou(scene, t=t)` averaged over held-out scenes 300…307."""
    def grade(ans):
        _need_pipe(pipe, "exercises.check_00_3(answer, pipe, SEED)")
        value, hint = _keys_hint(ans, TIMESTEPS_00_3, "the timesteps", "{t: mean IoU}")
        if hint:
            return hint
        for t in TIMESTEPS_00_3:
            v, exp = value[float(t)], mean_heatmap_iou(pipe, t, seed=seed)
            if _number(v) and abs(float(v) - exp) < IOU_TOL:
                continue
            s = SCENES_00_3
            others = {f"the mean IoU at t = {o} (did you pass t={t}?)": (lambda o=o: mean_heatmap_iou(pipe, o,
                                                                                                      seed=seed))
                      for o in TIMESTEPS_00_3 if o != t}
            others[f"the mean over {len(s) - 1} scenes: use all {len(s)}, range({s.start}, {s.stop})"] = \
                lambda: mean_heatmap_iou(pipe, t, seed=seed, scenes=range(s.start, s.stop - 1))
            others[f"the mean over section 10's {len(SECTION_SCENES)} scenes; the exercise uses the {len(s)} scenes "
                   f"{s.start}…{s.stop - 1}"] = lambda: mean_heatmap_iou(pipe, t, seed=seed, scenes=SECTION_SCENES)
            return _diagnose_iou(v, exp, f"at t = {t}", others)
        return None
    return _verdict("00.3", answer, grade, strict)


def check_00_4(answer, pipe=None, seed: int = 0, strict: bool = False):
    """00.4 Colour or shape? answer: {"shape": …, "colour": …, "phrase": …}, the mean IoU at t = 500 over held-out
    scenes 300…307 of the heat map of each scene's first object's shape word, colour word and phrase."""
    def grade(ans):
        _need_pipe(pipe, "exercises.check_00_4(answer, pipe, SEED)")
        if not isinstance(ans, dict) or set(ans) != set(KINDS_00_4):
            got = sorted(map(str, ans)) if isinstance(ans, dict) else type(ans).__name__
            return f"expected a dict with the keys {list(KINDS_00_4)} (one mean IoU each), got {got}"
        words = {"shape": "o.shape", "colour": "o.colour", "phrase": "o.phrase"}
        for kind in KINDS_00_4:
            v, exp = ans[kind], mean_heatmap_iou(pipe, T_00_4, kind, seed)
            if _number(v) and abs(float(v) - exp) < IOU_TOL:
                continue
            others = {f"the {o} word's mean IoU: did you pass {words[kind]} as the word?":
                      (lambda o=o: mean_heatmap_iou(pipe, T_00_4, o, seed)) for o in KINDS_00_4 if o != kind}
            others.update({f"the {kind} word's mean IoU at t = {t}; the exercise asks for t = {T_00_4}":
                           (lambda t=t: mean_heatmap_iou(pipe, t, kind, seed)) for t in (100, 300)})
            return _diagnose_iou(v, exp, f"{kind!r}", others)
        return None
    return _verdict("00.4", answer, grade, strict)


# -- 00.5 img2img as editing -------------------------------------------------------------------------------------
def edit_case(pipe, scene_index: int):
    """Section 9's edit of held-out scene `scene_index`: (scene, object 0, new colour, target caption)."""
    from .. import toyworld as tw
    from ..images import native_size
    src = tw.heldout_scene(int(scene_index), size=native_size(pipe))
    o = src.objects[0]
    new = next(c for c in tw.COLOUR_NAMES if c not in tw.colours_in_caption(src.caption))
    return src, o, new, src.caption.replace(o.phrase, f"{new} {o.shape}")


def edit_share(pipe, scene_index: int, strength: float, steps: int = 25, seed: int = 0) -> float:
    """Share of the object's region in its new colour after section 9's img2img edit at `strength`. Cached."""
    from .. import toyworld as tw
    from ..images import decode_pil, encode
    from ..sampling import img2img
    key = ("00.5", int(scene_index), round(float(strength), 6), int(steps), int(seed))
    store = _store(pipe)
    if key not in store:
        src, o, new, target = edit_case(pipe, scene_index)
        with torch.no_grad():
            lat = img2img(pipe, encode(pipe, src.image), target, strength=float(strength), steps=steps, seed=seed)
        store[key] = tw.colour_fraction(np.asarray(decode_pil(pipe, lat)[0]), o.mask, new)
    return store[key]


def smallest_strength(pipe, scene_index: int, steps: int = 25, seed: int = 0):
    """Exercise 00.5's reference: the first of 0.05, 0.10, …, 1.0 at which the object takes its new colour
    (share ≥ TURNED), or None."""
    return next((s for s in STRENGTHS_00_5 if edit_share(pipe, scene_index, s, steps, seed) >= TURNED), None)


def check_00_5(answer, pipe=None, steps: int = 25, seed: int = 0, strict: bool = False, scenes=SCENES_00_5):
    """00.5 img2img as editing. answer: {scene index: smallest strength} for held-out scenes 3…7: the first of
    0.05, 0.10, …, 1.0 at which section 9's recoloured object has its new colour on at least half of its region
    (None if no strength does)."""
    def grade(ans):
        _need_pipe(pipe, "exercises.check_00_5(answer, pipe, STEPS, SEED)")
        scenes_ = list(scenes)
        if not isinstance(ans, dict):
            return (f"expected a dict {{scene index: smallest strength}} for the scenes {scenes_}, "
                    f"got {type(ans).__name__}")
        if not all(_number(k) for k in ans) or sorted(int(k) for k in ans) != scenes_ or len(ans) != len(scenes_):
            return f"expected the keys {scenes_} (held-out scene indices), got {list(ans)}"
        value = {int(k): v for k, v in ans.items()}
        for i in scenes_:
            v, exp = value[i], smallest_strength(pipe, i, steps, seed)
            if v is None and exp is None:
                continue
            src, o, new, _ = edit_case(pipe, i)
            what = f"scene {i} (the {o.phrase} → {new})"
            if v is None:
                return (f"{what}: you found no strength, but at {exp:g} {edit_share(pipe, i, exp, steps, seed):.0%} "
                        f"of the {o.shape} is {new}: scan 0.05, 0.10, …, 1.0 and stop at the first share ≥ "
                        f"{TURNED:.0%}")
            if not _number(v):
                return f"{what}: expected a strength (a number) or None, got {v!r}"
            v = float(v)
            if 1 < v <= 100:
                return f"{what}: {v:g} looks like a percentage; strengths lie in (0, 1]"
            if not any(abs(v - s) < 1e-6 for s in STRENGTHS_00_5):
                return f"{what}: {v:g} is not one of the strengths 0.05, 0.10, …, 1.0 (steps of 0.05)"
            if exp is not None and abs(v - exp) < 1e-6:
                continue
            share = edit_share(pipe, i, v, steps, seed)
            if share < TURNED:
                return (f"{what}: at strength {v:g} only {share:.0%} of the {o.shape}'s region is {new}; it has "
                        f"taken its new colour when at least {TURNED:.0%} is (section 9's rule)")
            return (f"{what}: at strength {v:g} {share:.0%} of the {o.shape} is {new}, but already at {exp:g} "
                    f"({edit_share(pipe, i, exp, steps, seed):.0%}): give the smallest such strength, scanning "
                    "upwards from 0.05")
        return None
    return _verdict("00.5", answer, grade, strict)
