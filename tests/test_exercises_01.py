"""helpers/exercises/nb01.py (notebook 01): every check accepts an independently written solution and rejects the
typical wrong answers with a specific hint.

The solutions here do not call the checks' reference code: the masks come from one purist_mask call per number of
draws (the checks take the first n of one per-draw call) and are binarised by hand (d > 1.5 × mean); the edits are
decoded and scored as the notebook does (its `to_u8`, `psnr` outside the region). To stay cheap the checks run on two
edits and with shorter schedules here (they take both as arguments); notebooks/solutions/01_diffedit_purist_solutions
.ipynb runs the exercises' own settings in strict mode.
"""
import warnings

import numpy as np
import pytest
import torch

from helpers import exercises as ex
from helpers import toyworld as tw
from helpers.diffedit import latent_to_image_mask, masked_diffusion, purist_mask
from helpers.images import decode, encode, native_size
from helpers.metrics import iou, psnr
from helpers.sampling import img2img
from tests.exercise_checking import verdict, assert_wrong

nb = ex.nb01
SEED = 0
N_EDITS = 2      # the exercises: 3
STEPS_1 = 4      # 01.1 and 01.3 (the exercise: 10)
STEPS_2 = 10     # 01.2 (strength 0.1 needs at least 10 steps)
STEPS_E = 10     # 01.4-01.6 (the exercises: 20)
CHECKS = [ex.check_01_1, ex.check_01_2, ex.check_01_3, ex.check_01_4, ex.check_01_5, ex.check_01_6]


@pytest.mark.parametrize("check", CHECKS)
def test_missing_pipeline_is_a_clear_error(check):
    with pytest.raises(TypeError, match="pipeline"):
        check({1: 0.5})


# -- 01.1-01.3 masks ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ex_edits(pipe):
    return tw.edit_cases(N_EDITS, start=200, size=native_size(pipe))


def by_hand(d):
    return d > 1.5 * d.mean()   # diffusers' rule: above 1.5× the raw map's mean


def score(mask, region):
    return iou(latent_to_image_mask(mask, region.shape), region)


@pytest.fixture(scope="module")
def maps_1(pipe, ex_edits):
    """{n: [mean map of n draws per edit]}, one purist_mask call per n."""
    return {n: [purist_mask(pipe, encode(pipe, c.scene.image), c.reference, c.query, n=n, steps=STEPS_1, seed=SEED)
                for c in ex_edits] for n in (1, 2, 3, 4, 8)}


def test_01_1(pipe, ex_edits, maps_1, capsys):
    ctx, kw = (pipe, SEED), dict(n_edits=N_EDITS, steps=STEPS_1)
    mean = {n: float(np.mean([score(by_hand(d), c.region) for d, c in zip(maps_1[n], ex_edits)])) for n in maps_1}
    sol = {n: mean[n] for n in nb.DRAWS_01_1}
    assert verdict(capsys, ex.check_01_1, sol, *ctx, **kw) == (True, f"01.1: {ex.OK}")
    assert len({round(v, 6) for v in mean.values()}) == len(mean), mean   # else the slips are not told apart here
    draws = [purist_mask(pipe, encode(pipe, c.scene.image), c.reference, c.query, n=8, steps=STEPS_1, seed=SEED,
                         per_draw=True) for c in ex_edits]
    alone = float(np.mean([score(by_hand(d[3]), c.region) for d, c in zip(draws, ex_edits)]))
    rescaled = float(np.mean([score(ex.nb01.binarise(d, "rescale, > 0.5"), c.region)
                              for d, c in zip(maps_1[4], ex_edits)]))
    wrong = {"n = 2 for n = 1": ({**sol, 1: mean[2]}, "the mean IoU at n = 2"),
             "off by one": ({**sol, 2: mean[3]}, "off by one"),
             "draw alone": ({**sol, 4: alone}, "draw 4 alone"),
             "rescale rule": ({**sol, 4: rescaled}, "rescale, > 0.5"),
             "percent": ({n: 100 * v for n, v in sol.items()}, "not an IoU"),
             "missing n": ({n: v for n, v in sol.items() if n != 8}, "expected the keys"),
             "not a dict": (list(sol.values()), "expected a dict")}
    assert alone not in mean.values() and rescaled not in mean.values(), (alone, rescaled, mean)  # told apart
    assert_wrong(capsys, ex.check_01_1, wrong, *ctx, **kw)


def test_01_2(pipe, ex_edits, capsys):
    ctx, kw = (pipe, SEED), dict(n_edits=N_EDITS, steps=STEPS_2)
    maps = {s: [purist_mask(pipe, encode(pipe, c.scene.image), c.reference, c.query, n=2, strength=s,
                            steps=STEPS_2, seed=SEED) for c in ex_edits] for s in nb.STRENGTHS_01_2}
    sol = {s: float(np.mean([score(by_hand(d), c.region) for d, c in zip(maps[s], ex_edits)])) for s in maps}
    assert verdict(capsys, ex.check_01_2, sol, *ctx, **kw)[0] is True
    assert len(set(sol.values())) == len(sol), sol
    normalised = float(np.mean([score(nb.binarise(d, "binarise_diffusers after normalise"), c.region)
                                for d, c in zip(maps[0.1], ex_edits)]))
    wrong = {"strength not passed": ({s: sol[0.5] for s in sol}, "did you pass strength=0.1"),
             "normalised first": ({**sol, 0.1: normalised}, "binarise_diffusers after normalise"),
             "other value": ({**sol, 1.0: sol[1.0] / 2}, "is not the mean IoU"),
             "string keys": ({str(s): v for s, v in sol.items()}, "expected the keys")}
    assert normalised not in sol.values(), (normalised, sol)   # the slip gives another number here
    assert_wrong(capsys, ex.check_01_2, wrong, *ctx, **kw)


