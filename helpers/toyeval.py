"""The toy model's report card: the measurements its model card quotes, on held-out scenes.

Each function takes a loaded pipeline and a number of held-out scenes and returns plain numbers; the benchmark
`bench/toy_model_card.py` runs them on many scenes, the tests on a few.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import toyworld as tw
from .attention import capture_attention, cross_maps
from .images import decode, encode, native_size
from .metrics import binarise, iou, psnr
from .sampling import add_noise, generate
from .text import embed, token_positions


def vae_psnr(pipe, n: int = 64, start: int = 0) -> float:
    """Mean PSNR (dB) of VAE round trips of held-out scenes."""
    scenes = [tw.heldout_scene(start + i, size=native_size(pipe)) for i in range(n)]
    rec = decode(pipe, encode(pipe, [s.image for s in scenes]))
    x = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes]).float() / 127.5 - 1
    return float(np.mean([psnr(r, xx) for r, xx in zip(rec, x)]))


def adherence(pipe, n: int = 64, start: int = 0, steps: int = 25, guidance: float = 7.5, batch: int = 16):
    """Share of held-out captions whose generated image holds each named colour and no other; and the images."""
    caps = [tw.heldout_scene(start + i, size=native_size(pipe)).caption for i in range(n)]
    ok, images = [], []
    for b in range(0, n, batch):
        lat = generate(pipe, caps[b:b + batch], steps=steps, guidance=guidance, seed=start + b)
        for img, cap in zip(decode(pipe, lat), caps[b:b + batch]):
            a = ((img.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
            images.append(a)
            ok.append(tw.adheres(a, cap))
    return float(np.mean(ok)), images, caps


@torch.no_grad()
def cross_attention_iou(pipe, n: int = 64, start: int = 0, t: int = 500, threshold=0.5, seed: int = 0):
    """Mean IoU of each object's shape-word (and colour-word) cross-attention, thresholded, with the object's mask.

    Held-out scenes are encoded, noised to timestep t, and passed once through the UNet conditioned on their
    caption; each word's map is averaged over layers and heads, upsampled to image size, min-max normalised and
    thresholded. Returns {"shape": mean IoU, "colour": mean IoU}.
    """
    out = {"shape": [], "colour": []}
    scenes = [tw.heldout_scene(start + i, size=native_size(pipe)) for i in range(n)]
    lat = encode(pipe, [s.image for s in scenes])
    noisy = add_noise(pipe, lat, t, seed=seed)
    caps = [s.caption for s in scenes]
    cond = embed(pipe, caps)
    with capture_attention(pipe.unet, kinds=("cross",)) as store:
        pipe.unet(noisy, t, encoder_hidden_states=cond)
    size = scenes[0].image.shape[:2]
    maps = cross_maps(store, size=size)
    for b, s in enumerate(scenes):
        for j, o in enumerate(s.objects):
            for kind, word in (("colour", o.colour), ("shape", o.shape)):
                pos = token_positions(pipe.tokenizer, s.caption, word, occurrence=s.occurrence(j, word))
                out[kind].append(iou(binarise(maps[b, pos].mean(0), threshold), o.mask))
    return {k: float(np.mean(v)) for k, v in out.items()}


@torch.no_grad()
def self_attention_share(pipe, n: int = 64, start: int = 0, t: int = 300, prompt: str = "", seed: int = 0):
    """Mean share of a pixel's self-attention that falls on its own region, per resolution.

    As DiffSeg reads it: one UNet pass at timestep t with the empty prompt. For each resolution "RxR" it returns
    the share over all latent cells (own object, or the background for background cells) and, as
    "RxR objects", over object cells only (the harder part: objects are small); "… uniform" entries give what
    attention spread evenly over the image would score, the baseline to beat.
    """
    scenes = [tw.heldout_scene(start + i, size=native_size(pipe)) for i in range(n)]
    lat = encode(pipe, [s.image for s in scenes])
    noisy = add_noise(pipe, lat, t, seed=seed)
    cond = embed(pipe, [prompt] * n)
    with capture_attention(pipe.unet, kinds=("self",)) as store:
        pipe.unet(noisy, t, encoder_hidden_states=cond)
    out = {}
    for kind, (h, w) in store.keys():
        att = store.get(kind, (h, w))  # B × Q × K
        acc = {"": [], " objects": [], " uniform": [], " objects uniform": []}
        for b, s in enumerate(scenes):
            regions = F.one_hot(torch.from_numpy(s.instances), len(s.objects) + 1).permute(2, 0, 1).float()
            pooled = F.adaptive_avg_pool2d(regions[None], (h, w))[0].flatten(1)  # R × Q soft region masks
            owner = pooled.argmax(0)                                             # each cell's region (0 = bg)
            share = (att[b] @ pooled.T).gather(1, owner[:, None])[:, 0]          # attention on own region
            even = (pooled.sum(1) / pooled.sum())[owner]                         # ... if attention were uniform
            obj = owner > 0
            acc[""].append(share.mean().item()); acc[" uniform"].append(even.mean().item())
            if obj.any():
                acc[" objects"].append(share[obj].mean().item()); acc[" objects uniform"].append(even[obj].mean().item())
        for k, v in acc.items():
            out[f"{h}x{w}{k}"] = float(np.mean(v))
    return out
