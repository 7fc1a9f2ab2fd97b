"""Cross-attention heat maps per word, and segmentation from them (notebook 04).

The API a learner remembers — one context manager around a pipeline call, then a word's heat map:

    with trace(pipe, prompt) as tr:
        image = pipe(prompt).images[0]
    heat = tr.heatmap("circle")            # H × W at image size, mean over heads, layers, steps (conditional half)

Segmentation: each object word's map, normalised to [0, 1], thresholded (`word_masks`), or an argmax over the
caption's object words plus a constant background level (`argmax_labels`). Three ways to get the maps of a *real*
image, compared on held-out toy scenes by `compare` (notebook 04's table, `bench/cross_attention_segmentation.py`):

- "tuning" (DiffSegX's tuning method): null-text-invert the image (`helpers.inversion`), then capture the first few
  sampling steps of its reconstruction;
- "tuning-free" (DiffSegX's tuning-free method, the `diffseg++` notebook of the Scorbinwen/DiffSegX repository):
  start from the image's clean VAE latent as if it were the latent at the timestep `strength` points at (no noise
  added; `noise=True` adds it, as img2img would) and capture every remaining denoising step;
- "single pass": noise the latent to one timestep and capture one UNet call.

Which maps are read (`RECIPES`): `half="both"` averages the two halves of a guidance batch (DiffSegX keeps both),
"cond" keeps the text-conditioned half only; `resolutions` are fractions of the latent side (None: every layer).
DiffSegX reads its 16×16 layers on SD's 64×64 latent, i.e. latent/4 (`reference=True`).
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
HALVES = ("both", "cond")
# How the tuning-free variant reads an image. "reference": DiffSegX's diffseg++ notebook (clean latent, both guidance
# halves, the 16×16 layers of SD's 64×64 latent = latent/4). "course": the same, but every layer (as DAAM averages
# them); notebook 04 and the bench choose the layers on tuning scenes instead.
RECIPES = {"reference": dict(noise=False, half="both", resolutions=(1 / 4,)),
           "course": dict(noise=False, half="both", resolutions=None)}
TUNING_START = 1000  # tuning scenes: tw.heldout_scene(TUNING_START + i); the scored scenes start at 0


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


# -- which layers: resolutions as fractions of the latent side -------------------------------------------------------
def _fractions(resolutions) -> tuple[float, ...] | None:
    if resolutions is None or isinstance(resolutions, str) and resolutions == "all":
        return None
    fr = (resolutions,) if isinstance(resolutions, (int, float)) else tuple(resolutions)
    if not fr or any(not isinstance(f, (int, float)) or not 0 < f <= 1 for f in fr):
        raise ValueError(f"resolutions must be None ('all') or fractions of the latent side in (0, 1], e.g. (1/4,) "
                         f"for SD's 16×16 layers on its 64×64 latent; got {resolutions!r}")
    return tuple(float(f) for f in fr)


def layer_grids(store, resolutions) -> list[tuple[int, int]] | None:
    """The captured grids (h, w) that `resolutions` (fractions of the latent side, None: all) name in `store`."""
    fr = _fractions(resolutions)
    if fr is None:
        return None
    store.check_ran()
    h, w = store.latent_hw
    have = sorted({hw for kind, hw in store.keys() if kind == "cross"}, reverse=True)
    want = [(round(h * f), round(w * f)) for f in fr]
    missing = [g for g in want if g not in have]
    if missing:
        raise ValueError(f"no cross-attention layer works at {missing} (latent {h}×{w}); this UNet has "
                         + ", ".join(f"{a}×{b} = {fraction_label(a / h)}" for a, b in have))
    return want


def fraction_label(f) -> str:
    """1/4 -> "latent/4"; None -> "all"."""
    if f is None:
        return "all"
    return f"latent/{1 / f:g}" if abs(1 / f - round(1 / f)) < 1e-6 else f"latent×{f:g}"


def image_maps(store, n_images: int, size, resolutions=None, steps=None, tokens: int | None = None,
               half: str = "both") -> torch.Tensor:
    """n_images × tokens × H × W: `cross_maps` of the chosen layers. From a store that kept both halves of a guidance
    batch (2·n_images maps, unconditional first), half="both" gives each image the mean of its two halves and "cond"
    its text-conditioned half."""
    if half not in HALVES:
        raise ValueError(f"half must be one of {HALVES}, not {half!r}")
    maps = cross_maps(store, size, layer_grids(store, resolutions), steps, tokens)
    if maps.shape[0] == 2 * n_images:
        return maps.view(2, n_images, *maps.shape[1:]).mean(0) if half == "both" else maps[n_images:]
    if maps.shape[0] != n_images:
        raise ValueError(f"the store holds {maps.shape[0]} maps per layer, not {n_images} or {2 * n_images}")
    return maps


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
def _store(per_step: bool, half: str = "cond", guidance: float = 7.5) -> AttentionStore:
    if half not in HALVES + ("all",):
        raise ValueError(f"half must be one of {HALVES}, not {half!r}")
    keep = "all" if half in ("both", "all") or guidance == 1.0 else "cond"
    return AttentionStore(kinds=("cross",), half=keep, per_step=per_step)


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
                        seed: int = 0, per_step: bool = True, noise: bool = False, half: str = "both"):
    """Denoise the image's latents from the timestep `strength` points at to the end, under the captions with
    guidance, capturing the cross-attention of every step.

    noise=False (DiffSegX): the clean latent is handed to the first of those steps as it is; noise=True noises it to
    that timestep first (img2img). half: "both" keeps both halves of the guidance batch (read them with
    `image_maps`, which averages them), "cond" the text-conditioned half only.
    """
    i0 = start_index(steps, strength)
    if i0 >= steps:
        raise ValueError(f"strength {strength} with {steps} steps leaves no step to run; raise the strength "
                         f"(at least {1 / steps:.3f})")
    start = add_noise(pipe, latents, timesteps(pipe, steps)[i0], seed=seed) if noise else latents
    store = _store(per_step, half, guidance)
    with capture_attention(pipe.unet, store):
        denoise(pipe, start, list(captions), steps, guidance, start=i0)
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
                   method: str = "null-text", per_step: bool = True, inversion=None, half: str = "both"):
    """Invert one image (or use `inversion`), then capture the first `n_steps` steps of its reconstruction
    (half: as in `capture_tuning_free`)."""
    from .inversion import reconstruct
    inv = inversion if inversion is not None else invert(pipe, latents, caption, steps, guidance, n_steps, method)
    store = _store(per_step, half, inv.guidance)
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
    per_resolution: dict = field(default_factory=dict)           # (h, w) -> shape-word IoUs (each layer grid alone)
    latent_hw: tuple = ()
    settings: dict = field(default_factory=dict)                 # noise, half, resolutions used

    def mean(self, kind: str = "shape") -> float:
        return float(np.mean(self.iou[kind]))

    def by_fraction(self) -> dict:
        """{fraction of the latent side: mean shape-word IoU of that grid's layers alone}, finest first."""
        h = self.latent_hw[0]
        return {hw[0] / h: float(np.mean(v)) for hw, v in sorted(self.per_resolution.items(), reverse=True)}


def _score_store(pipe, store, scenes, res: Result, size, threshold, background, resolutions=None,
                 half: str = "both"):
    n_tok, n = n_tokens(pipe.tokenizer, [sc.caption for sc in scenes]), len(scenes)
    res.latent_hw = store.latent_hw
    maps = image_maps(store, n, size, resolutions, tokens=n_tok, half=half)
    for b, sc in enumerate(scenes):
        for k, v in score_scene(pipe.tokenizer, sc, maps[b], threshold, background).items():
            res.iou[k] += v
    for s in store.steps_kept():
        m = image_maps(store, n, size, resolutions, steps=[s], tokens=n_tok, half=half)
        res.per_step.setdefault(s, []).extend(
            x for b, sc in enumerate(scenes) for x in score_scene(pipe.tokenizer, sc, m[b], threshold)["shape"])
    h = store.latent_hw[0]
    for _kind, hw in store.keys():
        m = image_maps(store, n, size, [hw[0] / h], tokens=n_tok, half=half)
        res.per_resolution.setdefault(hw, []).extend(
            x for b, sc in enumerate(scenes) for x in score_scene(pipe.tokenizer, sc, m[b], threshold)["shape"])


def evaluate(pipe, scenes, variant: str, steps: int = 50, guidance: float = 7.5, strength: float = 0.1,
             n_steps: int = 5, t: int = 300, threshold=0.5, background: float = 0.5, seed: int = 0,
             batch: int = 16, method: str = "null-text", progress: bool = True, noise: bool | None = None,
             half: str | None = None, resolutions="recipe", reference: bool = False,
             per_step: bool = True) -> Result:
    """Score one variant on toy scenes: per-word IoU, UNet evaluations (inversion included) and seconds.

    noise, half, resolutions: how the image is read (see `capture_tuning_free`, `image_maps`); unset, they come from
    `RECIPES["reference"]` if reference=True, else from `RECIPES["course"]`. noise applies to the tuning-free variant,
    half to both guided variants, resolutions to every variant. per_step=False skips the IoU of each step.
    """
    if variant not in VARIANTS + EXTRA_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS + EXTRA_VARIANTS}")
    recipe = RECIPES["reference" if reference else "course"]
    noise = recipe["noise"] if noise is None else noise
    half = recipe["half"] if half is None else half
    resolutions = _fractions(recipe["resolutions"] if isinstance(resolutions, str) and resolutions == "recipe"
                             else resolutions)
    if half not in HALVES:
        raise ValueError(f"half must be one of {HALVES}, not {half!r}")
    name = variant if variant != "tuning" or method == "null-text" else f"tuning ({method})"
    if variant == "tuning (negative-prompt)":
        variant, method = "tuning", "negative-prompt"
    scenes = list(scenes)
    if not scenes:
        raise ValueError("no scenes given; e.g. [helpers.toyworld.heldout_scene(i) for i in range(20)]")
    res = Result(name, settings=dict(noise=noise, half=half, resolutions=resolutions))
    size = scenes[0].image.shape[:2]
    ts = timesteps(pipe, steps)
    t0 = time.perf_counter()
    with UNetCounter(pipe.unet) as count:
        if variant == "tuning":
            res.timesteps = [int(x) for x in ts[:n_steps]]
            for sc in tqdm(scenes, desc="tuning: invert + sample", disable=not progress, leave=False):
                store, _ = capture_tuning(pipe, encode(pipe, sc.image), sc.caption, steps, guidance, n_steps, method,
                                          per_step, half=half)
                _score_store(pipe, store, [sc], res, size, threshold, background, resolutions)
        else:
            chunks = [scenes[i:i + batch] for i in range(0, len(scenes), batch)]
            for chunk in tqdm(chunks, desc=variant, disable=not progress, leave=False):
                lat = encode(pipe, [sc.image for sc in chunk])
                caps = [sc.caption for sc in chunk]
                if variant == "tuning-free":
                    store = capture_tuning_free(pipe, lat, caps, strength, steps, guidance, seed, per_step,
                                                noise=noise, half=half)
                    res.timesteps = [int(x) for x in ts[start_index(steps, strength):]]
                else:
                    store = capture_single_pass(pipe, lat, caps, t, seed, per_step)
                    res.timesteps = [int(t)]
                _score_store(pipe, store, chunk, res, size, threshold, background, resolutions)
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


