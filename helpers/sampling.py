"""Sampling loops written out: guided noise prediction, generation, img2img from a strength, one-step x0, DDIM inversion.

Everything works on scaled latents (what the UNet sees) and on prompt embeddings from `helpers.text.embed`, and
counts nothing by itself: wrap calls in `UNetCounter` to count UNet evaluations, the machine-independent unit of cost.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .text import embed


class UNetCounter:
    """Counts UNet forward calls and evaluations (samples through the network) while active.

    with UNetCounter(pipe.unet) as c: ...;  c.calls, c.evals
    A guided step on one image is one call of batch 2, i.e. 2 evaluations.
    """

    def __init__(self, unet):
        self.unet, self.calls, self.evals, self._h = unet, 0, 0, None

    def _hook(self, mod, args, kwargs):
        x = args[0] if args else kwargs["sample"]
        self.calls += 1
        self.evals += x.shape[0]

    def __enter__(self):
        self._h = self.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._h.remove()


def timesteps(pipe, steps: int) -> torch.Tensor:
    """The scheduler's timesteps for `steps` inference steps (descending), on the pipeline's device."""
    pipe.scheduler.set_timesteps(steps, device=pipe.device)
    return pipe.scheduler.timesteps


def alpha_bar(pipe, t) -> torch.Tensor:
    """ᾱ_t, the fraction of signal variance left at timestep t (t < 0 means the clean image: 1)."""
    ac = pipe.scheduler.alphas_cumprod
    t = int(t)
    return ac[t] if t >= 0 else pipe.scheduler.final_alpha_cumprod


@torch.no_grad()
def predict_noise(pipe, latents, t, cond, uncond=None, guidance: float = 1.0) -> torch.Tensor:
    """ε(x_t, t) with classifier-free guidance: uncond + g·(cond − uncond), both halves in one batched UNet call."""
    if uncond is None or guidance == 1.0:
        return pipe.unet(latents, t, encoder_hidden_states=cond).sample
    x = torch.cat([latents, latents])
    e_u, e_c = pipe.unet(x, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
    return e_u + guidance * (e_c - e_u)


def x0_from_eps(pipe, latents, eps, t) -> torch.Tensor:
    """The clean latent implied by a noise prediction: x0 = (x_t − √(1−ᾱ)·ε) / √ᾱ."""
    a = alpha_bar(pipe, t).to(latents.device, latents.dtype)
    return (latents - (1 - a).sqrt() * eps) / a.sqrt()


def ddim_step(pipe, latents, eps, t, t_next) -> torch.Tensor:
    """Deterministic DDIM update from t to t_next (t_next < t denoises, t_next > t inverts): same formula both ways."""
    x0 = x0_from_eps(pipe, latents, eps, t)
    a_next = alpha_bar(pipe, t_next).to(latents.device, latents.dtype)
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


def prompt_embeddings(pipe, prompt, n: int = 1) -> torch.Tensor:
    """Embeddings for n samples from a string, a list of strings or ready embeddings; one prompt is repeated n times."""
    cond = embed(pipe, prompt) if isinstance(prompt, (str, list, tuple)) else prompt
    return cond.expand(n, -1, -1) if cond.shape[0] == 1 and n > 1 else cond


def conditioning(pipe, prompt, negative="", n: int = 1):
    """(cond, uncond) embeddings for n samples from strings or ready embeddings; one prompt is repeated n times."""
    cond = prompt_embeddings(pipe, prompt, n)
    unc = embed(pipe, negative) if isinstance(negative, (str, list, tuple)) else negative
    if unc.shape[0] != cond.shape[0]:
        unc = unc[:1].expand(cond.shape[0], -1, -1)
    return cond, unc


def seeded_noise(shape, seed: int, like: torch.Tensor) -> torch.Tensor:
    """Gaussian noise drawn on the CPU from `seed` (the same on every device), moved to `like`'s device and dtype."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=g).to(like.device, like.dtype)


def random_latents(pipe, n: int = 1, seed: int = 0, size: int | None = None) -> torch.Tensor:
    from .images import native_size, vae_factor
    side = (size or native_size(pipe)) // vae_factor(pipe)
    return seeded_noise((n, pipe.unet.config.in_channels, side, side), seed, pipe.unet)


