"""Cross-attention heat maps per word, and segmentation from them (notebook 04).

The API a learner remembers — one context manager around a pipeline call, then a word's heat map:

    with trace(pipe, prompt) as tr:
        image = pipe(prompt).images[0]
    heat = tr.heatmap("circle")            # H × W at image size, mean over heads, layers, steps (conditional half)

Segmentation: each object word's map, normalised to [0, 1], thresholded (`word_masks`), or an argmax over the
caption's object words plus a constant background level (`argmax_labels`). Three ways to get the maps of a *real*
image, compared on held-out toy scenes by `compare` (notebook 04's table, `bench/cross_attention_segmentation.py`):

- "tuning" (DiffSegX-style): null-text-invert the image (`helpers.inversion`), then capture the first few sampling
  steps of its reconstruction;
- "tuning-free": noise the image's VAE latent lightly (strength ~0.1) and capture every remaining denoising step;
- "single pass": noise the latent to one timestep and capture one UNet call.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .attention import AttentionStore, capture_attention, cross_maps, word_heatmap
from .images import encode, vae_factor
from .metrics import binarise, iou, normalise
from .sampling import UNetCounter, add_noise, denoise, start_index, timesteps
from .text import embed, token_positions

VARIANTS = ("tuning", "tuning-free", "single pass")
EXTRA_VARIANTS = ("tuning (negative-prompt)",)  # the tuning variant with negative-prompt inversion: no optimisation


# -- the learner's API -----------------------------------------------------------------------------------------------
class Trace:
    """What `trace` yields: the attention store of the traced calls, and heat maps of the prompt's words."""

    def __init__(self, pipe, store: AttentionStore, prompt: str | None):
        self.pipe, self.store, self.prompt = pipe, store, prompt

    def _prompt(self, prompt):
        prompt = prompt if prompt is not None else self.prompt
        if prompt is None:
            raise ValueError("which prompt? pass it to trace(pipe, prompt) or to heatmap(word, prompt=...)")
        return prompt

    def image_size(self) -> tuple[int, int]:
        self.store.check_ran()
        h, w = self.store.latent_hw
        f = vae_factor(self.pipe)
        return (h * f, w * f)

    def maps(self, resolutions=None, steps=None) -> torch.Tensor:
        """batch × tokens × H × W cross-attention at image size (see `helpers.attention.cross_maps`)."""
        return cross_maps(self.store, self.image_size(), resolutions, steps)

    def heatmap(self, word: str, prompt: str | None = None, index: int = 0, resolutions=None, steps=None,
                occurrence: int | None = None) -> torch.Tensor:
        """H × W heat map (image size) of `word` in the prompt, for batch element `index` of the kept half."""
        return word_heatmap(self.store, self.pipe.tokenizer, self._prompt(prompt), word, self.image_size(),
                            resolutions, index, occurrence, steps)

    def heatmaps(self, words, prompt: str | None = None, index: int = 0, resolutions=None, steps=None) -> dict:
        maps = self.maps(resolutions, steps)
        prompt = self._prompt(prompt)
        return {w: word_heatmap(self.store, self.pipe.tokenizer, prompt, w, index=index, maps=maps) for w in words}


@contextmanager
def trace(pipe, prompt: str | None = None, half: str = "cond", **store_kw):
    """Capture the cross-attention of every UNet call inside the block; yields a `Trace`.

    half="cond" keeps the text-conditioned half of a classifier-free-guidance batch (diffusers' pipelines put it
    second); with guidance off (guidance_scale ≤ 1, one sample) the whole batch is kept. Other store options
    (resolutions=, steps=, per_step=) pass through to `AttentionStore`.
    """
    store = AttentionStore(kinds=store_kw.pop("kinds", ("cross",)), half=half, **store_kw)
    with capture_attention(pipe.unet, store):
        yield Trace(pipe, store, prompt)


# -- from heat maps to masks -----------------------------------------------------------------------------------------
def word_masks(heat: dict, threshold: float | str = 0.5) -> dict:
    """{word: bool mask}: each word's heat map min-max normalised and thresholded (a number or "otsu")."""
    return {w: binarise(h, threshold) for w, h in heat.items()}


