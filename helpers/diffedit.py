"""DiffEdit (Couairon et al., 2022): a mask of *where* an edit must happen, from the model's own disagreement.

Notebook 01 builds the purist recipe step by step, notebook 02 the fast one; this module keeps the versions later
notebooks and the benchmark import.

- `purist_mask`: n img2img partial denoisings (strength 0.5 of a 50-step schedule) under the reference and the query
  prompt, with shared noise per draw; the absolute difference of the results, averaged over channels and draws.
- `fast_mask`: one UNet call for all n draws and both prompts (with guidance): the difference of the predicted
  clean latents x0 at the strength's timestep. With shared noise, x0_q − x0_r = −√((1−ᾱ)/ᾱ)·(ε_q − ε_r): the same
  map as the noise-prediction difference diffusers uses, up to a constant factor.
- `binarise_diffusers`: diffusers' rule (clamp at 3× the mean, rescale to [0, 1], threshold 0.5).
- `masked_diffusion`: DDIM-encode the input, decode under the query, and at every step keep the outside of the mask
  equal to the input's encoding at that step.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .sampling import (add_noise, conditioning, ddim_invert, denoise, predict_noise, prompt_embeddings, seeded_noise,
                       start_index, timesteps, x0_from_eps)
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
                guidance: float = 7.5, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """The purist DiffEdit map (h×w latent grid, normalised to [0, 1]): mean |denoised_query − denoised_reference|.

    All n draws and both prompts run as one batch of 2n through `steps·strength` guided DDIM steps.
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
    return normalise((out[n:] - out[:n]).abs().mean(1).mean(0))


@torch.no_grad()
def fast_mask(pipe, latents, reference: str, query: str, n: int = 20, strength: float = 0.5, steps: int = 50,
              guidance: float = 7.5, seed: int = 0) -> torch.Tensor:
    """The fast DiffEdit map (h×w, [0, 1]): mean |x0_query − x0_reference| from ONE batched UNet call (4n samples)."""
    check_prompts(reference, query)
    _check_n(n)
    _check_latents(latents)
    t = timesteps(pipe, steps)[start_index(steps, strength)]
    noise = seeded_noise((n, *latents.shape[1:]), seed, latents)
    z = latents.expand(2 * n, -1, -1, -1)
    noisy = add_noise(pipe, z, t, torch.cat([noise, noise]))
    cond = torch.cat([prompt_embeddings(pipe, reference, n), prompt_embeddings(pipe, query, n)])
    cond, unc = conditioning(pipe, cond, "", 2 * n)
    eps = predict_noise(pipe, noisy, t, cond, unc, guidance)
    x0 = x0_from_eps(pipe, noisy, eps, t)
    return normalise((x0[n:] - x0[:n]).abs().mean(1).mean(0))


def binarise_diffusers(diff: torch.Tensor, ratio: float = 3.0) -> torch.Tensor:
    """diffusers' `generate_mask` rule: clamp at ratio × mean, rescale to [0, 1], threshold at 0.5."""
    d = torch.minimum(diff.clamp(min=0), ratio * diff.mean())
    return normalise(d) > 0.5


def blur(mask: torch.Tensor, sigma: float = 1.0, size: int = 3) -> torch.Tensor:
    """Gaussian blur (size×size) of a map; `blur(m) > 0` smooths and dilates a binary mask by about a cell."""
    ax = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-ax**2 / (2 * sigma**2))
    k = (k[:, None] * k[None]) / k.sum() ** 2
    return F.conv2d(mask.float()[None, None], k[None, None].to(mask.device), padding=size // 2)[0, 0]


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


@torch.no_grad()
def masked_diffusion(pipe, latents, mask, reference: str, query: str, strength: float = 0.7, steps: int = 50,
                     guidance: float = 7.5, progress: bool = False) -> torch.Tensor:
    """DiffEdit's step 2 and 3: DDIM-encode the input under the reference prompt to the strength's timestep, then
    decode under the query; after every step, outside the mask, put back the input's encoding at that step.

    Returns the edited latents. The mask may be at latent or image size, binary or soft.
    """
    check_prompts(reference, query)
    _check_latents(latents)
    m = to_latent_mask(pipe, mask, latents)
    if m.sum() == 0:
        raise ValueError("the mask is empty: nothing would be edited; lower the threshold or check the prompts")
    if (m > 0.5).float().mean() > 0.95:
        warnings.warn("the mask covers more than 95% of the image: the edit will not preserve the input",
                      stacklevel=2)
    i0 = start_index(steps, strength)
    traj = ddim_invert(pipe, latents, reference, steps, guidance=1.0)  # x_0 … x_T along the schedule
    ts = timesteps(pipe, steps)
    # traj[k] sits at the k-th ascending timestep; the descending index i starts from ts[i] = traj[len(ts) - i]
    start = traj[len(ts) - i0]

    def keep_outside(i, t, lat):
        ref = traj[len(ts) - i - 1]  # the input's encoding at the step just reached
        return m * lat + (1 - m) * ref

    return denoise(pipe, start, query, steps, guidance, start=i0, callback=keep_outside, progress=progress)


def diffedit_pipeline(pipe):
    """diffusers' StableDiffusionDiffEditPipeline built from an already loaded pipeline's parts (no reload)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline
    parts = {k: v for k, v in pipe.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet")}
    p = StableDiffusionDiffEditPipeline(**parts, scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
                                        inverse_scheduler=DDIMInverseScheduler.from_config(pipe.scheduler.config),
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
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
    import time
    from tqdm.auto import tqdm
    from .images import encode
    from .metrics import iou
    from .sampling import UNetCounter
    out = {name: {"iou": [], "evals": [], "seconds": []} for name in methods}
    for case in tqdm(cases, desc="edits", disable=not progress):
        z = encode(pipe, case.scene.image)
        for name, fn in methods.items():
            t = time.perf_counter()
            with UNetCounter(pipe.unet) as c:
                m = fn(pipe, z, case)
            out[name]["seconds"].append(time.perf_counter() - t)
            m = torch.as_tensor(m)
            if tuple(m.shape) != case.region.shape:
                m = torch.from_numpy(latent_to_image_mask(m, case.region.shape))
            out[name]["iou"].append(iou(m.bool().numpy(), case.region))
            out[name]["evals"].append(c.evals)
    return out


def diffusers_mask(dp, image_u8, reference: str, query: str, seed: int = 0, **kw) -> torch.Tensor:
    """diffusers' `generate_mask` on a uint8 H×W×3 image; returns its boolean latent-size mask."""
    x = torch.from_numpy(image_u8).permute(2, 0, 1)[None].float() / 255
    m = dp.generate_mask(image=x, source_prompt=reference, target_prompt=query,
                         generator=torch.Generator().manual_seed(seed), **kw)
    return torch.from_numpy(m[0]) > 0.5


def mask_methods(pipe, n_purist: int = 10, n_fast: int = 20, strength: float = 0.5, steps: int = 50,
                 guidance: float = 7.5, seed: int = 0) -> dict:
    """The mask recipes compared in notebook 02's closing table and in bench/diffedit_masks.py, with their defaults.

    Each maps (pipe, latents, edit case) -> a boolean mask.
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
        "fast, averaged captions":
            lambda p, z, c: binarise_diffusers(fast_mask(p, z, averaged(p, c.reference), averaged(p, c.query),
                                                         n=n_fast, **kw)),
        "diffusers generate_mask":
            lambda p, z, c: diffusers_mask(dp, c.scene.image, c.reference, c.query, seed=seed,
                                           mask_encode_strength=strength, num_inference_steps=steps,
                                           guidance_scale=guidance),
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
