"""Checks of notebook 02 (fast DiffEdit, inpainting, diffusers' pipeline): exercises 02.1-02.5.

The mask exercises (02.1-02.3) run on the first three of the closing tables' held-out edits, `tw.edit_cases(3)`
(a colour, a shape and a one-of-three edit): 02.1 the fast mask, 02.2 and 02.3 `improved_mask` with 5 draws per
strength. The edit exercises (02.4-02.5) run on section 1's edit with 10-step schedules: 02.4 the two inpainting
pipelines with the ground-truth region as the mask, 02.5 diffusers' DiffEdit pipeline and its `inpaint_strength`
pitfall. Each reference is computed with the course's helpers and cached per pipeline.
"""
from __future__ import annotations

import numpy as np
import torch

from ._common import (PSNR_TOL, _case_latents, _diagnose_psnr, _iou_hint, _keys_hint, _match, _need_pipe,
                      _number, _psnr_hint, _store, _verdict)

# only the checks go into `helpers.exercises`; the references stay here (exercises.nb02.fast_iou, …)
__all__ = ["check_02_1", "check_02_2", "check_02_3", "check_02_4", "check_02_5"]

N_EDITS = 3                      # exercises 02.1-02.3: tw.edit_cases(3): a colour, a shape, a one-of-three edit
DRAWS_02_1 = (1, 4, 20)          # fast_mask's n (20: the blog's)
N_IMPROVED = 5                   # 02.2-02.3: improved_mask(..., n=5): 20 UNet evaluations per mask
STRENGTHS_02_2 = ((0.5,), (0.75,), (0.5, 0.75))
THRESHOLDS_02_3 = (0.45, 0.65, 0.85)
GUIDES_02_3 = (True, False)
EDIT_STEPS = 10                  # 02.4-02.5: 10-step schedules
INPAINT_02_4 = ("base", "checkpoint")
STRENGTHS_02_4 = (1.0, 0.6)
INVERT_STRENGTH = 0.8            # 02.5: invert() at 0.8 (its default), 10 steps: one latent per edit timestep (8)
KEYS_02_5 = ("matched", "mismatched", "same count")
MISMATCH_STRENGTH = 0.5          # 02.5 "mismatched": the edit at 0.5, 10 steps (5 timesteps)
SAME_COUNT_STEPS = 16            # 02.5 "same count": the edit at 0.5 with 16 steps (8 timesteps, as inverted)
IOU_TOL = 1e-6                   # the same computation gives the same mask


# -- the edits ---------------------------------------------------------------------------------------------------
def edits(pipe, n: int = N_EDITS):
    """Exercises 02.1-02.3's edits: tw.edit_cases(n) at the pipeline's size (the first n of the closing tables')."""
    from .. import toyworld as tw
    from ..images import native_size
    store = _store(pipe)
    key = ("edits02", n)
    if key not in store:
        store[key] = tw.edit_cases(n, size=native_size(pipe))
    return store[key]


def section_case(pipe):
    """Section 1's edit: tw.edit_cases(1, start=11)[0] at the pipeline's size."""
    from .. import toyworld as tw
    from ..images import native_size
    store = _store(pipe)
    if "case02" not in store:
        store["case02"] = tw.edit_cases(1, start=11, size=native_size(pipe))[0]
    return store["case02"]


# -- 02.1 the fast mask ------------------------------------------------------------------------------------------
RULES_02_1 = ("diffusers", "blur > 0", "normalise > 0.5")


def fast_map(pipe, index: int, n: int, seed: int = 0, n_edits: int = N_EDITS) -> torch.Tensor:
    """fast_mask(pipe, z, c.reference, c.query, n=n, seed=seed) (strength 0.5, 50 steps, guidance 7.5). Cached."""
    from ..diffedit import fast_mask
    store = _store(pipe)
    key = ("fast02", index, int(n), int(seed), n_edits)
    if key not in store:
        c = edits(pipe, n_edits)[index]
        store[key] = fast_mask(pipe, _case_latents(pipe, c), c.reference, c.query, n=int(n), seed=seed)
    return store[key]


