"""DiffEdit (Couairon et al., 2022): a mask of *where* an edit must happen, from the model's own disagreement.

Notebook 01 builds the purist recipe step by step, notebook 02 the fast one; this module keeps the versions later
notebooks and the benchmark import.

- `purist_mask`: n img2img partial denoisings (strength 0.5 of a 50-step schedule) under the reference and the query
  prompt, with shared noise per draw; the absolute difference of the results, averaged over channels and draws.
- `fast_mask`: one UNet call for all n draws and both prompts (with guidance): the difference of the predicted
  clean latents x0 at the strength's timestep. With shared noise, x0_q − x0_r = −√((1−ᾱ)/ᾱ)·(ε_q − ε_r): the same
  map as the noise-prediction difference diffusers uses, up to a constant factor.
- Both return the *raw* map (normalise it only to look at it): `binarise_diffusers` needs the raw values.
- `binarise_diffusers`: diffusers' `generate_mask` rule exactly: divide the raw map by 3× its mean, clamp to
  [0, 1], keep > 0.5 (that is: keep the pixels above 1.5× the map's mean).
- `improved_mask`: the course's sharper fast mask at the same 80 UNet evaluations, at image size (not a published
  recipe; each departure is measured on tuning edits by bench/diffedit_mask_tuning.py): no guidance and draws at
  two strengths (`strengths_map`), bilinear upsampling, edges from the input image (`guided_filter`), a relative
  threshold, holes filled.
- `masked_diffusion`: two recipes. `recipe="inversion"` (the DiffEdit paper, diffusers' pipeline): DDIM-encode the
  input, decode under the query, and at every step paste the input's encoding at that step outside the mask.
  `recipe="blend"` (the purist recipe of the FastDiffEdit blog post): noise the input as img2img does, and at every
  step blend a query step (inside) with a reference step (outside), both taken from the current latent.
- `edit_report` / `compare_edits`: was the edit made (the toy world's detector in the edited region) and was the
  rest kept (PSNR outside the region)?
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .sampling import (add_noise, conditioning, convert_output, ddim_invert, ddim_step, denoise, predict_noise,
                       predict_output, prompt_embeddings, seeded_noise, start_index, step_gap, timesteps)
from .metrics import normalise  # also imported from here by notebooks 01-02


def check_prompts(reference, query):
    """Reference and query are prompt strings or prompt embeddings (1 × tokens × dim); they must differ."""
    if isinstance(reference, torch.Tensor) and isinstance(query, torch.Tensor):
        if torch.equal(reference, query):
            raise ValueError("the reference and query embeddings are identical: the mask would be empty")
        return
    if not isinstance(reference, str) or not isinstance(query, str):
        raise TypeError("reference and query are both prompt strings or both embedding tensors")
    if reference.strip().lower() == query.strip().lower():
        raise ValueError(f"the reference and query prompts are identical ({query!r}): nothing differs, so the mask "
                         "would be empty; write the query as the edited description, e.g. 'a red circle' → "
                         "'a green circle'")


def _check_n(n: int):
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (noise draws per mask) must be an integer ≥ 1, got {n!r}")


def _check_latents(latents: torch.Tensor):
    if latents.ndim != 4 or latents.shape[0] != 1:
        raise ValueError(f"expected the latents of one image (1×C×h×w), got shape {tuple(latents.shape)}; "
                         "use helpers.images.encode(pipe, image)")


@torch.no_grad()
def purist_mask(pipe, latents, reference: str, query: str, n: int = 10, strength: float = 0.5, steps: int = 50,
                guidance: float = 7.5, seed: int = 0, progress: bool = False,
                per_draw: bool = False) -> torch.Tensor:
    """The purist DiffEdit map (h×w latent grid, raw values): mean |denoised_query − denoised_reference|.

    All n draws and both prompts run as one batch of 2n through `steps·strength` guided DDIM steps. With
    `per_draw=True`, the n maps of the single draws (n×h×w) instead of their mean.
    """
    check_prompts(reference, query)
    _check_n(n)
    _check_latents(latents)
    i0 = start_index(steps, strength)
    noise = seeded_noise((n, *latents.shape[1:]), seed, latents)
    z = latents.expand(2 * n, -1, -1, -1)
    t0 = timesteps(pipe, steps)[i0]
    noisy = add_noise(pipe, z, t0, torch.cat([noise, noise]))
    cond = torch.cat([prompt_embeddings(pipe, reference, n), prompt_embeddings(pipe, query, n)])
    out = denoise(pipe, noisy, cond, steps, guidance, start=i0, progress=progress)
    maps = (out[n:] - out[:n]).abs().mean(1)
    return maps if per_draw else maps.mean(0)


@torch.no_grad()
def fast_mask(pipe, latents, reference: str, query: str, n: int = 20, strength: float = 0.5, steps: int = 50,
              guidance: float = 7.5, seed: int = 0) -> torch.Tensor:
    """The fast DiffEdit map (h×w, raw values): mean |x0_query − x0_reference| from ONE batched UNet call (4n
    samples)."""
    check_prompts(reference, query)
    _check_n(n)
    _check_latents(latents)
    t = timesteps(pipe, steps)[start_index(steps, strength)]
    noise = seeded_noise((n, *latents.shape[1:]), seed, latents)
    z = latents.expand(2 * n, -1, -1, -1)
    noisy = add_noise(pipe, z, t, torch.cat([noise, noise]))
    cond = torch.cat([prompt_embeddings(pipe, reference, n), prompt_embeddings(pipe, query, n)])
    cond, unc = conditioning(pipe, cond, "", 2 * n)
    x0 = convert_output(pipe, predict_output(pipe, noisy, t, cond, unc, guidance), noisy, t, "sample")  # ε, x0 or v
    return (x0[n:] - x0[:n]).abs().mean(1).mean(0)


def binarise_diffusers(diff: torch.Tensor, ratio: float = 3.0) -> torch.Tensor:
    """diffusers' `generate_mask` rule, exactly: divide the raw map by `ratio` × its mean, clamp to [0, 1], keep
    > 0.5. With the default ratio 3 it keeps the pixels above 1.5× the map's mean.

    Pass the raw difference map (`fast_mask`, `purist_mask`): after a min-max normalisation the mean moves and the
    mask changes.
    """
    d = torch.as_tensor(diff, dtype=torch.float32)
    if d.ndim != 2:
        raise ValueError(f"expected one h×w difference map, got shape {tuple(d.shape)}")
    if not ratio > 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    clamp = d.mean() * ratio
    if not clamp > 0:
        raise ValueError("the difference map is zero everywhere (its mean is not positive): the reference and "
                         "query predictions agree, so there is nothing to mask; check that the prompts differ")
    return d.clamp(0, clamp) / clamp > 0.5


def blur(mask: torch.Tensor, sigma: float = 1.0, size: int = 3) -> torch.Tensor:
    """Gaussian blur (size×size) of a map; `blur(m) > 0` smooths and dilates a binary mask by about a cell."""
    ax = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-ax**2 / (2 * sigma**2))
    k = (k[:, None] * k[None]) / k.sum() ** 2
    return F.conv2d(mask.float()[None, None], k[None, None].to(mask.device), padding=size // 2)[0, 0]


# --- A sharper fast mask: the DiffEdit map read with image edges (bench/diffedit_mask_tuning.py measures each step) ---

IMPROVED_STRENGTHS = (0.5, 0.75)   # two timesteps of a 50-step schedule (t 481 and 721), chosen on tuning edits
IMPROVED_THRESHOLD = 0.65          # of the min-max normalised map, with the image guide (tuning plateau 0.6–0.7)
IMPROVED_THRESHOLD_NO_GUIDE = 0.45  # without it (tuning plateau 0.4–0.5)


@torch.no_grad()
def strengths_map(pipe, latents, reference, query, n: int = 20, strengths=IMPROVED_STRENGTHS, steps: int = 50,
                  seed: int = 0) -> torch.Tensor:
    """The DiffEdit noise-difference map (h×w, latent grid) without guidance, from n draws at each of several
    strengths, all in ONE UNet call of 2·n·len(strengths) evaluations.

    Per strength: mean over draws and channels of |ε_query − ε_reference| (shared noise per draw, conditional
    predictions only), divided by its own mean so that every timestep weighs the same; then the mean over strengths.
    Guidance is left out on purpose: the unconditional half sees the same latent and the same empty prompt for both
    prompts, so it cancels in the difference, and the guided map is exactly `guidance` × this one; its evaluations
    buy twice the draws instead.
    """
    check_prompts(reference, query)
    _check_n(n)
    _check_latents(latents)
    strengths = tuple(strengths)
    if not strengths:
        raise ValueError("strengths is empty: give at least one strength in (0, 1], e.g. (0.5, 0.75)")
    ts = timesteps(pipe, steps)
    t_of = [ts[start_index(steps, s)] for s in strengths]  # start_index checks each strength
    noise = seeded_noise((n * len(strengths), *latents.shape[1:]), seed, latents).split(n)
    z = latents.expand(n, -1, -1, -1)
    noisy = [add_noise(pipe, z, t, e) for t, e in zip(t_of, noise)]
    x = torch.cat([torch.cat([xt, xt]) for xt in noisy])                    # per strength: [reference, query] × n
    t_all = torch.cat([t.reshape(1).expand(2 * n) for t in t_of]).to(latents.device)
    pair = torch.cat([prompt_embeddings(pipe, reference, n), prompt_embeddings(pipe, query, n)])
    out = pipe.unet(x, t_all, encoder_hidden_states=pair.repeat(len(strengths), 1, 1)).sample
    maps = []
    for k, t in enumerate(t_of):
        sl = slice(2 * n * k, 2 * n * (k + 1))
        eps = convert_output(pipe, out[sl], x[sl], t, "epsilon")
        m = (eps[n:] - eps[:n]).abs().mean(1).mean(0)
        if not m.mean() > 0:
            raise ValueError("the difference map is zero everywhere: the reference and query predictions agree, "
                             "so there is nothing to mask; check that the prompts differ")
        maps.append(m / m.mean())
    return torch.stack(maps).mean(0)


def _box(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over a (2r+1)² window of each channel of C×H×W (edges replicated), as two 1-D passes."""
    k = 2 * r + 1
    x = F.pad(x[None], (r, r, r, r), mode="replicate")
    return F.avg_pool2d(F.avg_pool2d(x, (1, k), stride=1), (k, 1), stride=1)[0]


