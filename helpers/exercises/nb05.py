"""Checks of notebook 05 (DiffSeg): exercises 05.1-05.6."""
from __future__ import annotations

import numpy as np
import torch

from ._common import (NOT_ATTEMPTED, OK, PLACEHOLDERS, TOL, _call, _capture, _check_pipe, _close, _number, _pct,
                      _scenes, _store, _verdict, scenes)


def _weights_key(weights):
    return None if weights is None else tuple(sorted((tuple(r), float(v)) for r, v in weights.items()))


def diffseg_scores(pipe, threshold: float, anchors: int = 16, t: int = 300, weights=None) -> dict:
    """DiffSeg on the exercise scenes: {"miou", "accuracy", "miou_present", "segments"} (cached).

    The same protocol as section 7 of notebook 05: `ds.segment` of the aggregated self-attention (resolution
    `weights`, default the reference's), each image Hungarian-matched to all classes of the toy world.
    """
    from .. import diffseg as ds
    from .. import diffseg_eval as de
    from ..metrics import SegmentationScore
    _check_pipe(pipe)
    key = ("scores", float(threshold), int(anchors), int(t), _weights_key(weights))
    store = _store(pipe)
    if key not in store:
        maps, cap = _capture(pipe, t)
        labs = ds.segment(ds.aggregate(maps, weights=weights), cap.image_hw, float(threshold), int(anchors))
        ref, loose = SegmentationScore(de.toy_classes()), SegmentationScore(de.toy_classes(), present_only=True)
        for lab, s in zip(labs, _scenes(pipe)):
            ref.add(lab, s.semantic)
            loose.add(lab, s.semantic)
        store[key] = {"miou": ref.miou, "accuracy": ref.accuracy, "miou_present": loose.miou,
                      "segments": float(np.mean([len(np.unique(x)) for x in labs]))}
    return store[key]


def _diagnose_miou(value, expected: dict, where: str, others: dict) -> str:
    """A hint for an mIoU that is not `expected["miou"]`: which other quantity or setting it matches."""
    if not _number(value):
        return f"{where}: expected a number (an mIoU), got {value!r}"
    if not 0 <= float(value) <= 1:
        return f"{where}: {float(value):g} is not an mIoU (those lie in [0, 1])"
    if _close(value, expected["accuracy"]):
        return f"{where}: that is the pixel accuracy; the exercise asks for the mIoU (\"miou\")"
    if _close(value, expected["miou_present"]):
        return (f"{where}: that is the present-classes mIoU (\"miou_present\"); take the reference rule's "
                "\"miou\"")
    for label, scores in others.items():
        if _close(value, scores()["miou"]):
            return f"{where}: your value is DiffSeg's mIoU {label}"
    return (f"{where}: {float(value):.3f} is not DiffSeg's mIoU on the exercise scenes "
            f"(held-out scenes {EXERCISE_SCENES.start}…{EXERCISE_SCENES.stop - 1}, all of them, scored with "
            "SegmentationScore(N_CLASSES) as in section 7)")


# -- notebook 05: DiffSeg ---------------------------------------------------------------------------------------
T_05_1 = (100, 300, 600)
REFERENCE_THRESHOLD = 1.1


def check_05_1(answer, pipe=None, threshold: float = 0.7, strict: bool = False):
    """05.1 Timestep. answer: {T: mIoU} for T in 100, 300, 600, DiffSeg at `threshold` on the exercise scenes."""
    def grade(ans):
        _check_pipe(pipe)
        if not isinstance(ans, dict):
            return f"expected a dict {{T: mIoU}} for T = {T_05_1}, got {type(ans).__name__}"
        if not all(_number(k) for k in ans) or {int(k) for k in ans} != set(T_05_1) or len(ans) != len(T_05_1):
            return f"expected the keys {list(T_05_1)} (the timesteps), got {list(ans)}"
        value = {int(k): v for k, v in ans.items()}
        for t in T_05_1:
            v = value[t]
            exp = diffseg_scores(pipe, threshold, t=t)
            if _close(v, exp["miou"]):
                continue
            others = {f"at T = {o} (did you pass t={t}?)": (lambda o=o: diffseg_scores(pipe, threshold, t=o))
                      for o in T_05_1 if o != t}
            if threshold != REFERENCE_THRESHOLD:
                others[f"at the reference threshold {REFERENCE_THRESHOLD} (use THRESHOLD, {threshold:g})"] = \
                    lambda: diffseg_scores(pipe, REFERENCE_THRESHOLD, t=t)
            return _diagnose_miou(v, exp, f"at T = {t}", others)
        return None
    return _verdict("05.1", answer, grade, strict)