def fast_iou(pipe, n: int, seed: int = 0, rule: str = "diffusers", n_edits: int = N_EDITS) -> float:
    """Mean IoU over the edits of the fast mask with n draws, binarised by one of RULES_02_1."""
    from ..diffedit import binarise_diffusers, blur, latent_to_image_mask
    from ..metrics import iou, normalise
    out = []
    for i, c in enumerate(edits(pipe, n_edits)):
        d = fast_map(pipe, i, n, seed, n_edits)
        m = {"diffusers": lambda: binarise_diffusers(d), "blur > 0": lambda: blur(binarise_diffusers(d)) > 0,
             "normalise > 0.5": lambda: normalise(d) > 0.5}[rule]()
        out.append(iou(latent_to_image_mask(m, c.region.shape), c.region))
    return float(np.mean(out))


def check_02_1(answer, pipe=None, seed: int = 0, strict: bool = False, n_edits: int = N_EDITS):
    """02.1 Fewer draws. answer: {n: mean IoU} for n in 1, 4, 20: the fast mask fast_mask(pipe, z, c.reference,
    c.query, n=n, seed=SEED) of each of tw.edit_cases(3), binarised with binarise_diffusers, scored with
    iou(latent_to_image_mask(mask, c.region.shape), c.region), averaged over the three edits."""
    def grade(ans):
        _need_pipe(pipe, "exercises.check_02_1(answer_1, pipe, SEED)")
        value, hint = _keys_hint(ans, DRAWS_02_1, "the numbers of draws", "{n: mean IoU}")
        if hint:
            return hint
        for n in DRAWS_02_1:
            v = value[float(n)]
            hint = _iou_hint(v, f"at n = {n}")
            if hint:
                return hint
            if abs(float(v) - fast_iou(pipe, n, seed, n_edits=n_edits)) <= IOU_TOL:
                continue
            others = {f"the mean IoU at n = {o} (did you pass n={n}?)":
                      (lambda o=o: fast_iou(pipe, o, seed, n_edits=n_edits)) for o in DRAWS_02_1 if o != n}
            others["the IoU of the blog's clean-up, blur(mask) > 0; score binarise_diffusers(raw) itself"] = \
                lambda: fast_iou(pipe, n, seed, "blur > 0", n_edits)
            others["the IoU of normalise(raw) > 0.5; binarise the raw map with binarise_diffusers"] = \
                lambda: fast_iou(pipe, n, seed, "normalise > 0.5", n_edits)
            label = _match(v, others, IOU_TOL)
            if label:
                return f"at n = {n}: {float(v):.3f} is {label}"
            return (f"at n = {n}: {float(v):.3f} is not the mean IoU over the {n_edits} edits of "
                    f"binarise_diffusers(fast_mask(pipe, z, c.reference, c.query, n={n}, seed=SEED)) "
                    "(z = encode(pipe, c.scene.image); scored with iou(latent_to_image_mask(mask, "
                    "c.region.shape), c.region))")
        return None
    return _verdict("02.1", answer, grade, strict)


# -- 02.2-02.3 the improved mask ---------------------------------------------------------------------------------
def improved(pipe, index: int, strengths=(0.5, 0.75), guide: bool = True, threshold=None, n: int = N_IMPROVED,
             seed: int = 0, n_edits: int = N_EDITS, image: bool = True) -> np.ndarray:
    """improved_mask of edit `index` (image=False: without the input image, so the guide decodes the latents)."""
    from ..diffedit import improved_mask
    store = _store(pipe)
    key = ("imp02", index, tuple(map(float, strengths)), bool(guide), threshold, int(n), int(seed), n_edits, image)
    if key not in store:
        c = edits(pipe, n_edits)[index]
        store[key] = improved_mask(pipe, _case_latents(pipe, c), c.reference, c.query,
                                   image=c.scene.image if image else None, n=int(n), strengths=tuple(strengths),
                                   seed=seed, guide=guide, threshold=threshold).cpu().numpy()
    return store[key]


def improved_ious(pipe, n_edits: int = N_EDITS, **kw) -> list:
    from ..metrics import iou
    return [float(iou(improved(pipe, i, n_edits=n_edits, **kw), c.region))
            for i, c in enumerate(edits(pipe, n_edits))]


