"""Checks of notebook 01 (DiffEdit, the purist way): exercises 01.1-01.6.

The mask exercises (01.1-01.3) run `purist_mask` on the first three of section 4's held-out edits with a 10-step
schedule; the edit exercises (01.4-01.6) run `masked_diffusion` / `img2img` on section 1's edit with its
ground-truth region as the mask and a 20-step schedule. Each reference is computed with the course's helpers and
cached per pipeline.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ._common import (_case_latents, _diagnose_psnr, _iou_hint, _keys_hint, _match, _need_pipe,
                      _number, _psnr_hint, _store, _verdict)

# only the checks go into `helpers.exercises`; the references stay here (exercises.nb01.draw_maps, …)
__all__ = ["check_01_1", "check_01_2", "check_01_3", "check_01_4", "check_01_5", "check_01_6"]

N_EDITS = 3                  # exercises 01.1-01.3: tw.edit_cases(3, start=200): a colour, a shape, a one-of-three edit
EDITS_START = 200            # section 4's held-out edits start there
MASK_STEPS = 10              # a 10-step schedule: strength 0.5 denoises 5 steps per draw
DRAWS_01_1 = (1, 2, 4, 8)
STRENGTHS_01_2 = (0.1, 0.5, 1.0)
DRAWS_01_2 = 2
SHAPE_EDIT = 1               # exercise 01.3: the shape edit among the three (edit_cases cycles colour, shape, …)
TARGETS_01_3 = ("union", "old", "new")
EDIT_STEPS = 20              # exercises 01.4-01.6: a 20-step schedule
STRENGTHS_01_4 = (0.5, 0.7, 0.9)
RECIPES = ("inversion", "blend")
IOU_TOL = 1e-6               # the same computation gives the same mask; a cell more or less moves an IoU by ~0.03


# -- the edits ---------------------------------------------------------------------------------------------------
def edits(pipe, n: int = N_EDITS):
    """Exercises 01.1-01.3's held-out edits: tw.edit_cases(n, start=200) at the pipeline's size."""
    from .. import toyworld as tw
    from ..images import native_size
    store = _store(pipe)
    key = ("edits", n)
    if key not in store:
        store[key] = tw.edit_cases(n, start=EDITS_START, size=native_size(pipe))
    return store[key]


def section_case(pipe):
    """Section 1's edit: tw.edit_cases(1, start=8, kinds=("colour",))[0] at the pipeline's size."""
    from .. import toyworld as tw
    from ..images import native_size
    store = _store(pipe)
    if "case" not in store:
        store["case"] = tw.edit_cases(1, start=8, size=native_size(pipe), kinds=("colour",))[0]
    return store["case"]


# -- 01.1-01.3 masks ---------------------------------------------------------------------------------------------
def draw_maps(pipe, index: int, n: int, strength: float = 0.5, seed: int = 0, steps: int = MASK_STEPS,
              n_edits: int = N_EDITS) -> torch.Tensor:
    """The n per-draw maps (n×h×w) of `purist_mask` on edit `index`, one call with per_draw=True. Cached."""
    from ..diffedit import purist_mask
    store = _store(pipe)
    key = ("draws", index, int(n), round(float(strength), 6), int(seed), int(steps), n_edits)
    if key not in store:
        c = edits(pipe, n_edits)[index]
        store[key] = purist_mask(pipe, _case_latents(pipe, c), c.reference, c.query, n=int(n), strength=float(strength),
                                 steps=steps, guidance=7.5, seed=seed, per_draw=True)
    return store[key]


RULES = ("diffusers", "rescale, > 0.5", "binarise_diffusers after normalise")


def binarise(d: torch.Tensor, rule: str = "diffusers") -> torch.Tensor:
    """A mask from a raw map by one of RULES: diffusers' rule (the exercises'), or two usual slips."""
    from ..diffedit import binarise_diffusers
    from ..metrics import normalise
    if rule == "diffusers":
        return binarise_diffusers(d)
    if rule == "rescale, > 0.5":
        return normalise(d) > 0.5
    if rule == "binarise_diffusers after normalise":
        return binarise_diffusers(normalise(d))
    raise ValueError(f"rule must be one of {RULES}, not {rule!r}")


def mask_iou(pipe, index: int, n: int, k=None, strength: float = 0.5, seed: int = 0, steps: int = MASK_STEPS,
             rule: str = "diffusers", target: str = "union", single: bool = False, n_edits: int = N_EDITS) -> float:
    """IoU of the binarised mean of the first k (default n) of n draws on edit `index` with its region ("union"), the
    old object's mask ("old") or the new one's ("new"). single: draw k alone instead of the mean of the first k."""
    from ..diffedit import latent_to_image_mask
    from ..metrics import iou
    c = edits(pipe, n_edits)[index]
    d = draw_maps(pipe, index, n, strength, seed, steps, n_edits)
    k = n if k is None else k
    m = d[k - 1] if single else d[:k].mean(0)
    gt = {"union": c.region, "old": c.scene.objects[c.index].mask, "new": c.target.objects[c.index].mask}[target]
    return iou(latent_to_image_mask(binarise(m, rule), gt.shape), gt)


def mean_mask_iou(pipe, n: int, k=None, n_edits: int = N_EDITS, **kw) -> float:
    return float(np.mean([mask_iou(pipe, i, n, k, n_edits=n_edits, **kw) for i in range(n_edits)]))


def check_01_1(answer, pipe=None, seed: int = 0, strict: bool = False, n_edits: int = N_EDITS,
               steps: int = MASK_STEPS):
    """01.1 How many draws? answer: {n: mean IoU} for n in 1, 2, 4, 8: over the first three of section 4's edits, one
    purist_mask(..., n=8, steps=10, per_draw=True) call each, the mean of its first n maps, binarised with
    binarise_diffusers and scored against the edit's region."""
    top = max(DRAWS_01_1)

    def grade(ans):
        _need_pipe(pipe, "exercises.check_01_1(answer_1, pipe, SEED)")
        value, hint = _keys_hint(ans, DRAWS_01_1, "the numbers of draws", "{n: mean IoU}")
        if hint:
            return hint
        kw = dict(seed=seed, steps=steps, n_edits=n_edits)
        for k in DRAWS_01_1:
            v = value[float(k)]
            hint = _iou_hint(v, f"at n = {k}")
            if hint:
                return hint
            if abs(float(v) - mean_mask_iou(pipe, top, k, **kw)) <= IOU_TOL:
                continue
            others = {f"the mean IoU at n = {o}": (lambda o=o: mean_mask_iou(pipe, top, o, **kw))
                      for o in DRAWS_01_1 if o != k}
            others[f"the IoU of draw {k} alone: average the first {k} draws, d[:{k}].mean(0)"] = \
                lambda: mean_mask_iou(pipe, top, k, single=True, **kw)
            if k < top:
                others[f"the mean of the first {k + 1} draws (off by one: d[:{k}] holds {k} draws)"] = \
                    lambda: mean_mask_iou(pipe, top, k + 1, **kw)
            for rule in RULES:
                if rule != "diffusers":
                    others[f"the IoU with the rule '{rule}'; binarise the raw mean map with binarise_diffusers"] = \
                        (lambda rule=rule: mean_mask_iou(pipe, top, k, rule=rule, **kw))
            label = _match(v, others, IOU_TOL)
            if label:
                return f"at n = {k}: {float(v):.3f} is {label}"
            return (f"at n = {k}: {float(v):.3f} is not the mean IoU over the {n_edits} edits "
                    f"(purist_mask(pipe, z, c.reference, c.query, n={top}, steps={steps}, seed=SEED, "
                    "per_draw=True) for each edit c, then binarise_diffusers(d[:n].mean(0)), "
                    "latent_to_image_mask and iou with c.region)")
        return None
    return _verdict("01.1", answer, grade, strict)


