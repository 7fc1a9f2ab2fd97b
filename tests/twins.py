"""Architecture twins of real Stable Diffusion checkpoints: tiny random-weight pipelines in their layouts.

A twin has the component classes, configs and shapes that matter of a real checkpoint — its scheduler config as the
checkpoint ships it, VAE factor 8, multi-head cross-attention, 77 tokens, v-prediction where the checkpoint uses it
— with a few thousand times fewer weights, built in about a second without any download and saved as a diffusers
folder that `helpers.loading.load_pipeline` loads like any model. Random weights make random images: a twin checks
shapes, schedules, costs and agreement with diffusers' own samplers, never quality.

    python -m tests.twins OUT_DIR --layout sd15        # SD 1.5 layout at 128 px (16×16 latents)
    python -m tests.twins OUT_DIR --layout sd2v        # SD 2.1 (768 px, v-prediction) layout at 192 px
    python -m tests.twins OUT_DIR --layout sd15-192    # SD 1.5 layout at 192 px (24×24 latents)

Layouts (what is copied from the real checkpoint, what is shrunk):
- sd15: `scheduler_config.json` exactly as SD 1.5 ships it (PNDM, skip_prk_steps, steps_offset 1, clip_sample
  false, ε-prediction); UNet with SD 1.5's block types (three cross-attention down blocks and a plain one, two
  layers per block, a cross-attention mid block), 2 heads per attention layer; VAE with four blocks (factor 8) and
  SD's scaling factor 0.18215; CLIP text encoder with 77 positions and the bundled toy tokenizer (so toy words are
  single tokens). Channels 32/32/64/64 instead of 320/640/1280/1280; 128 px instead of 512.
- sd2v: as SD 2.1 (768 px) ships: a DDIM scheduler config with `prediction_type="v_prediction"`, a UNet with
  `use_linear_projection=True`, `upcast_attention=True` and a per-block head list (`attention_head_dim` [2, 4, 4, 4],
  as SD 2.1's [5, 10, 20, 20]); 192 px (SD 2.1's 768 is 1.5× SD 1.5's 512, as 192 is 1.5× 128).
- sd15-192: sd15 at 192 px (24×24 latents: the UNet's coarsest grid is 3×3, an odd size).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TOY_TOKENIZER = ROOT / "data" / "toy-sd" / "tokenizer"

# SD 1.5's scheduler/scheduler_config.json, as the checkpoint ships it
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# SD 2.1's (768 px, v-prediction) scheduler/scheduler_config.json, as the checkpoint ships it
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

LAYOUTS = {
    "sd15": dict(image=128, scheduler=SD15_SCHEDULER, heads=2, linear=False, upcast=False),
    "sd2v": dict(image=192, scheduler=SD21_SCHEDULER, heads=[2, 4, 4, 4], linear=True, upcast=True),
    "sd15-192": dict(image=192, scheduler=SD15_SCHEDULER, heads=2, linear=False, upcast=False),
}
UNET_CHANNELS = (32, 32, 64, 64)
VAE_CHANNELS = (16, 16, 32, 32)
TEXT_DIM = 32


def build(layout: str = "sd15", seed: int = 0):
    """The twin as a StableDiffusionPipeline in memory (float32, CPU), scheduler built from the shipped config."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    L = LAYOUTS[layout]
    f = 8  # VAE factor: four VAE blocks, three down-samplers, as SD
    tok = CLIPTokenizer.from_pretrained(str(TOY_TOKENIZER))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=L["image"] // f, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=UNET_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=L["heads"], norm_num_groups=8,
        use_linear_projection=L["linear"], upcast_attention=L["upcast"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=VAE_CHANNELS,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=L["image"], scaling_factor=0.18215)
    torch.manual_seed(seed + 2)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=TEXT_DIM, hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    cfg = {k: v for k, v in L["scheduler"].items() if not k.startswith("_")}
    sched_cls = PNDMScheduler if L["scheduler"]["_class_name"] == "PNDMScheduler" else DDIMScheduler
    sched = sched_cls.from_config(cfg)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save(out, layout: str = "sd15", seed: int = 0) -> Path:
    """Build the twin and save it as a diffusers folder at `out` (replaced if it exists); returns the path.

    The scheduler config is written exactly as the real checkpoint ships it (not as this diffusers would save it).
    """
    out = Path(out)
    pipe = build(layout, seed)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(str(out), safe_serialization=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(LAYOUTS[layout]["scheduler"], indent=2))
    (out / "TWIN.md").write_text(f"Random-weight architecture twin, layout {layout}, seed {seed}: shapes and "
                                 "schedules of a real checkpoint, no trained weights. Built by tests/twins.py.\n")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build a random-weight architecture twin of a real Stable Diffusion "
                                             "checkpoint as a diffusers folder.")
    ap.add_argument("out", help="output folder (replaced if it exists)")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="sd15")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    path = save(a.out, a.layout, a.seed)
    print(f"{a.layout} twin saved to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
