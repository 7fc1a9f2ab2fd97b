"""Checks of notebook 04 (cross-attention segmentation): exercises 04.1-04.5.

Every check scores on the exercise scenes (`exercises.scenes(pipe)`, held-out scenes 0…7) with the notebook's default
schedule (`SETTINGS_04`). The references read one tuning-free capture of those scenes (kept per pipeline), so
the threshold, background and layer exercises cost one capture in all; 04.1 inverts four scenes by negative-prompt
inversion on a 10-step schedule; 04.5 traces one 10-step generation.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import torch

from ._common import TOL, _check_pipe, _close, _number, _scenes, _store, _verdict

__all__ = ["SETTINGS_04", "TUNING_STEPS_04", "TUNING_SCENES_04", "LAYERS_04_2", "THRESHOLDS_04_3",
           "BACKGROUNDS_04_4", "ZEBRA_PROMPT_04", "ZEBRA_STEPS_04",
           "check_04_1", "check_04_2", "check_04_3", "check_04_4", "check_04_5"]

SETTINGS_04 = dict(steps=50, guidance=7.5, strength=0.1, seed=0)   # the notebook's default schedule
TUNING_STEPS_04 = 10       # 04.1: a 10-step schedule, every step captured after negative-prompt inversion
TUNING_SCENES_04 = 4       # 04.1: the first four exercise scenes (one inversion each)
# 04.2: every layer, or one grid of layers (a fraction of the latent side), as helpers.xattn_seg.fraction_label names it
LAYERS_04_2 = {"all": None, "latent/1": 1.0, "latent/2": 1 / 2, "latent/4": 1 / 4}
THRESHOLDS_04_3 = (0.5, "otsu")
BACKGROUNDS_04_4 = (0.2, 0.35, 0.5, 0.65, 0.8)
ZEBRA_PROMPT_04 = "a zebra and a red circle"
ZEBRA_STEPS_04 = 10


# -- references (cached per pipeline) ----------------------------------------------------------------------------
def _ex(pipe) -> SimpleNamespace:
    from ..images import encode
    from ..xattn_seg import n_tokens
    store = _store(pipe)
    if "04" not in store:
        sc = _scenes(pipe)
        store["04"] = SimpleNamespace(scenes=sc, latents=encode(pipe, [s.image for s in sc]),
                                      captions=[s.caption for s in sc], size=sc[0].image.shape[:2],
                                      n_tok=n_tokens(pipe.tokenizer, [s.caption for s in sc]))
    return store["04"]


def _maps(pipe, noise: bool = False, half: str = "both", fraction=None) -> torch.Tensor:
    """Tuning-free maps of the exercise scenes (n × tokens × H × W), read with `half` and one grid `fraction`."""
    from ..xattn_seg import capture_tuning_free, image_maps
    store, e = _store(pipe), _ex(pipe)
    skey = ("04", "free", noise)
    if skey not in store:
        s = SETTINGS_04
        store[skey] = capture_tuning_free(pipe, e.latents, e.captions, s["strength"], s["steps"], s["guidance"],
                                          s["seed"], per_step=False, noise=noise, half="both")
    mkey = ("04", "maps", noise, half, fraction)
    if mkey not in store:
        store[mkey] = image_maps(store[skey], len(e.scenes), e.size, None if fraction is None else (fraction,),
                                 tokens=e.n_tok, half=half)
    return store[mkey]


def _scores(pipe, threshold=0.5, background: float = 0.5, **read) -> dict:
    """score_scene on every exercise scene: {"shape", "colour", "argmax", "background": lists}, scene by scene."""
    from ..xattn_seg import score_scene
    store = _store(pipe)
    key = ("04", "scores", threshold, float(background), tuple(sorted(read.items())))
    if key not in store:
        maps, out = _maps(pipe, **read), {"shape": [], "colour": [], "argmax": [], "background": []}
        for b, sc in enumerate(_ex(pipe).scenes):
            for k, v in score_scene(pipe.tokenizer, sc, maps[b], threshold, background).items():
                out[k] += v
        store[key] = out
    return store[key]


def _tuning_steps(pipe, half: str = "both", fraction=None) -> list[float]:
    """04.1's reference: per sampling step, the mean shape-word IoU of the tuning variant with negative-prompt
    inversion (TUNING_STEPS_04 steps, all captured) on the first TUNING_SCENES_04 exercise scenes."""
    from ..images import encode
    from ..inversion import negative_prompt_inversion
    from ..xattn_seg import capture_tuning, image_maps, n_tokens, score_scene
    store = _store(pipe)
    skey = ("04", "tuning stores")
    scenes = _ex(pipe).scenes[:TUNING_SCENES_04]
    if skey not in store:
        g, n = SETTINGS_04["guidance"], TUNING_STEPS_04
        stores = []
        for sc in scenes:
            z = encode(pipe, sc.image)
            inv = negative_prompt_inversion(pipe, z, sc.caption, n, g)
            stores.append(capture_tuning(pipe, z, sc.caption, n, g, n, "negative-prompt", per_step=True,
                                         inversion=inv, half="both")[0])
        store[skey] = stores
    key = ("04", "tuning", half, fraction)
    if key not in store:
        per_step: dict = {}
        for sc, st in zip(scenes, store[skey]):
            n_tok = n_tokens(pipe.tokenizer, [sc.caption])
            for s in st.steps_kept():
                m = image_maps(st, 1, sc.image.shape[:2], None if fraction is None else (fraction,), steps=[s],
                               tokens=n_tok, half=half)
                per_step.setdefault(s, []).extend(score_scene(pipe.tokenizer, sc, m[0])["shape"])
        store[key] = [float(np.mean(per_step[s])) for s in sorted(per_step)]
    return store[key]


def _numbers(values, n: int, what: str, where: str = "") -> tuple[list | None, str | None]:
    """A list of n numbers from `values`, or a hint."""
    pre = f"{where}: " if where else ""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        return None, f"{pre}expected a list of {n} {what}, got {type(values).__name__}"
    if not all(_number(v) for v in values):
        return None, f"{pre}expected numbers ({what}), got {values!r}"
    return [float(v) for v in values], None


def _same(a: list, b: list, tol: float = TOL) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def _mean(v) -> float:
    return float(np.mean(v))


# -- 04.1 the tuning variant's steps ---------------------------------------------------------------------------------
def check_04_1(answer, pipe=None, strict: bool = False):
    """04.1 More steps for the tuning variant. answer: the mean shape-word IoU at each of the TUNING_STEPS_04 sampling
    steps (step 0 first) of the tuning variant with negative-prompt inversion on ex_scenes[:TUNING_SCENES_04]."""
    def grade(ans):
        _check_pipe(pipe)
        want = _tuning_steps(pipe)
        n = len(want)
        vals, hint = _numbers(ans, n, "IoUs, one per sampling step")
        if hint:
            return hint
        if len(vals) != n:
            if len(vals) == 5:
                return (f"you have 5 steps, N_FIRST's default: capture all {n} steps of the {n}-step schedule "
                        f"(steps={n}, n_steps={n})")
            return f"expected one IoU per sampling step, {n} of them (step 0, the noisiest, first); got {len(vals)}"
        if _same(vals, want):
            return None
        if _same(vals[::-1], want):
            return "your list runs backwards: step 0 (the noisiest, t = 901 on 10 steps) comes first"
        if _same(vals, _tuning_steps(pipe, fraction=1.0)):
            return ("these IoUs read the finest layers only (read=section 6's choice?): read every layer "
                    "(leave resolutions= unset)")
        k = next(i for i, (x, y) in enumerate(zip(vals, want)) if abs(x - y) > TOL)
        return (f"step {k}: {vals[k]:.3f} is not the mean shape-word IoU of that step (tuning variant, "
                f"negative-prompt inversion, steps={n}, n_steps={n}, on ex_scenes[:{TUNING_SCENES_04}])")
    return _verdict("04.1", answer, grade, strict)


# -- 04.2 one grid of layers -----------------------------------------------------------------------------------------
def check_04_2(answer, pipe=None, strict: bool = False):
    """04.2 One grid of layers. answer: {"all", "latent/1", "latent/2", "latent/4": mean shape-word IoU} of the
    tuning-free variant on the exercise scenes (clean latent, both halves), reading every layer or one grid."""
    def grade(ans):
        _check_pipe(pipe)
        names = list(LAYERS_04_2)
        if not isinstance(ans, dict) or set(ans) != set(names):
            got = sorted(map(str, ans)) if isinstance(ans, dict) else type(ans).__name__
            return f"expected a dict with the keys {names} (fraction_label of each reading), got {got}"
        for name, f in LAYERS_04_2.items():
            v, where = ans[name], f"{name!r}"
            if not _number(v) or not 0 <= float(v) <= 1:
                return f"{where}: expected a mean IoU in [0, 1] (r.mean('shape')), got {v!r}"
            s = _scores(pipe, fraction=f)
            if _close(v, _mean(s["shape"])):
                continue
            for o, g in LAYERS_04_2.items():
                if o != name and _close(v, _mean(_scores(pipe, fraction=g)["shape"])):
                    arg = "resolutions=None" if f is None else f"resolutions=({f:g},)"
                    return f"{where}: that is the IoU of the {o!r} reading: pass {arg}"
            if _close(v, _mean(s["colour"])):
                return f"{where}: that is the colour words' IoU; the exercise scores the shape words (mean('shape'))"
            if _close(v, _mean(_scores(pipe, half="cond", fraction=f)["shape"])):
                return f"{where}: that reads the conditional half only; average both halves (half='both')"
            if _close(v, _mean(_scores(pipe, noise=True, fraction=f)["shape"])):
                return f"{where}: that reads the noised latent; DiffSegX's clean latent is the default (noise=False)"
            return (f"{where}: {float(v):.3f} is not the tuning-free variant's shape-word IoU on ex_scenes with "
                    f"this reading (evaluate(pipe, ex_scenes, 'tuning-free', **EX, resolutions=...))")
        return None
    return _verdict("04.2", answer, grade, strict)


# -- 04.3 threshold or Otsu ------------------------------------------------------------------------------------------
def check_04_3(answer, pipe=None, strict: bool = False):
    """04.3 Threshold or Otsu. answer: {0.5: [IoU per object], "otsu": [IoU per object]}: the shape-word mask IoU of
    every object of the exercise scenes (scene by scene, Result.iou["shape"]), tuning-free, every layer."""
    def grade(ans):
        _check_pipe(pipe)
        if not isinstance(ans, dict) or len(ans) != 2 or "otsu" not in ans or \
                not any(_number(k) and float(k) == 0.5 for k in ans):
            got = list(ans) if isinstance(ans, dict) else type(ans).__name__
            return f"expected a dict with the keys [0.5, 'otsu'] (one list of IoUs each), got {got}"
        value = {("otsu" if k == "otsu" else 0.5): v for k, v in ans.items()}
        n = len(_scores(pipe)["shape"])
        for th in THRESHOLDS_04_3:
            where = f"threshold {th!r}"
            if _number(value[th]):
                return (f"{where}: expected one IoU per object, {n} of them (r.iou['shape']), not their mean: the "
                        "exercise asks which objects gain")
            vals, hint = _numbers(value[th], n, "IoUs, one per object", where)
            if hint:
                return hint
            if len(vals) != n:
                return (f"{where}: expected one IoU per object of the {len(_ex(pipe).scenes)} scenes, {n}; "
                        f"got {len(vals)}")
            s = _scores(pipe, threshold=th)
            if _same(vals, s["shape"]):
                continue
            other = "otsu" if th == 0.5 else 0.5
            if _same(vals, _scores(pipe, threshold=other)["shape"]):
                return f"{where}: these are the IoUs at threshold {other!r}: pass threshold={th!r}"
            if _same(vals, s["colour"]):
                return f"{where}: these are the colour words' IoUs; the exercise scores the shape words"
            if _same(vals, _scores(pipe, threshold=th, fraction=1.0)["shape"]):
                return (f"{where}: these read the finest layers only (section 6's choice?); read every layer "
                        "(leave resolutions= unset)")
            if sorted(vals) == sorted(s["shape"]):
                return f"{where}: the right IoUs in another order: keep the objects in scene order (r.iou['shape'])"
            return (f"{where}: not the shape-word IoUs of the tuning-free variant on ex_scenes "
                    "(evaluate(pipe, ex_scenes, 'tuning-free', **EX, threshold=...).iou['shape'])")
        return None
    return _verdict("04.3", answer, grade, strict)


# -- 04.4 background level -------------------------------------------------------------------------------------------
def check_04_4(answer, pipe=None, strict: bool = False):
    """04.4 Background level. answer: {b: (mean argmax IoU of the objects, mean background IoU)} for each b of
    BACKGROUNDS_04_4: the argmax segmentation of the tuning-free maps of the exercise scenes, every layer."""
    def grade(ans):
        _check_pipe(pipe)
        if not isinstance(ans, dict) or not all(_number(k) for k in ans) or \
                sorted(float(k) for k in ans) != sorted(BACKGROUNDS_04_4):
            got = list(ans) if isinstance(ans, dict) else type(ans).__name__
            return f"expected a dict with the keys {list(BACKGROUNDS_04_4)} (background levels), got {got}"
        value = {float(k): v for k, v in ans.items()}
        ref = {b: (_mean(_scores(pipe, background=b)["argmax"]), _mean(_scores(pipe, background=b)["background"]))
               for b in BACKGROUNDS_04_4}
        for b in BACKGROUNDS_04_4:
            pair, where = value[b], f"background {b:g}"
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_number(x) for x in pair)):
                return f"{where}: expected a pair (objects' argmax IoU, background IoU), got {pair!r}"
            if _close(pair[0], ref[b][0]) and _close(pair[1], ref[b][1]):
                continue
            if _close(pair[0], ref[b][1]) and _close(pair[1], ref[b][0]):
                return f"{where}: the pair is swapped: (objects, background)"
            for o in BACKGROUNDS_04_4:
                if o != b and _close(pair[0], ref[o][0]) and _close(pair[1], ref[o][1]):
                    return f"{where}: these are the IoUs at background {o:g}: pass background={b:g}"
            if not _close(pair[0], ref[b][0]):
                if _close(pair[0], _mean(_scores(pipe, background=b)["shape"])):
                    return (f"{where}: {pair[0]:.3f} is the shape words' thresholded IoU; the objects' IoU here is "
                            "the argmax's (r.mean('argmax'))")
                return f"{where}: the objects' argmax IoU is not {float(pair[0]):.3f} (r.mean('argmax'))"
            return f"{where}: the background IoU is not {float(pair[1]):.3f} (r.mean('background'))"
        return None
    return _verdict("04.4", answer, grade, strict)


# -- 04.5 a word out of the vocabulary -------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet(pipe):
    """No progress bar from the pipeline call of a check; the pipeline's own setting is restored."""
    old = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe._progress_bar_config = old