def weights_05_2(maps) -> dict:
    """The two resolution weightings of exercise 05.2: {"finest": …, "coarse": …} (each sums to 1)."""
    finest = max(maps, key=lambda r: r[0] * r[1])
    return {"finest": {r: float(r == finest) for r in maps},
            "coarse": {r: float(r != finest) / (len(maps) - 1) for r in maps}}


def check_05_2(answer, pipe=None, threshold: float = 0.7, strict: bool = False):
    """05.2 Resolutions. answer: {"all": mIoU, "finest": mIoU, "coarse": mIoU} on the exercise scenes."""
    def grade(ans):
        _check_pipe(pipe)
        names = ("all", "finest", "coarse")
        if not isinstance(ans, dict) or set(ans) != set(names):
            got = sorted(map(str, ans)) if isinstance(ans, dict) else type(ans).__name__
            return f"expected a dict with the keys {list(names)} (one mIoU each), got {got}"
        maps, _ = _capture(pipe)
        if len(maps) < 2:
            raise ValueError("this model has one attention resolution: exercise 05.2 needs several")
        w = {"all": None, **weights_05_2(maps)}
        score = {k: (lambda k=k: diffseg_scores(pipe, threshold, weights=w[k])) for k in names}
        for k in names:
            if _close(ans[k], score[k]()["miou"]):
                continue
            others = {f"with the {o!r} weights" + (" (did you pass weights=...?)" if o == "all" else ""):
                      score[o] for o in names if o != k}
            return _diagnose_miou(ans[k], score[k](), f"{k!r}", others)
        return None
    return _verdict("05.2", answer, grade, strict)


def background_shares(pipe, threshold: float, fn):
    """(share of background pixels named "background", share of object pixels named by their shape), or a hint."""
    from .. import diffseg as ds
    from .. import toyworld as tw
    maps, cap = _capture(pipe, captions=True)
    store, key = _store(pipe), ("labels", float(threshold))
    if key not in store:
        store[key] = ds.segment(ds.aggregate(maps), cap.image_hw, threshold)
    labs = store[key]
    bg_ok = bg_n = ob_ok = ob_n = 0
    for i, (lab, s, cross) in enumerate(zip(labs, _scenes(pipe), cap.cross)):
        nouns = ds.toy_nouns(s.caption)
        names, hint = _call(fn, lab.copy(), cross.clone(), pipe.tokenizer, s.caption, list(nouns))
        if hint:
            return None, hint
        if not isinstance(names, dict):
            return None, f"expected a dict {{segment id: name}}, got {type(names).__name__}"
        ids = {int(i) for i in np.unique(lab)}
        if {int(k) for k in names if _number(k)} != ids:
            return None, (f"on exercise scene {i}, your dict names segments {sorted(names)}; the segmentation has "
                          f"segments {sorted(ids)}: name each one once")
        allowed = {"background", *nouns}
        wrong = {v for v in names.values() if v not in allowed}
        if wrong:
            return None, f"names must be 'background' or one of the caption's nouns {nouns}; got {sorted(wrong)}"
        look = {int(k): v for k, v in names.items()}
        named = np.array([look[i] for i in sorted(ids)], dtype=object)[np.searchsorted(sorted(ids), lab)]
        truth = np.array(["background", *tw.SHAPES], dtype=object)[s.semantic]
        bg = s.semantic == 0
        bg_ok += int((named[bg] == "background").sum())
        bg_n += int(bg.sum())
        ob_ok += int((named[~bg] == truth[~bg]).sum())
        ob_n += int((~bg).sum())
    return (bg_ok / max(bg_n, 1), ob_ok / max(ob_n, 1)), None


def label_with_background_reference(labels, cross, tokenizer, caption, nouns) -> dict:
    """Exercise 05.3's reference: the start token competes with the nouns, normalised the same way (noun_maps)."""
    from ..text import token_positions
    x = cross / cross.sum(0, keepdim=True).clamp_min(1e-12)
    m = torch.stack([x[0]] + [x[token_positions(tokenizer, caption, w)].mean(0) for w in nouns])
    m = m / m.flatten(1).norm(dim=1)[:, None, None].clamp_min(1e-12)
    lab = torch.as_tensor(np.asarray(labels)).to(m.device)
    names = ["background", *nouns]
    return {int(s): names[int(m[:, lab == s].mean(1).argmax())] for s in torch.unique(lab).tolist()}


