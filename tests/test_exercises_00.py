"""helpers/exercises/nb00.py (notebook 00): every check accepts an independently written solution and rejects the
typical wrong answers with a specific hint.

The solutions here do not call the checks' reference code: 00.1 runs diffusers' own pipeline, 00.2 writes the
guided DDIM loop out, 00.3/00.4 capture all scenes in one batched UNet call per timestep, 00.5 scans strengths k/20.
To stay cheap, 00.1 is graded on 4 captions, 00.2 with 5 sampling steps and 00.5 on 3 scenes (the checks take
them as arguments); notebooks/solutions/00_tour_of_stable_diffusion_solutions.ipynb runs the exercises' own settings
in strict mode.
"""
import numpy as np
import pytest
import torch

from helpers import exercises as ex
from helpers import toyworld as tw
from helpers.attention import capture_attention, cross_maps, word_heatmap
from helpers.images import decode_pil, encode, native_size, vae_factor
from helpers.metrics import binarise, iou
from helpers.sampling import add_noise, ddim_step, img2img, random_latents, seeded_noise, timesteps
from helpers.text import embed
from tests.exercise_checking import verdict, assert_wrong

nb = ex.nb00
SEED = 0
CAPS = range(200, 204)   # 00.1 on four captions here (the exercise: 16)
STEPS_2 = 5              # 00.2 with five sampling steps here (the exercise: the notebook's STEPS)
SCENES_5 = range(3, 6)   # 00.5 on three scenes here (the exercise: 3…7)


@pytest.mark.parametrize("check", [ex.check_00_1, ex.check_00_2, ex.check_00_3, ex.check_00_4, ex.check_00_5])
def test_missing_pipeline_is_a_clear_error(check):
    with pytest.raises(TypeError, match="pipeline"):
        check({1: 0.5})


# -- 00.1 guidance -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sol_00_1(pipe):
    """diffusers' pipeline, one batch per scale, from the same seed."""
    caps = [tw.heldout_scene(i).caption for i in CAPS]
    rates = {}
    for g in nb.GUIDANCES_00_1:
        images = pipe(caps, num_inference_steps=nb.STEPS_00_1, guidance_scale=g, output_type="pil",
                      generator=torch.Generator().manual_seed(SEED)).images
        rates[g] = float(np.mean([tw.adheres(np.asarray(im), c) for im, c in zip(images, caps)]))
    return rates


def test_00_1(pipe, sol_00_1, capsys):
    kw = dict(captions=CAPS)
    assert verdict(capsys, ex.check_00_1, sol_00_1, pipe, SEED, **kw) == (True, f"00.1: {ex.OK}")
    assert len(set(sol_00_1.values())) > 1, sol_00_1   # the scales differ, or "forgot guidance" is undetectable
    slow = nb.adherence_rates(pipe, SEED, steps=nb.SECTION_STEPS, captions=CAPS, guidances=(1.0,))[1.0]
    assert slow != sol_00_1[1.0]                        # else the 25-steps slip below is not a slip here
    wrong = {"forgot guidance": ({g: sol_00_1[7.5] for g in sol_00_1}, "did you pass guidance=g"),
             "percent": ({g: 100 * v for g, v in sol_00_1.items()}, "percentage"),
             "three captions": ({**sol_00_1, 1.0: 2 / 3}, "not a count out of the 4 captions"),
             "section's 25 steps": ({**sol_00_1, 1.0: slow}, "section 8's 25 steps"),
             "one caption off": ({**sol_00_1, 1.0: next(v for v in (sol_00_1[1.0] - 0.25, sol_00_1[1.0] + 0.25)
                                                         if 0 <= v <= 1 and v != slow)}, "the reference has"),
             "missing scale": ({g: v for g, v in sol_00_1.items() if g != 15.0}, "expected the keys"),
             "not a dict": (list(sol_00_1.values()), "expected a dict"),
             "string keys": ({str(g): v for g, v in sol_00_1.items()}, "expected the keys")}
    assert_wrong(capsys, ex.check_00_1, wrong, pipe, SEED, **kw)


