"""helpers/exercises (notebook 04): every check accepts its solution and rejects typical wrong answers with a
specific hint. The solutions here take other paths than the checks' references: `evaluate` for the tuning-free
scores, a loop of our own over `capture_tuning` stores for the tuning variant's steps, and the token maps of a
traced generation averaged by hand; the placeholder test for every check is in tests/test_exercises.py.
"""
import numpy as np
import pytest
import torch

from helpers import exercises as ex
from helpers.images import encode
from helpers.inversion import negative_prompt_inversion
from helpers.metrics import binarise, iou
from helpers.text import describe_tokens
from helpers.xattn_seg import capture_tuning, evaluate, fraction_label, image_maps, trace
from tests.exercise_checking import verdict, assert_wrong

SETTINGS = dict(ex.SETTINGS_04, progress=False, per_step=False)


@pytest.fixture(scope="module")
def ex_scenes(pipe):
    return ex.scenes(pipe)


def test_missing_context_is_a_clear_error():
    for fn, answer in [(ex.check_04_1, [0.5] * 10), (ex.check_04_5, torch.zeros(4, 4))]:
        with pytest.raises(TypeError, match="pipeline"):
            fn(answer)


# -- 04.1 the tuning variant's steps ---------------------------------------------------------------------------------
def step_ious(pipe, scenes):
    """Per sampling step, the mean shape-word IoU over the objects of `scenes` (tuning, negative-prompt inversion),
    reading every layer and the finest layers only; both halves (negative-prompt inversion makes them equal)."""
    n, g = ex.TUNING_STEPS_04, ex.SETTINGS_04["guidance"]
    per_step = {}
    for sc in scenes:
        z = encode(pipe, sc.image)
        store, _ = capture_tuning(pipe, z, sc.caption, n, g, n, inversion=negative_prompt_inversion(
            pipe, z, sc.caption, n, g))
        n_tok = len(describe_tokens(pipe.tokenizer, sc.caption))
        for s in range(n):
            for h, f in [("both", None), ("both", 1.0)]:
                maps = image_maps(store, 1, sc.image.shape[:2], None if f is None else (f,), steps=[s],
                                  tokens=n_tok, half=h)[0]
                for j, o in enumerate(sc.objects):
                    heat = maps[_shape_positions(pipe.tokenizer, sc, j)].mean(0)
                    per_step.setdefault((h, f), {}).setdefault(s, []).append(iou(binarise(heat, 0.5), o.mask))
    return {k: [float(np.mean(v[s])) for s in sorted(v)] for k, v in per_step.items()}


def _shape_positions(tokenizer, sc, j):
    from helpers.text import token_positions
    return token_positions(tokenizer, sc.caption, sc.objects[j].shape, sc.occurrence(j, sc.objects[j].shape))


@pytest.fixture(scope="module")
def steps_04_1(pipe, ex_scenes):
    return step_ious(pipe, ex_scenes[:ex.TUNING_SCENES_04])


def test_04_1(pipe, steps_04_1, capsys):
    sol = steps_04_1[("both", None)]
    assert verdict(capsys, ex.check_04_1, sol, pipe) == (True, f"04.1: {ex.OK}")
    assert verdict(capsys, ex.check_04_1, np.array(sol), pipe)[0] is True   # an array is fine
    wrong = {"N_FIRST steps": (sol[:5], "N_FIRST"),
             "backwards": (sol[::-1], "backwards"),
             "finest layers": (steps_04_1[("both", 1.0)], "finest layers only"),
             "one step off": (sol[:3] + [sol[3] + 0.1] + sol[4:], "step 3"),
             "not a list": (0.5, "expected a list"),
             "wrong length": (sol + sol, "one IoU per sampling step")}
    assert_wrong(capsys, ex.check_04_1, wrong, pipe)


# -- 04.2 one grid of layers -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def readings(pipe, ex_scenes):
    return {fraction_label(f): evaluate(pipe, ex_scenes, "tuning-free", resolutions=f, **SETTINGS)
            for f in (None, 1, 1 / 2, 1 / 4)}


def test_04_2(pipe, ex_scenes, readings, capsys):
    sol = {k: r.mean("shape") for k, r in readings.items()}
    assert verdict(capsys, ex.check_04_2, sol, pipe) == (True, f"04.2: {ex.OK}")
    cond = evaluate(pipe, ex_scenes, "tuning-free", resolutions=(1 / 2,), half="cond", **SETTINGS)
    noised = evaluate(pipe, ex_scenes, "tuning-free", resolutions=None, noise=True, **SETTINGS)
    wrong = {"resolutions not passed": ({k: sol["all"] for k in sol}, "pass resolutions=(1,)"),
             # on the toy model colour and shape words attend alike: they differ at the coarsest layers
             "colour words": ({**sol, "latent/4": readings["latent/4"].mean("colour")}, "colour words"),
             "conditional half": ({**sol, "latent/2": cond.mean("shape")}, "conditional half"),
             "noised latent": ({**sol, "all": noised.mean("shape")}, "noised latent"),
             "missing key": ({"all": sol["all"]}, "expected a dict with the keys"),
             "percent": ({**sol, "all": 100 * sol["all"]}, "in [0, 1]"),
             "off": ({**sol, "latent/4": sol["latent/4"] + 0.05}, "is not the tuning-free")}
    assert_wrong(capsys, ex.check_04_2, wrong, pipe)


