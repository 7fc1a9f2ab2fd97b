"""helpers/exercises (notebook 03): every check accepts its solution and rejects typical wrong answers with a
specific hint. The solutions here take other paths than the checks' references (compare_inversions for PSNR and
cost, edit_scores for the PSNR outside, the notebook's written-out attention processor, a token diff); the
placeholder test for every check is in tests/test_exercises.py. Everything grades on one scene and a short
schedule (ex.STEPS_03 DDIM steps), so null-text inversion stays cheap.
"""
import math

import numpy as np
import pytest
import torch

from helpers import exercises as ex
from helpers.images import encode
from helpers.inversion import (compare_inversions, ddim_inversion, inversion_methods, negative_prompt_inversion,
                               null_text_inversion, reconstruct)
from helpers.p2p import edit, edit_scores
from helpers.text import describe_tokens
from tests.exercise_checking import verdict, assert_wrong

STEPS = ex.STEPS_03


@pytest.fixture(scope="module")
def frozen(pipe):
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    pipe.unet.requires_grad_(False)
    yield pipe
    for p, f in zip(pipe.unet.parameters(), flags):
        p.requires_grad_(f)


@pytest.fixture(scope="module")
def scene(pipe):
    return ex.scene_03(pipe)


@pytest.fixture(scope="module")
def z(pipe, scene):
    return encode(pipe, scene.image)


def table(pipe, scene, methods):
    """{name: (evals, PSNR)} of each inversion method on the exercise scene, by compare_inversions."""
    t = compare_inversions(pipe, [scene], methods, progress=False)
    return {k: (t[k]["evals"][0], t[k]["psnr"][0]) for k in methods}


def test_missing_context_is_a_clear_error():
    for fn, answer in [(ex.check_03_1, {1: 20.0}), (ex.check_03_4, [1]), (ex.check_03_5, torch.zeros(1))]:
        with pytest.raises(TypeError, match="pipeline"):
            fn(answer)


def test_scene_has_one_circle(scene):
    assert [o.shape for o in scene.objects].count("circle") == 1


# -- 03.1 guidance sweep -----------------------------------------------------------------------------------------
def test_03_1(pipe, scene, capsys):
    methods = {g: (lambda g: lambda p, z, c: (ddim_inversion(p, z, c, STEPS), g))(g) for g in ex.GUIDANCES_03_1}
    sol = {g: v[1] for g, v in table(pipe, scene, methods).items()}
    assert verdict(capsys, ex.check_03_1, sol, pipe) == (True, f"03.1: {ex.OK}")
    assert verdict(capsys, ex.check_03_1, {int(g) if g == int(g) else g: v for g, v in sol.items()}, pipe)[0]
    from helpers.images import decode_pil
    from helpers.metrics import psnr
    z = encode(pipe, scene.image)
    u8 = lambda latents: np.asarray(decode_pil(pipe, latents)[0])   # noqa: E731
    round_trip = u8(z)
    d5 = ddim_inversion(pipe, z, scene.caption, STEPS)
    wrong = {
        "guidance not passed": ({g: sol[1.0] for g in sol}, "pass guidance=2"),
        "against the VAE round trip": ({**sol, 1.0: psnr(u8(reconstruct(pipe, d5)), round_trip)}, "VAE round trip"),
        "missing key": ({1.0: sol[1.0], 7.5: sol[7.5]}, "expected the keys"),
        "not a dict": (list(sol.values()), "expected a dict"),
        "not a PSNR": ({**sol, 7.5: -3.0}, "not a PSNR"),
        "off by a dB": ({**sol, 4.0: sol[4.0] + 1}, "is not the PSNR of the DDIM inversion"),
    }
    assert_wrong(capsys, ex.check_03_1, wrong, pipe)