def guided_filter(guide: torch.Tensor, p: torch.Tensor, radius: int, eps: float = 1e-3) -> torch.Tensor:
    """Edge-aware smoothing of a map p (H×W) by a colour image (3×H×W, values in [0, 1]): the guided filter of
    He, Sun and Tang (ECCV 2010), colour-guide form. In each (2·radius+1)² window the output is an affine function
    of the guide's colour, fitted to p by least squares (ridge `eps`), and the fits of all windows are averaged: the
    result follows p's layout but takes its edges from the image."""
    if guide.ndim != 3 or guide.shape[0] != 3 or guide.shape[1:] != p.shape:
        raise ValueError(f"guide must be 3×H×W with H×W = the map's {tuple(p.shape)}, got {tuple(guide.shape)}")
    if radius < 1:
        raise ValueError(f"radius must be at least 1 pixel, got {radius}")
    guide, p = guide.float(), p.float()
    h, w = p.shape
    mean_i, mean_p = _box(guide, radius), _box(p[None], radius)[0]
    cov_ip = _box(guide * p, radius) - mean_i * mean_p
    outer = (guide[:, None] * guide[None]).reshape(9, h, w)
    var = _box(outer, radius).reshape(3, 3, h, w) - mean_i[:, None] * mean_i[None]
    var = var + eps * torch.eye(3, device=p.device)[:, :, None, None]
    a = torch.linalg.solve(var.permute(2, 3, 0, 1), cov_ip.permute(1, 2, 0)[..., None])[..., 0].permute(2, 0, 1)
    b = mean_p - (a * mean_i).sum(0)
    return (_box(a, radius) * guide).sum(0) + _box(b[None], radius)[0]