def check_01_2(answer, pipe=None, seed: int = 0, strict: bool = False, n_edits: int = N_EDITS,
               steps: int = MASK_STEPS):
    """01.2 Strength of the mask. answer: {strength: mean IoU} for strengths 0.1, 0.5, 1.0: purist_mask(..., n=2,
    strength=s, steps=10) on the three edits of 01.1, binarised with binarise_diffusers."""
    def grade(ans):
        _need_pipe(pipe, "exercises.check_01_2(answer_2, pipe, SEED)")
        value, hint = _keys_hint(ans, STRENGTHS_01_2, "the strengths", "{strength: mean IoU}")
        if hint:
            return hint
        kw = dict(seed=seed, steps=steps, n_edits=n_edits)
        for s in STRENGTHS_01_2:
            v = value[float(s)]
            hint = _iou_hint(v, f"at strength {s:g}")
            if hint:
                return hint
            if abs(float(v) - mean_mask_iou(pipe, DRAWS_01_2, strength=s, **kw)) <= IOU_TOL:
                continue
            others = {f"the mean IoU at strength {o:g} (did you pass strength={s:g}?)":
                      (lambda o=o: mean_mask_iou(pipe, DRAWS_01_2, strength=o, **kw))
                      for o in STRENGTHS_01_2 if o != s}
            for rule in RULES:
                if rule != "diffusers":
                    others[f"the IoU with the rule '{rule}'; binarise the raw map with binarise_diffusers"] = \
                        (lambda rule=rule: mean_mask_iou(pipe, DRAWS_01_2, strength=s, rule=rule, **kw))
            label = _match(v, others, IOU_TOL)
            if label:
                return f"at strength {s:g}: {float(v):.3f} is {label}"
            return (f"at strength {s:g}: {float(v):.3f} is not the mean IoU over the {n_edits} edits of purist_mask("
                    f"..., n={DRAWS_01_2}, strength={s:g}, steps={steps}, seed=SEED), binarised with "
                    "binarise_diffusers")
        return None
    return _verdict("01.2", answer, grade, strict)