@torch.no_grad()
def denoise(pipe, latents, prompt, steps: int = 25, guidance: float = 7.5, start: int = 0, negative="",
            callback=None, progress: bool = False, stop: int | None = None) -> torch.Tensor:
    """DDIM-denoise `latents` from step index `start` of a `steps`-step schedule to the end (or to `stop`).

    prompt/negative: strings or embeddings; `negative` may also be a function i -> embedding, a different
    unconditional embedding per step (null-text inversion learns one). callback(i, t, latents) is called after each
    step (it may return new latents, e.g. to blend with a mask).
    """
    ts = timesteps(pipe, steps)
    per_step = negative if callable(negative) else None
    cond, unc = conditioning(pipe, prompt, "" if per_step else negative, latents.shape[0])
    step_ratio = pipe.scheduler.config.num_train_timesteps // steps
    for i in tqdm(range(start, len(ts) if stop is None else stop), desc="denoise", disable=not progress, leave=False):
        t = ts[i]
        if per_step is not None:
            unc = per_step(i)
        eps = predict_noise(pipe, latents, t, cond, unc, guidance)
        latents = ddim_step(pipe, latents, eps, t, int(t) - step_ratio)
        if callback is not None:
            out = callback(i, t, latents)
            latents = out if out is not None else latents
    return latents


def start_index(steps: int, strength: float) -> int:
    """img2img: with `strength` s, the first ⌊steps·(1−s)⌋ steps are skipped (s = 1 starts from pure noise)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    return steps - min(int(steps * strength), steps)


def add_noise(pipe, latents, t, noise=None, seed: int = 0) -> torch.Tensor:
    if noise is None:
        noise = seeded_noise(latents.shape, seed, latents)
    return pipe.scheduler.add_noise(latents, noise, torch.as_tensor([int(t)], device=latents.device))


@torch.no_grad()
def img2img(pipe, latents, prompt, strength: float = 0.5, steps: int = 50, guidance: float = 7.5, noise=None,
            seed: int = 0, negative="", callback=None, progress: bool = False) -> torch.Tensor:
    """Noise clean latents to the timestep `strength` points at, then denoise them under `prompt`."""
    ts = timesteps(pipe, steps)
    i0 = start_index(steps, strength)
    if i0 >= len(ts):
        return latents
    noisy = add_noise(pipe, latents, ts[i0], noise, seed)
    return denoise(pipe, noisy, prompt, steps, guidance, start=i0, negative=negative, callback=callback,
                   progress=progress)


@torch.no_grad()
def predict_x0(pipe, latents, t, prompt, guidance: float = 1.0, noise=None, seed: int = 0, negative=""):
    """One UNet call: noise clean latents to t and return the predicted clean latents x0 (and the noise used)."""
    if noise is None:
        noise = seeded_noise(latents.shape, seed, latents)
    noisy = add_noise(pipe, latents, t, noise)
    cond, unc = conditioning(pipe, prompt, negative, latents.shape[0])
    eps = predict_noise(pipe, noisy, t, cond, unc, guidance)
    return x0_from_eps(pipe, noisy, eps, t), noise


@torch.no_grad()
def ddim_invert(pipe, latents, prompt, steps: int = 50, guidance: float = 1.0, negative="",
                progress: bool = False) -> list[torch.Tensor]:
    """DDIM inversion: run the deterministic update backwards, clean latents -> noise.

    Returns the trajectory [x_0, x_t1, …, x_T] (steps + 1 latents); reversed, it is the path `denoise` retraces.
    """
    ts = timesteps(pipe, steps).flip(0)  # ascending
    cond, unc = conditioning(pipe, prompt, negative, latents.shape[0])
    step_ratio = pipe.scheduler.config.num_train_timesteps // steps
    traj = [latents]
    for t in tqdm(ts, desc="DDIM inversion", disable=not progress, leave=False):
        t_prev = int(t) - step_ratio  # where the latent currently is
        eps = predict_noise(pipe, latents, t, cond, unc, guidance)
        # invert the step t -> t_prev: estimate x0 from the current latent with ε(x, t), push to t
        a_prev = alpha_bar(pipe, t_prev).to(latents.dtype)
        x0 = (latents - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        a_t = alpha_bar(pipe, t).to(latents.dtype)
        latents = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        traj.append(latents)
    return traj


@torch.no_grad()
def generate(pipe, prompt, steps: int = 25, guidance: float = 7.5, seed: int = 0, n: int = 1, negative="",
             progress: bool = False) -> torch.Tensor:
    """Text-to-image with our own loop: random latents, `steps` guided DDIM steps. Returns latents."""
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    lat = random_latents(pipe, len(prompts), seed)
    return denoise(pipe, lat, prompts, steps, guidance, negative=negative, progress=progress)