# -- 03.2 cheaper schedules -------------------------------------------------------------------------------------
def test_03_2(pipe, frozen, scene, z, capsys):
    methods = inversion_methods(STEPS, ex.GUIDANCE_03, ex.SCHEDULES_03_2)
    sol = table(frozen, scene, {n: methods[n] for n in ex.SCHEDULES_03_2})
    assert verdict(capsys, ex.check_03_2, sol, pipe) == (True, f"03.2: {ex.OK}")
    ref, bar, first = sol["reference"], sol["tol_scale=3000"], sol["optimise_steps=3"]
    assert ref[0] > first[0] > bar[0] and ref[1] > first[1] > bar[1]   # each cheaper variant costs PSNR
    tol = null_text_inversion(frozen, z, scene.caption, STEPS, ex.GUIDANCE_03, progress=False, tol=3000.0)
    wrong = {
        "options not passed": ({n: ref for n in sol}, "is the cost of 'reference': pass tol_scale=3000"),
        "tol instead of tol_scale": ({**sol, "tol_scale=3000": (tol.evals, bar[1])}, "replaces the bar's base"),
        "20 steps": ({**sol, "reference": (13 * 20, ref[1])}, "20-step inversion"),
        "steps=3": ({**sol, "optimise_steps=3": (13 * 3, first[1])}, "3-step inversion"),
        "not a pair": ({n: p for n, (_, p) in sol.items()}, "expected a pair"),
        "evals not whole": ({**sol, "reference": (64.5, ref[1])}, "whole number"),
        "PSNR off": ({**sol, "optimise_steps=3": (first[0], first[1] + 1)}, "the PSNR is not"),
        "missing key": ({"reference": ref}, "expected a dict with the keys"),
    }
    assert_wrong(capsys, ex.check_03_2, wrong, pipe)


# -- 03.3 blend settings -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ex_inv(pipe, scene, z):
    return negative_prompt_inversion(pipe, z, scene.caption, STEPS, ex.SWAP_GUIDANCE_03)


def blend_answer(pipe, scene, inv, preset="reference", override=True):
    idx, gt, region = ex.swap_03(scene)
    out = {}
    for name, kw in ex.BLEND_SETTINGS_03_3.items():
        e = edit(pipe, inv, gt.caption, "swap", blend=("circle", "square"), preset=preset,
                 **(kw if override else {}))
        s = edit_scores(pipe, e, scene.image, region)
        out[name] = (e.mask.sum().item() / e.mask.numel(), s["outside"], s["outside_vs_source"], s["images"][1])
    return out


def test_03_3(pipe, scene, ex_inv, capsys):
    from helpers.metrics import psnr
    full = blend_answer(pipe, scene, ex_inv)
    sol = {n: v[:2] for n, v in full.items()}
    assert verdict(capsys, ex.check_03_3, sol, pipe)[0] is True
    idx, gt, region = ex.swap_03(scene)
    course = edit(pipe, ex_inv, gt.caption, "swap", blend=("circle", "square"))   # edit's default preset
    course = (course.mask.float().mean().item(), edit_scores(pipe, course, scene.image, region)["outside"])
    wrong = {
        "course preset": ({**sol, "reference": course}, "pass preset=\"reference\""),
        "no override": ({n: sol["reference"] for n in sol}, "as the setting 'reference' does"),
        "percent": ({**sol, "reference": (100 * sol["reference"][0], sol["reference"][1])}, "in [0, 1]"),
        "whole image": ({n: (v[0], psnr(v[3], scene.image)) for n, v in full.items()}, "whole image"),
        "against the source": ({n: (v[0], v[2]) for n, v in full.items()}, "the PSNR outside is"),
        "missing key": ({"reference": sol["reference"]}, "expected a dict with the keys"),
        "not a pair": ({n: v[0] for n, v in sol.items()}, "expected a pair"),
    }
    assert_wrong(capsys, ex.check_03_3, wrong, pipe)