# -- 04.3 threshold or Otsu ------------------------------------------------------------------------------------------
def test_04_3(pipe, ex_scenes, readings, capsys):
    otsu = evaluate(pipe, ex_scenes, "tuning-free", threshold="otsu", **SETTINGS)
    sol = {0.5: readings["all"].iou["shape"], "otsu": otsu.iou["shape"]}
    assert verdict(capsys, ex.check_04_3, sol, pipe) == (True, f"04.3: {ex.OK}")
    shuffled = list(sol["otsu"])
    shuffled[0], shuffled[-1] = shuffled[-1], shuffled[0]
    wrong = {"means": ({k: float(np.mean(v)) for k, v in sol.items()}, "not their mean"),
             "threshold not passed": ({0.5: sol[0.5], "otsu": sol[0.5]}, "pass threshold='otsu'"),
             "colour words": ({**sol, 0.5: readings["all"].iou["colour"]}, "colour words"),
             "finest layers": ({**sol, "otsu": evaluate(pipe, ex_scenes, "tuning-free", threshold="otsu",
                                                        resolutions=(1,), **SETTINGS).iou["shape"]},
                               "finest layers only"),
             "order": ({**sol, "otsu": shuffled}, "another order"),
             "first scene only": ({**sol, 0.5: sol[0.5][:3]}, "one IoU per object"),
             "keys": ({0.5: sol[0.5], 0.6: sol["otsu"]}, "expected a dict with the keys")}
    assert_wrong(capsys, ex.check_04_3, wrong, pipe)


# -- 04.4 background level -------------------------------------------------------------------------------------------
def test_04_4(pipe, ex_scenes, readings, capsys):
    runs = {b: evaluate(pipe, ex_scenes, "tuning-free", background=b, **SETTINGS) for b in ex.BACKGROUNDS_04_4}
    sol = {b: (r.mean("argmax"), r.mean("background")) for b, r in runs.items()}
    assert verdict(capsys, ex.check_04_4, sol, pipe) == (True, f"04.4: {ex.OK}")
    lo, hi = ex.BACKGROUNDS_04_4[0], ex.BACKGROUNDS_04_4[-1]
    wrong = {"swapped": ({**sol, lo: sol[lo][::-1]}, "swapped"),
             "background not passed": ({b: sol[0.5] for b in sol}, "pass background=0.2"),
             "shape words": ({**sol, lo: (readings["all"].mean("shape"), sol[lo][1])}, "thresholded IoU"),
             "background off": ({**sol, hi: (sol[hi][0], sol[hi][1] - 0.1)}, "background IoU is not"),
             "not a pair": ({**sol, lo: sol[lo][0]}, "expected a pair"),
             "keys": ({0.5: sol[0.5]}, "expected a dict with the keys")}
    assert_wrong(capsys, ex.check_04_4, wrong, pipe)


# -- 04.5 a word out of the vocabulary -------------------------------------------------------------------------------
def test_04_5(pipe, capsys):
    prompt = ex.ZEBRA_PROMPT_04
    with trace(pipe, prompt) as tr:
        pipe(prompt, num_inference_steps=ex.ZEBRA_STEPS_04, guidance_scale=ex.SETTINGS_04["guidance"],
             generator=torch.Generator().manual_seed(ex.SETTINGS_04["seed"]))
    maps = tr.maps()[0]
    tokens = describe_tokens(pipe.tokenizer, prompt)
    words = [p for p, t in tokens if 0 < p < len(tokens) - 1]
    # zebra's tokens: those before " and" that are not the article (the toy tokenizer spells it z, e, b, r, a</w>)
    and_at = next(p for p, t in tokens if t.startswith("and"))
    pos = [p for p in words if 1 < p < and_at]
    sol = maps[pos].mean(0)
    assert verdict(capsys, ex.check_04_5, sol, pipe) == (True, f"04.5: {ex.OK}")
    assert verdict(capsys, ex.check_04_5, sol.numpy(), pipe)[0] is True
    wrong = {"sum": (maps[pos].sum(0), "sum"),
             "off by one": (maps[[p - 1 for p in pos]].mean(0), "off by one"),
             "every token map": (maps[pos], "expected an H × W"),
             "not a tensor": ([[0.0]], "expected an H × W heat map"),
             "other word": (maps[[p for p, t in tokens if t.startswith("circle")]].mean(0), "differs")}
    if len(pos) > 1:
        wrong["first token"] = (maps[pos[0]], "one token")
    assert_wrong(capsys, ex.check_04_5, wrong, pipe)
