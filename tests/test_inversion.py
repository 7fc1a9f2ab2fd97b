import copy
from types import SimpleNamespace

import pytest
import torch

from helpers import toyworld as tw
from helpers.images import encode
from helpers.inversion import (REFERENCE_SCHEDULE, Inversion, ddim_inversion, negative_prompt_inversion,
                               null_text_inversion, reconstruct)
from helpers.sampling import UNetCounter, ddim_invert, denoise
from helpers.text import embed

STEPS = 6


@pytest.fixture(scope="module")
def scene_latents(pipe):
    sc = tw.heldout_scene(3)
    return sc.caption, encode(pipe, sc.image)


@pytest.fixture(scope="module")
def nti(pipe, scene_latents):
    prompt, z = scene_latents
    return null_text_inversion(pipe, z, prompt, steps=STEPS, guidance=7.5, progress=False)


def _err(a, b):
    return (a - b).pow(2).mean().item()


def test_ddim_inversion_is_sampling_ddim_invert_and_retraces_at_guidance_1(pipe, scene_latents):
    prompt, z = scene_latents
    inv = ddim_inversion(pipe, z, prompt, steps=STEPS)
    ref = ddim_invert(pipe, z, prompt, STEPS)
    assert len(inv.latents) == STEPS + 1 and all(torch.equal(a, b) for a, b in zip(inv.latents, ref))
    assert inv.evals == STEPS and inv.null_embeddings is None and inv.negative is None
    at1, at75 = _err(reconstruct(pipe, inv, guidance=1.0), z), _err(reconstruct(pipe, inv, guidance=7.5), z)
    assert at1 < 0.2 * at75, (at1, at75)  # guidance drifts away from the inverted path


def test_reconstruct_is_denoise_and_stops_after_n_steps(pipe, scene_latents):
    prompt, z = scene_latents
    inv = ddim_inversion(pipe, z, prompt, steps=STEPS)
    seen = []
    full = reconstruct(pipe, inv, guidance=1.0, callback=lambda i, t, x: seen.append(x.clone()))
    assert torch.allclose(full, denoise(pipe, inv.latents[-1], prompt, STEPS, guidance=1.0), atol=1e-6)
    with UNetCounter(pipe.unet) as c:
        x2 = reconstruct(pipe, inv, guidance=1.0, n_steps=2)
    assert c.evals == 2 and torch.equal(x2, seen[1])
    assert torch.equal(reconstruct(pipe, inv, n_steps=0), inv.latents[-1])


def test_null_text_beats_ddim_under_guidance_and_counts_evaluations(pipe, scene_latents, nti):
    prompt, z = scene_latents
    ddim = _err(reconstruct(pipe, ddim_inversion(pipe, z, prompt, steps=STEPS), guidance=7.5), z)
    with UNetCounter(pipe.unet) as c:
        rec = reconstruct(pipe, nti)
    assert c.evals == 2 * STEPS  # guided sampling: both halves each step
    assert _err(rec, z) < 0.5 * ddim, (_err(rec, z), ddim)
    assert len(nti.null_embeddings) == STEPS and len(nti.losses) == STEPS
    # reference accounting: pivot (1/step) + per step: conditional (1) + one per inner iteration + advance (1)
    assert nti.evals == STEPS + sum(1 + k + 1 for k in nti.inner_iterations())
    assert all(1 <= k <= REFERENCE_SCHEDULE["inner_steps"] for k in nti.inner_iterations())
    first = nti.losses[0]
    assert min(first) < first[0]  # the optimiser lowers the loss


def test_early_stopping_bar_and_schedule_options(pipe, scene_latents):
    prompt, z = scene_latents
    loose = null_text_inversion(pipe, z, prompt, steps=3, progress=False, tol_scale=1e9)
    assert loose.inner_iterations() == [1, 1, 1]  # the reference steps once before testing the bar
    none = null_text_inversion(pipe, z, prompt, steps=3, progress=False, early_stop=False, inner_steps=2)
    assert none.inner_iterations() == [2, 2, 2]
    with pytest.raises(TypeError, match="unknown schedule options"):
        null_text_inversion(pipe, z, prompt, steps=3, progress=False, learning_rate=0.1)
    with pytest.raises(ValueError, match="init must be"):
        null_text_inversion(pipe, z, prompt, steps=3, progress=False, init="zeros")
    with pytest.raises(ValueError, match="one image at a time"):
        null_text_inversion(pipe, torch.cat([z, z]), prompt, steps=3, progress=False)


