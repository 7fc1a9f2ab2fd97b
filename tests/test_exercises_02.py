"""helpers/exercises/nb02.py (notebook 02): every check accepts an independently written solution and rejects the
typical wrong answers with a specific hint.

The solutions here do not call the checks' reference code: the masks come from fast_mask / improved_mask calls
binarised and scored by hand (d > 1.5 × mean for diffusers' rule), the edits from the diffusers pipelines called
directly and scored with edit_report. To stay cheap the mask checks run on two edits here (they take n_edits);
notebooks/solutions/02_fast_diffedit_and_diffusers_solutions.ipynb runs the exercises' own settings in strict mode.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import exercises as ex
from helpers import toyworld as tw
from helpers.diffedit import blur, diffedit_pipeline, edit_report, fast_mask, improved_mask, inpaint_pipeline
from helpers.diffedit import latent_to_image_mask
from helpers.images import encode, native_size
from helpers.loading import default_inpaint_model, resolve_model
from helpers.metrics import iou, psnr
from tests.exercise_checking import verdict, assert_wrong

nb = ex.nb02
SEED = 0
N_EDITS = 2      # the exercises: 3
CHECKS = [ex.check_02_1, ex.check_02_2, ex.check_02_3, ex.check_02_4, ex.check_02_5]


@pytest.mark.parametrize("check", CHECKS)
def test_missing_pipeline_is_a_clear_error(check):
    with pytest.raises(TypeError, match="pipeline"):
        check({1: 0.5})


def test_02_4_needs_the_checkpoint(pipe):
    with pytest.raises(TypeError, match="INPAINT_MODEL"):
        ex.check_02_4({"base": {}}, pipe, None)


# -- 02.1-02.3 masks ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ex_edits(pipe):
    return tw.edit_cases(N_EDITS, size=native_size(pipe))


@pytest.fixture(scope="module")
def ex_z(pipe, ex_edits):
    return [encode(pipe, c.scene.image) for c in ex_edits]


def score(mask, region):
    return iou(latent_to_image_mask(mask, region.shape), region)


def test_02_1(pipe, ex_edits, ex_z, capsys):
    ctx, kw = (pipe, SEED), dict(n_edits=N_EDITS)
    maps = {n: [fast_mask(pipe, z, c.reference, c.query, n=n, seed=SEED) for c, z in zip(ex_edits, ex_z)]
            for n in nb.DRAWS_02_1}
    sol = {n: float(np.mean([score(d > 1.5 * d.mean(), c.region) for d, c in zip(maps[n], ex_edits)]))
           for n in maps}
    assert verdict(capsys, ex.check_02_1, sol, *ctx, **kw) == (True, f"02.1: {ex.OK}")
    assert len(set(sol.values())) == len(sol), sol   # else the slips are not told apart here
    blurred = float(np.mean([score(blur(d > 1.5 * d.mean()) > 0, c.region) for d, c in zip(maps[4], ex_edits)]))
    wrong = {"n = 4 for n = 1": ({**sol, 1: sol[4]}, "the mean IoU at n = 4"),
             "blurred": ({**sol, 4: blurred}, "blur(mask) > 0"),
             "percent": ({n: 100 * v for n, v in sol.items()}, "not an IoU"),
             "missing n": ({1: sol[1], 4: sol[4]}, "expected the keys"),
             "other value": ({**sol, 20: sol[20] / 2}, "is not the mean IoU"),
             "not a dict": (list(sol.values()), "expected a dict")}
    assert_wrong(capsys, ex.check_02_1, wrong, *ctx, **kw)


def improved_ious(pipe, ex_edits, ex_z, **kw):
    return [iou(improved_mask(pipe, z, c.reference, c.query, image=c.scene.image, seed=SEED, **kw).numpy(),
                c.region) for c, z in zip(ex_edits, ex_z)]


def test_02_2(pipe, ex_edits, ex_z, capsys):
    ctx, kw = (pipe, SEED), dict(n_edits=N_EDITS)
    sol = {s: improved_ious(pipe, ex_edits, ex_z, n=5, strengths=s) for s in [(0.5,), (0.75,), (0.5, 0.75)]}
    assert verdict(capsys, ex.check_02_2, sol, *ctx, **kw)[0] is True
    bare = {0.5: sol[(0.5,)], (0.75,): sol[(0.75,)], (0.5, 0.75): sol[0.5, 0.75]}
    assert verdict(capsys, ex.check_02_2, bare, *ctx, **kw)[0] is True   # a bare number: that one strength
    assert len({v[1] for v in sol.values()}) == len(sol), sol   # the shape edit tells the strengths apart
    no_guide = [iou(improved_mask(pipe, z, c.reference, c.query, guide=False, n=5, strengths=(0.75,),
                                  seed=SEED).numpy(), c.region) for c, z in zip(ex_edits, ex_z)]
    wrong = {"strengths not passed": ({**sol, (0.75,): sol[0.5, 0.75]}, "did you pass strengths=(0.75,)"),
             "no guide": ({**sol, (0.75,): no_guide}, "without the image guide"),
             "n default": ({**sol, (0.5,): improved_ious(pipe, ex_edits, ex_z, strengths=(0.5,))},
                           "pass n=5"),
             "order": ({**sol, (0.75,): sol[(0.75,)][::-1]}, "in another order"),
             "a mean": ({**sol, (0.75,): float(np.mean(sol[(0.75,)]))}, "expected a list of 2 IoUs"),
             "keys": ({"0.5": 1}, "expected the keys")}
    assert_wrong(capsys, ex.check_02_2, wrong, *ctx, **kw)


def test_02_3(pipe, ex_edits, ex_z, capsys):
    ctx, kw = (pipe, SEED), dict(n_edits=N_EDITS)
    sol = {g: {th: float(np.mean(improved_ious(pipe, ex_edits, ex_z, n=5, guide=g, threshold=th)))
               for th in nb.THRESHOLDS_02_3} for g in (True, False)}
    assert verdict(capsys, ex.check_02_3, sol, *ctx, **kw)[0] is True
    flat = [v for d in sol.values() for v in d.values()]
    assert len(set(flat)) == len(flat), sol
    wrong = {"guides swapped": ({True: sol[False], False: sol[True]}, "are the two swapped"),
             "threshold not passed": ({**sol, False: {th: sol[False][0.45] for th in sol[False]}},
                                      "did you pass threshold=0.65"),
             "named keys": ({"guide": sol[True], "no guide": sol[False]}, "key the dict by the guide="),
             "missing threshold": ({**sol, True: {0.45: sol[True][0.45]}}, "guide=True: expected the keys"),
             "above one": ({**sol, True: {**sol[True], 0.85: 1.5}}, "is not an IoU")}
    assert_wrong(capsys, ex.check_02_3, wrong, *ctx, **kw)


# -- 02.4-02.5 edits ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def case(pipe):
    return tw.edit_cases(1, start=11, size=native_size(pipe))[0]


def test_02_4(pipe, case, capsys):
    model = default_inpaint_model(resolve_model("toy"))
    pipes = {"base": inpaint_pipeline(pipe), "checkpoint": inpaint_pipeline(pipe, model)}
    mask = Image.fromarray(case.region.astype(np.uint8) * 255)
    imgs = {(k, s): np.asarray(ip(case.query, image=case.scene.pil(), mask_image=mask, num_inference_steps=10,
                                  strength=s, height=case.region.shape[0], width=case.region.shape[1],
                                  generator=torch.Generator().manual_seed(SEED)).images[0])
            for k, ip in pipes.items() for s in (1.0, 0.6)}
    sol = {k: {s: edit_report(imgs[k, s], case)["psnr_out"] for s in (1.0, 0.6)} for k in pipes}
    ctx = (pipe, model, SEED)
    assert verdict(capsys, ex.check_02_4, sol, *ctx)[0] is True
    whole = psnr(imgs["checkpoint", 1.0], case.scene.image)
    ck = sol["checkpoint"]
    wrong = {"swapped": ({"base": ck, "checkpoint": sol["base"]}, "are the two swapped"),
             "strength not passed": ({**sol, "checkpoint": {1.0: ck[1.0], 0.6: ck[1.0]}}, "did you pass strength=0.6"),
             "whole image": ({**sol, "checkpoint": {**ck, 1.0: whole}}, "the PSNR of the whole image"),
             "missing pipeline": ({"base": sol["base"]}, "expected the keys"),
             "not a PSNR": ({**sol, "base": {1.0: -1.0, 0.6: 3.0}}, "is not a PSNR")}
    assert_wrong(capsys, ex.check_02_4, wrong, *ctx)


def test_02_5(pipe, case, capsys):
    dp = diffedit_pipeline(pipe)
    x = torch.from_numpy(case.scene.image).permute(2, 0, 1)[None].float() / 255

    def g():
        return torch.Generator().manual_seed(SEED)

    m = dp.generate_mask(image=x, source_prompt=case.reference, target_prompt=case.query, generator=g())

    def run(strength, steps, inv_strength=0.8, negative=True):
        inv = dp.invert(prompt=case.reference, image=x, inpaint_strength=inv_strength, num_inference_steps=10,
                        generator=g()).latents
        try:
            out = dp(prompt=case.query, mask_image=m, image_latents=inv, inpaint_strength=strength,
                     num_inference_steps=steps, negative_prompt=case.reference if negative else None,
                     generator=g()).images[0]
        except ValueError as e:
            return type(e).__name__
        return edit_report(np.asarray(out), case)["psnr_out"]

    sol = {"matched": run(0.8, 10), "mismatched": run(0.5, 10), "same count": run(0.5, 16)}
    assert isinstance(sol["matched"], float) and isinstance(sol["same count"], float), sol
    assert verdict(capsys, ex.check_02_5, sol, pipe, SEED)[0] is True
    fixed = run(0.5, 10, inv_strength=0.5)
    wrong = {"inverted at the edit's strength": ({**sol, "mismatched": fixed}, "that is the pitfall"),
             "no negative prompt": ({**sol, "matched": run(0.8, 10, negative=False)}, "without negative_prompt"),
             "swapped": ({**sol, "matched": sol["same count"]}, "the 'same count' value"),
             "missing key": ({"matched": sol["matched"]}, "expected the keys")}
    if isinstance(sol["mismatched"], str):   # this diffusers refuses the mismatch of counts
        wrong["exception object"] = ({**sol, "mismatched": ValueError("x")}, "class name as a string")
        wrong["wrong name"] = ({**sol, "mismatched": "RuntimeError"}, f"raises {sol['mismatched']}")
    assert_wrong(capsys, ex.check_02_5, wrong, pipe, SEED)