def argmax_labels(heat: dict, background: float = 0.5) -> np.ndarray:
    """Label map: 0 where every normalised word map is below `background`, else 1 + the index of the strongest word.

    Each word's map is min-max normalised first, so words compete on their own scale; the background is a constant
    level, the same as thresholding each word at `background` and giving contested pixels to the strongest word.
    """
    if not heat:
        raise ValueError("no words given: pass {word: heat map} for the caption's object words")
    maps = normalise(torch.stack([torch.as_tensor(h, dtype=torch.float32) for h in heat.values()]))
    scores = torch.cat([torch.full_like(maps[:1], background), maps])
    return scores.argmax(0).numpy()


# -- scoring on toy scenes -------------------------------------------------------------------------------------------
_POSITIONS: dict = {}


def object_positions(tokenizer, scene) -> list[tuple[list[int], list[int]]]:
    """(shape-word positions, colour-word positions) of each object of a toy scene, the shape word at its own
    occurrence when the caption repeats it (cached per caption)."""
    key = (id(tokenizer), scene.caption, tuple((o.shape, o.colour) for o in scene.objects))
    if key not in _POSITIONS:
        _POSITIONS[key] = [(token_positions(tokenizer, scene.caption, o.shape, scene.occurrence(j, o.shape)),
                            token_positions(tokenizer, scene.caption, o.colour, scene.occurrence(j, o.colour)))
                           for j, o in enumerate(scene.objects)]
    return _POSITIONS[key]


def n_tokens(tokenizer, captions) -> int:
    """Token positions the captions use, start and end tokens included (the rest is padding)."""
    return max(len(tokenizer(c).input_ids) for c in captions)


def object_maps(tokenizer, scene, maps: torch.Tensor) -> list[dict]:
    """For each object of a toy scene: its shape word's, colour word's and phrase's ("red circle") heat maps, taken
    from `maps` (tokens × H × W, one batch element of `cross_maps`), the shape word at its own occurrence."""
    return [{"shape": maps[shape].mean(0), "colour": maps[colour].mean(0), "phrase": maps[shape + colour].mean(0)}
            for shape, colour in object_positions(tokenizer, scene)]


def score_scene(tokenizer, scene, maps: torch.Tensor, threshold=0.5, background: float = 0.5) -> dict:
    """IoU of each object's shape-word and colour-word mask (thresholded) with the object's ground-truth mask, and of
    the argmax segmentation over the object phrases + background, per object and for the background."""
    objs = object_maps(tokenizer, scene, maps)
    out = {"shape": [], "colour": [], "argmax": []}
    for o, m in zip(scene.objects, objs):
        out["shape"].append(iou(binarise(m["shape"], threshold), o.mask))
        out["colour"].append(iou(binarise(m["colour"], threshold), o.mask))
    lab = argmax_labels({o.phrase: m["phrase"] for o, m in zip(scene.objects, objs)}, background)
    out["argmax"] = [iou(lab == j + 1, o.mask) for j, o in enumerate(scene.objects)]
    out["background"] = [iou(lab == 0, scene.instances == 0)]
    return out


# -- three ways to get the maps of a real image -----------------------------------------------------------------------
def _store(per_step: bool, half: str = "cond") -> AttentionStore:
    return AttentionStore(kinds=("cross",), half=half, per_step=per_step)


@torch.no_grad()
def capture_single_pass(pipe, latents, captions, t: int = 300, seed: int = 0, per_step: bool = True):
    """One UNet call on the latents noised to timestep t, conditioned on their captions (no guidance)."""
    noisy = add_noise(pipe, latents, t, seed=seed)
    store = _store(per_step, "all")
    with capture_attention(pipe.unet, store):
        pipe.unet(noisy, t, encoder_hidden_states=embed(pipe, captions))
    return store