def _strengths_keys(ans):
    if not isinstance(ans, dict):
        return None, f"expected a dict {{strengths: [IoU per edit]}}, got {type(ans).__name__}"
    try:
        value = {tuple(float(s) for s in (k if isinstance(k, (tuple, list)) else (k,))): v for k, v in ans.items()}
    except (TypeError, ValueError):
        value = None
    if value is None or set(value) != set(STRENGTHS_02_2) or len(value) != len(ans):
        return None, (f"expected the keys {list(STRENGTHS_02_2)} (the strengths= argument of improved_mask), "
                      f"got {list(ans)}")
    return value, None


def check_02_2(answer, pipe=None, seed: int = 0, strict: bool = False, n_edits: int = N_EDITS):
    """02.2 Which noise level? answer: {strengths: [IoU of each edit]} for strengths (0.5,), (0.75,) and (0.5, 0.75):
    improved_mask(pipe, z, c.reference, c.query, image=c.scene.image, n=5, strengths=strengths, seed=SEED) for each
    of tw.edit_cases(3), in their order, scored with iou(mask.numpy(), c.region)."""
    def grade(ans):
        _need_pipe(pipe, "exercises.check_02_2(answer_2, pipe, SEED)")
        value, hint = _strengths_keys(ans)
        if hint:
            return hint
        kw = dict(seed=seed, n_edits=n_edits)
        for s in STRENGTHS_02_2:
            v, where = value[s], f"strengths {s}"
            if not isinstance(v, (list, tuple, np.ndarray)) or len(v) != n_edits:
                return f"{where}: expected a list of {n_edits} IoUs (one per edit, in the order of ex_edits), got {v!r}"
            for x in v:
                hint = _iou_hint(x, where)
                if hint:
                    return hint
            ref = improved_ious(pipe, strengths=s, **kw)
            if np.allclose(np.asarray(v, float), ref, atol=IOU_TOL, rtol=0):
                continue
            if abs(float(np.mean(v)) - np.mean(ref)) <= IOU_TOL:
                return f"{where}: the IoUs are those of the edits in another order; keep the order of ex_edits"
            for k, (x, r) in enumerate(zip(v, ref)):
                if abs(float(x) - r) <= IOU_TOL:
                    continue
                others = {f"the IoU at strengths {o} (did you pass strengths={s}?)":
                          (lambda o=o: improved_ious(pipe, strengths=o, **kw)[k]) for o in STRENGTHS_02_2 if o != s}
                others["the IoU without the image guide; pass image=c.scene.image and keep guide=True"] = \
                    lambda: improved_ious(pipe, strengths=s, guide=False, **kw)[k]
                others["the mask guided by the decoded latents: pass image=c.scene.image, the input itself"] = \
                    lambda: improved_ious(pipe, strengths=s, image=False, **kw)[k]
                others[f"the IoU with 20 draws per strength, improved_mask's default: pass n={N_IMPROVED}"] = \
                    lambda: improved_ious(pipe, strengths=s, n=20, **kw)[k]
                label = _match(x, others, IOU_TOL)
                if label:
                    return f"{where}, edit {k}: {float(x):.3f} is {label}"
                return (f"{where}, edit {k}: {float(x):.3f} is not the IoU of improved_mask(pipe, z, c.reference, "
                        f"c.query, image=c.scene.image, n={N_IMPROVED}, strengths={s}, seed=SEED) with c.region")
        return None
    return _verdict("02.2", answer, grade, strict)


def improved_mean(pipe, **kw) -> float:
    return float(np.mean(improved_ious(pipe, **kw)))