# -- 00.2 negative prompts ---------------------------------------------------------------------------------------
def make_sampler(pipe, guidance=7.5, swap=False, fixed=None, decoded=False):
    """Section 8's loop with a negative prompt; the keywords make the typical slips."""
    @torch.no_grad()
    def sample_neg(prompt, negative, steps=STEPS_2, seed=SEED):
        if fixed is not None:
            negative = fixed
        if swap:
            prompt, negative = negative, prompt
        latents = random_latents(pipe, 1, seed)
        cond, neg = embed(pipe, prompt), embed(pipe, negative)
        ts = timesteps(pipe, steps)
        for i, t in enumerate(ts):
            e_neg, e_txt = pipe.unet(torch.cat([latents, latents]), t,
                                     encoder_hidden_states=torch.cat([neg, cond])).sample.chunk(2)
            eps = e_neg + guidance * (e_txt - e_neg)
            latents = ddim_step(pipe, latents, eps, t, ts[i + 1] if i + 1 < len(ts) else -1)
        return decode_pil(pipe, latents)[0] if decoded else latents
    return sample_neg


def test_00_2(pipe, capsys):
    ctx = (pipe, STEPS_2, SEED)
    assert verdict(capsys, ex.check_00_2, make_sampler(pipe), *ctx)[0] is True
    plain = make_sampler(pipe, fixed="")
    wrong = {"negative ignored": (plain, "the negative prompt is not used"),
             "swapped": (make_sampler(pipe, swap=True), "swapped"),
             "no guidance": (make_sampler(pipe, guidance=1.0), "unguided"),
             "negative hard-coded": (make_sampler(pipe, fixed=nb.NEGATIVE_00_2), "fixed inside your function"),
             "returns an image": (make_sampler(pipe, decoded=True), "got Image"),
             "raises": (lambda prompt, negative: 1 / 0, "raised ZeroDivisionError"),
             "not a function": (plain(nb.PROMPT_00_2, nb.NEGATIVE_00_2), "expected a function"),
             "other seed": (lambda p, n: make_sampler(pipe)(p, n, seed=SEED + 1), "differs from the reference")}
    assert_wrong(capsys, ex.check_00_2, wrong, *ctx)


# -- 00.3 and 00.4 heat maps -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def heat_ious(pipe):
    """{(t, kind): mean IoU} from one batched UNet pass per timestep over the exercise's scenes."""
    scenes = [tw.heldout_scene(i, size=native_size(pipe)) for i in nb.SCENES_00_3]
    z = encode(pipe, [s.image for s in scenes])
    noise = seeded_noise((1, *z.shape[1:]), SEED, z).expand_as(z)   # shape_heatmap_iou noises each scene alike
    cond = embed(pipe, [s.caption for s in scenes])
    out = {}
    for t in nb.TIMESTEPS_00_3:
        with capture_attention(pipe.unet, kinds=("cross",)) as store, torch.no_grad():
            pipe.unet(add_noise(pipe, z, t, noise), t, encoder_hidden_states=cond)
        maps = cross_maps(store, size=z.shape[-1] * vae_factor(pipe), tokens=pipe.tokenizer.model_max_length)
        for kind in ("shape", "colour", "phrase") if t in (100, 300, 500) else ("shape",):
            scores = []
            for j, s in enumerate(scenes):
                o = s.objects[0]
                word = {"shape": o.shape, "colour": o.colour, "phrase": o.phrase}[kind]
                occ = s.occurrence(0, word) if kind == "shape" else None
                heat = word_heatmap(store, pipe.tokenizer, s.caption, word, index=j, occurrence=occ, maps=maps)
                scores.append(iou(binarise(heat, 0.5), o.mask))
            out[t, kind] = float(np.mean(scores))
    return out