def recipe_grid(pipe, scenes, steps: int = 50, guidance: float = 7.5, strength: float = 0.1, seed: int = 0,
                threshold=0.5, background: float = 0.5, batch: int = 16, progress: bool = False, **_) -> dict:
    """The tuning-free variant read every way: {(noise, half): Result}, for noise in (False, True) and half in
    `HALVES` (both readings come from one capture that keeps both halves); each Result holds its IoU with every
    layer (`mean`) and with each grid's layers alone (`by_fraction`)."""
    scenes = list(scenes)
    if not scenes:
        raise ValueError("no scenes given; e.g. [helpers.toyworld.heldout_scene(TUNING_START + i) for i in range(20)]")
    size = scenes[0].image.shape[:2]
    out = {}
    for noise in tqdm((False, True), desc="recipe grid", disable=not progress, leave=False):
        res = {h: Result("tuning-free", settings=dict(noise=noise, half=h, resolutions=None)) for h in HALVES}
        t0 = time.perf_counter()
        for i in range(0, len(scenes), batch):
            chunk = scenes[i:i + batch]
            store = capture_tuning_free(pipe, encode(pipe, [sc.image for sc in chunk]), [sc.caption for sc in chunk],
                                        strength, steps, guidance, seed, per_step=False, noise=noise, half="both")
            for h in HALVES:
                _score_store(pipe, store, chunk, res[h], size, threshold, background, None, half=h)
        for h in HALVES:
            res[h].seconds = time.perf_counter() - t0
            out[(noise, h)] = res[h]
    return out