def check_02_3(answer, pipe=None, seed: int = 0, strict: bool = False, n_edits: int = N_EDITS):
    """02.3 The threshold and the image guide. answer: {guide: {threshold: mean IoU}} for guide True and False and
    thresholds 0.45, 0.65, 0.85: improved_mask(pipe, z, c.reference, c.query, image=c.scene.image, n=5, seed=SEED,
    guide=guide, threshold=threshold) over tw.edit_cases(3), scored with iou(mask.numpy(), c.region)."""
    def grade(ans):
        _need_pipe(pipe, "exercises.check_02_3(answer_3, pipe, SEED)")
        if isinstance(ans, dict) and set(ans) == {"guide", "no guide"}:
            return "key the dict by the guide= argument itself: {True: {…}, False: {…}}"
        value, hint = _keys_hint(ans, GUIDES_02_3, "the guide= argument", "{guide: {threshold: mean IoU}}")
        if hint:
            return hint
        kw = dict(seed=seed, n_edits=n_edits)
        for guide in GUIDES_02_3:
            inner, hint = _keys_hint(value[guide], THRESHOLDS_02_3, "the thresholds",
                                     f"{{threshold: mean IoU}} for guide={guide}")
            if hint:
                return f"guide={guide}: {hint}"
            for th in THRESHOLDS_02_3:
                v, where = inner[float(th)], f"guide={guide}, threshold {th:g}"
                hint = _iou_hint(v, where)
                if hint:
                    return hint
                if abs(float(v) - improved_mean(pipe, guide=guide, threshold=th, **kw)) <= IOU_TOL:
                    continue
                others = {f"the value with guide={not guide}: are the two swapped?":
                          lambda: improved_mean(pipe, guide=not guide, threshold=th, **kw)}
                others.update({f"the value at threshold {o:g} (did you pass threshold={th:g}?)":
                               (lambda o=o: improved_mean(pipe, guide=guide, threshold=o, **kw))
                               for o in THRESHOLDS_02_3 if o != th})
                others["the value at improved_mask's default threshold: pass threshold="] = \
                    lambda: improved_mean(pipe, guide=guide, **kw)
                if guide:
                    others["the mask guided by the decoded latents: pass image=c.scene.image"] = \
                        lambda: improved_mean(pipe, guide=True, threshold=th, image=False, **kw)
                others[f"the value with 20 draws per strength, improved_mask's default: pass n={N_IMPROVED}"] = \
                    lambda: improved_mean(pipe, guide=guide, threshold=th, n=20, **kw)
                label = _match(v, others, IOU_TOL)
                if label:
                    return f"{where}: {float(v):.3f} is {label}"
                return (f"{where}: {float(v):.3f} is not the mean IoU over the {n_edits} edits of improved_mask("
                        f"pipe, z, c.reference, c.query, image=c.scene.image, n={N_IMPROVED}, seed=SEED, "
                        f"guide={guide}, threshold={th:g})")
        return None
    return _verdict("02.3", answer, grade, strict)


# -- 02.4 inpainting: base UNet and checkpoint -------------------------------------------------------------------
def _inpainter(pipe, which: str, model):
    from ..diffedit import inpaint_pipeline
    store = _store(pipe)
    key = ("ip02", which, str(model))
    if key not in store:
        store[key] = inpaint_pipeline(pipe) if which == "base" else inpaint_pipeline(pipe, model)
    return store[key]


def inpainted(pipe, which: str, strength: float, model, seed: int = 0, steps: int = EDIT_STEPS) -> np.ndarray:
    """Section 1's edit inpainted by the base 4-channel UNet or the checkpoint `model`, its ground-truth region as
    the mask, `steps` steps, guidance 7.5, uint8. Cached."""
    from PIL import Image
    store = _store(pipe)
    key = ("inp02", which, str(model), round(float(strength), 6), int(seed), int(steps))
    if key not in store:
        c = section_case(pipe)
        ip = _inpainter(pipe, which, model)
        side = c.region.shape[0]
        out = ip(c.query, image=c.scene.pil(), mask_image=Image.fromarray(c.region.astype(np.uint8) * 255),
                 num_inference_steps=int(steps), guidance_scale=7.5, strength=float(strength), height=side,
                 width=side, generator=torch.Generator().manual_seed(seed)).images[0]
        store[key] = np.asarray(out.convert("RGB"))
    return store[key]


def inpaint_psnr(pipe, which, strength, model, seed=0, steps=EDIT_STEPS, where="outside") -> float:
    from ..metrics import psnr
    c = section_case(pipe)
    img = inpainted(pipe, which, strength, model, seed, steps)
    return psnr(img, c.scene.image, mask=None if where == "all" else ~c.region)