def test_01_3(pipe, ex_edits, capsys):
    ctx, kw = (pipe, SEED), dict(n_edits=N_EDITS, steps=STEPS_1)
    c = ex_edits[1]
    assert c.kind == "shape"
    m = by_hand(purist_mask(pipe, encode(pipe, c.scene.image), c.reference, c.query, n=8, steps=STEPS_1, seed=SEED))
    sol = {"union": score(m, c.region), "old": score(m, c.scene.objects[0].mask),
           "new": score(m, c.target.objects[0].mask)}
    assert verdict(capsys, ex.check_01_3, sol, *ctx, **kw)[0] is True
    colour_edit = score(by_hand(purist_mask(pipe, encode(pipe, ex_edits[0].scene.image), ex_edits[0].reference,
                                            ex_edits[0].query, n=8, steps=STEPS_1, seed=SEED)), ex_edits[0].region)
    wrong = {"old and new swapped": ({**sol, "old": sol["new"], "new": sol["old"]}, "the new shape's mask"),
             "union = old": ({**sol, "union": sol["old"]}, "the old shape's mask"),
             "the colour edit": ({**sol, "union": colour_edit}, "the shape edit is edits[1]"),
             "missing key": ({"union": sol["union"]}, "expected the keys"),
             "not a number": ({**sol, "new": None}, "expected a number")}
    assert_wrong(capsys, ex.check_01_3, wrong, *ctx, **kw)


# -- 01.4-01.6 edits ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def case(pipe):
    return tw.edit_cases(1, start=8, size=native_size(pipe), kinds=("colour",))[0]


def outside(pipe, case, lat, region=True):
    """The notebook's to_u8, then PSNR outside the region (or over the whole image)."""
    img = ((decode(pipe, lat)[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    return psnr(img, case.scene.image, mask=~case.region if region else None)


def edit(pipe, case, mask, strength, recipe="inversion", reference=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return masked_diffusion(pipe, encode(pipe, case.scene.image), mask, case.reference if reference is None
                                else reference, case.query, strength, STEPS_E, recipe=recipe, seed=SEED)


def test_01_4(pipe, case, capsys):
    ctx, kw = (pipe, SEED), dict(steps=STEPS_E)
    lat = {(r, s): edit(pipe, case, case.region, s, r) for r in nb.RECIPES for s in nb.STRENGTHS_01_4}
    sol = {r: {s: outside(pipe, case, lat[r, s]) for s in nb.STRENGTHS_01_4} for r in nb.RECIPES}
    assert verdict(capsys, ex.check_01_4, sol, *ctx, **kw)[0] is True
    blend = sol["blend"]
    whole = outside(pipe, case, lat["blend", 0.7], region=False)
    wrong = {"recipes swapped": ({"inversion": blend, "blend": sol["inversion"]}, "the 'blend' recipe's value"),
             "strength not passed": ({**sol, "blend": {s: blend[0.7] for s in blend}}, "did you pass strength=0.5"),
             "whole image": ({**sol, "blend": {**blend, 0.7: whole}}, "the PSNR of the whole image"),
             "missing recipe": ({"blend": blend}, "expected the keys"),
             "missing strength": ({**sol, "blend": {0.5: blend[0.5]}}, "'blend': expected the keys"),
             "not a PSNR": ({**sol, "blend": {**blend, 0.9: -3.0}}, "is not a PSNR")}
    assert_wrong(capsys, ex.check_01_4, wrong, *ctx, **kw)


def test_01_5(pipe, case, capsys):
    ctx, kw = (pipe, 0.7, SEED), dict(steps=STEPS_E)
    ones = edit(pipe, case, np.ones_like(case.region), 0.7)
    plain = img2img(pipe, encode(pipe, case.scene.image), case.query, 0.7, STEPS_E, seed=SEED)
    sol = {"all ones": outside(pipe, case, ones), "img2img": outside(pipe, case, plain)}
    assert verdict(capsys, ex.check_01_5, sol, *ctx, **kw)[0] is True
    gt_mask = outside(pipe, case, edit(pipe, case, case.region, 0.7))
    wrong = {"swapped": ({"all ones": sol["img2img"], "img2img": sol["all ones"]}, "are the two swapped"),
             "ground-truth mask": ({**sol, "all ones": gt_mask}, "not an all-ones mask"),
             "whole image": ({**sol, "img2img": outside(pipe, case, plain, region=False)}, "whole image"),
             "wrong keys": ({"ones": 1.0, "img2img": 2.0}, "expected the keys")}
    assert_wrong(capsys, ex.check_01_5, wrong, *ctx, **kw)


def test_01_6(pipe, case, capsys):
    ctx, kw = (pipe, 0.7, SEED), dict(steps=STEPS_E)
    sol = {"caption": outside(pipe, case, edit(pipe, case, case.region, 0.7, "blend")),
           "empty": outside(pipe, case, edit(pipe, case, case.region, 0.7, "blend", reference=""))}
    assert verdict(capsys, ex.check_01_6, sol, *ctx, **kw)[0] is True
    inversion = outside(pipe, case, edit(pipe, case, case.region, 0.7, "inversion", reference=""))
    wrong = {"swapped": ({"caption": sol["empty"], "empty": sol["caption"]}, "are the two swapped"),
             "inversion recipe": ({**sol, "empty": inversion}, 'pass recipe="blend"'),
             "not a number": ({**sol, "empty": "higher"}, "expected a number")}
    assert_wrong(capsys, ex.check_01_6, wrong, *ctx, **kw)