# -- 03.4 token counts -------------------------------------------------------------------------------------------
def own_tokens(tokenizer, source, target):
    """Target positions outside the longest common prefix and suffix of the two token lists."""
    s = [t for _, t in describe_tokens(tokenizer, source)][1:-1]
    t = [t for _, t in describe_tokens(tokenizer, target)][1:-1]
    pre = next(i for i in range(len(t) + 1) if i == min(len(s), len(t)) or s[i] != t[i])
    suf = next(i for i in range(len(t) + 1) if i == min(len(s), len(t)) - pre or s[-1 - i] != t[-1 - i])
    return list(range(1 + pre, 1 + len(t) - suf))


def test_03_4(pipe, scene, capsys):
    target = scene.caption.replace("circle", "circles")
    sol = own_tokens(pipe.tokenizer, scene.caption, target)
    assert verdict(capsys, ex.check_03_4, sol, pipe)[0] is True
    assert verdict(capsys, ex.check_03_4, np.array(sol[::-1]), pipe)[0] is True   # any order, any sequence
    n = len(describe_tokens(pipe.tokenizer, target))
    wrong = {"with the end token": (sol + [n - 1], "end token"),
             "off by one": ([p - 1 for p in sol], "off by one"),
             "start token": ([0] + sol, "start token"),
             "shared tokens": (sol + [1], "also occur"),
             "not a list": (3.5, "expected a list")}
    if len(sol) > 1:   # the toy tokenizer splits "circles" into several tokens
        wrong["the word only"] = (sol[:1], "list every one")
    assert_wrong(capsys, ex.check_03_4, wrong, pipe)


# -- 03.5 sharing self-attention everywhere ----------------------------------------------------------------------
def swap_processor(n_cross, n_self, cap):
    """Notebook 03's SwapProcessor (section 6), with its settings as arguments."""
    class SwapProcessor:
        step = 0

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
            cross = encoder_hidden_states is not None
            context = encoder_hidden_states if cross else hidden_states
            q, k, v = (attn.head_to_batch_dim(f(h)) for f, h in
                       ((attn.to_q, hidden_states), (attn.to_k, context), (attn.to_v, context)))
            p = attn.get_attention_scores(q, k, attention_mask)
            p = p.view(-1, attn.heads, *p.shape[1:])
            side = round(math.sqrt(p.shape[2]))
            if (cross and self.step < n_cross) or (not cross and self.step < n_self and side <= cap):
                p[-1] = p[-2]
            out = attn.batch_to_head_dim(torch.bmm(p.flatten(0, 1), v))
            return attn.to_out[1](attn.to_out[0](out))
    return SwapProcessor()


def run_processor(pipe, inv, prompts, proc):
    before = pipe.unet.attn_processors
    pipe.unet.set_attn_processor(proc)
    try:
        return reconstruct(pipe, inv, prompts, callback=lambda i, t, x: setattr(proc, "step", i + 1))
    finally:
        pipe.unet.set_attn_processor(before)


def test_03_5(pipe, scene, z, ex_inv, capsys):
    _, gt, _ = ex.swap_03(scene)
    prompts = [scene.caption, gt.caption]
    side = max(z.shape[-2:])
    mine = run_processor(pipe, ex_inv, prompts, swap_processor(round(0.8 * STEPS), STEPS, side))
    assert verdict(capsys, ex.check_03_5, mine[1:], pipe)[0] is True
    wrong = {
        "n_cross of STEPS": (run_processor(pipe, ex_inv, prompts, swap_processor(16, STEPS, side))[1:],
                             "n_cross is 80% of EX_STEPS"),
        "half the steps": (run_processor(pipe, ex_inv, prompts, swap_processor(
            round(0.8 * STEPS), round(0.5 * STEPS), side))[1:], "set n_self"),
        "processor not installed": (reconstruct(pipe, ex_inv, prompts)[1:], "is your processor installed"),
        "source row": (mine[:1], "source branch"),
        "both rows": (mine, "only the edited sample"),
        "wrong shape": (mine[1:, :, :4], "expected latents of shape"),
        "not a tensor": (mine[1:].numpy(), "expected the edited sample's latents"),
        "other inversion": (mine[1:] + 0.5, "differ from the swap"),
    }
    assert_wrong(capsys, ex.check_03_5, wrong, pipe)