def check_01_3(answer, pipe=None, seed: int = 0, strict: bool = False, n_edits: int = N_EDITS,
               steps: int = MASK_STEPS):
    """01.3 Shape edits. answer: {"union": IoU, "old": IoU, "new": IoU}: exercise 01.1's mask at n = 8 for the shape
    edit (the second of the three) against its region, the old shape's mask and the new shape's mask."""
    top = max(DRAWS_01_1)
    names = {"union": "the region (old ∪ new: c.region)", "old": "the old shape's mask (c.scene.objects[0].mask)",
             "new": "the new shape's mask (c.target.objects[0].mask)"}

    def grade(ans):
        _need_pipe(pipe, "exercises.check_01_3(answer_3, pipe, SEED)")
        value, hint = _keys_hint(ans, TARGETS_01_3, "the three ground truths", '{"union": …, "old": …, "new": …}')
        if hint:
            return hint
        kw = dict(seed=seed, steps=steps, n_edits=n_edits)
        if edits(pipe, n_edits)[SHAPE_EDIT].kind != "shape":
            raise ValueError("edit 1 of tw.edit_cases is no longer a shape edit: update SHAPE_EDIT")
        for target in TARGETS_01_3:
            v = value[target]
            hint = _iou_hint(v, repr(target))
            if hint:
                return hint
            if abs(float(v) - mask_iou(pipe, SHAPE_EDIT, top, target=target, **kw)) <= IOU_TOL:
                continue
            others = {f"the IoU with {names[o]}": (lambda o=o: mask_iou(pipe, SHAPE_EDIT, top, target=o, **kw))
                      for o in TARGETS_01_3 if o != target}
            others.update({f"the IoU of another edit: the shape edit is edits[{SHAPE_EDIT}] (c.kind == 'shape')":
                           (lambda i=i: mask_iou(pipe, i, top, target="union", **kw))
                           for i in range(n_edits) if i != SHAPE_EDIT and target == "union"})
            others.update({f"the IoU of the mean of {k} draws; use all {top}":
                           (lambda k=k: mask_iou(pipe, SHAPE_EDIT, top, k, target=target, **kw))
                           for k in DRAWS_01_1 if k != top})
            label = _match(v, others, IOU_TOL)
            if label:
                return f"{target!r}: {float(v):.3f} is {label}"
            return (f"{target!r}: {float(v):.3f} is not the IoU of exercise 1's n = {top} mask of the shape edit with "
                    f"{names[target]}")
        return None
    return _verdict("01.3", answer, grade, strict)