@torch.no_grad()
def capture_tuning_free(pipe, latents, captions, strength: float = 0.1, steps: int = 50, guidance: float = 7.5,
                        seed: int = 0, per_step: bool = True):
    """Noise the clean latents to the timestep `strength` points at, then denoise every remaining step under the
    captions with guidance, keeping the conditional half's cross-attention of every step."""
    i0 = start_index(steps, strength)
    if i0 >= steps:
        raise ValueError(f"strength {strength} with {steps} steps leaves no step to run; raise the strength "
                         f"(at least {1 / steps:.3f})")
    noisy = add_noise(pipe, latents, timesteps(pipe, steps)[i0], seed=seed)
    store = _store(per_step, "cond" if guidance != 1.0 else "all")
    with capture_attention(pipe.unet, store):
        denoise(pipe, noisy, list(captions), steps, guidance, start=i0)
    return store


def invert(pipe, latents, caption: str, steps: int = 50, guidance: float = 7.5, n_steps: int = 5,
           method: str = "null-text"):
    """Invert one image for the tuning variant. Null-text inversion only needs its first `n_steps` null embeddings
    here (only those steps are sampled), so no others are computed; "negative-prompt" skips optimising."""
    from .inversion import negative_prompt_inversion, null_text_inversion
    if method == "null-text":
        return null_text_inversion(pipe, latents, caption, steps=steps, guidance=guidance, progress=False,
                                   n_steps=n_steps)
    if method == "negative-prompt":
        return negative_prompt_inversion(pipe, latents, caption, steps=steps, guidance=guidance)
    raise ValueError(f"method must be 'null-text' or 'negative-prompt', not {method!r}")


def capture_tuning(pipe, latents, caption: str, steps: int = 50, guidance: float = 7.5, n_steps: int = 5,
                   method: str = "null-text", per_step: bool = True, inversion=None):
    """Invert one image (or use `inversion`), then capture the first `n_steps` steps of its reconstruction."""
    from .inversion import reconstruct
    inv = inversion if inversion is not None else invert(pipe, latents, caption, steps, guidance, n_steps, method)
    store = _store(per_step, "cond" if inv.guidance != 1.0 else "all")
    with capture_attention(pipe.unet, store):
        reconstruct(pipe, inv, n_steps=n_steps)
    return store, inv


# -- the comparison ---------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """One variant's scores on a set of scenes: IoU lists per word kind, cost, and per-step / per-resolution IoU."""
    variant: str
    iou: dict = field(default_factory=lambda: {"shape": [], "colour": [], "argmax": [], "background": []})
    evals: int = 0
    seconds: float = 0.0
    timesteps: list[int] = field(default_factory=list)          # the timestep of each captured step
    per_step: dict = field(default_factory=dict)                 # step index -> shape-word IoUs
    per_resolution: dict = field(default_factory=dict)           # (h, w) -> shape-word IoUs

    def mean(self, kind: str = "shape") -> float:
        return float(np.mean(self.iou[kind]))


def _score_store(pipe, store, scenes, res: Result, size, threshold, background):
    n_tok = n_tokens(pipe.tokenizer, [sc.caption for sc in scenes])
    maps = cross_maps(store, size, tokens=n_tok)
    for b, sc in enumerate(scenes):
        for k, v in score_scene(pipe.tokenizer, sc, maps[b], threshold, background).items():
            res.iou[k] += v
    for s in store.steps_kept():
        m = cross_maps(store, size, steps=[s], tokens=n_tok)
        res.per_step.setdefault(s, []).extend(
            x for b, sc in enumerate(scenes) for x in score_scene(pipe.tokenizer, sc, m[b], threshold)["shape"])
    for _kind, hw in store.keys():
        m = cross_maps(store, size, resolutions=[hw], tokens=n_tok)
        res.per_resolution.setdefault(hw, []).extend(
            x for b, sc in enumerate(scenes) for x in score_scene(pipe.tokenizer, sc, m[b], threshold)["shape"])