def _guide_image(pipe, image, latents) -> torch.Tensor:
    """The input image as 3×H×W in [0, 1] at the latents' image size (decoded from the latents when None)."""
    from .images import decode, pil_to_tensor, vae_factor
    size = tuple(s * vae_factor(pipe) for s in latents.shape[-2:])
    if image is None:
        x = decode(pipe, latents)[0]
    elif isinstance(image, torch.Tensor):
        x = image[0] if image.ndim == 4 else image
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"image tensor must be 3×H×W or 1×3×H×W in [-1, 1], got shape {tuple(image.shape)}")
    else:
        x = pil_to_tensor(image)[0]
    if tuple(x.shape[-2:]) != size:
        raise ValueError(f"the image is {x.shape[-1]}×{x.shape[-2]} but the latents decode to {size[1]}×{size[0]}; "
                         "pass the image the latents were encoded from")
    return ((x.float() + 1) / 2).clamp(0, 1).to(latents.device)


@torch.no_grad()
def improved_mask(pipe, latents, reference, query, image=None, n: int = 20, strengths=IMPROVED_STRENGTHS,
                  steps: int = 50, seed: int = 0, guide: bool = True, threshold: float | None = None,
                  radius: int = 2, eps: float = 1e-3) -> torch.Tensor:
    """A sharper fast DiffEdit mask at image size (H×W, boolean), 2·n·len(strengths) UNet evaluations in one call
    (80 with the defaults, as `fast_mask` with n=20).

    Steps and their departures from the fast mask as `fast_mask` + `binarise_diffusers` make it, with diffusers'
    `generate_mask` defaults (one strength, 0.5, guidance 7.5, keep the cells above 1.5× the map's mean, the
    latent-grid mask upsampled by nearest neighbour): 1. `strengths_map`: no guidance (it only scales the map) and n draws at each of two
    strengths, 0.5 and 0.75; 2. bilinear upsampling of the raw map to image size; 3. with `guide=True`, the
    guided filter with the input `image` as guide (radius in latent cells; edges from the image, the layout from
    the map); 4. min-max normalise and keep > `threshold` (0.65 with the guide, 0.45 without); 5. fill holes
    (scipy's binary_fill_holes: a shape edit lights the outline where the shapes differ more than the inside).
    `image`: the input (PIL, uint8 H×W×3 or a [-1, 1] tensor); None decodes the latents (one VAE decode).
    """
    from scipy.ndimage import binary_fill_holes
    from .images import vae_factor
    if threshold is None:
        threshold = IMPROVED_THRESHOLD if guide else IMPROVED_THRESHOLD_NO_GUIDE
    if not 0 < threshold < 1:
        raise ValueError(f"threshold is a fraction of the normalised map's range, in (0, 1); got {threshold}")
    if not (isinstance(radius, int) and radius >= 1):
        raise ValueError(f"radius (of the guided filter, in latent cells) must be an integer ≥ 1, got {radius!r}")
    check_prompts(reference, query)
    _check_latents(latents)
    rgb = _guide_image(pipe, image, latents) if guide else None  # checked before the UNet runs
    raw = strengths_map(pipe, latents, reference, query, n=n, strengths=strengths, steps=steps, seed=seed)
    f = vae_factor(pipe)
    size = (raw.shape[0] * f, raw.shape[1] * f)
    m = F.interpolate(raw[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    if guide:
        m = guided_filter(rgb, m, radius=radius * f, eps=eps)
    lo, hi = m.min(), m.max()
    if not hi > lo:
        raise ValueError("the difference map is flat: there is no region to pick; check that the prompts differ")
    keep = ((m - lo) / (hi - lo) > threshold).cpu().numpy()
    return torch.from_numpy(binary_fill_holes(keep)).to(latents.device)


def to_latent_mask(pipe, mask, latents: torch.Tensor) -> torch.Tensor:
    """A mask at latent size (h×w) or image size (H×W) -> float mask at latent size; errors on other shapes."""
    m = torch.as_tensor(mask).float().to(latents.device)
    h, w = latents.shape[-2:]
    if m.ndim != 2:
        raise ValueError(f"a mask is a 2-D map (h×w), got shape {tuple(m.shape)}")
    if tuple(m.shape) == (h, w):
        return m
    from .images import vae_factor
    f = vae_factor(pipe)
    if tuple(m.shape) == (h * f, w * f):
        return F.adaptive_avg_pool2d(m[None, None], (h, w))[0, 0]
    raise ValueError(f"mask of shape {tuple(m.shape)} fits neither the latents ({h}×{w}) nor the image "
                     f"({h * f}×{w * f}); resize it to one of them")


MASKED_DIFFUSION_RECIPES = ("inversion", "blend")


@torch.no_grad()
def masked_diffusion(pipe, latents, mask, reference: str, query: str, strength: float = 0.7, steps: int = 50,
                     guidance: float = 7.5, progress: bool = False, recipe: str = "inversion",
                     seed: int = 0) -> torch.Tensor:
    """DiffEdit's steps 2 and 3: edit inside the mask under the query, keep the outside. Returns the edited latents.
    The mask may be at latent or image size, binary or soft.

    recipe="inversion" (the DiffEdit paper and diffusers' pipeline): DDIM-encode the input under the reference
    prompt to the strength's timestep, then decode under the query; after every step, outside the mask, put back
    the input's encoding at that step. The outside ends exactly on the input's latents.
    recipe="blend" (the purist recipe of the FastDiffEdit blog post): add fresh noise (`seed`) to the input as img2img
    does, then at every step take one guided step under the query and one under the reference from the same latent,
    and keep the query's inside the mask, the reference's outside. Twice the UNet evaluations per step, no
    inversion; the outside is re-drawn under the reference caption, so it is close to the input, not equal.
    """
    if recipe not in MASKED_DIFFUSION_RECIPES:
        raise ValueError(f"recipe must be one of {MASKED_DIFFUSION_RECIPES}, not {recipe!r}")
    check_prompts(reference, query)
    _check_latents(latents)
    m = to_latent_mask(pipe, mask, latents)
    if m.sum() == 0:
        raise ValueError("the mask is empty: nothing would be edited; lower the threshold or check the prompts")
    if (m > 0.5).float().mean() > 0.95:
        warnings.warn("the mask covers more than 95% of the image: the edit will not preserve the input",
                      stacklevel=2)
    i0 = start_index(steps, strength)
    if recipe == "blend":
        return _blend_diffusion(pipe, latents, m, reference, query, i0, steps, guidance, seed, progress)
    traj = ddim_invert(pipe, latents, reference, steps, guidance=1.0)  # x_0 … x_T along the schedule
    ts = timesteps(pipe, steps)
    # traj[k] sits at the k-th ascending timestep; the descending index i starts from ts[i] = traj[len(ts) - i]
    start = traj[len(ts) - i0]

    def keep_outside(i, t, lat):
        ref = traj[len(ts) - i - 1]  # the input's encoding at the step just reached
        return m * lat + (1 - m) * ref

    return denoise(pipe, start, query, steps, guidance, start=i0, callback=keep_outside, progress=progress)


@torch.no_grad()
def _blend_diffusion(pipe, latents, m, reference, query, i0, steps, guidance, seed, progress):
    """The blog's purist masked diffusion: x ← m·step_query(x) + (1−m)·step_reference(x), from img2img noise."""
    from tqdm.auto import tqdm
    ts = timesteps(pipe, steps)
    x = add_noise(pipe, latents, ts[i0], seeded_noise(latents.shape, seed, latents))
    cond = torch.cat([prompt_embeddings(pipe, reference, 1), prompt_embeddings(pipe, query, 1)])
    cond, unc = conditioning(pipe, cond, "", 2)
    gap = step_gap(pipe, steps)
    for i in tqdm(range(i0, len(ts)), desc="masked diffusion", disable=not progress, leave=False):
        both = torch.cat([x, x])                                      # [reference, query] from the same latent
        eps = predict_noise(pipe, both, ts[i], cond, unc, guidance)
        ref, qry = ddim_step(pipe, both, eps, ts[i], int(ts[i]) - gap).chunk(2)
        x = m * qry + (1 - m) * ref
    return x


def diffedit_pipeline(pipe):
    """diffusers' StableDiffusionDiffEditPipeline built from an already loaded pipeline's parts (no reload)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline
    from diffusers.utils import logging as dlog
    parts = {k: v for k, v in pipe.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet")}
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # its deprecation notice (no fixes after diffusers 0.33.1): notebook 02 says it once
    try:
        cfg = pipe.scheduler.config
        p = StableDiffusionDiffEditPipeline(**parts, scheduler=DDIMScheduler.from_config(cfg),
                                            inverse_scheduler=DDIMInverseScheduler.from_config(cfg),
                                            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    finally:
        dlog.set_verbosity(level)
    p.set_progress_bar_config(disable=True)
    return p


CAPTION_TEMPLATES = ("{}", "a photo of {}", "a picture of {}", "{} on the background", "{}.")


def caption_variants(caption: str, templates=CAPTION_TEMPLATES) -> list[str]:
    """Several phrasings of one caption — the offline stand-in for captions written by a language model."""
    return [t.format(caption) for t in templates]


FLAN_T5 = "google/flan-t5-large"                       # writes captions of a concept (the diffusers DiffEdit guide)
BLIP = "Salesforce/blip-image-captioning-base"         # captions the input image for inversion

CAPTION_INSTRUCTION = ("Provide a caption for images containing a {}. "
                       "The captions should be in English and should be no longer than 150 characters.")


def _from_hub(cls, model_id: str, stand_in: str, **kw):
    """`cls.from_pretrained(model_id)` with an error that names the offline stand-in instead of a hub stack trace."""
    from .loading import _offline
    if not Path(model_id).exists() and _offline():
        raise RuntimeError(f"'{model_id}' is a hub id, but the hub is offline here (HF_HUB_OFFLINE=1). "
                           f"Offline, use {stand_in} instead.")
    try:
        return cls.from_pretrained(model_id, **kw)
    except OSError as e:
        raise RuntimeError(f"Could not fetch '{model_id}' ({type(e).__name__}: {e}). Offline, use {stand_in} "
                           "instead.") from e


def _captioner(model, helper, what: str, device, stand_in: str):
    """(model on device, its tokenizer/processor, device): loaded from a hub id or folder, or the objects passed."""
    if isinstance(model, (str, Path)):
        import transformers
        if what == "tokenizer":
            helper_cls, model_cls = transformers.AutoTokenizer, transformers.T5ForConditionalGeneration
        else:
            helper_cls, model_cls = transformers.BlipProcessor, transformers.BlipForConditionalGeneration
        helper = _from_hub(helper_cls, str(model), stand_in)
        model = _from_hub(model_cls, str(model), stand_in)
    elif helper is None:
        raise ValueError(f"a loaded model was passed without its {what}: pass {what}= as well")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), helper, device


def _clean_captions(texts, n: int) -> list[str]:
    """Strip, drop empties and repeats (keeping order), keep at most n."""
    out = []
    for t in texts:
        t = " ".join(t.split()).strip()
        if t and t not in out:
            out.append(t)
    return out[:n]


def generate_captions(concept: str, n: int = 16, model=FLAN_T5, tokenizer=None, device: str | None = None,
                      seed: int = 0, max_new_tokens: int = 64) -> list[str]:
    """Up to n distinct captions of images showing `concept`, sampled from an instruction-tuned language model.

    `model` is a hub id / folder (loaded with T5ForConditionalGeneration) or an already loaded seq2seq model (then
    pass its `tokenizer` too). Needs the hub or a local copy: offline, `caption_variants` is the stand-in.
    """
    if not isinstance(concept, str) or not concept.strip():
        raise ValueError(f"concept must be a non-empty word or phrase, got {concept!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    model, tokenizer, device = _captioner(model, tokenizer, "tokenizer", device,
                                          "helpers.diffedit.caption_variants(caption)")
    ids = tokenizer(CAPTION_INSTRUCTION.format(concept.strip()), return_tensors="pt").input_ids.to(device)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, do_sample=True, top_k=10, num_return_sequences=2 * n,
                             max_new_tokens=max_new_tokens)
    return _clean_captions(tokenizer.batch_decode(out, skip_special_tokens=True), n)


def caption_image(image, model=BLIP, processor=None, device: str | None = None, max_new_tokens: int = 30) -> str:
    """One caption of a PIL image by an image-captioning model (BLIP), e.g. the source prompt for `invert`.

    Offline, the toy world's own caption (`scene.caption`) is the stand-in.
    """
    model, processor, device = _captioner(model, processor, "processor", device,
                                          "the toy world's own caption (scene.caption)")
    inputs = processor(images=image, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens)
    return _clean_captions(processor.batch_decode(out, skip_special_tokens=True), 1)[0]


def average_embedding(pipe, prompts) -> torch.Tensor:
    """The mean of several prompts' embeddings (1 × tokens × dim), as the diffusers DiffEdit guide builds them."""
    from .text import embed
    return embed(pipe, list(prompts)).mean(0, keepdim=True)


def latent_to_image_mask(mask: torch.Tensor, shape) -> np.ndarray:
    """A latent-size mask -> a boolean mask at image size (nearest neighbour)."""
    m = F.interpolate(torch.as_tensor(mask).float()[None, None], size=tuple(shape), mode="nearest")[0, 0]
    return (m > 0.5).cpu().numpy()


def compare_masks(pipe, cases, methods: dict, progress: bool = True) -> dict:
    """Run each mask method on each toy edit case; return per method lists of IoU, UNet evaluations and seconds.

    methods: name -> function(pipe, latents, case) returning a boolean latent- or image-size mask.
    """
    from .metrics import iou
    out = {name: {"iou": [], "evals": [], "seconds": []} for name in methods}
    for case, name, m, seconds, evals in _run_methods(pipe, cases, methods, progress):
        out[name]["seconds"].append(seconds)
        m = torch.as_tensor(m)
        if tuple(m.shape) != case.region.shape:
            m = torch.from_numpy(latent_to_image_mask(m, case.region.shape))
        out[name]["iou"].append(iou(m.bool().numpy(), case.region))
        out[name]["evals"].append(evals)
    return out


def _run_methods(pipe, cases, methods: dict, progress: bool, leave: bool = True):
    """Each method on each case's encoded input: yields (case, name, result, seconds, UNet evaluations)."""
    import time
    from tqdm.auto import tqdm
    from .images import encode
    from .sampling import UNetCounter
    from contextlib import ExitStack
    for case in tqdm(cases, desc="edits", disable=not progress, leave=leave):
        z = encode(pipe, case.scene.image)
        for name, fn in methods.items():
            t = time.perf_counter()
            # a method that runs another UNet too (an inpainting checkpoint) names it in `fn.extra_unets`
            unets = [pipe.unet, *[u for u in getattr(fn, "extra_unets", ()) if u is not pipe.unet]]
            with ExitStack() as stack:
                counters = [stack.enter_context(UNetCounter(u)) for u in unets]
                result = fn(pipe, z, case)
            yield case, name, result, time.perf_counter() - t, sum(c.evals for c in counters)


def diffusers_mask(dp, image_u8, reference: str, query: str, seed: int = 0, **kw) -> torch.Tensor:
    """diffusers' `generate_mask` on a uint8 H×W×3 image; returns its boolean latent-size mask."""
    x = torch.from_numpy(image_u8).permute(2, 0, 1)[None].float() / 255
    m = dp.generate_mask(image=x, source_prompt=reference, target_prompt=query,
                         generator=torch.Generator().manual_seed(seed), **kw)
    return torch.from_numpy(m[0]) > 0.5


def mask_methods(pipe, n_purist: int = 10, n_fast: int = 20, strength: float = 0.5, steps: int = 50,
                 guidance: float = 7.5, seed: int = 0) -> dict:
    """The mask recipes compared in notebook 02's closing table and in bench/diffedit_masks.py, with their defaults.

    Each maps (pipe, latents, edit case) -> a boolean mask. The last, `improved_mask`, takes n_fast draws at each of
    its strengths, without guidance: the same 4·n_fast UNet evaluations as the fast mask; `strength` and `guidance`
    do not apply to it.
    """
    dp = diffedit_pipeline(pipe)
    kw = dict(strength=strength, steps=steps, guidance=guidance, seed=seed)

    def averaged(p, c):
        return average_embedding(p, caption_variants(c))

    return {
        f"purist (n={n_purist}, {steps - start_index(steps, strength)} steps)":
            lambda p, z, c: binarise_diffusers(purist_mask(p, z, c.reference, c.query, n=n_purist, **kw)),
        f"fast (n={n_fast}, 1 call)":
            lambda p, z, c: binarise_diffusers(fast_mask(p, z, c.reference, c.query, n=n_fast, **kw)),
        "fast, blurred > 0 (the blog's clean-up)":
            lambda p, z, c: blur(binarise_diffusers(fast_mask(p, z, c.reference, c.query, n=n_fast, **kw))) > 0,
        "fast, averaged captions":
            lambda p, z, c: binarise_diffusers(fast_mask(p, z, averaged(p, c.reference), averaged(p, c.query),
                                                         n=n_fast, **kw)),
        "diffusers generate_mask":
            lambda p, z, c: diffusers_mask(dp, c.scene.image, c.reference, c.query, seed=seed,
                                           mask_encode_strength=strength, num_inference_steps=steps,
                                           guidance_scale=guidance),
        f"improved (n={n_fast} at {len(IMPROVED_STRENGTHS)} strengths, image-guided)":
            lambda p, z, c: improved_mask(p, z, c.reference, c.query, image=c.scene.image, n=n_fast, steps=steps,
                                          seed=seed),
    }


def table_text(table: dict, cases=None) -> str:
    """The comparison table as text: mean ± spread of IoU, UNet evaluations, seconds and time relative to fast;
    with the edit `cases` it was measured on, also each method's mean IoU per kind of edit."""
    fast = next(k for k in table if k.startswith("fast ("))
    ref_s = np.mean(table[fast]["seconds"])
    lines = [f"{'method':26s} {'mask IoU':>13s} {'UNet evals':>11s} {'seconds':>8s} {'× fast':>7s}"]
    for name, r in table.items():
        lines.append(f"{name:26s} {np.mean(r['iou']):6.2f} ± {np.std(r['iou']):.2f} {np.mean(r['evals']):11.0f} "
                     f"{np.mean(r['seconds']):8.2f} {np.mean(r['seconds']) / ref_s:7.1f}")
    if cases is not None:
        kinds = sorted({c.kind for c in cases})
        for name, r in table.items():
            lines.append(f"  {name:26s} " + "  ".join(
                f"{k}: {np.mean([v for v, c in zip(r['iou'], cases) if c.kind == k]):.2f}" for k in kinds))
    return "\n".join(lines)


def _by_kind(values, cases, kind):
    return float(np.mean([v for v, c in zip(values, cases) if c.kind == kind]))


def table_markdown(table: dict, cases) -> str:
    """The mask comparison as a markdown table (the README's and notebook 02's): mean ± sd IoU, IoU per kind of
    edit, UNet evaluations, and wall time relative to the fast mask (or to the first method)."""
    base = next((k for k in table if k.startswith("fast (")), next(iter(table)))
    ref_s = np.mean(table[base]["seconds"])
    kinds = sorted({c.kind for c in cases})
    head = ["mask", "IoU (mean ± sd)", *[f"IoU, {k}" for k in kinds], "UNet evaluations", f"time × {base}"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in table.items():
        cells = [name, f"{np.mean(r['iou']):.2f} ± {np.std(r['iou']):.2f}",
                 *[f"{_by_kind(r['iou'], cases, k):.2f}" for k in kinds], f"{np.mean(r['evals']):.0f}",
                 f"{np.mean(r['seconds']) / ref_s:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# --- Edits measured as edits: was the object changed, was the rest kept? -----------------------------------------

def edit_goal(case) -> tuple[str, str]:
    """(colour, shape) the edited object must have: the toy world's rendering of the query says it."""
    o = case.target.objects[case.index]
    return o.colour, o.shape


def edit_report(image, case) -> dict:
    """Score one edited image (uint8 H×W×3 or PIL) against its toy edit case.

    success: the toy world's detector finds an object in the edited region with the query's colour and shape
    (it says "no object" when the region holds none); colour_share: the share of the region in the query's colour;
    psnr_out: PSNR (dB) against the input outside the region, i.e. how well the rest was kept; reason: the
    detector's words.
    """
    from . import toyworld as tw
    from .metrics import psnr
    img = np.asarray(image)
    if img.shape != case.scene.image.shape or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image of shape {case.scene.image.shape} (the input's), got "
                         f"{img.dtype} {img.shape}; convert with np.asarray(pil_image)")
    colour, shape = edit_goal(case)
    v = tw.edit_verdict(img, case.region, colour=colour, shape=shape)
    return dict(success=bool(v.success), colour_share=float(v.colour_share),
                psnr_out=psnr(img, case.scene.image, mask=~case.region), reason=v.reason)


def failure_kind(reason: str) -> str:
    """The detector's reason in a few words: "edit found", "no object in the region", "wrong colour",
    "wrong shape" or "wrong colour and shape"."""
    if reason.startswith("no object") or reason == "edit found":
        return reason
    parts = reason.split(";")
    wrong = [w for w, hit in (("colour", any("looks like" not in p and ", not " in p for p in parts)),
                              ("shape", any("looks like" in p for p in parts))) if hit]
    return "wrong " + " and ".join(wrong) if wrong else reason


def inpaint_pipeline(pipe, model=None):
    """diffusers' StableDiffusionInpaintPipeline: built from the loaded pipeline's parts (model=None: its plain
    4-channel UNet, which the pipeline uses by blending the noised input back outside the mask at every step), or
    loaded from an inpainting checkpoint (9 input channels: latents, mask, masked image's latents)."""
    from diffusers import StableDiffusionInpaintPipeline
    if model is None:
        parts = {k: v for k, v in pipe.components.items()
                 if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
        p = StableDiffusionInpaintPipeline(**parts, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    else:
        from .loading import load_pipeline
        p = load_pipeline(model, cls=StableDiffusionInpaintPipeline)
    p.set_progress_bar_config(disable=True)
    return p


def _u8(latents_or_pil, pipe=None) -> np.ndarray:
    if isinstance(latents_or_pil, torch.Tensor):
        from .images import decode
        x = decode(pipe, latents_or_pil)[0]
        return ((x.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    return np.asarray(latents_or_pil.convert("RGB"))


def edit_methods(pipe, n_fast: int = 20, strength: float = 0.5, edit_strength: float = 0.7,
                 inpaint_strength: float = 0.8, steps: int = 50, guidance: float = 7.5, seed: int = 0,
                 inpaint_model=None) -> dict:
    """The edits compared in notebook 02 and bench/diffedit_masks.py. Each maps (pipe, latents, case) -> the edited
    image (uint8 H×W×3).

    - masked diffusion: fast mask (diffusers' rule), `masked_diffusion(recipe="inversion")` at `edit_strength`;
    - inpainting with the base model's 4-channel UNet: fast mask, blurred > 0 (the blog's clean-up),
      StableDiffusionInpaintPipeline at strength 1, which then blends the noised input back outside the mask;
    - with `inpaint_model` (a 9-channel inpainting checkpoint such as "toy-inpaint" or "sd15-inpaint"): the same
      mask and call on that checkpoint, the FastDiffEdit blog's recipe; the checkpoint with `improved_mask`; and
      that edit with the input pasted back outside the mask after decoding (diffusers' `apply_overlay`);
    - diffusers' DiffEdit pipeline: `generate_mask`, `invert` and the edit at `inpaint_strength` (both calls);
    - no edit: the input through the VAE, the ceiling of PSNR outside (and an edit the detector must reject).
    """
    from PIL import Image
    dp = diffedit_pipeline(pipe)
    ip_base = inpaint_pipeline(pipe)
    ip_ckpt = inpaint_pipeline(pipe, inpaint_model) if inpaint_model is not None else None
    kw = dict(strength=strength, steps=steps, guidance=guidance, seed=seed)

    def gen():
        return torch.Generator().manual_seed(seed)

    def mask(p, z, c):  # a map with no cell above 1.5× its mean (random weights) keeps its upper half instead
        raw = fast_mask(p, z, c.reference, c.query, n=n_fast, **kw)
        m = binarise_diffusers(raw)
        return m if m.any() else normalise(raw) > 0.5

    def masked(p, z, c):
        m = mask(p, z, c)
        return _u8(masked_diffusion(p, z, m.float(), c.reference, c.query, edit_strength, steps, guidance), p)

    def inpaint_with(ip, improved: bool = False):
        def inpaint(p, z, c):
            if improved:  # the course's sharper mask, at image size
                m_img = improved_mask(p, z, c.reference, c.query, image=c.scene.image, n=n_fast, steps=steps,
                                      seed=seed).cpu().numpy()
            else:         # the blog's: fast mask, blurred > 0
                m_img = latent_to_image_mask(blur(mask(p, z, c)) > 0, c.region.shape)
            m_img = Image.fromarray(m_img.astype(np.uint8) * 255)
            out = ip(c.query, image=c.scene.pil(), mask_image=m_img, num_inference_steps=steps,
                     guidance_scale=guidance, strength=1.0, generator=gen(), height=c.region.shape[0],
                     width=c.region.shape[1]).images[0]
            inpaint.last = (c, m_img, out)  # for the pasted-back row, which reuses this very edit
            return _u8(out)
        inpaint.extra_unets = (ip.unet,)  # counted by compare_edits with the base UNet
        return inpaint

    def pasted_back(made, ip):
        """The edit `made` produced, with the input pasted back outside its mask after decoding: diffusers'
        `VaeImageProcessor.apply_overlay`, which diffusers' inpainting guide recommends when the unmasked area must
        stay as it was. It reuses `made`'s image of the same case (compare_edits charges it `made`'s cost)."""
        def paste(p, z, c):
            last = getattr(made, "last", None)
            if last is None or last[0] is not c:
                made(p, z, c)
            _, m_img, out = made.last
            return _u8(ip.image_processor.apply_overlay(m_img, c.scene.pil(), out))
        paste.reuses = made
        return paste

    def diffusers_edit(p, z, c):
        x = torch.from_numpy(c.scene.image).permute(2, 0, 1)[None].float() / 255
        m = dp.generate_mask(image=x, source_prompt=c.reference, target_prompt=c.query, generator=gen(),
                             mask_encode_strength=strength, num_inference_steps=steps, guidance_scale=guidance)
        inv = dp.invert(prompt=c.reference, image=x, inpaint_strength=inpaint_strength, num_inference_steps=steps,
                        guidance_scale=guidance, generator=gen()).latents
        out = dp(prompt=c.query, mask_image=m, image_latents=inv, inpaint_strength=inpaint_strength,
                 negative_prompt=c.reference, num_inference_steps=steps, guidance_scale=guidance,
                 generator=gen()).images[0]
        return _u8(out)

    methods = {f"masked diffusion (fast mask, strength {edit_strength})": masked,
               "inpainting, base 4-channel UNet (fast mask, blurred)": inpaint_with(ip_base)}
    if ip_ckpt is not None:
        methods["inpainting checkpoint, 9 channels (fast mask, blurred)"] = inpaint_with(ip_ckpt)
        methods["inpainting checkpoint, 9 channels (improved mask)"] = improved = inpaint_with(ip_ckpt, improved=True)
        methods["inpainting checkpoint, 9 channels (improved mask, input pasted back)"] = pasted_back(improved,
                                                                                                    ip_ckpt)
    methods[f"diffusers DiffEdit pipeline (strength {inpaint_strength})"] = diffusers_edit
    methods["no edit (VAE round trip)"] = lambda p, z, c: _u8(z, p)
    return methods


def compare_edits(pipe, cases, methods: dict, progress: bool = True) -> dict:
    """Run each edit method on each toy edit case; per method, lists of `edit_report`'s fields, UNet evaluations,
    seconds, and the edited images."""
    out = {name: {"success": [], "colour_share": [], "psnr_out": [], "reason": [], "evals": [], "seconds": [],
                  "images": []} for name in methods}
    # a method that post-processes another one's edit (`fn.reuses`) is charged that edit's evaluations and time
    made_by = {name: next((k for k, f in methods.items() if f is getattr(fn, "reuses", None)), None)
               for name, fn in methods.items()}
    for case, name, img, seconds, evals in _run_methods(pipe, cases, methods, progress, leave=False):
        if made_by[name] is not None and evals == 0:
            seconds, evals = seconds + out[made_by[name]]["seconds"][-1], out[made_by[name]]["evals"][-1]
        out[name]["seconds"].append(seconds)
        out[name]["evals"].append(evals)
        out[name]["images"].append(img)
        for k, v in edit_report(img, case).items():
            out[name][k].append(v)
    return out


def _mean_sd(values, digits: int = 1) -> str:
    v = np.asarray(values, dtype=float)
    if np.isinf(v).all():  # PSNR of an unchanged image is infinite
        return "∞"
    if np.isinf(v).any():  # some images unchanged there (the input pasted back over all of the outside)
        f = v[np.isfinite(v)]
        return f"∞ on {np.isinf(v).sum()}/{len(v)}; the rest {f.mean():.{digits}f} ± {f.std():.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def edit_table_markdown(table: dict, cases) -> str:
    """The edit comparison as a markdown table: success rate (overall and per kind), PSNR outside the region, UNet
    evaluations per edit (mask included), wall time relative to the first method."""
    kinds = sorted({c.kind for c in cases})
    first = next(iter(table))
    ref_s = np.mean(table[first]["seconds"])
    head = ["edit", "success", *[f"success, {k}" for k in kinds], "PSNR outside (dB)", "UNet evaluations",
            "time × first"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in table.items():
        cells = [name, f"{np.mean(r['success']):.0%} ({sum(r['success'])}/{len(r['success'])})",
                 *[f"{_by_kind(r['success'], cases, k):.0%}" for k in kinds],
                 _mean_sd(r["psnr_out"]), f"{np.mean(r['evals']):.0f}",
                 f"{np.mean(r['seconds']) / ref_s:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