# -- 01.4-01.6 edits ---------------------------------------------------------------------------------------------
def edited_image(pipe, how: str, strength: float = 0.7, reference=None, seed: int = 0,
                 steps: int = EDIT_STEPS) -> np.ndarray:
    """Section 1's edit made by `how` ("inversion" or "blend": masked_diffusion with the ground-truth region;
    "ones": masked_diffusion with an all-ones mask; "img2img": no mask) as a uint8 image. Cached."""
    from ..diffedit import masked_diffusion
    from ..images import decode_pil
    from ..sampling import img2img
    c = section_case(pipe)
    reference = c.reference if reference is None else reference
    store = _store(pipe)
    key = ("edit", how, round(float(strength), 6), reference, int(seed), int(steps))
    if key not in store:
        z = _case_latents(pipe, c)
        if how == "img2img":
            lat = img2img(pipe, z, c.query, strength, steps, 7.5, seed=seed)
        else:
            mask = np.ones_like(c.region) if how == "ones" else c.region
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # the all-ones mask warns that it keeps nothing
                lat = masked_diffusion(pipe, z, mask, reference, c.query, strength, steps, 7.5,
                                       recipe="inversion" if how == "ones" else how, seed=seed)
        store[key] = np.asarray(decode_pil(pipe, lat)[0])
    return store[key]


def psnr_out(pipe, how: str, strength: float = 0.7, reference=None, seed: int = 0, steps: int = EDIT_STEPS,
             where: str = "outside") -> float:
    """PSNR (dB) of `edited_image` against the input outside the region (edit_report's psnr_out), or over the whole
    image (where="all")."""
    from ..metrics import psnr
    c = section_case(pipe)
    img = edited_image(pipe, how, strength, reference, seed, steps)
    return psnr(img, c.scene.image, mask=None if where == "all" else ~c.region)


def check_01_4(answer, pipe=None, seed: int = 0, strict: bool = False, steps: int = EDIT_STEPS,
               strengths=STRENGTHS_01_4):
    """01.4 Edit strength. answer: {recipe: {strength: PSNR outside}} for recipes "inversion" and "blend" and
    strengths 0.5, 0.7, 0.9: masked_diffusion of section 1's edit with its ground-truth region as the mask, steps=20,
    seed SEED; the PSNR outside the region (edit_report's psnr_out)."""
    def grade(ans):
        _need_pipe(pipe, "exercises.check_01_4(answer_4, pipe, SEED)")
        value, hint = _keys_hint(ans, RECIPES, "the recipes", "{recipe: {strength: PSNR outside}}")
        if hint:
            return hint
        for recipe in RECIPES:
            inner, hint = _keys_hint(value[recipe], strengths, "the edit strengths",
                                     f"{{strength: PSNR outside}} for {recipe!r}")
            if hint:
                return f"{recipe!r}: {hint}"
            for s in strengths:
                v, where = inner[float(s)], f"{recipe!r} at strength {s:g}"
                hint = _psnr_hint(v, where)
                if hint:
                    return hint
                kw = dict(seed=seed, steps=steps)
                other = [r for r in RECIPES if r != recipe][0]
                others = {f"the {other!r} recipe's value: pass recipe={recipe!r}":
                          lambda: psnr_out(pipe, other, s, **kw)}
                others.update({f"the value at strength {o:g} (did you pass strength={s:g}?)":
                               (lambda o=o: psnr_out(pipe, recipe, o, **kw)) for o in strengths if o != s})
                others["the PSNR of the whole image; measure outside the region (psnr(..., mask=~gt))"] = \
                    lambda: psnr_out(pipe, recipe, s, where="all", **kw)
                hint = _diagnose_psnr(v, where, psnr_out(pipe, recipe, s, **kw), others)
                if hint:
                    return hint
        return None
    return _verdict("01.4", answer, grade, strict)