def check_05_3(answer, pipe=None, threshold: float = 0.7, strict: bool = False, margin: float = 0.05):
    """05.3 A background word. answer: label_with_background(labels, cross, tokenizer, caption, nouns) -> dict."""
    def grade(fn):
        _check_pipe(pipe)
        got, hint = background_shares(pipe, threshold, fn)
        if hint:
            return hint
        store = _store(pipe)
        key = ("05.3", float(threshold))
        if key not in store:
            store[key] = background_shares(pipe, threshold, label_with_background_reference)[0]
        (bg, ob), (ref_bg, ref_ob) = got, store[key]
        summary = (f"background pixels named 'background': {_pct(bg)}; object pixels named by their own shape: "
                   f"{_pct(ob)}")
        if bg == 0:
            return (f"{summary}. No segment was ever named 'background': add the start token (position 0 of the "
                    "cross-attention) to the candidates, under the name 'background', its map normalised like "
                    "the nouns' (ds.noun_maps: divided by the sum over tokens at each pixel, then by its L2 norm)")
        if bg < ref_bg - margin:
            return (f"{summary}; the start token can do better on the background (about {_pct(ref_bg)}): "
                    "normalise its map exactly like the nouns' (ds.noun_maps: divide by the sum over tokens at "
                    "each pixel, then by the map's L2 norm over pixels)")
        if ob < ref_ob - margin:
            return (f"{summary}: objects lose their names (about {_pct(ref_ob)} is reachable). Is the start "
                    "token's map normalised like the nouns' (ds.noun_maps), and does each segment take the name "
                    "whose mean inside it is highest?")
        return None
    return _verdict("05.3", answer, grade, strict)


def check_05_4(answer, pipe=None, threshold: float = 0.7, strict: bool = False):
    """05.4 Anchors. answer: {anchors per side: mIoU} for every value 2 … the attention's side."""
    def grade(ans):
        _check_pipe(pipe)
        maps, _ = _capture(pipe)
        side = min(max(maps, key=lambda r: r[0] * r[1]))   # anchors per side: at most the finest grid's side
        want = set(range(2, side + 1))
        if not isinstance(ans, dict):
            return f"expected a dict {{anchors per side: mIoU}} for 2 … {side}, got {type(ans).__name__}"
        keys = {int(k) for k in ans if _number(k)}
        if len(keys) != len(ans):
            return "the keys must be numbers of anchors per side (integers)"
        if keys == set(range(2, side)):
            return (f"off by one: your keys stop at {side - 1}; the attention's side is {side}, and "
                    f"range(2, {side}) leaves it out: use range(2, side + 1)")
        if keys != want:
            missing, extra = sorted(want - keys), sorted(keys - want)
            return (f"expected one entry per anchor count 2 … {side} (the attention's side); "
                    f"missing {missing or 'none'}, extra {extra or 'none'}")
        value = {int(k): v for k, v in ans.items()}
        for a in sorted(want):
            exp = diffseg_scores(pipe, threshold, anchors=a)
            if _close(value[a], exp["miou"]):
                continue
            others = {}
            if a > 2:
                others[f"with {a - 1} anchors per side (off by one?)"] = \
                    lambda: diffseg_scores(pipe, threshold, anchors=a - 1)
            others[f"with the reference's {min(16, side)} anchors per side: did you pass anchors={a}?"] = \
                lambda: diffseg_scores(pipe, threshold, anchors=min(16, side))
            if threshold != REFERENCE_THRESHOLD:
                others[f"at the reference threshold {REFERENCE_THRESHOLD} (use THRESHOLD, {threshold:g})"] = \
                    lambda: diffseg_scores(pipe, REFERENCE_THRESHOLD, anchors=a)
            return _diagnose_miou(value[a], exp, f"with {a} anchors per side", others)
        return None
    return _verdict("05.4", answer, grade, strict)


def refine_reference(proposals: torch.Tensor, attn: torch.Tensor, max_iter: int = 300) -> torch.Tensor:
    """Exercise 05.5's reference: Lloyd's k-means on the rows of attn, started from the proposals; a centre that
    gets no row stays where it is."""
    c = proposals.clone()
    for _ in range(max_iter):
        near = torch.cdist(attn, c).argmin(1)
        new = c.clone()
        for j in near.unique().tolist():
            new[j] = attn[near == j].mean(0)
        if torch.equal(new, c):
            break
        c = new
    return c


def _inputs_05_5(pipe, threshold: float, n: int = 3):
    """(proposals, attention, res) of the first n exercise scenes, cached."""
    from .. import diffseg as ds
    store = _store(pipe)
    key = ("05.5", float(threshold), n)
    if key not in store:
        maps, cap = _capture(pipe)
        agg = ds.aggregate(maps)
        res = ds.latent_res(agg, cap.image_hw)
        store[key] = [(ds.merge(a, res, float(threshold)), a, res) for a in agg[:n]]
    return store[key]