def _zebra(pipe) -> SimpleNamespace:
    """04.5's trace: token maps (tokens × H × W) of ZEBRA_PROMPT_04's 10-step generation, and zebra's positions."""
    import warnings
    from ..text import token_positions
    from ..xattn_seg import trace
    store = _store(pipe)
    if ("04", "zebra") not in store:
        with _quiet(pipe), trace(pipe, ZEBRA_PROMPT_04) as tr:
            pipe(ZEBRA_PROMPT_04, num_inference_steps=ZEBRA_STEPS_04, guidance_scale=SETTINGS_04["guidance"],
                 generator=torch.Generator().manual_seed(SETTINGS_04["seed"]))
        maps = tr.maps()[0].float().cpu()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pos = token_positions(pipe.tokenizer, ZEBRA_PROMPT_04, "zebra")
        store[("04", "zebra")] = SimpleNamespace(maps=maps, pos=pos, heat=maps[pos].mean(0))
    return store[("04", "zebra")]


def check_04_5(answer, pipe=None, strict: bool = False, tol: float = 1e-4):
    """04.5 A word out of the vocabulary. answer: the H × W heat map of "zebra", built by hand from tr.maps() of the
    traced generation of ZEBRA_PROMPT_04 (10 steps, guidance 7.5, seed 0)."""
    def grade(ans):
        _check_pipe(pipe)
        z = _zebra(pipe)
        if isinstance(ans, np.ndarray):
            ans = torch.from_numpy(ans)
        if not isinstance(ans, torch.Tensor):
            return f"expected an H × W heat map (a tensor), got {type(ans).__name__}"
        x = ans.detach().float().cpu().squeeze()
        if tuple(x.shape) != tuple(z.heat.shape):
            return (f"expected an H × W heat map at image size, {tuple(z.heat.shape)} (one batch element, the mean "
                    f"over zebra's tokens); got {tuple(ans.shape)}")
        scale = float(z.heat.abs().max())

        def near(y):
            return float((x - y).abs().max()) <= tol * max(scale, 1e-12)

        if near(z.heat):
            return None
        pos, n = z.pos, len(z.pos)
        if n > 1 and near(z.maps[pos].sum(0)):
            return f"that is the sum of zebra's {n} token maps: a word's heat map is their mean"
        for p in pos:
            if n > 1 and near(z.maps[p]):
                return (f"that is the map of one token (position {p}) of the {n} that 'zebra' splits into: average "
                        f"the maps of positions {pos}")
        for shift in (-1, 1):
            q = [p + shift for p in pos]
            if min(q) >= 0 and near(z.maps[q].mean(0)):
                return (f"off by one: zebra's tokens are at positions {pos} (position 0 is the start token; "
                        "describe_tokens shows them)")
        return (f"your map differs from the mean of zebra's token maps (positions {pos}) by up to "
                f"{float((x - z.heat).abs().max()):.3g}: trace pipe({ZEBRA_PROMPT_04!r}, num_inference_steps="
                f"{ZEBRA_STEPS_04}, guidance_scale={SETTINGS_04['guidance']:g}, generator seeded "
                f"{SETTINGS_04['seed']})")
    return _verdict("04.5", answer, grade, strict)