def check_02_4(answer, pipe=None, inpaint_model=None, seed: int = 0, strict: bool = False,
               steps: int = EDIT_STEPS):
    """02.4 The inpainting checkpoint. answer: {"base": {strength: PSNR outside}, "checkpoint": {…}} for strengths
    1.0 and 0.6: section 1's edit by inpaint_pipeline(pipe) ("base") and inpaint_pipeline(pipe, INPAINT_MODEL)
    ("checkpoint"), with the ground-truth region as mask_image, num_inference_steps=10, guidance_scale 7.5,
    generator seeded with SEED; the PSNR outside the region (edit_report's psnr_out)."""
    def grade(ans):
        _need_pipe(pipe, "exercises.check_02_4(answer_4, pipe, INPAINT_MODEL, SEED)")
        if inpaint_model is None:
            raise TypeError("this check needs the inpainting checkpoint as its third argument: "
                            "exercises.check_02_4(answer_4, pipe, INPAINT_MODEL, SEED) (INPAINT_MODEL is None "
                            "when the loaded model has none: this exercise needs one)")
        value, hint = _keys_hint(ans, INPAINT_02_4, "the two pipelines", '{"base": {…}, "checkpoint": {…}}')
        if hint:
            return hint
        kw = dict(seed=seed, steps=steps)
        for which in INPAINT_02_4:
            inner, hint = _keys_hint(value[which], STRENGTHS_02_4, "the strengths",
                                     f"{{strength: PSNR outside}} for {which!r}")
            if hint:
                return f"{which!r}: {hint}"
            other = [o for o in INPAINT_02_4 if o != which][0]
            for s in STRENGTHS_02_4:
                v, where = inner[float(s)], f"{which!r} at strength {s:g}"
                hint = _psnr_hint(v, where)
                if hint:
                    return hint
                others = {f"the {other!r} pipeline's value: are the two swapped?":
                          lambda: inpaint_psnr(pipe, other, s, inpaint_model, **kw)}
                others.update({f"the value at strength {o:g} (did you pass strength={s:g}?)":
                               (lambda o=o: inpaint_psnr(pipe, which, o, inpaint_model, **kw))
                               for o in STRENGTHS_02_4 if o != s})
                others["the PSNR of the whole image; measure outside the region (edit_report's psnr_out)"] = \
                    lambda: inpaint_psnr(pipe, which, s, inpaint_model, where="all", **kw)
                others[f"the value after 50 steps, the pipeline's default: pass num_inference_steps={steps}"] = \
                    lambda: inpaint_psnr(pipe, which, s, inpaint_model, seed=seed, steps=50)
                hint = _diagnose_psnr(v, where, inpaint_psnr(pipe, which, s, inpaint_model, **kw), others)
                if hint:
                    return hint
        return None
    return _verdict("02.4", answer, grade, strict)


# -- 02.5 diffusers' pipeline and its pitfall --------------------------------------------------------------------
def _dp(pipe):
    import warnings
    from ..diffedit import diffedit_pipeline
    store = _store(pipe)
    if "dp02" not in store:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated.*")
            store["dp02"] = diffedit_pipeline(pipe)
    return store["dp02"]


def _img01(c):
    return torch.from_numpy(c.scene.image).permute(2, 0, 1)[None].float() / 255


def d_mask(pipe, seed: int = 0):
    """Section 5's mask: generate_mask on section 1's edit with its defaults. Cached."""
    store = _store(pipe)
    key = ("dmask02", int(seed))
    if key not in store:
        c = section_case(pipe)
        store[key] = _dp(pipe).generate_mask(image=_img01(c), source_prompt=c.reference, target_prompt=c.query,
                                             generator=torch.Generator().manual_seed(seed))
    return store[key]


def inverted(pipe, strength: float = INVERT_STRENGTH, seed: int = 0, steps: int = EDIT_STEPS):
    store = _store(pipe)
    key = ("inv02", round(float(strength), 6), int(seed), int(steps))
    if key not in store:
        c = section_case(pipe)
        store[key] = _dp(pipe).invert(prompt=c.reference, image=_img01(c), inpaint_strength=float(strength),
                                      num_inference_steps=int(steps),
                                      generator=torch.Generator().manual_seed(seed)).latents
    return store[key]


