"""Every helper path a notebook uses, on random-weight architecture twins of real Stable Diffusion (tests/twins.py).

Twins check what does not need trained weights: the schedule, the conversions of the model's output, agreement with
diffusers' own DDIM step and pipeline, UNet-evaluation counts, the attention store's memory prediction, and that
masks and heat maps come back at the image's size. Quality is never asserted here.
"""
import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import aligndiff as ad
from helpers import diffedit as de
from helpers import diffseg as ds
from helpers import p2p
from helpers import toyworld as tw
from helpers.attention import AttentionStore, attention_layout, capture_attention, layer_infos
from helpers.images import decode, encode, native_size, vae_factor
from helpers.inversion import ddim_inversion, negative_prompt_inversion, null_text_inversion, reconstruct
from helpers.loading import load_pipeline
from helpers.sampling import (PREDICTION_TYPES, UNetCounter, convert_output, ddim_invert, ddim_step, denoise,
                              generate, img2img, prediction_target, prompt_embeddings, random_latents, step_gap, timesteps)
from helpers.xattn_seg import trace
from tests import twins

LAYOUTS = ["sd15", "sd2v", "sd15-192"]
PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("twins")
    return {name: twins.save(root / name, name) for name in LAYOUTS}


@pytest.fixture(scope="module")
def pipes(folders):
    return {name: load_pipeline(str(path), device="cpu", dtype=torch.float32) for name, path in folders.items()}


@pytest.fixture(params=LAYOUTS)
def twin(request, pipes):
    return request.param, pipes[request.param]


@pytest.fixture(params=["sd15", "sd2v"])
def twin2(request, pipes):
    """The two main layouts (ε-prediction with SD 1.5's PNDM config, v-prediction as SD 2.1)."""
    return request.param, pipes[request.param]


def _image(pipe, seed=0):
    return tw.heldout_scene(seed, size=native_size(pipe))


def test_layout_and_the_loaders_ddim(twin, folders):
    name, pipe = twin
    shipped = twins.LAYOUTS[name]["scheduler"]
    on_disk = json.loads((folders[name] / "scheduler" / "scheduler_config.json").read_text())
    assert on_disk == shipped  # the scheduler config exactly as the real checkpoint ships it
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    cfg = pipe.scheduler.config
    for k in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "set_alpha_to_one", "clip_sample"):
        assert cfg[k] == shipped[k], k
    assert cfg.prediction_type == shipped.get("prediction_type", "epsilon")
    assert vae_factor(pipe) == 8 and pipe.tokenizer.model_max_length == 77
    assert pipe.text_encoder.config.max_position_embeddings == 77
    heads = {m.heads for m in pipe.unet.modules() if type(m).__name__ == "Attention"}
    assert min(heads) >= 2  # multi-head attention everywhere
    assert pipe.unet.config.use_linear_projection == (name == "sd2v")
    for steps in (4, 25, 50):
        ts = timesteps(pipe, steps).tolist()
        assert len(ts) == steps and len(set(ts)) == steps and ts == sorted(ts, reverse=True)
        assert all(a - b == step_gap(pipe, steps) for a, b in zip(ts, ts[1:]))
    assert timesteps(pipe, 4).tolist() == [751, 501, 251, 1]
    if name.startswith("sd15"):  # what SD 1.5's own PNDM would have given: a repeated timestep
        from diffusers import PNDMScheduler
        pndm = PNDMScheduler.from_pretrained(str(folders[name]), subfolder="scheduler")
        pndm.set_timesteps(4)
        assert pndm.timesteps.tolist() == [751, 501, 501, 251, 1]


def test_one_ddim_step_equals_diffusers(twin2):
    from diffusers import DDIMScheduler
    _, pipe = twin2
    ref = DDIMScheduler.from_config(pipe.scheduler.config)
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    for t in timesteps(pipe, 10)[[0, 4, -1]]:
        out = pipe.unet(x, t, encoder_hidden_states=torch.zeros(2, 77, 32)).sample.detach()
        r = ref.step(out, t, x)
        mine = ddim_step(pipe, x, convert_output(pipe, out, x, t), t, int(t) - step_gap(pipe, 10))
        assert torch.allclose(mine, r.prev_sample, atol=1e-5, rtol=1e-5)
        assert torch.allclose(convert_output(pipe, out, x, t, "sample"), r.pred_original_sample, atol=1e-5, rtol=1e-5)