def test_warm_start_that_converges_is_negative_prompt_inversion(pipe, scene_latents):
    prompt, z = scene_latents
    npi = negative_prompt_inversion(pipe, z, prompt, steps=STEPS)
    assert torch.equal(npi.negative, embed(pipe, prompt))  # the prompt plays "unconditional"
    warm = null_text_inversion(pipe, z, prompt, steps=STEPS, progress=False, init="prompt", skip_converged=True,
                               tol_scale=1e9)
    assert warm.evals == 2 * STEPS  # pivot + one conditional prediction per step, nothing optimised
    a, b = reconstruct(pipe, npi), reconstruct(pipe, warm)
    assert torch.allclose(a, b, atol=1e-5)
    # negative-prompt inversion at guidance 7.5 retraces the guidance-1 DDIM path
    ddim1 = reconstruct(pipe, ddim_inversion(pipe, z, prompt, steps=STEPS), guidance=1.0)
    assert torch.allclose(a, ddim1, atol=1e-4)


def test_different_step_count_is_refused(pipe, scene_latents, nti):
    with pytest.raises(ValueError, match=f"inverted with {STEPS} DDIM steps but 50"):
        reconstruct(pipe, nti, steps=50)
    with pytest.raises(ValueError, match="n_steps must be"):
        reconstruct(pipe, nti, n_steps=STEPS + 1)


def test_inverting_for_the_first_steps_only(pipe, scene_latents, nti):
    prompt, z = scene_latents
    part = null_text_inversion(pipe, z, prompt, steps=STEPS, guidance=7.5, progress=False, n_steps=2)
    assert len(part.null_embeddings) == 2 and part.evals < nti.evals
    # the first two steps are optimised exactly as in the full inversion, so sampling them gives the same latents
    assert torch.allclose(reconstruct(pipe, part, n_steps=2), reconstruct(pipe, nti, n_steps=2), atol=1e-5)
    with pytest.raises(ValueError, match="first 2 sampling steps only"):
        reconstruct(pipe, part)
    with pytest.raises(ValueError, match="n_steps must be an integer"):
        null_text_inversion(pipe, z, prompt, steps=STEPS, progress=False, n_steps=STEPS + 1)


def test_fp16_unet_is_upcast_with_a_warning_or_refused(pipe, scene_latents):
    prompt, z = scene_latents
    half = SimpleNamespace(unet=copy.deepcopy(pipe.unet).half(), scheduler=pipe.scheduler, tokenizer=pipe.tokenizer,
                           text_encoder=pipe.text_encoder, device=pipe.device, vae=pipe.vae)
    with pytest.raises(ValueError, match="load the pipeline in float32"):
        null_text_inversion(half, z, prompt, steps=2, progress=False, fp16="refuse")
    with pytest.warns(UserWarning, match="upcasts"):
        inv = null_text_inversion(half, z, prompt, steps=2, progress=False, inner_steps=3, early_stop=False)
    assert inv.null_embeddings[0].dtype == torch.float16 and inv.latents[0].dtype == torch.float16
    assert all(l[-1] < l[0] for l in inv.losses)  # the optimisation made progress in float32
    assert half.unet.dtype == torch.float16  # the caller's UNet was not converted


def test_bad_input(pipe, scene_latents):
    prompt, z = scene_latents
    with pytest.raises(ValueError, match="B×C×h×w"):
        ddim_inversion(pipe, z[0], prompt, steps=3)
    with pytest.raises(ValueError, match="positive integer"):
        negative_prompt_inversion(pipe, z, prompt, steps=0)
    assert isinstance(ddim_inversion(pipe, z, prompt, steps=2), Inversion)


def test_compare_inversions_table(pipe):
    from helpers.inversion import compare_inversions, inversion_methods, inversion_table_text
    methods = inversion_methods(3, 7.5, {"null-text, reference": dict(inner_steps=1)})
    table = compare_inversions(pipe, [tw.heldout_scene(0)], methods, progress=False)
    assert list(table)[0] == "VAE round trip" and len(table) == 1 + len(methods)
    assert table["negative-prompt inversion"]["evals"] == [3]
    assert abs(table["negative-prompt inversion"]["psnr"][0] - table["DDIM inversion, guidance 1"]["psnr"][0]) < 0.05
    assert table["VAE round trip"]["psnr"][0] >= max(r["psnr"][0] for r in table.values()) - 0.5  # the ceiling
    assert "| null-text, reference |" in inversion_table_text(table)