def check_01_5(answer, pipe=None, strength: float = 0.7, seed: int = 0, strict: bool = False,
               steps: int = EDIT_STEPS):
    """01.5 Mask or no mask? answer: {"all ones": PSNR outside, "img2img": PSNR outside}: section 1's edit by
    masked_diffusion (inversion recipe) with an all-ones mask, and by img2img, at `strength` (EDIT_STRENGTH),
    steps=20, seed SEED."""
    keys = ("all ones", "img2img")
    how = {"all ones": "ones", "img2img": "img2img"}

    def grade(ans):
        _need_pipe(pipe, "exercises.check_01_5(answer_5, pipe, EDIT_STRENGTH, SEED)")
        value, hint = _keys_hint(ans, keys, "the two edits", '{"all ones": …, "img2img": …}')
        if hint:
            return hint
        kw = dict(seed=seed, steps=steps)
        for k in keys:
            v = value[k]
            hint = _psnr_hint(v, repr(k))
            if hint:
                return hint
            other = [o for o in keys if o != k][0]
            others = {f"the {other!r} value: are the two swapped?": lambda: psnr_out(pipe, how[other], strength, **kw),
                      "the PSNR of the whole image; measure outside the region (edit_report's psnr_out)":
                      lambda: psnr_out(pipe, how[k], strength, where="all", **kw)}
            if k == "all ones":
                others["masked diffusion with the ground-truth mask, not an all-ones mask"] = \
                    lambda: psnr_out(pipe, "inversion", strength, **kw)
            hint = _diagnose_psnr(v, repr(k), psnr_out(pipe, how[k], strength, **kw), others)
            if hint:
                return hint
        return None
    return _verdict("01.5", answer, grade, strict)


def check_01_6(answer, pipe=None, strength: float = 0.7, seed: int = 0, strict: bool = False,
               steps: int = EDIT_STEPS):
    """01.6 Recipes. answer: {"caption": PSNR outside, "empty": PSNR outside}: section 1's edit by masked_diffusion
    with recipe="blend" and the ground-truth mask, with the reference caption and with "" as the reference, at
    `strength` (EDIT_STRENGTH), steps=20, seed SEED."""
    keys = ("caption", "empty")

    def ref_of(k):
        return None if k == "caption" else ""

    def grade(ans):
        _need_pipe(pipe, "exercises.check_01_6(answer_6, pipe, EDIT_STRENGTH, SEED)")
        value, hint = _keys_hint(ans, keys, "the two reference prompts", '{"caption": …, "empty": …}')
        if hint:
            return hint
        kw = dict(seed=seed, steps=steps)
        for k in keys:
            v = value[k]
            hint = _psnr_hint(v, repr(k))
            if hint:
                return hint
            other = [o for o in keys if o != k][0]
            others = {f"the {other!r} value: are the two swapped?":
                      lambda: psnr_out(pipe, "blend", strength, ref_of(other), **kw),
                      "the inversion recipe's value: pass recipe=\"blend\"":
                      lambda: psnr_out(pipe, "inversion", strength, ref_of(k), **kw),
                      "the PSNR of the whole image; measure outside the region (edit_report's psnr_out)":
                      lambda: psnr_out(pipe, "blend", strength, ref_of(k), where="all", **kw)}
            hint = _diagnose_psnr(v, repr(k), psnr_out(pipe, "blend", strength, ref_of(k), **kw), others)
            if hint:
                return hint
        return None
    return _verdict("01.6", answer, grade, strict)