def dp_edit(pipe, strength: float, steps: int = EDIT_STEPS, invert_strength: float = INVERT_STRENGTH,
            seed: int = 0, negative: bool = True):
    """The DiffEdit pipeline's edit of section 1's case at `strength` and `steps`, on latents inverted at
    `invert_strength` with 10 steps: the PSNR outside the region, or the name of the exception it raises. Cached."""
    from ..diffedit import edit_report
    store = _store(pipe)
    key = ("dpedit02", round(float(strength), 6), int(steps), round(float(invert_strength), 6), int(seed), negative)
    if key not in store:
        c = section_case(pipe)
        try:
            out = _dp(pipe)(prompt=c.query, mask_image=d_mask(pipe, seed), image_latents=inverted(
                pipe, invert_strength, seed), inpaint_strength=float(strength), num_inference_steps=int(steps),
                negative_prompt=c.reference if negative else None,
                generator=torch.Generator().manual_seed(seed)).images[0]
            store[key] = edit_report(np.asarray(out.convert("RGB")), c)["psnr_out"]
        except Exception as e:  # diffusers may refuse the mismatch: its exception's name is the answer then
            store[key] = type(e).__name__
    return store[key]


def _setting(key):
    return {"matched": dict(strength=INVERT_STRENGTH),
            "mismatched": dict(strength=MISMATCH_STRENGTH),
            "same count": dict(strength=MISMATCH_STRENGTH, steps=SAME_COUNT_STEPS)}[key]


def check_02_5(answer, pipe=None, seed: int = 0, strict: bool = False):
    """02.5 The pitfall. answer: {"matched": …, "mismatched": …, "same count": …}: section 1's edit by diffusers'
    DiffEdit pipeline (section 5's mask d_mask, latents from dp.invert(prompt=case.reference, image=img01,
    inpaint_strength=0.8, num_inference_steps=10, generator seeded with SEED), negative_prompt=case.reference),
    edited at inpaint_strength 0.8 with 10 steps ("matched"), at 0.5 with 10 steps ("mismatched") and at 0.5 with
    16 steps ("same count"). Each value: the PSNR outside the region (edit_report's psnr_out), or, where the call
    raises, the exception's class name (type(e).__name__)."""
    def grade(ans):
        _need_pipe(pipe, "exercises.check_02_5(answer_5, pipe, SEED)")
        value, hint = _keys_hint(ans, KEYS_02_5, "the three edits",
                                 '{"matched": …, "mismatched": …, "same count": …}')
        if hint:
            return hint
        for k in KEYS_02_5:
            v, ref, s = value[k], dp_edit(pipe, seed=seed, **_setting(k)), _setting(k)
            others = {"the value with latents inverted at the edit's strength: invert at 0.8 whatever the edit's "
                      "strength (that is the pitfall)":
                      lambda: dp_edit(pipe, invert_strength=s["strength"], seed=seed, **s),
                      "the value without negative_prompt=case.reference":
                      lambda: dp_edit(pipe, seed=seed, negative=False, **s)}
            others.update({f"the {o!r} value: check the edit's inpaint_strength and num_inference_steps":
                           (lambda o=o: dp_edit(pipe, seed=seed, **_setting(o))) for o in KEYS_02_5 if o != k})
            safe = {lab: (lambda f=f: (lambda r: r if _number(r) else float("nan"))(f())) for lab, f in others.items()}
            if isinstance(ref, str):
                if v == ref:
                    continue
                if isinstance(v, str):
                    return f"{k!r}: the call raises {ref}, not {v}; give type(e).__name__ of what it raises"
                if isinstance(v, BaseException) or (isinstance(v, type) and issubclass(v, BaseException)):
                    return f"{k!r}: give the exception's class name as a string, type(e).__name__ ({ref!r})"
                label = _match(v, safe, PSNR_TOL) if _number(v) else None
                if label:
                    return f"{k!r}: {float(v):.2f} dB is {label}"
                return (f"{k!r}: this call raises {ref} here: did it run as asked (invert at 0.8, edit at "
                        f"{s['strength']:g} with {s.get('steps', EDIT_STEPS)} steps)? Catch it and give "
                        "type(e).__name__")
            if isinstance(v, str):
                return (f"{k!r}: this call runs here and returns an image; give edit_report(image, case)['psnr_out'] "
                        f"(you gave {v!r})")
            hint = _psnr_hint(v, repr(k))
            if hint:
                return hint
            hint = _diagnose_psnr(v, repr(k), ref, safe)
            if hint:
                return hint
        return None
    return _verdict("02.5", answer, grade, strict)