def test_00_3(pipe, heat_ious, capsys):
    sol = {t: heat_ious[t, "shape"] for t in nb.TIMESTEPS_00_3}
    assert verdict(capsys, ex.check_00_3, sol, pipe, SEED)[0] is True
    first = range(nb.SCENES_00_3.start, nb.SCENES_00_3.stop - 1)
    wrong = {"forgot t": ({t: sol[500] for t in sol}, "did you pass t=100"),
             "t=300 for t=100": ({**sol, 100: sol[300]}, "at t = 300 (did you pass t=100?)"),
             "seven scenes": ({**sol, 100: nb.mean_heatmap_iou(pipe, 100, seed=SEED, scenes=first)},
                              "the mean over 7 scenes"),
             "section's 16 scenes": ({**sol, 100: nb.mean_heatmap_iou(pipe, 100, seed=SEED,
                                                                      scenes=nb.SECTION_SCENES)},
                                     "section 10's 16 scenes"),
             "percent": ({t: 100 * v for t, v in sol.items()}, "percentage"),
             "other value": ({**sol, 900: sol[900] + 0.05}, "is not the mean IoU"),
             "missing t": ({t: v for t, v in sol.items() if t != 900}, "expected the keys")}
    assert_wrong(capsys, ex.check_00_3, wrong, pipe, SEED)


def test_00_4(pipe, heat_ious, capsys):
    sol = {k: heat_ious[500, k] for k in nb.KINDS_00_4}
    assert verdict(capsys, ex.check_00_4, sol, pipe, SEED)[0] is True
    wrong = {"colour = shape": ({**sol, "colour": sol["shape"]}, "did you pass o.colour"),
             "phrase = shape": ({**sol, "phrase": sol["shape"]}, "did you pass o.phrase"),
             "t = 100": ({**sol, "colour": heat_ious[100, "colour"]}, "at t = 100"),
             "not a number": ({**sol, "phrase": "high"}, "expected a number"),
             "missing key": ({"shape": sol["shape"]}, "expected a dict with the keys")}
    assert_wrong(capsys, ex.check_00_4, wrong, pipe, SEED)


# -- 00.5 img2img as editing -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sol_00_5(pipe):
    steps, size = 25, native_size(pipe)
    out = {}
    for i in SCENES_5:
        src = tw.heldout_scene(i, size=size)
        o = src.objects[0]
        new = [c for c in tw.COLOUR_NAMES if c not in tw.colours_in_caption(src.caption)][0]
        target = src.caption.replace(f"{o.colour} {o.shape}", f"{new} {o.shape}")
        z = encode(pipe, src.image)
        out[i] = None
        for k in range(1, 21):
            im = decode_pil(pipe, img2img(pipe, z, target, strength=k / 20, steps=steps, seed=SEED))[0]
            if tw.colour_fraction(np.asarray(im), o.mask, new) >= 0.5:
                out[i] = k / 20
                break
    return out


def test_00_5(pipe, sol_00_5, capsys):
    ctx = (pipe, 25, SEED)
    kw = dict(scenes=SCENES_5)
    assert verdict(capsys, ex.check_00_5, sol_00_5, *ctx, **kw)[0] is True
    i = next(i for i, s in sol_00_5.items() if s is not None and s > 0.05)
    j = next(j for j, s in sol_00_5.items() if s is not None and s < 1)
    wrong = {"one step early": ({**sol_00_5, i: round(sol_00_5[i] - 0.05, 2)}, "it has taken its new colour when"),
             "one step late": ({**sol_00_5, j: round(sol_00_5[j] + 0.05, 2)}, "give the smallest such strength"),
             "none found": ({**sol_00_5, j: None}, "you found no strength"),
             "percent": ({**sol_00_5, j: 100 * sol_00_5[j]}, "percentage"),
             "off the grid": ({**sol_00_5, j: sol_00_5[j] + 0.01}, "steps of 0.05"),
             "missing scene": ({k: v for k, v in sol_00_5.items() if k != j}, "expected the keys"),
             "string keys": ({str(k): v for k, v in sol_00_5.items()}, "expected the keys"),
             "not a dict": (list(sol_00_5.values()), "expected a dict")}
    assert_wrong(capsys, ex.check_00_5, wrong, *ctx, **kw)
