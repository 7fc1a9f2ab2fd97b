"""helpers/exercises (notebook 06, AlignDiff): every check accepts an independently written solution and rejects the
typical wrong answers with a specific hint. (The "not attempted yet" placeholders are tested for every check in
tests/test_exercises.py.)

The solutions here do not call the checks' reference code (`exercises.synthesis_06`, `fss_iou_06`,
`prototype_score_06`): they build their own prompt banks, features and IoUs. To stay fast, the exercises run here
with 8 samples of 8 steps instead of the notebook's 8 of 10 (the checks take the settings as context).
notebooks/solutions/06_aligndiff_solutions.ipynb runs the notebook's settings in strict mode.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import aligndiff as ad
from helpers import exercises as ex
from helpers import toyworld as tw
from helpers.images import native_size
from tests.exercise_checking import verdict, assert_wrong

CAT = "star"
EX = dict(n=8, steps=8)   # 8 sampling steps (the notebook: 10); the rest as its defaults (ex.SETTINGS_06)
S = {**ex.SETTINGS_06, **EX}


def mean_iou(masks, truths) -> float:
    inter = [np.logical_and(m, t).sum() for m, t in zip(masks, truths)]
    union = [np.logical_or(m, t).sum() for m, t in zip(masks, truths)]
    return float(np.mean([i / u if u else 1.0 for i, u in zip(inter, union)]))


# -- the framework -----------------------------------------------------------------------------------------------
def test_missing_context_and_bad_settings_are_clear_errors(pipe):
    with pytest.raises(TypeError, match="pipeline"):
        ex.check_06_1({1: 0.5, 3: 0.5, 5: 0.5})
    with pytest.raises(TypeError, match="EX"):
        ex.check_06_3({"all": 0.5, "late": 0.5}, pipe, 12)
    with pytest.raises(ValueError, match="unknown exercise settings"):
        ex.check_06_6({7.5: 0.5, 12: 0.5}, pipe, {"samples": 12})
    with pytest.raises(AssertionError, match="06.5"):
        ex.check_06_5({CAT: "many", "triangle": 1}, pipe, EX, strict=True)
    assert {"06.1", "06.3", "06.4", "06.5", "06.6"} <= set(ex.CHECKS) and "06.2" not in ex.CHECKS


# -- fixtures: the solutions' own syntheses ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def draw(pipe):
    done = {}

    def draw(category=CAT, guidance=S["guidance"], attn_steps=None):
        key = (category, guidance, None if attn_steps is None else tuple(attn_steps))
        if key not in done:
            bank = ad.PromptBank(category)
            for text, colour in ad.plain_texts(category):
                bank.add_text(text, colour)
            done[key] = ad.synthesize(pipe, bank, S["n"], steps=S["steps"], guidance=guidance, seed=S["seed"],
                                      threshold=S["threshold"], attn_steps=attn_steps, progress=False)
        return done[key]
    return draw


def coarse(syn, only=None) -> float:
    truths = [tw.colour_mask(im, c) for im, c in zip(syn.images, syn.colours)]
    keep = np.ones(len(truths), bool) if only is None else only
    return mean_iou(syn.masks[keep], np.stack(truths)[keep])


def holds(syn, shape):
    return np.array([any(f.shape == shape for f in tw.find_objects(im)) for im in syn.images])


# -- 06.1 more shots ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shots(pipe):
    """{k: IoU} with features computed for each support size separately (another batch layout than the check's)."""
    size = native_size(pipe)
    test_images, test_masks = ad.test_scenes(CAT, S["n_test"], size=size)
    test_feats = {}

    def score(k, prompt=f"a {CAT}", on_support=False, t=S["fss_t"]):
        ims, ms, _ = ad.real_examples(CAT, k, size=size)
        feats = ad.unet_features(pipe, ims, t, prompt=prompt)
        seg = ad.PrototypeSegmenter(feats, np.stack(ms))
        if on_support:
            return mean_iou(seg.predict(feats, (size, size)), ms)
        if (prompt, t) not in test_feats:
            test_feats[prompt, t] = ad.unet_features(pipe, test_images, t, prompt=prompt)
        return mean_iou(seg.predict(test_feats[prompt, t], (size, size)), test_masks)
    return score


def test_06_1(pipe, shots, capsys):
    sol = {k: shots(k) for k in (1, 3, 5)}
    assert verdict(capsys, ex.check_06_1, sol, pipe, EX) == (True, f"06.1: {ex.OK}")
    assert verdict(capsys, ex.check_06_1, {float(k): v for k, v in sol.items()}, pipe, EX)[0] is True
    wrong = {
        "same support for all": ({k: sol[3] for k in sol}, "IoU with 3 real examples as support"),
        "scored on the support": ({**sol, 5: shots(5, on_support=True)}, "on its own support images"),
        "no prompt": ({**sol, 1: shots(1, prompt="")}, "with no prompt"),
        "missing k": ({1: sol[1], 3: sol[3]}, "expected the keys"),
        "string keys": ({str(k): v for k, v in sol.items()}, "expected the keys"),
        "not a dict": (list(sol.values()), "expected a dict"),
        "percent": ({**sol, 3: 100 * sol[3]}, "not an IoU"),
        "not a number": ({**sol, 3: "high"}, "expected a number"),
    }
    assert_wrong(capsys, ex.check_06_1, wrong, pipe, EX)


def test_06_1_names_the_default_timestep(pipe, shots, capsys):
    at_200 = {"fss_t": 200}
    sol = {k: shots(k, t=200) for k in (1, 3, 5)}
    assert verdict(capsys, ex.check_06_1, sol, pipe, at_200)[0] is True
    ok, out = verdict(capsys, ex.check_06_1, {k: shots(k) for k in (1, 3, 5)}, pipe, at_200)
    assert ok is False and "pass t=FSS_T (200)" in out, out


# -- 06.3 late attention -----------------------------------------------------------------------------------------
def test_06_3(pipe, draw, capsys):
    steps, half = S["steps"], S["steps"] // 2
    syn_all, syn_late = draw(), draw(attn_steps=range(half, steps))
    sol = {"all": coarse(syn_all), "late": coarse(syn_late)}
    assert verdict(capsys, ex.check_06_3, sol, pipe, EX) == (True, f"06.3: {ex.OK}")
    wrong = {
        "attn_steps not passed": ({**sol, "late": sol["all"]}, "pass attn_steps=range(STEPS // 2, STEPS)"),
        # (wrong answers need not be independent: the check's own syntheses, cached, keep this test fast)
        "first half": ({**sol, "late": ex.coarse_iou_06(ex.synthesis_06(pipe, EX, attn_steps=range(0, half)))},
                       "that is the first half"),
        "off by one": ({**sol, "late": ex.coarse_iou_06(ex.synthesis_06(pipe, EX, attn_steps=range(half - 1, steps)))},
                       "off by one"),
        "swapped": ({"all": sol["late"], "late": sol["all"]}, "'all': that is the late-attention IoU"),
        "only samples with a star": ({**sol, "all": coarse(syn_all, holds(syn_all, CAT))},
                                     "in which the detector finds a star"),
        "a count": ({**sol, "late": 5}, "not an IoU"),
        "extra key": ({**sol, "early": 0.5}, "expected the keys"),
    }
    assert_wrong(capsys, ex.check_06_3, wrong, pipe, EX)


# -- 06.4 the few-shot segmenter's score ------------------------------------------------------------------------
def prototype_score(support_feats, support_masks, feats):
    """Written out with loops and explicit cosines (not the reference's pooling-and-einsum)."""
    h, w = support_feats.shape[-2:]
    H, W = support_masks.shape[1:]
    fg, bg = [], []
    for f, m in zip(support_feats, support_masks):
        cover = torch.as_tensor(m, dtype=torch.float32).reshape(h, H // h, w, W // w).mean((1, 3))
        inside = cover > 0.5
        fg.append(f[:, inside].mean(1))
        bg.append(f[:, ~inside].mean(1))
    protos_f, protos_b = torch.stack(fg), torch.stack(bg)
    cells = feats.permute(0, 2, 3, 1)                                                    # B × h × w × C

    def best(protos):
        cos = (cells @ protos.T) / (cells.norm(dim=-1, keepdim=True) * protos.norm(dim=1))
        return cos.max(-1).values
    return best(protos_f) - best(protos_b)


def test_06_4(pipe, capsys):
    assert verdict(capsys, ex.check_06_4, prototype_score, pipe, EX) == (True, f"06.4: {ex.OK}")
    assert verdict(capsys, ex.check_06_4, lambda *a: prototype_score(*a).numpy(), pipe, EX)[0] is True

    def slip(**kw):
        return lambda sf, sm, f: ex.prototype_score_06(sf, sm, f, **kw)
    wrong = {
        "sign": (lambda *a: -prototype_score(*a), "wrong sign"),
        "cells not normalised": (slip(norm_pixels=False), "× the reference"),
        "prototypes not normalised": (slip(norm_protos=False), "prototypes are not unit vectors"),
        "mean over prototypes": (slip(reduce="mean"), "take the best one"),
        "any overlap": (slip(cut=0.0), "not > 0"),
        "nearest mask": (slip(cells="nearest"), "nearest resize"),
        "channel axis kept": (lambda *a: prototype_score(*a)[:, None], "drop the channel axis"),
        "image size": (lambda sf, sm, f: F.interpolate(prototype_score(sf, sm, f)[:, None], size=sm.shape[1:])[:, 0],
                       "predict() upsamples later"),
        "NaN": (lambda *a: torch.full_like(prototype_score(*a), float("nan")), "NaN"),
        "other": (lambda *a: prototype_score(*a) + 0.01, "differ from the reference by up to 0.01"),
        "raises": (lambda *a: a[0].foo, "raised AttributeError"),
        "not a function": (42, "expected a function"),
    }
    assert_wrong(capsys, ex.check_06_4, wrong, pipe, EX)


def test_06_4_reference_slip_free_is_the_helper(pipe):
    ims, ms, _ = ad.real_examples(CAT, 2, size=native_size(pipe))
    feats = ad.unet_features(pipe, ims, S["fss_t"], prompt=f"a {CAT}")
    assert torch.allclose(ex.prototype_score_06(feats, np.stack(ms), feats),
                          ad.PrototypeSegmenter(feats, np.stack(ms)).score(feats), atol=1e-6)


# -- 06.5 another class ------------------------------------------------------------------------------------------
def test_06_5(pipe, draw, capsys):
    star, tri = draw(), draw("triangle")
    sol = {CAT: int(holds(star, CAT).sum()), "triangle": int(holds(tri, "triangle").sum())}
    assert verdict(capsys, ex.check_06_5, sol, pipe, EX) == (True, f"06.5: {ex.OK}")
    assert verdict(capsys, ex.check_06_5, {k: float(v) for k, v in sol.items()}, pipe, EX)[0] is True
    any_object = sum(bool(tw.find_objects(im)) for im in tri.images)
    own_colour = sum(any(f.shape == "triangle" and f.colour == c for f in tw.find_objects(im))
                     for im, c in zip(tri.images, tri.colours))
    assert len({sol["triangle"], any_object, own_colour, int(holds(tri, CAT).sum())}) == 4  # hints can tell
    wrong = {
        "stars in the triangle samples": ({**sol, "triangle": int(holds(tri, CAT).sum())},
                                          "you counted stars in the triangle samples"),
        "any object": ({**sol, "triangle": any_object}, "samples with any object"),
        "prompt's colour only": ({**sol, "triangle": own_colour}, "of any colour"),
        "a share": ({**sol, CAT: sol[CAT] / S["n"]}, "not a share"),
        "not a number": ({**sol, CAT: "many"}, "expected a count"),
        "wrong class": ({CAT: 1, "circle": 2}, "expected the keys"),
    }
    assert_wrong(capsys, ex.check_06_5, wrong, pipe, EX)


# -- 06.6 guidance -----------------------------------------------------------------------------------------------
def test_06_6(pipe, draw, capsys):
    g, half = ex.GUIDANCES_06, S["steps"] // 2
    sol = {7.5: coarse(draw(guidance=7.5)), 12: coarse(draw(guidance=12.0))}
    assert verdict(capsys, ex.check_06_6, sol, pipe, EX) == (True, f"06.6: {ex.OK}")
    assert g == (7.5, 12.0)
    late = coarse(draw(guidance=7.5, attn_steps=range(half, S["steps"])))
    syn12 = draw(guidance=12.0)
    wrong = {
        "guidance not passed": ({**sol, 12: sol[7.5]}, "IoU at guidance 7.5: pass guidance=12"),
        "swapped": ({7.5: sol[12], 12: sol[7.5]}, "IoU at guidance 12: pass guidance=7.5"),
        "late attention kept": ({**sol, 7.5: late}, "late attention of exercise 3"),
        "only samples with a star": ({**sol, 12: coarse(syn12, holds(syn12, CAT))}, "holding a star"),
        "a count": ({**sol, 12: int(holds(syn12, CAT).sum())}, "not an IoU"),
        "string keys": ({"7.5": sol[7.5], "12": sol[12]}, "expected the keys"),
    }
    assert_wrong(capsys, ex.check_06_6, wrong, pipe, EX)
