"""Sampling loops written out: guided noise prediction, generation, img2img from a strength, one-step x0, DDIM inversion.

Everything works on scaled latents (what the UNet sees) and on prompt embeddings from `helpers.text.embed`, and
counts nothing by itself: wrap calls in `UNetCounter` to count UNet evaluations, the machine-independent unit of cost.

The methods of the course are defined on DDIM. Every loop here reads its schedule from `ddim_scheduler(pipe)`: the
pipeline's own scheduler when it is a `DDIMScheduler` (what `helpers.loading.load_pipeline` installs), else a DDIM
built from its config (same β-schedule, `prediction_type` and `steps_offset`). Whatever the UNet predicts (ε, x0 or
v, by `scheduler.config.prediction_type`), `convert_output` turns it into ε or x0 in one place.
"""
from __future__ import annotations

import weakref

import torch
from tqdm.auto import tqdm

from .text import embed

# what a UNet may be trained to predict (diffusers' names); each converts into the others by `convert_output`
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


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


def as_ddim(scheduler):
    """A `DDIMScheduler` with `scheduler`'s β-schedule, prediction_type, steps_offset and timestep spacing.

    A DDIM scheduler is returned as it is. From another config (SD 1.5 ships PNDM), `DDIMScheduler.from_config`
    keeps every shared value; `clip_sample` is set to False where the config does not say (DDIM's default, True,
    clips latents to [-1, 1], which is wrong for latent diffusion; the null-text reference uses False).
    """
    from diffusers import DDIMScheduler
    if isinstance(scheduler, DDIMScheduler):
        return scheduler
    extra = {} if "clip_sample" in scheduler.config else {"clip_sample": False}
    return DDIMScheduler.from_config(scheduler.config, **extra)


_DDIM = weakref.WeakKeyDictionary()  # non-DDIM scheduler -> the DDIM built from its config (built once)


def ddim_scheduler(pipe):
    """The DDIM scheduler the loops run on: `pipe.scheduler` itself if it is one, else one built from its config."""
    s = pipe.scheduler
    from diffusers import DDIMScheduler
    if isinstance(s, DDIMScheduler):
        return s
    if s not in _DDIM:
        _DDIM[s] = as_ddim(s)
    return _DDIM[s]


def prediction_type(pipe) -> str:
    """What the UNet predicts: "epsilon" (SD 1.x, SD 2.x base, the toy model), "v_prediction" (SD 2.x 768 px) or
    "sample"; a clear error for anything else."""
    kind = pipe.scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"the scheduler says prediction_type={kind!r}; the course's samplers convert "
                         f"{', '.join(PREDICTION_TYPES)} only. Load a model that predicts one of them, or set the "
                         "right one with pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, "
                         "prediction_type=...)")
    return kind


def timesteps(pipe, steps: int) -> torch.Tensor:
    """The DDIM timesteps for `steps` inference steps (descending, no repeats), on the pipeline's device."""
    s = ddim_scheduler(pipe)
    s.set_timesteps(steps, device=pipe.device)
    return s.timesteps


def step_gap(pipe, steps: int) -> int:
    """Timesteps between two DDIM steps of a `steps`-step schedule, as `DDIMScheduler.step` counts them."""
    return ddim_scheduler(pipe).config.num_train_timesteps // steps


def alpha_bar(pipe, t) -> torch.Tensor:
    """ᾱ_t, the fraction of signal variance left at timestep t (t < 0 means the clean image: `final_alpha_cumprod`)."""
    s = ddim_scheduler(pipe)
    t = int(t)
    return s.alphas_cumprod[t] if t >= 0 else s.final_alpha_cumprod


def convert_output(pipe, output, latents, t, to: str = "epsilon") -> torch.Tensor:
    """The UNet's output at (latents, t) as ε ("epsilon"), x0 ("sample") or v ("v_prediction").

    With x_t = √ᾱ·x0 + √(1−ᾱ)·ε and v = √ᾱ·ε − √(1−ᾱ)·x0 (ᾱ at t, where the UNet was asked to denoise):
    ε = √ᾱ·v + √(1−ᾱ)·x_t,  x0 = √ᾱ·x_t − √(1−ᾱ)·v;  from ε: x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ;  from x0: ε = (x_t − √ᾱ·x0)/√(1−ᾱ).
    What the UNet predicts is read from `pipe.scheduler.config.prediction_type`. The conversion is affine in the
    output, so classifier-free guidance gives the same result before or after it.
    """
    kind = prediction_type(pipe)
    if to not in PREDICTION_TYPES:
        raise ValueError(f"to must be one of {PREDICTION_TYPES}, not {to!r}")
    if kind == to:
        return output
    a = alpha_bar(pipe, t).to(latents.device, latents.dtype)
    sa, s1 = a.sqrt(), (1 - a).sqrt()
    if kind == "epsilon":
        eps, x0 = output, (latents - s1 * output) / sa
    elif kind == "v_prediction":
        eps, x0 = sa * output + s1 * latents, sa * latents - s1 * output
    else:
        eps, x0 = (latents - sa * output) / s1, output
    return {"epsilon": eps, "sample": x0, "v_prediction": sa * eps - s1 * x0}[to]


