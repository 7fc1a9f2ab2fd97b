"""Checks of notebook 06 (AlignDiff): exercises 06.1, 06.3, 06.4, 06.5 and 06.6 (06.2 and 06.7 are discussions).

Every check grades against a reference computed with `helpers.aligndiff` on the given pipeline, with the settings of
the notebook's exercise setup cell (`EX`, a dict: category, n, steps, guidance, threshold, seed, fss_t, k, n_test).
The references are small on purpose: `n` = 8 synthetic samples (sample i: the i-th plain text of `ad.plain_texts`,
seed `seed + i`) and `n_test` = 12 held-out real scenes. Expensive parts are cached per pipeline.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ._common import TOL, _call, _check_pipe, _close, _number, _store, _verdict

__all__ = ["SETTINGS_06", "SHOTS_06", "GUIDANCES_06", "settings_06", "plain_bank_06", "synthesis_06",
           "coarse_iou_06", "fss_iou_06", "prototype_score_06", "check_06_1", "check_06_3", "check_06_4",
           "check_06_5", "check_06_6"]

# the notebook's defaults (its parameters cell) and the exercises' own sizes: 8 samples, 12 test scenes
SETTINGS_06 = dict(category="star", n=8, steps=10, guidance=7.5, threshold=0.4, seed=0, fss_t=300, k=3,
                   n_test=12)
SHOTS_06 = (1, 3, 5)          # exercise 06.1: support sizes
GUIDANCES_06 = (7.5, 12.0)    # exercise 06.6: guidance scales
OTHER_06 = "triangle"         # exercise 06.5: the other class
TOL_06 = 1e-3  # mean-IoU tolerance: the same samples in another batch layout may flip a few boundary pixels


def settings_06(settings=None) -> dict:
    """The exercise settings: SETTINGS_06 updated with `settings` (a dict, e.g. the notebook's `EX`)."""
    if settings is None:
        return dict(SETTINGS_06)
    if not isinstance(settings, dict):
        raise TypeError(f"the settings are a dict like the notebook's EX (keys {sorted(SETTINGS_06)}), "
                        f"got {type(settings).__name__}: e.g. exercises.check_06_1(answer, pipe, EX)")
    unknown = set(settings) - set(SETTINGS_06)
    if unknown:
        raise ValueError(f"unknown exercise settings {sorted(unknown)}; the settings are {sorted(SETTINGS_06)}")
    return {**SETTINGS_06, **settings}


def _key(s: dict) -> tuple:
    return tuple(sorted(s.items()))


def plain_bank_06(category: str):
    """The prompt bank of the plain texts ("a red star", "a red star and a blue circle", …), with their colours."""
    from .. import aligndiff as ad
    bank = ad.PromptBank(category)
    for text, colour in ad.plain_texts(category):
        bank.add_text(text, colour)
    return bank


def synthesis_06(pipe, settings=None, category: str | None = None, guidance: float | None = None,
                 attn_steps=None):
    """`ad.synthesize` of the plain bank of `category` (default: the settings'), n samples, seeds seed + i (cached)."""
    from .. import aligndiff as ad
    s = settings_06(settings)
    category = s["category"] if category is None else category
    guidance = float(s["guidance"] if guidance is None else guidance)
    steps = None if attn_steps is None else tuple(int(i) for i in attn_steps)
    key = ("06", "syn", _key(s), category, guidance, steps)
    store = _store(pipe)
    if key not in store:
        store[key] = ad.synthesize(pipe, plain_bank_06(category), s["n"], steps=s["steps"], guidance=guidance,
                                   seed=s["seed"], threshold=s["threshold"], attn_steps=steps, progress=False)
    return store[key]


def _found(syn, shape: str) -> np.ndarray:
    """Per sample: does the toy world's detector find an object of this shape (any colour)?"""
    from .. import toyworld as tw
    return np.array([any(f.shape == shape for f in tw.find_objects(im)) for im in syn.images])


def coarse_iou_06(syn, only=None) -> float:
    """Mean IoU of the coarse masks with the generated objects' pixels (by colour); `only`: a boolean selection."""
    from .. import aligndiff as ad
    v = np.array(ad.coarse_iou(syn), dtype=float)
    return float(v.mean() if only is None else v[only].mean() if only.any() else np.nan)


# -- few-shot segmenter inputs (cached) --------------------------------------------------------------------------
def _fss_inputs(pipe, s: dict, prompt: str | None = None, t: int | None = None) -> dict:
    """Features of the first max(SHOTS_06, k) real examples and of the n_test exercise test scenes."""
    from .. import aligndiff as ad
    from ..images import native_size
    prompt = f"a {s['category']}" if prompt is None else prompt
    t = s["fss_t"] if t is None else int(t)
    store = _store(pipe)
    n_real = max(*SHOTS_06, s["k"])
    key = ("06", "fss", s["category"], n_real, s["n_test"], int(t), prompt)
    if key not in store:
        size = native_size(pipe)
        ims, ms, _ = ad.real_examples(s["category"], n_real, size=size)
        test_images, test_masks = ad.test_scenes(s["category"], s["n_test"], size=size)
        store[key] = dict(real_images=np.stack(ims), real_masks=np.stack(ms),
                          real_feats=ad.unet_features(pipe, ims, t, prompt=prompt),
                          test_images=test_images, test_masks=test_masks,
                          test_feats=ad.unet_features(pipe, test_images, t, prompt=prompt))
    return store[key]


def fss_iou_06(pipe, settings=None, k: int = 3, prompt: str | None = None, on_support: bool = False,
               t: int | None = None) -> float:
    """Mean IoU of `ad.PrototypeSegmenter` with the first k real examples as support on the exercise test scenes
    (or on the support images themselves, `on_support`)."""
    from .. import aligndiff as ad
    from ..metrics import iou
    s = settings_06(settings)
    d = _fss_inputs(pipe, s, prompt, t)
    seg = ad.PrototypeSegmenter(d["real_feats"][:k], d["real_masks"][:k])
    feats, masks = ((d["real_feats"][:k], d["real_masks"][:k]) if on_support
                    else (d["test_feats"], d["test_masks"]))
    pred = seg.predict(feats, masks.shape[1:])
    return float(np.mean([iou(p, m) for p, m in zip(pred, masks)]))


def _dict_of_numbers(ans, keys, what: str, name: str):
    """({key: value} with the expected keys, None) or (None, a hint). A numeric key matches by value (12 or 12.0);
    a string is never a numeric key."""
    if not isinstance(ans, dict):
        return None, f"expected a dict {{{name}: {what}}} for {name} in {list(keys)}, got {type(ans).__name__}"
    out = {}
    for k in ans:
        match = [e for e in keys if (k == e if isinstance(e, str) else _number(k) and float(k) == float(e))]
        if not match:
            return None, f"expected the keys {list(keys)}, got {list(ans)}"
        out[match[0]] = ans[k]
    if set(out) != set(keys) or len(ans) != len(keys):
        return None, f"expected the keys {list(keys)} (one {what} each), got {list(ans)}"
    return out, None


def _not_an_iou(v, where: str) -> str | None:
    if not _number(v):
        return f"{where}: expected a number (a mean IoU), got {v!r}"
    if not 0 <= float(v) <= 1:
        return f"{where}: {float(v):g} is not an IoU (those lie in [0, 1]); did you count or sum instead of averaging?"
    return None


def _match(v, alternatives, tol: float = TOL_06) -> str | None:
    """The label of the first alternative (label, thunk) whose value is close to v."""
    for label, value in alternatives:
        if _close(v, value(), tol):
            return label
    return None


# -- 06.1 more shots ---------------------------------------------------------------------------------------------
def check_06_1(answer, pipe=None, settings=None, strict: bool = False):
    """06.1 More shots. answer: {k: mean IoU} for k in 1, 3, 5: the few-shot segmenter (ad.PrototypeSegmenter)
    with the first k real examples of the category as support, features at fss_t with the prompt "a {category}",
    scored on the n_test exercise test scenes. Context: the pipeline and the notebook's EX."""
    def grade(ans):
        _check_pipe(pipe)
        s = settings_06(settings)
        value, hint = _dict_of_numbers(ans, SHOTS_06, "mean IoU", "k")
        if hint:
            return hint
        cat = s["category"]
        for k in SHOTS_06:
            bad = _not_an_iou(value[k], f"with k = {k}")
            if bad:
                return bad
        for k in SHOTS_06:
            v = value[k]
            if _close(v, fss_iou_06(pipe, s, k)):
                continue
            where = f"with k = {k}"
            alts = [(f"{where}: your value is the IoU with {o} real examples as support (the support is the first "
                     f"{k}: real_feats[:{k}], real_masks[:{k}])", lambda o=o: fss_iou_06(pipe, s, o))
                    for o in SHOTS_06 if o != k]
            alts += [(f"{where}: your value is the segmenter's IoU on its own support images; score it on the "
                      f"{s['n_test']} exercise test scenes (ex_test_images)",
                      lambda: fss_iou_06(pipe, s, k, on_support=True)),
                     (f"{where}: your features were read with no prompt; step 3 reads them with the prompt "
                      f"'a {cat}' (prompt=f\"a {{CATEGORY}}\")", lambda: fss_iou_06(pipe, s, k, prompt="")),
                     (f"{where}: your features were read at the default t = 300; pass t=FSS_T "
                      f"({s['fss_t']})", lambda: fss_iou_06(pipe, s, k, t=300) if s["fss_t"] != 300 else np.nan)]
            label = _match(v, alts, TOL)
            return label or (f"{where}: {float(v):.3f} is not the few-shot segmenter's mean IoU on the "
                              f"{s['n_test']} exercise test scenes with the first {k} real examples as support "
                              f"(ad.unet_features at FSS_T = {s['fss_t']}, prompt 'a {cat}'; "
                              "ad.PrototypeSegmenter(...).predict at the image size)")
        return None
    return _verdict("06.1", answer, grade, strict)


# -- 06.3 late attention -----------------------------------------------------------------------------------------
def check_06_3(answer, pipe=None, settings=None, strict: bool = False):
    """06.3 Late attention only. answer: {"all": mean IoU, "late": mean IoU}: the coarse masks' mean IoU with the
    objects' pixels (ad.coarse_iou) over the n exercise samples of the plain bank, with the attention of every
    step and of the second half only (attn_steps=range(steps // 2, steps)). Context: the pipeline and EX."""
    def grade(ans):
        _check_pipe(pipe)
        s = settings_06(settings)
        names = ("all", "late")
        value, hint = _dict_of_numbers(ans, names, "mean IoU", "name")
        if hint:
            return hint
        n_steps, half = s["steps"], s["steps"] // 2
        ranges = {"all": None, "late": range(half, n_steps)}
        ref = {k: (lambda r=r: coarse_iou_06(synthesis_06(pipe, s, attn_steps=r))) for k, r in ranges.items()}
        for k in names:
            bad = _not_an_iou(value[k], repr(k))
            if bad:
                return bad
        for k in names:
            v = value[k]
            if _close(v, ref[k](), TOL_06):
                continue
            alts = []
            if k == "late":
                alts += [(f"'late': that is the IoU with every step's attention: pass "
                          f"attn_steps=range(STEPS // 2, STEPS) to ad.synthesize", ref["all"]),
                         (f"'late': that is the first half, range(0, {half}); the second half is "
                          f"range(STEPS // 2, STEPS) = range({half}, {n_steps})",
                          lambda: coarse_iou_06(synthesis_06(pipe, s, attn_steps=range(0, half))))]
                alts += [(f"'late': off by one: your steps are range({a}, {n_steps}); the second half is "
                          f"range({half}, {n_steps})",
                          lambda a=a: coarse_iou_06(synthesis_06(pipe, s, attn_steps=range(a, n_steps))))
                         for a in (half - 1, half + 1) if 0 <= a < n_steps]
            else:
                alts.append(("'all': that is the late-attention IoU; 'all' keeps every step (attn_steps=None)",
                             ref["late"]))
            alts.append((f"{k!r}: that is the mean over the samples in which the detector finds a "
                         f"{s['category']}; average over all {s['n']} samples",
                         lambda: coarse_iou_06(syn := synthesis_06(pipe, s, attn_steps=ranges[k]),
                                               _found(syn, s["category"]))))
            label = _match(v, alts)
            return label or (f"{k!r}: {float(v):.3f} is not the coarse masks' mean IoU over the {s['n']} exercise "
                             f"samples (ad.synthesize(pipe, ex_bank, EX['n'], steps=STEPS, guidance=GUIDANCE, "
                             "seed=SEED, threshold=THRESHOLD, ...), then np.mean(ad.coarse_iou(syn)))")
        return None
    return _verdict("06.3", answer, grade, strict)


# -- 06.4 the few-shot segmenter's score ------------------------------------------------------------------------
def prototype_score_06(support_feats, support_masks, feats, norm_pixels: bool = True, norm_protos: bool = True,
                       reduce: str = "max", cells: str = "area", cut: float = 0.5) -> torch.Tensor:
    """A prototype-matching score with switchable slips (the defaults are ad.PrototypeSegmenter.score): the
    checks use it to name what a wrong answer did."""
    hw = support_feats.shape[-2:]
    m = torch.as_tensor(np.asarray(support_masks, np.float32))[:, None]
    m = F.adaptive_avg_pool2d(m, hw) if cells == "area" else F.interpolate(m, size=hw, mode="nearest")
    fg, bg = [], []
    for f, w in zip(support_feats, (m[:, 0] > cut).float()):
        if w.sum() == 0 or (1 - w).sum() == 0:
            continue
        pf, pb = (f * w).sum((1, 2)) / w.sum(), (f * (1 - w)).sum((1, 2)) / (1 - w).sum()
        fg.append(F.normalize(pf, dim=0) if norm_protos else pf)
        bg.append(F.normalize(pb, dim=0) if norm_protos else pb)
    x = F.normalize(feats, dim=1) if norm_pixels else feats
    sf = torch.einsum("bchw,kc->bkhw", x, torch.stack(fg))
    sb = torch.einsum("bchw,kc->bkhw", x, torch.stack(bg))
    red = (lambda a: a.amax(1)) if reduce == "max" else (lambda a: a.mean(1))
    return red(sf) - red(sb)


def _score_inputs(pipe, s: dict):
    d = _fss_inputs(pipe, s)
    k = s["k"]
    return d["real_feats"][:k], d["real_masks"][:k], d["test_feats"]


def check_06_4(answer, pipe=None, settings=None, strict: bool = False, tol: float = 1e-4):
    """06.4 The few-shot segmenter. answer: prototype_score(support_feats, support_masks, feats) -> B × h × w,
    the score of ad.PrototypeSegmenter written out (graded on the k real examples' features as support and the
    exercise test scenes' features). Context: the pipeline and EX."""
    def grade(fn):
        _check_pipe(pipe)
        s = settings_06(settings)
        from .. import aligndiff as ad
        sf, sm, tf = _score_inputs(pipe, s)
        out, hint = _call(fn, sf.clone(), sm.copy(), tf.clone())
        if hint:
            return hint
        try:
            out = out.detach().cpu().float() if isinstance(out, torch.Tensor) else \
                torch.as_tensor(np.asarray(out, dtype=np.float32))
        except (TypeError, ValueError, RuntimeError):
            return f"expected a B × h × w tensor of scores, got {type(out).__name__}"
        want = (tf.shape[0], *tf.shape[-2:])
        if tuple(out.shape) != want:
            extra = (" (drop the channel axis: one score per cell)" if out.ndim == 4 and out.shape[1] == 1 else
                     " (score the feature grid; predict() upsamples later)" if out.shape[-2:] != tf.shape[-2:]
                     else "")
            return f"expected one score per cell of the feature grid, shape {want}; got {tuple(out.shape)}{extra}"
        if not torch.isfinite(out).all():
            return ("your scores contain NaN or inf: is a prototype the mean over zero cells? (a support image "
                    "with no foreground or no background cell gives no prototype: skip it)")
        ref = ad.PrototypeSegmenter(sf, sm).score(tf)
        if torch.allclose(out, ref, atol=tol, rtol=0):
            return None
        if torch.allclose(out, -ref, atol=tol, rtol=0):
            return "your score has the wrong sign: best foreground similarity minus best background similarity"
        ratio = float((out * ref).sum() / (ref * ref).sum())
        if abs(ratio - 1) > 0.05 and torch.allclose(out, ratio * ref, atol=10 * tol, rtol=1e-3):
            return (f"your score is {ratio:.2f} × the reference: compare unit vectors (cosine similarity): "
                    "normalise each cell's feature vector (F.normalize(feats, dim=1))")
        slips = [("the prototypes are not unit vectors: normalise each prototype (F.normalize(..., dim=0)) before "
                  "the dot products", dict(norm_protos=False)),
                 ("the cells' features are not unit vectors: normalise them (F.normalize(feats, dim=1))",
                  dict(norm_pixels=False)),
                 ("you average the similarities over the prototypes; take the best one (max over prototypes)",
                  dict(reduce="mean")),
                 ("a cell counts as foreground when more than half of it is covered: average-pool the mask to the "
                  "feature grid (F.adaptive_avg_pool2d) and keep > 0.5, not > 0", dict(cut=0.0)),
                 ("you read the mask at one pixel per cell (nearest resize); take the share of each cell that is "
                  "covered (F.adaptive_avg_pool2d) and keep cells more than half covered", dict(cells="nearest"))]
        for label, kw in slips:
            if torch.allclose(out, prototype_score_06(sf, sm, tf, **kw), atol=tol, rtol=0):
                return label
        gap = float((out - ref).abs().max())
        agree = float(((out > 0) == (ref > 0)).float().mean())
        return (f"your scores differ from the reference by up to {gap:.3g} ({agree:.0%} of the cells on the same "
                "side of 0): per support image, a foreground prototype (mean feature over the cells more than "
                "half covered by its mask) and a background one (the other cells), both unit vectors; per cell, "
                "the best cosine similarity to a foreground prototype minus the best to a background one")
    return _verdict("06.4", answer, grade, strict)


# -- 06.5 another class ------------------------------------------------------------------------------------------
def _other(category: str) -> str:
    return OTHER_06 if category != OTHER_06 else "star"


def check_06_5(answer, pipe=None, settings=None, strict: bool = False):
    """06.5 Another class. answer: {category: count, "triangle": count}: in how many of the n exercise samples of
    each class's plain bank (plain_texts of that class, same steps, guidance, seeds) the detector finds an object of
    that class (tw.find_objects, any colour). Context: the pipeline and EX."""
    def grade(ans):
        from .. import toyworld as tw
        _check_pipe(pipe)
        s = settings_06(settings)
        cat, other = s["category"], _other(s["category"])
        value, hint = _dict_of_numbers(ans, (cat, other), "count", "class")
        if hint:
            return hint
        for c in (cat, other):
            v = value[c]
            if not _number(v):
                return f"{c!r}: expected a count (an integer 0 … {s['n']}), got {v!r}"
            if 0 < float(v) < 1 or float(v) != int(v):
                return f"{c!r}: expected a count of samples (an integer 0 … {s['n']}), not a share: {float(v):g}"
            if not 0 <= float(v) <= s["n"]:
                return f"{c!r}: {float(v):g} is not a count of the {s['n']} exercise samples"
        syn = {c: synthesis_06(pipe, s, category=c) for c in (cat, other)}
        for c in (cat, other):
            v, o = value[c], other if c == cat else cat
            if float(v) == int(_found(syn[c], c).sum()):
                continue
            where = f"{c!r}"
            alts = [(f"{where}: that is the count for the {o}: check which samples you count for which class",
                     int(_found(syn[o], o).sum())),
                    (f"{where}: you counted {o}s in the {c} samples; count the objects the detector names "
                     f"'{c}' (f.shape == {c!r})", int(_found(syn[c], o).sum())),
                    (f"{where}: you counted the {o} samples (the {o}'s prompt bank); the {c}'s samples come from "
                     f"the plain texts of '{c}'", int(_found(syn[o], c).sum())),
                    (f"{where}: you counted samples with any object; count those in which the detector finds a {c}",
                     int(sum(bool(tw.find_objects(im)) for im in syn[c].images))),
                    (f"{where}: you counted only {c}s of the prompt's colour; count a {c} of any colour",
                     int(sum(any(f.shape == c and f.colour == col for f in tw.find_objects(im))
                             for im, col in zip(syn[c].images, syn[c].colours))))]
            for label, alt in alts:
                if float(v) == alt:
                    return label
            return (f"{where}: {int(v)} is not the number of the {s['n']} exercise samples of '{c}' in which the "
                    f"detector finds a {c} (plain bank of '{c}', ad.synthesize with the exercise settings; "
                    f"any(f.shape == {c!r} for f in tw.find_objects(image)))")
        return None
    return _verdict("06.5", answer, grade, strict)


# -- 06.6 guidance -----------------------------------------------------------------------------------------------
def check_06_6(answer, pipe=None, settings=None, strict: bool = False):
    """06.6 Guidance. answer: {7.5: mean IoU, 12: mean IoU}: the coarse masks' mean IoU (ad.coarse_iou) over the
    n exercise samples of the plain bank at each guidance scale. Context: the pipeline and EX."""
    def grade(ans):
        _check_pipe(pipe)
        s = settings_06(settings)
        value, hint = _dict_of_numbers(ans, GUIDANCES_06, "mean IoU", "guidance")
        if hint:
            return hint
        ref = {g: (lambda g=g: coarse_iou_06(synthesis_06(pipe, s, guidance=g))) for g in GUIDANCES_06}
        half = s["steps"] // 2
        for g in GUIDANCES_06:
            bad = _not_an_iou(value[g], f"at guidance {g:g}")
            if bad:
                return bad
        for g in GUIDANCES_06:
            v = value[g]
            if _close(v, ref[g](), TOL_06):
                continue
            where = f"at guidance {g:g}"
            alts = [(f"{where}: your value is the IoU at guidance {o:g}: pass guidance={g:g} to ad.synthesize",
                     ref[o]) for o in GUIDANCES_06 if o != g]
            if all(float(s["guidance"]) != o for o in GUIDANCES_06):
                alts.append((f"{where}: your value is the IoU at GUIDANCE = {s['guidance']:g}: pass guidance="
                             f"{g:g}", lambda: coarse_iou_06(synthesis_06(pipe, s))))
            alts += [(f"{where}: that is the IoU with the late attention of exercise 3: drop attn_steps",
                      lambda: coarse_iou_06(synthesis_06(pipe, s, guidance=g,
                                                         attn_steps=range(half, s["steps"])))),
                     (f"{where}: that is the mean over the samples holding a {s['category']}; average over all "
                      f"{s['n']} samples", lambda: coarse_iou_06(syn := synthesis_06(pipe, s, guidance=g),
                                                                  _found(syn, s["category"])))]
            label = _match(v, alts)
            return label or (f"{where}: {float(v):.3f} is not the coarse masks' mean IoU over the {s['n']} "
                             "exercise samples (ad.synthesize(pipe, ex_bank, EX['n'], steps=STEPS, guidance=..., "
                             "seed=SEED, threshold=THRESHOLD), then np.mean(ad.coarse_iou(syn)))")
        return None
    return _verdict("06.6", answer, grade, strict)