def test_every_prediction_type_converts_as_diffusers(pipes):
    from diffusers import DDIMScheduler
    base = pipes["sd15"]
    g = torch.Generator().manual_seed(1)
    x0, noise, out, x = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(4))
    for kind in PREDICTION_TYPES:
        sched = DDIMScheduler.from_config(base.scheduler.config, prediction_type=kind)
        fake = SimpleNamespace(scheduler=sched, device=torch.device("cpu"))
        sched.set_timesteps(20)
        t = sched.timesteps[7]
        r = sched.step(out, t, x)
        mine = ddim_step(fake, x, convert_output(fake, out, x, t), t, int(t) - step_gap(fake, 20))
        assert torch.allclose(mine, r.prev_sample, atol=1e-5), kind
        # the training target of this kind, converted back to ε, is the noise that was added
        noisy = sched.add_noise(x0, noise, t.reshape(1))
        target = prediction_target(fake, x0, noise, t)
        assert torch.allclose(convert_output(fake, target, noisy, t, "epsilon"), noise, atol=1e-4), kind
        assert torch.allclose(convert_output(fake, target, noisy, t, "sample"), x0, atol=1e-4), kind
    bad = SimpleNamespace(scheduler=SimpleNamespace(config={"prediction_type": "flow"}))
    with pytest.raises(ValueError, match="prediction_type='flow'.*epsilon, v_prediction, sample"):
        convert_output(bad, out, x, 1)


def test_full_sampling_equals_the_stock_pipeline_with_ddim(twin2):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    _, pipe = twin2
    stock = StableDiffusionPipeline(**pipe.components)
    stock.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    stock.set_progress_bar_config(disable=True)
    theirs = stock(PROMPT, num_inference_steps=8, guidance_scale=7.5, output_type="latent",
                   generator=torch.Generator().manual_seed(3)).images
    with UNetCounter(pipe.unet) as c:
        mine = generate(pipe, PROMPT, steps=8, guidance=7.5, seed=3)
    assert (c.calls, c.evals) == (8, 16)
    assert torch.allclose(mine, theirs, atol=1e-4 * max(1.0, theirs.abs().max().item()))


def test_ddim_inversion_then_reconstruction_returns_the_input(twin2):
    """Exact up to DDIM inversion's own approximation (the prediction at x_{t-1} stands in for the one at x_t),
    which vanishes as the steps shrink when the prediction varies slowly. Here the twin's output layer is scaled by
    1e-4 (a slowly varying predictor; raw random weights are no denoiser), in float64. ε-prediction: the
    prediction is then almost constant and the round trip is exact to 1e-3 of the latent's norm. v-prediction: ε
    is then √(1−ᾱ)·x_t, which follows x_t, so the round trip converges with the step count: within 5e-2 at 10
    steps, 1e-2 at 20 (measured: 0.019 and 0.005)."""
    name, pipe = twin2
    unet = copy.deepcopy(pipe.unet).double()
    unet.conv_out.weight.data *= 1e-4
    unet.conv_out.bias.data *= 1e-4
    smooth = SimpleNamespace(unet=unet, scheduler=pipe.scheduler, tokenizer=pipe.tokenizer,
                             text_encoder=pipe.text_encoder, device=pipe.device)
    z = encode(pipe, _image(pipe).image).double()
    cond = prompt_embeddings(pipe, PROMPT).double()
    errs = {}
    for steps in (10, 20):
        with UNetCounter(unet) as c:
            traj = ddim_invert(smooth, z, cond, steps=steps)
        assert len(traj) == steps + 1 and c.evals == steps
        rec = denoise(smooth, traj[-1], cond, steps=steps, guidance=1.0)
        errs[steps] = ((rec - z).norm() / z.norm()).item()
    print(f"{name}: round-trip error / latent norm {errs}")
    assert errs[10] < (1e-3 if name == "sd15" else 5e-2), errs
    if name != "sd15":
        assert errs[20] < 1e-2 and errs[20] < 0.6 * errs[10], errs
    if name == "sd15":  # a wrong schedule (one step off) does not come back
        off = denoise(smooth, traj[-1], cond, steps=20, guidance=1.0, start=1)
        assert ((off - z).norm() / z.norm()).item() > 10 * errs[20]


def test_costs_in_unet_evaluations(twin2):
    _, pipe = twin2
    z = encode(pipe, _image(pipe).image)
    with UNetCounter(pipe.unet) as c:
        img2img(pipe, z, PROMPT, strength=0.5, steps=8, guidance=7.5)
    assert c.evals == 2 * 4
    with UNetCounter(pipe.unet) as c:
        de.purist_mask(pipe, z, "a red circle", "a green circle", n=2, strength=0.5, steps=8)
    assert (c.calls, c.evals) == (4, 4 * 2 * 2 * 2)  # 4 steps, batch of 2 draws × 2 prompts × 2 guidance halves
    with UNetCounter(pipe.unet) as c:
        m = de.fast_mask(pipe, z, "a red circle", "a green circle", n=3, strength=0.5, steps=8)
    assert (c.calls, c.evals) == (1, 12) and m.shape == z.shape[-2:]
    for inv, cost in [(ddim_inversion(pipe, z, PROMPT, steps=6), 6),
                      (negative_prompt_inversion(pipe, z, PROMPT, steps=6), 6)]:
        assert inv.evals == cost and len(inv.latents) == 7
        with UNetCounter(pipe.unet) as c:
            rec = reconstruct(pipe, inv)
        assert rec.shape == z.shape and c.evals == 6 * (1 if inv.guidance == 1.0 else 2)
    nti = null_text_inversion(pipe, z, PROMPT, steps=3, inner_steps=2, progress=False)
    assert nti.evals == 3 + sum(1 + k + 1 for k in nti.inner_iterations())
    assert len(nti.null_embeddings) == 3 and all(len(l) >= 1 for l in nti.losses)


