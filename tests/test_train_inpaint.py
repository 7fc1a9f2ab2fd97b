"""helpers/train_inpaint.py: the toy inpainting checkpoint is made as SD's was, and fed as diffusers feeds it."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import toyworld as tw
from helpers.train_inpaint import (BUNDLED, DEFAULT_OUT, PARSER, inpaint_inputs, random_mask, to_tensor, train,
                                   widen_unet)


def test_widened_unet_is_the_base_model_at_step_zero(pipe):
    """Zero-initialised extra channels: whatever the mask and masked latents, the output is the base UNet's."""
    wide = widen_unet(pipe.unet)
    assert wide.config.in_channels == 9
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=g)
    extra = torch.randn(2, 5, 16, 16, generator=g)
    cond = torch.randn(2, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size, generator=g)
    with torch.no_grad():
        base = pipe.unet(z, 500, encoder_hidden_states=cond).sample
        out = wide(torch.cat([z, extra], 1), 500, encoder_hidden_states=cond).sample
    assert torch.allclose(base, out, atol=1e-5)
    assert wide.conv_in.weight[:, 4:].abs().max() == 0


def test_random_masks_cover_objects_boxes_and_whole_images():
    rng = np.random.default_rng(0)
    scenes = [tw.train_scene(i) for i in range(200)]
    masks = [random_mask(s, rng) for s in scenes]
    assert all(m.dtype == bool and m.shape == (64, 64) and m.any() for m in masks)
    full = np.mean([m.all() for m in masks])
    covers = np.mean([any((m & o.mask).sum() >= 0.9 * o.mask.sum() for o in s.objects)
                      for s, m in zip(scenes, masks) if not m.all()])
    assert 0.04 < full < 0.2, full              # about one in ten: plain text-to-image
    assert covers > 0.5, covers                  # most masks hold a whole object, as an edit mask does
    assert np.mean([m.mean() for m in masks if not m.all()]) < 0.5  # and leave most of the image visible


def test_training_inputs_are_what_the_inpainting_pipeline_feeds_the_unet(pipe):
    """The mask at latent size and the masked image's latents, exactly as StableDiffusionInpaintPipeline makes
    them from a PIL image and a PIL mask (its preprocessing, binarisation, nearest resize and VAE sampling)."""
    from diffusers import StableDiffusionInpaintPipeline
    ip = StableDiffusionInpaintPipeline(**{k: v for k, v in pipe.components.items()
                                           if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sc = tw.heldout_scene(3)
    mask = random_mask(sc, np.random.default_rng(1))
    image = ip.image_processor.preprocess(sc.pil(), height=64, width=64)
    m_cond = ip.mask_processor.preprocess(Image.fromarray(mask.astype(np.uint8) * 255), height=64, width=64)
    m_ref, z_ref = ip.prepare_mask_latents(m_cond, image * (m_cond < 0.5), 1, 64, 64, torch.float32, "cpu",
                                           torch.Generator().manual_seed(5), False)
    x = to_tensor(sc.image[None])
    m, z = inpaint_inputs(x, torch.from_numpy(mask).float()[None, None], pipe.vae,
                          pipe.vae.config.scaling_factor, torch.Generator().manual_seed(5))
    assert torch.equal(m, m_ref)
    assert torch.allclose(z, z_ref, atol=1e-5)


def test_outside_weights_raise_the_loss_outside_the_mask_at_high_noise_only():
    from helpers.train_inpaint import loss_weights
    snr = torch.tensor([0.01, 1.0, 20.0])
    mask = torch.zeros(3, 1, 2, 2)
    mask[:, :, 0] = 1  # top row inside the mask
    plain, weighted = loss_weights(snr, mask), loss_weights(snr, mask, outside=1.0)
    assert torch.allclose(plain, torch.tensor([1.0, 1.0, 0.25])[:, None, None, None].expand(3, 1, 2, 2))  # min-SNR-5
    assert torch.equal(weighted[:, :, 0], plain[:, :, 0])                     # inside: unchanged
    assert torch.allclose(weighted[:, :, 1], torch.tensor([100.0, 1.0, 0.25])[:, None, None])  # outside: ≥ 1/SNR


def test_tiny_run_exports_an_inpainting_pipeline_and_refuses_the_bundled_folder(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--work", str(work), "--out", str(out), "--pairs", "8", "--batch", "4", "--ckpt-every", "1"]
    train(PARSER.parse_args(args + ["--steps", "2", "--phase2-steps", "3"]))
    meta = json.loads((out / "training.json").read_text())  # phase 2's, with phase 1's under "previous"
    assert meta["step"] == 3 and meta["base"] == "data/toy-sd" and meta["outside"] == 1.0
    assert meta["init"] == str(work / "phase1")
    assert meta["previous"]["step"] == 2 and meta["previous"]["outside"] == 0.0 and not meta["previous"]["init"]
    assert "--pairs 8" in meta["command"] and "--phase2-steps 3" in meta["command"]
    assert (work / "inpaint.pt").exists() and (work / "phase2.pt").exists()  # both phases resumable
    # one more phase from the result: its own checkpoint, not phase 1's or phase 2's (those would be "done")
    more = tmp_path / "more"
    train(PARSER.parse_args(["--work", str(work), "--out", str(more), "--pairs", "8", "--batch", "4", "--init", str(out),
                             "--steps", "4"]))
    assert json.loads((more / "training.json").read_text())["step"] == 4 and (work / "from-out.pt").exists()
    p = StableDiffusionInpaintPipeline.from_pretrained(str(out))
    p.set_progress_bar_config(disable=True)
    assert p.unet.config.in_channels == 9
    sc = tw.heldout_scene(0)
    img = p(sc.caption, image=sc.pil(), mask_image=Image.fromarray(sc.objects[0].mask.astype(np.uint8) * 255),
            num_inference_steps=2, height=64, width=64).images[0]
    assert img.size == (64, 64)
    assert DEFAULT_OUT.resolve() != BUNDLED.resolve()
    with pytest.raises(SystemExit, match="--replace-bundled"):
        train(PARSER.parse_args(["--work", str(work), "--out", str(BUNDLED)]))


def test_a_grey_hole_shifts_the_toy_vae_latents_outside_it(pipe):
    """The model card's limit: the masked image's latents (what the checkpoint is told to keep) decode to a worse
    copy of the outside than the full image's latents do, because the toy VAE spreads the grey hole beyond it."""
    from helpers.metrics import psnr
    rng = np.random.default_rng(0)
    full, holed = [], []
    for i in range(8):
        sc = tw.heldout_scene(100 + i)
        mask = random_mask(sc, rng)
        while mask.all():
            mask = random_mask(sc, rng)
        x = to_tensor(sc.image[None])
        with torch.no_grad():
            for x_in, into in ((x, full), (x * torch.from_numpy(~mask)[None, None], holed)):
                y = pipe.vae.decode(pipe.vae.encode(x_in).latent_dist.mean).sample
                u8 = ((y[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
                into.append(psnr(u8, sc.image, mask=~mask))
    assert np.mean(holed) < np.mean(full) - 3, (np.mean(holed), np.mean(full))
