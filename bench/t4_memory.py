"""Estimated GPU memory per notebook for Stable Diffusion 1.5 in float16 on a 16 GB T4 — computed, not measured.

    python bench/t4_memory.py

For each notebook's main call: the model's weights (parameter counts of SD 1.5's UNet, VAE and text encoder, built
on PyTorch's "meta" device from their published configs: no weights are loaded), the attention store's running
means (`AttentionStore.expected_nbytes`, exact on every model the tests run), the largest attention-probability
tensor a captured layer materialises at once, and, for null-text inversion, the float32 copy of the UNet it
optimises on. Not included: the UNet's other activations, which grow with the batch; `bench/gpu_smoke.py` measures
the true peak on a GPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers.attention import AttentionStore, attention_layout  # noqa: E402

GB = 1024 ** 3
T4_BYTES = 16 * GB
TOKENS = 77
HEADS = 8           # SD 1.x: 8 heads in every attention layer
LATENT = 64         # 512 px / 8

# SD 1.5's component configs (as published with the checkpoint), for parameter counts and the attention layout
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


def sd15_meta():
    """(unet, parameter counts {unet, vae, text_encoder}) of SD 1.5, built without memory on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        te = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    count = lambda m: sum(p.numel() for p in m.parameters())
    return unet, {"unet": count(unet), "vae": count(vae), "text_encoder": count(te)}


def _probs_bytes(unet, kinds, batch, latent, max_side=None, element=2):
    """The largest batch × heads × queries × keys probability tensor one captured layer materialises (float16)."""
    best = 0
    for (kind, (h, w)), _ in attention_layout(unet, (latent, latent)).items():
        if kind in kinds and (max_side is None or max(h, w) <= max_side):
            keys = TOKENS if kind == "cross" else h * w
            best = max(best, batch * HEADS * h * w * keys * element)
    return best


# notebook -> (main call, UNet batch, store options or None, keep kinds for the transient, extra bytes key)
NOTEBOOKS = {
    "00 tour": ("generate, 25 guided steps", 2, None, None),
    "01 DiffEdit purist": ("purist_mask, n=10 draws", 40, None, None),
    "02 fast DiffEdit": ("fast_mask, n=20 draws (one call)", 80, None, None),
    "03 null-text + prompt-to-prompt": ("null-text inversion, then a p2p edit", 4,
                                        dict(kinds=("cross",), resolutions=[LATENT // 4], half="cond"),
                                        (("cross", "self"), LATENT // 2)),
    "04 cross-attention": ("trace of a guided call, all resolutions", 2,
                           dict(kinds=("cross",), half="cond"), (("cross",), None)),
    "05 DiffSeg": ("one UNet pass, self-attention of every layer", 2,
                   dict(kinds=("self", "cross"), half="all"), (("self", "cross"), None)),
    "06 AlignDiff": ("synthesis, 16 images per batch, one token kept", 32,
                     dict(kinds=("cross",), half="cond"), (("cross",), None)),
}


def estimate() -> list[dict]:
    unet, params = sd15_meta()
    weights = 2 * sum(params.values())  # float16
    rows = []
    for name, (call, batch, store_kw, transient) in NOTEBOOKS.items():
        store = 0
        if store_kw is not None:
            tokens = 1 if name.startswith("06") else TOKENS  # AlignDiff's TokenStore keeps one column
            store = AttentionStore(**store_kw).expected_nbytes(unet, batch, (LATENT, LATENT), tokens)
        probs = _probs_bytes(unet, transient[0], batch, LATENT, transient[1]) if transient else 0
        extra = 4 * params["unet"] if name.startswith("03") else 0  # null-text: a float32 copy of the UNet
        total = weights + store + probs + extra
        rows.append(dict(notebook=name, call=call, batch=batch, weights=weights, store=store, probs=probs,
                         extra=extra, total=total, fits=total < T4_BYTES))
    return rows


def main():
    rows = estimate()
    print("SD 1.5 in float16 at 512 px on a 16 GB T4 — estimate (weights + attention store + largest captured "
          "attention tensor + null-text's float32 UNet copy; other activations not included):")
    print(f"{'notebook':34s} {'UNet batch':>10s} {'weights':>8s} {'store':>8s} {'attn probs':>10s} "
          f"{'fp32 copy':>9s} {'total':>8s}  of 16 GB")
    for r in rows:
        g = lambda b: f"{b / GB:.2f} GB"
        mb = lambda b: f"{b / 1024 ** 2:.0f} MB"
        print(f"{r['notebook']:34s} {r['batch']:10d} {g(r['weights']):>8s} {mb(r['store']):>8s} "
              f"{mb(r['probs']):>10s} {g(r['extra']):>9s} {g(r['total']):>8s}  {r['total'] / T4_BYTES:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