def test_diffedit_masks_and_masked_diffusion(twin):
    _, pipe = twin
    sc = _image(pipe, 3)
    z = encode(pipe, sc.image)
    m = de.purist_mask(pipe, z, sc.caption, sc.caption.replace("a ", "a big ", 1), n=1, steps=4)
    assert m.shape == z.shape[-2:]
    mask = torch.zeros(z.shape[-2:])
    mask[: z.shape[-2] // 2] = 1
    with UNetCounter(pipe.unet) as c:
        out = de.masked_diffusion(pipe, z, mask, sc.caption, "a green circle", strength=0.5, steps=6)
    assert c.evals == 6 + 2 * 3  # the DDIM inversion, then 3 guided steps
    assert torch.equal(out[..., z.shape[-2] // 2:, :], z[..., z.shape[-2] // 2:, :])  # outside kept exactly
    big = torch.zeros(native_size(pipe), native_size(pipe))
    big[: native_size(pipe) // 2] = 1
    assert de.to_latent_mask(pipe, big, z).shape == z.shape[-2:]  # an image-size mask is accepted too


def test_attention_store_memory_prediction_and_heat_maps_at_image_size(twin):
    _, pipe = twin
    side = native_size(pipe) // vae_factor(pipe)
    store = AttentionStore(kinds=("cross", "self"), half="cond")
    with capture_attention(pipe.unet, store):
        generate(pipe, PROMPT, steps=2, guidance=7.5)
    assert store.nbytes() == store.expected_nbytes(pipe.unet, 2, (side, side), pipe.tokenizer.model_max_length)
    kept = {k: len(v) for k, v in store.layers_seen.items()}
    assert kept == attention_layout(pipe.unet, (side, side))
    with trace(pipe, PROMPT) as tr:
        generate(pipe, PROMPT, steps=2, guidance=7.5)
    heat = tr.heatmap("circle")
    assert tuple(heat.shape) == (native_size(pipe),) * 2 and torch.isfinite(heat).all()


def test_diffseg_segments_at_image_size(twin):
    _, pipe = twin
    sc = _image(pipe, 1)
    labels = ds.diffseg(pipe, [sc.image])
    assert labels.shape == (1, native_size(pipe), native_size(pipe)) and labels.min() == 0


def test_prompt_to_prompt_edit(twin):
    _, pipe = twin
    sc = tw.Scene if False else _image(pipe, 5)
    z = encode(pipe, sc.image)
    inv = negative_prompt_inversion(pipe, z, "a red circle", steps=5)
    with UNetCounter(pipe.unet) as c:
        e = p2p.edit(pipe, inv, "a red square", mode="swap", blend=("circle", "square"))
    assert c.evals == 5 * 4  # a batch of 2 prompts, both guidance halves, per step
    side = z.shape[-1]
    assert e.edited.shape == z.shape and e.mask.shape == (1, 1, side, side)
    before = {i.name: type(p).__name__ for i, p in zip(layer_infos(pipe.unet), pipe.unet.attn_processors.values())}
    assert "StoreProcessor" not in before.values()  # the hook is gone


def test_aligndiff_textual_inversion_and_synthesis(twin2):
    _, pipe = twin2
    size = native_size(pipe)
    images, masks, colours = ad.real_examples("star", 1, size=size)
    inv = ad.textual_inversion(pipe, images, masks, "star", steps=2, progress=False, prefix="<twin-star-")
    assert len(inv.losses) == 2 and np.isfinite(inv.losses).all()
    fg, bg = ad.inversion_error(pipe, images, masks, inv.prompts, n=2)
    assert np.isfinite([fg, bg]).all()
    bank = ad.PromptBank("star")
    bank.add_text("a red star", "red")
    with UNetCounter(pipe.unet) as c:
        syn = ad.synthesize(pipe, bank, n=2, steps=3, progress=False)
    assert c.evals == 3 * 2 * 2
    assert syn.images.shape == (2, size, size, 3) and syn.masks.shape == (2, size, size)