def evaluate(pipe, scenes, variant: str, steps: int = 50, guidance: float = 7.5, strength: float = 0.1,
             n_steps: int = 5, t: int = 300, threshold=0.5, background: float = 0.5, seed: int = 0,
             batch: int = 16, method: str = "null-text", progress: bool = True) -> Result:
    """Score one variant on toy scenes: per-word IoU, UNet evaluations (inversion included) and seconds."""
    if variant not in VARIANTS + EXTRA_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS + EXTRA_VARIANTS}")
    name = variant if variant != "tuning" or method == "null-text" else f"tuning ({method})"
    if variant == "tuning (negative-prompt)":
        variant, method = "tuning", "negative-prompt"
    scenes = list(scenes)
    if not scenes:
        raise ValueError("no scenes given; e.g. [helpers.toyworld.heldout_scene(i) for i in range(20)]")
    res = Result(name)
    size = scenes[0].image.shape[:2]
    ts = timesteps(pipe, steps)
    t0 = time.perf_counter()
    with UNetCounter(pipe.unet) as count:
        if variant == "tuning":
            res.timesteps = [int(x) for x in ts[:n_steps]]
            for sc in tqdm(scenes, desc="tuning: invert + sample", disable=not progress, leave=False):
                store, _ = capture_tuning(pipe, encode(pipe, sc.image), sc.caption, steps, guidance, n_steps, method)
                _score_store(pipe, store, [sc], res, size, threshold, background)
        else:
            chunks = [scenes[i:i + batch] for i in range(0, len(scenes), batch)]
            for chunk in tqdm(chunks, desc=variant, disable=not progress, leave=False):
                lat = encode(pipe, [sc.image for sc in chunk])
                caps = [sc.caption for sc in chunk]
                if variant == "tuning-free":
                    store = capture_tuning_free(pipe, lat, caps, strength, steps, guidance, seed)
                    res.timesteps = [int(x) for x in ts[start_index(steps, strength):]]
                else:
                    store = capture_single_pass(pipe, lat, caps, t, seed)
                    res.timesteps = [int(t)]
                _score_store(pipe, store, chunk, res, size, threshold, background)
    res.evals, res.seconds = count.evals, time.perf_counter() - t0
    return res


def compare(pipe, scenes, variants=VARIANTS, progress: bool = True, **kw) -> dict:
    """{variant: Result} on the same scenes, in one run."""
    return {v: evaluate(pipe, scenes, v, progress=progress, **kw) for v in variants}


def table_text(results: dict) -> str:
    """The comparison as a markdown table: IoU (mean ± std over objects) per word kind, UNet evaluations per image,
    and seconds per image as a ratio to the single pass (or the first variant) measured in the same run."""
    base = results.get("single pass") or next(iter(results.values()))
    lines = ["| variant | scenes | shape words | colour words | argmax (objects) | background | UNet evals / image "
             "| time / image (ratio) |", "|---|---|---|---|---|---|---|---|"]
    base_per = base.seconds / len(base.iou["background"])
    for name, r in results.items():
        n = len(r.iou["background"])
        cells = [f"{np.mean(r.iou[k]):.2f} ± {np.std(r.iou[k]):.2f}" for k in ("shape", "colour", "argmax",
                                                                                  "background")]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) +
                     f" | {r.evals / n:.0f} | {r.seconds / n / base_per:.1f}× |")
    return "\n".join(lines)


@torch.no_grad()
def layout_sweep(pipe, scenes, ts, seed: int = 0, threshold=0.5, progress: bool = True) -> dict:
    """Shape-word IoU of a single pass at each timestep in `ts`, per resolution and for all resolutions together:
    {"all" or (h, w): [mean IoU per timestep]} — which timesteps and resolutions carry the layout."""
    scenes = list(scenes)
    lat = encode(pipe, [sc.image for sc in scenes])
    caps = [sc.caption for sc in scenes]
    size = scenes[0].image.shape[:2]
    n_tok = n_tokens(pipe.tokenizer, caps)
    out: dict = {}
    for t in tqdm(list(ts), desc="timesteps", disable=not progress, leave=False):
        store = capture_single_pass(pipe, lat, caps, int(t), seed, per_step=False)
        for key in ["all", *sorted({hw for _, hw in store.keys()}, reverse=True)]:
            maps = cross_maps(store, size, resolutions=None if key == "all" else [key], tokens=n_tok)
            ious = [x for b, sc in enumerate(scenes) for x in score_scene(pipe.tokenizer, sc, maps[b], threshold)["shape"]]
            out.setdefault(key, []).append(float(np.mean(ious)))
    return out