def check_05_5(answer, pipe=None, threshold: float = 0.7, strict: bool = False, tol: float = 1e-4):
    """05.5 Refinement. answer: refine(proposals M × K, attn Q × K) -> M × K centres of k-means started there."""
    def grade(fn):
        _check_pipe(pipe)
        for i, (props, attn, _) in enumerate(_inputs_05_5(pipe, threshold)):
            out, hint = _call(fn, props.clone(), attn.clone())
            if hint:
                return hint
            try:
                out = out.detach().cpu() if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))
            except (TypeError, ValueError, RuntimeError):
                return f"expected an M × K tensor of centres, got {type(out).__name__}"
            if tuple(out.shape) != tuple(props.shape):
                return (f"expected one centre per proposal, {tuple(props.shape)} (M × K); got {tuple(out.shape)}. "
                        "Keep a centre that gets no row where it is")
            out = out.to(attn.dtype)
            if not torch.isfinite(out).all():
                return "your centres contain NaN or inf: a centre that gets no row must keep its value"
            scale = float(attn.abs().max())
            if torch.allclose(out, props, atol=tol * scale, rtol=0):
                return "your centres are the proposals, unchanged: run the k-means iterations"
            near = torch.cdist(attn, out).argmin(1)
            for j in near.unique().tolist():
                gap = float((out[j] - attn[near == j].mean(0)).abs().max()) / scale
                if gap > tol:
                    return (f"image {i}: centre {j} is not the mean of the {int((near == j).sum())} rows nearest to "
                            f"it (off by {gap:.1%} of the largest value): assign rows by Euclidean distance and "
                            "repeat until the centres stop moving")
            if not torch.allclose(out, refine_reference(props, attn), atol=10 * tol * scale, rtol=0):
                return ("your centres are a k-means fixed point, but not the one reached from the proposals: start "
                        "from the proposals (not random centres) and keep the centres in the proposals' order")
        return None
    return _verdict("05.5", answer, grade, strict)


def check_05_6(answer, scene=None, n_classes: int | None = None, strict: bool = False,
               high: float = 0.9, gap: float = 0.15):
    """05.6 Scoring rules. answer: an H × W segmentation of `scene` whose mIoU is at least `high` under the
    present-classes rule and at least `gap` lower under the reference's rule."""
    from ..metrics import SegmentationScore

    def grade(seg):
        if scene is None or not hasattr(scene, "semantic"):
            raise TypeError("this check needs the scene as its second argument, e.g. "
                            "exercises.check_05_6(answer, scene)")
        k = n_classes
        if k is None:
            from ..diffseg_eval import toy_classes
            k = toy_classes()
        gt = scene.semantic
        try:
            a = np.asarray(seg.cpu() if isinstance(seg, torch.Tensor) else seg)
        except (TypeError, ValueError):
            return f"expected an H × W array of segment ids, got {type(seg).__name__}"
        if a.shape != gt.shape:
            return f"expected an H × W array of segment ids like scene.semantic, {gt.shape}; got shape {a.shape}"
        if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_)) or a.min() < 0:
            return "segment ids must be integers ≥ 0 (as ds.relabel gives them)"
        a = a.astype(np.int64)
        present = SegmentationScore(k, present_only=True).add(a, gt).miou
        ref = SegmentationScore(k).add(a, gt).miou
        ids, n_cls = np.unique(a), len(np.unique(gt))
        absent = k - n_cls
        scores = (f"present-classes mIoU {present:.2f}, reference mIoU {ref:.2f}, {len(ids)} segment(s) for "
                  f"{n_cls} classes present")
        if present < high:
            return (f"{scores}: the present-classes mIoU should be at least {high}. Start from scene.semantic "
                    "(a perfect segmentation) and change little of it")
        if present - ref < gap:
            if len(ids) <= n_cls:
                return (f"{scores}: with no more segments than classes both rules agree. Add surplus segments "
                        "(split the background into pieces)")
            if len(ids) != int(ids.max()) + 1:
                return (f"{scores}: your ids skip numbers ({len(ids)} segments, largest id {int(ids.max())}). The "
                        "reference's matching counts every id up to the largest as a segment, so an absent class "
                        "takes an unused id at no cost: number the segments 0, 1, 2, … (ds.relabel)")
            return (f"{scores}: the gap should be at least {gap}. The reference matches each of the {absent} "
                    f"class(es) absent from this scene to a surplus segment, which then scores IoU 0: give "
                    f"each absent class a surplus segment")
        return None
    return _verdict("05.6", answer, grade, strict)
