import pytest
import torch

from helpers import toyworld as tw
from helpers.images import decode, encode
from helpers.metrics import psnr
from helpers.sampling import (UNetCounter, add_noise, ddim_invert, denoise, generate, img2img, predict_x0,
                              random_latents, start_index, timesteps, x0_from_eps)


def test_our_loop_equals_the_pipeline(pipe):
    out = pipe("a red circle", num_inference_steps=10, guidance_scale=7.5, output_type="latent",
               generator=torch.Generator().manual_seed(3)).images
    mine = denoise(pipe, random_latents(pipe, 1, seed=3), "a red circle", steps=10, guidance=7.5)
    assert torch.allclose(out, mine, atol=1e-4)


def test_counter_counts_guided_evaluations(pipe):
    with UNetCounter(pipe.unet) as c:
        generate(pipe, "a red circle", steps=6, guidance=7.5)
    assert (c.calls, c.evals) == (6, 12)
    with UNetCounter(pipe.unet) as c:
        generate(pipe, "a red circle", steps=6, guidance=1.0)
    assert (c.calls, c.evals) == (6, 6)


def test_strength_picks_the_start(pipe):
    assert start_index(50, 0.5) == 25 and start_index(50, 1.0) == 0 and start_index(50, 0.7) == 15
    with pytest.raises(ValueError, match="strength"):
        start_index(50, 0)
    z = encode(pipe, tw.heldout_scene(0).image)
    with UNetCounter(pipe.unet) as c:
        img2img(pipe, z, "a red circle", strength=0.4, steps=20, guidance=7.5)
    assert c.calls == 8


def test_x0_formula_inverts_add_noise(pipe):
    z = encode(pipe, tw.heldout_scene(1).image)
    noise = torch.randn_like(z)
    t = timesteps(pipe, 50)[20]
    noisy = add_noise(pipe, z, t, noise)
    assert torch.allclose(x0_from_eps(pipe, noisy, noise, t), z, atol=1e-4)
    x0, used = predict_x0(pipe, z, t, "a red circle", noise=noise)
    assert x0.shape == z.shape and torch.equal(used, noise)


def test_ddim_inversion_reconstructs_without_guidance(pipe):
    s = tw.heldout_scene(2)
    z = encode(pipe, s.image)
    traj = ddim_invert(pipe, z, s.caption, steps=25)
    assert len(traj) == 26
    rec = denoise(pipe, traj[-1], s.caption, steps=25, guidance=1.0)
    vae_ceiling = psnr(decode(pipe, z)[0], torch.from_numpy(s.image).permute(2, 0, 1) / 127.5 - 1)
    got = psnr(decode(pipe, rec)[0], torch.from_numpy(s.image).permute(2, 0, 1) / 127.5 - 1)
    assert got > vae_ceiling - 6  # inversion at guidance 1 nearly retraces its path
    noise_only = denoise(pipe, torch.randn_like(z), s.caption, steps=25, guidance=1.0)
    assert got > psnr(decode(pipe, noise_only)[0], torch.from_numpy(s.image).permute(2, 0, 1) / 127.5 - 1) + 5