@torch.no_grad()
def predict_output(pipe, latents, t, cond, uncond=None, guidance: float = 1.0) -> torch.Tensor:
    """The UNet's own output (ε, x0 or v, see `prediction_type`) with classifier-free guidance:
    uncond + g·(cond − uncond), both halves in one batched UNet call."""
    if uncond is None or guidance == 1.0:
        return pipe.unet(latents, t, encoder_hidden_states=cond).sample
    x = torch.cat([latents, latents])
    o_u, o_c = pipe.unet(x, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
    return o_u + guidance * (o_c - o_u)


@torch.no_grad()
def predict_noise(pipe, latents, t, cond, uncond=None, guidance: float = 1.0) -> torch.Tensor:
    """ε(x_t, t) with classifier-free guidance, whatever the UNet predicts (converted by `convert_output`)."""
    return convert_output(pipe, predict_output(pipe, latents, t, cond, uncond, guidance), latents, t, "epsilon")


def x0_from_eps(pipe, latents, eps, t) -> torch.Tensor:
    """The clean latent implied by a noise prediction: x0 = (x_t − √(1−ᾱ)·ε) / √ᾱ."""
    a = alpha_bar(pipe, t).to(latents.device, latents.dtype)
    return (latents - (1 - a).sqrt() * eps) / a.sqrt()


def ddim_step(pipe, latents, eps, t, t_next) -> torch.Tensor:
    """Deterministic DDIM update from t to t_next (t_next < t denoises, t_next > t inverts): same formula both ways.

    eps: the noise prediction (`predict_noise`, or `convert_output(..., "epsilon")` of a raw UNet output). Where the
    scheduler clips x0 (`clip_sample=True`, not SD's setting), the step clips as `DDIMScheduler.step` does.
    """
    x0 = x0_from_eps(pipe, latents, eps, t)
    cfg = ddim_scheduler(pipe).config
    if cfg.get("thresholding", False):
        raise ValueError("the scheduler uses dynamic thresholding, which the course's DDIM step does not implement; "
                         "build it with thresholding=False")
    if cfg.get("clip_sample", False):
        r = cfg.get("clip_sample_range", 1.0)
        x0 = x0.clamp(-r, r)
        a = alpha_bar(pipe, t).to(latents.device, latents.dtype)
        eps = (latents - a.sqrt() * x0) / (1 - a).sqrt()
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
    gap = step_gap(pipe, steps)
    for i in tqdm(range(start, len(ts) if stop is None else stop), desc="denoise", disable=not progress, leave=False):
        t = ts[i]
        if per_step is not None:
            unc = per_step(i)
        eps = predict_noise(pipe, latents, t, cond, unc, guidance)
        latents = ddim_step(pipe, latents, eps, t, int(t) - gap)
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
    return ddim_scheduler(pipe).add_noise(latents, noise, torch.as_tensor([int(t)], device=latents.device))


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
    out = predict_output(pipe, noisy, t, cond, unc, guidance)
    return convert_output(pipe, out, noisy, t, "sample"), noise


@torch.no_grad()
def ddim_invert(pipe, latents, prompt, steps: int = 50, guidance: float = 1.0, negative="",
                progress: bool = False) -> list[torch.Tensor]:
    """DDIM inversion: run the deterministic update backwards, clean latents -> noise.

    Returns the trajectory [x_0, x_t1, …, x_T] (steps + 1 latents); reversed, it is the path `denoise` retraces.
    """
    ts = timesteps(pipe, steps).flip(0)  # ascending
    cond, unc = conditioning(pipe, prompt, negative, latents.shape[0])
    gap = step_gap(pipe, steps)
    traj = [latents]
    for t in tqdm(ts, desc="DDIM inversion", disable=not progress, leave=False):
        t_prev = int(t) - gap  # where the latent currently is
        eps = predict_noise(pipe, latents, t, cond, unc, guidance)  # ε(x_{t_prev}, t) stands in for ε(x_t, t)
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


def prediction_target(pipe, latents, noise, t) -> torch.Tensor:
    """What the UNet is trained to output for clean `latents` noised with `noise` at timestep(s) t: the noise
    ("epsilon"), the velocity √ᾱ·ε − √(1−ᾱ)·x0 ("v_prediction", `DDIMScheduler.get_velocity`) or x0 ("sample").
    A loss on the UNet's output (textual inversion) regresses on this."""
    kind = prediction_type(pipe)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return latents
    t = torch.as_tensor(t, device=latents.device).reshape(-1)
    return ddim_scheduler(pipe).get_velocity(latents, noise, t.expand(latents.shape[0]) if len(t) == 1 else t)