def grid_scores(grid: dict) -> dict:
    """{(noise, half, fraction or None): mean shape-word IoU} from `recipe_grid` (None: every layer)."""
    out = {}
    for (noise, half), r in grid.items():
        out[(noise, half, None)] = r.mean("shape")
        out.update({(noise, half, f): v for f, v in r.by_fraction().items()})
    return out


def choose_recipe(grid: dict) -> dict:
    """The best way to read an image on the scenes of `grid` (tuning scenes): {"noise", "half", "resolutions"}."""
    scores = grid_scores(grid)
    noise, half, f = max(scores, key=scores.get)
    return dict(noise=noise, half=half, resolutions=None if f is None else (f,))


def grid_text(grid: dict, mark: dict | None = None) -> str:
    """`recipe_grid` as a markdown table: one row per (latent, halves), one column per layer choice; `mark` (a
    recipe, e.g. from `choose_recipe`) is set in bold, and DiffSegX's recipe is tagged."""
    scores = grid_scores(grid)
    fracs = sorted({f for (_, _, f) in scores if f is not None}, reverse=True)
    lat = next(iter(grid.values())).latent_hw
    cols = [None, *fracs]
    head = ["every layer"] + [f"{fraction_label(f)} ({round(lat[0] * f)}×{round(lat[1] * f)}) only" for f in fracs]
    lines = ["| latent | guidance halves | " + " | ".join(head) + " |", "|---" * (len(cols) + 2) + "|"]
    ref = RECIPES["reference"]
    for (noise, half) in grid:
        cells = []
        for f in cols:
            v = f"{scores[(noise, half, f)]:.3f}"
            r = None if f is None else (f,)
            if mark and (noise, half, r) == (mark["noise"], mark["half"], mark["resolutions"]):
                v = f"**{v}**"
            if (noise, half, r) == (ref["noise"], ref["half"], ref["resolutions"]):
                v += " (DiffSegX)"
            cells.append(v)
        lines.append(f"| {'noised (strength)' if noise else 'clean'} | {half} | " + " | ".join(cells) + " |")
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
            ious = [x for b, sc in enumerate(scenes)
                    for x in score_scene(pipe.tokenizer, sc, maps[b], threshold)["shape"]]
            out.setdefault(key, []).append(float(np.mean(ious)))
    return out
