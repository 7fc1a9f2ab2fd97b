"""Inverting a real image: find the noise (and, for null-text inversion, the unconditional embeddings) that
regenerate it under classifier-free guidance.

Three methods share one result type, `Inversion`, and one sampler, `reconstruct`:

- `ddim_inversion`: run DDIM backwards (`helpers.sampling.ddim_invert`). Exact at guidance 1; under guidance the
  sampling path drifts away from the inverted one.
- `null_text_inversion` (Mokady et al. 2022): keep the DDIM trajectory at guidance 1 as a *pivot* and, step by
  step, optimise the unconditional ("null") embedding so that one guided DDIM step lands on the pivot's next latent.
- `negative_prompt_inversion` (Miyake et al. 2023): use the prompt's own embedding as the "unconditional" one, so
  guidance cancels and the sampling path is the guidance-1 path — no optimisation at all.

Cost is counted in UNet evaluations (`helpers.sampling.UNetCounter`); a backward pass through the UNet is not
counted as an evaluation (it costs about two forward passes in time; see `Inversion.seconds`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import SimpleNamespace
import time
import warnings

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .sampling import (UNetCounter, convert_output, ddim_invert, ddim_step, denoise, prompt_embeddings, step_gap,
                       timesteps)
from .text import embed

# The reference schedule (Mokady et al.'s code): per-step Adam, lr 1e-2·(1 − i/100), ≤ 10 inner iterations,
# early stop when the loss falls below 1e-5 + i·2e-5, null embedding initialised from the empty prompt.
REFERENCE_SCHEDULE = dict(lr=1e-2, lr_decay=1e-2, inner_steps=10, tol=1e-5, tol_slope=2e-5, tol_scale=1.0,
                          init="empty", optimise_steps=None, skip_converged=False)


@dataclass
class Inversion:
    """What an inversion returns: the trajectory to sample back from and the embeddings to sample with."""
    prompt: str
    steps: int
    guidance: float
    latents: list[torch.Tensor]                # DDIM trajectory x_0 (clean VAE latent) … x_T
    null_embeddings: list[torch.Tensor] | None = None  # one unconditional embedding per sampling step, else None
    negative: torch.Tensor | None = None       # negative-prompt inversion: the embedding used as "unconditional"
    evals: int = 0                             # UNet evaluations spent (forward passes of one sample)
    seconds: float = 0.0
    losses: list[list[float]] = field(default_factory=list)  # null-text: per sampling step, the inner-loop losses
    method: str = "ddim"

    @property
    def noise(self) -> torch.Tensor:
        """x_T, where sampling starts."""
        return self.latents[-1]

    def inner_iterations(self) -> list[int]:
        """Inner-loop losses evaluated per sampling step (null-text inversion); 0 where nothing was optimised."""
        return [len(l) for l in self.losses]


def _check_latents(latents):
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise ValueError(f"expected VAE latents of shape B×C×h×w (helpers.images.encode), got "
                         f"{getattr(latents, 'shape', type(latents).__name__)}")


def _check_steps(steps):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, not {steps!r}")


def ddim_inversion(pipe, latents, prompt, steps: int = 50, guidance: float = 1.0, progress: bool = False) -> Inversion:
    """Plain DDIM inversion under `prompt` (guidance 1 by default: the conditional prediction alone)."""
    _check_latents(latents)
    _check_steps(steps)
    t0 = time.perf_counter()
    with UNetCounter(pipe.unet) as c:
        traj = ddim_invert(pipe, latents, prompt, steps, guidance, progress=progress)
    return Inversion(prompt, steps, guidance, traj, evals=c.evals, seconds=time.perf_counter() - t0, method="ddim")


def negative_prompt_inversion(pipe, latents, prompt, steps: int = 50, guidance: float = 7.5,
                              progress: bool = False) -> Inversion:
    """DDIM inversion at guidance 1, sampled back with the prompt's embedding standing in for the unconditional one.

    With uncond = cond, ε_u + g·(ε_c − ε_u) = ε_c for any g, so the reconstruction retraces the inversion. For an edit,
    the source prompt stays the "unconditional" embedding and guidance pushes towards the target prompt.
    """
    inv = ddim_inversion(pipe, latents, prompt, steps, 1.0, progress)
    inv.guidance, inv.method = guidance, "negative-prompt"
    inv.negative = prompt_embeddings(pipe, prompt, latents.shape[0]).detach()
    return inv


def _fp32_view(pipe, fp16: str):
    """The pipeline itself, or — for a half-precision UNet — a view of it with an fp32 copy of the UNet."""
    if pipe.unet.dtype == torch.float32:
        return pipe
    if fp16 == "refuse":
        raise ValueError(f"null-text inversion does not optimise in {pipe.unet.dtype} (the embedding's gradients "
                         "underflow and the loss stalls); load the pipeline in float32, or pass fp16='upcast' to "
                         "optimise on a temporary float32 copy of the UNet")
    if fp16 != "upcast":
        raise ValueError(f"fp16 must be 'upcast' or 'refuse', not {fp16!r}")
    warnings.warn(f"the UNet is {pipe.unet.dtype}: null-text inversion upcasts, optimising on a temporary float32 "
                  "copy of the UNet (twice its memory); pass fp16='refuse' to get an error instead", stacklevel=3)
    unet = copy.deepcopy(pipe.unet).float()
    return SimpleNamespace(unet=unet, scheduler=pipe.scheduler, tokenizer=pipe.tokenizer,
                           text_encoder=pipe.text_encoder, device=pipe.device, vae=pipe.vae)


def null_text_inversion(pipe, latents, prompt, steps: int = 50, guidance: float = 7.5, inner_steps: int = 10,
                        early_stop: bool = True, progress: bool = True, fp16: str = "upcast",
                        n_steps: int | None = None, **schedule_options) -> Inversion:
    """Null-text inversion with the reference schedule; `schedule_options` select cheaper variants.

    Pivot: DDIM inversion under the prompt at guidance 1. Then for each sampling step i (from noise to image) a fresh
    Adam optimises the unconditional embedding (lr = lr·(1 − i·lr_decay)) for at most `inner_steps` iterations on
    MSE(one guided DDIM step, pivot latent of the next step), stopping early when the loss falls below
    tol_scale·(tol + i·tol_slope); the latent then advances with the optimised embedding, which also starts the next
    step. The optimisation runs in float32; a half-precision UNet is upcast (a temporary fp32 copy, with a
    warning) or refused (`fp16="refuse"`). n_steps: find null embeddings only for the first n sampling steps (when
    only those will be sampled, e.g. to read their attention); `reconstruct` then runs at most n_steps.

    schedule_options (defaults = the reference, `REFERENCE_SCHEDULE`):
      lr, lr_decay, tol, tol_slope, tol_scale — the optimiser and the early-stopping bar;
      init: "empty" (the empty prompt, reference) or "prompt" (start from negative-prompt inversion's solution);
      optimise_steps: optimise only the first k sampling steps, then keep the embedding fixed;
      skip_converged: check the loss *before* each optimiser step and stop without stepping when it is below the
      bar (the reference always takes at least one step) — a step that is already converged costs one evaluation.
    """
    unknown = set(schedule_options) - set(REFERENCE_SCHEDULE)
    if unknown:
        raise TypeError(f"unknown schedule options {sorted(unknown)}; known: {sorted(REFERENCE_SCHEDULE)}")
    opt = {**REFERENCE_SCHEDULE, "inner_steps": inner_steps, **schedule_options}
    if opt["init"] not in ("empty", "prompt"):
        raise ValueError(f"init must be 'empty' or 'prompt', not {opt['init']!r}")
    _check_latents(latents)
    _check_steps(steps)
    if latents.shape[0] != 1:
        raise ValueError(f"null-text inversion optimises one image at a time; got a batch of {latents.shape[0]}")
    if n_steps is not None and not (isinstance(n_steps, int) and 1 <= n_steps <= steps):
        raise ValueError(f"n_steps must be an integer in [1, {steps}] (or None for all steps), not {n_steps!r}")
    work = _fp32_view(pipe, fp16)
    unet = work.unet
    t_start = time.perf_counter()
    latents = latents.to(unet.device, torch.float32)
    with UNetCounter(unet) as count:
        cond = prompt_embeddings(pipe, prompt).detach().to(torch.float32)
        pivot = ddim_invert(work, latents, cond, steps, 1.0)  # float32 embeddings: a float16 text encoder's are cast
        null = (cond if opt["init"] == "prompt" else embed(pipe, "")).detach().to(torch.float32).clone()
        ts = timesteps(pipe, steps)
        gap = step_gap(pipe, steps)
        x = pivot[-1]
        nulls, losses = [], []
        bar = tqdm(total=len(ts[:n_steps]) * opt["inner_steps"], desc="null-text inversion", disable=not progress,
                   leave=False)
        for i, t in enumerate(ts[:n_steps]):
            target, t_next = pivot[-2 - i], int(t) - gap
            with torch.no_grad():
                eps_c = convert_output(work, unet(x, t, encoder_hidden_states=cond).sample, x, t)  # ε, x0 or v → ε
            step_losses, eps_u = [], None
            optimise = opt["optimise_steps"] is None or i < opt["optimise_steps"]
            bar_tol = opt["tol_scale"] * (opt["tol"] + i * opt["tol_slope"])
            if optimise and opt["skip_converged"] and early_stop and torch.equal(null, cond):
                # uncond = cond: the guided prediction is ε_c whatever the guidance, so the loss is free to check
                with torch.no_grad():
                    value = F.mse_loss(ddim_step(work, x, eps_c, t, t_next), target).item()
                if value < bar_tol:
                    step_losses.append(value)
                    optimise, eps_u = False, eps_c
            if optimise and opt["inner_steps"] > 0:
                null = null.detach().requires_grad_(True)
                adam = torch.optim.Adam([null], lr=opt["lr"] * (1 - i * opt["lr_decay"]))
                for j in range(opt["inner_steps"]):
                    eps_u = convert_output(work, unet(x, t, encoder_hidden_states=null).sample, x, t)
                    x_next = ddim_step(work, x, eps_u + guidance * (eps_c - eps_u), t, t_next)
                    loss = F.mse_loss(x_next, target)
                    value = loss.item()
                    step_losses.append(value)
                    if opt["skip_converged"] and early_stop and value < bar_tol:
                        eps_u = eps_u.detach()  # converged before stepping: this prediction advances the latent
                        bar.update(1)
                        break
                    adam.zero_grad()
                    loss.backward()
                    adam.step()
                    eps_u = None
                    bar.update(1)
                    bar.set_postfix(step=i, loss=f"{value:.2e}")
                    if early_stop and value < bar_tol:
                        break
                bar.update(opt["inner_steps"] - min(j + 1, opt["inner_steps"]))
                null = null.detach()
            else:
                bar.update(opt["inner_steps"])
                bar.set_postfix(step=i, loss=f"{step_losses[-1]:.2e}" if step_losses else "-")
            with torch.no_grad():
                if eps_u is None:
                    same = torch.equal(null, cond)  # uncond = cond: the guided prediction is ε_c, no call needed
                    eps_u = eps_c if same else convert_output(work, unet(x, t, encoder_hidden_states=null).sample,
                                                              x, t)
                x = ddim_step(work, x, eps_u + guidance * (eps_c - eps_u), t, t_next)
            nulls.append(null.clone())
            losses.append(step_losses)
        bar.close()
    dtype = pipe.unet.dtype
    return Inversion(prompt if isinstance(prompt, str) else "", steps, guidance, [p.to(dtype) for p in pivot],
                     null_embeddings=[n.to(dtype) for n in nulls], evals=count.evals,
                     seconds=time.perf_counter() - t_start, losses=losses, method="null-text")


def unconditional_for(pipe, inv: Inversion, i: int, n: int) -> torch.Tensor:
    """The embedding that plays "unconditional" at sampling step i of `inv`, for a batch of n."""
    if inv.null_embeddings is not None:
        u = inv.null_embeddings[i]
    elif inv.negative is not None:
        u = inv.negative
    else:
        u = embed(pipe, "")
    return u[:1].expand(n, -1, -1) if u.shape[0] != n else u


@torch.no_grad()
def reconstruct(pipe, inv: Inversion, prompt=None, guidance: float | None = None, n_steps: int | None = None,
                callback=None, steps: int | None = None) -> torch.Tensor:
    """Sample from `inv`'s noise x_T with its unconditional embeddings (per-step null, negative, or the empty prompt).

    prompt: defaults to the inverted prompt; a list of prompts (or embeddings) samples a batch from the same noise,
    e.g. [source, edited] for prompt-to-prompt. guidance: defaults to the inversion's. n_steps: run only the first
    n_steps sampling steps and return those latents (None: all). callback(i, t, latents) may return new latents.
    steps: if given, must equal the inversion's step count (the schedule cannot change after inverting).
    Returns latents (decode them with helpers.images.decode).
    """
    if steps is not None and steps != inv.steps:
        raise ValueError(f"the image was inverted with {inv.steps} DDIM steps but {steps} were asked for here; the "
                         f"inverted latents and null embeddings belong to the {inv.steps}-step schedule: invert "
                         f"again with steps={steps}, or sample with steps={inv.steps}")
    if n_steps is None:
        n_steps = inv.steps
    if not isinstance(n_steps, int) or not 0 <= n_steps <= inv.steps:
        raise ValueError(f"n_steps must be an integer in [0, {inv.steps}] (the inversion's step count), not {n_steps!r}")
    if inv.null_embeddings is not None and n_steps > len(inv.null_embeddings):
        raise ValueError(f"this null-text inversion holds embeddings for its first {len(inv.null_embeddings)} "
                         f"sampling steps only (it was run with n_steps={len(inv.null_embeddings)}); sample at most "
                         f"that many, or invert again without n_steps")
    prompt = inv.prompt if prompt is None else prompt
    guidance = inv.guidance if guidance is None else guidance
    n = len(prompt) if isinstance(prompt, (list, tuple)) else (prompt.shape[0] if isinstance(prompt, torch.Tensor) else 1)
    x = inv.latents[-1].to(pipe.device, pipe.unet.dtype)
    x = x.expand(n, -1, -1, -1).clone() if x.shape[0] != n else x
    cond = prompt_embeddings(pipe, prompt, n).to(pipe.unet.dtype)
    x = denoise(pipe, x, cond, inv.steps, guidance, stop=n_steps, callback=callback,
                negative=lambda i: unconditional_for(pipe, inv, i, n).to(pipe.unet.dtype))
    return x


# -- comparing inversions on toy scenes (the notebook's table and bench/null_text_inversion.py) -----------------------
def inversion_methods(steps: int, guidance: float = 7.5, variants: dict | None = None) -> dict:
    """name -> function(pipe, latents, prompt) returning (Inversion, guidance to reconstruct at).

    DDIM at guidance 1 and at `guidance`, negative-prompt inversion, and one null-text inversion per entry of
    `variants` ({name: schedule options}; a float `optimise_steps` is a fraction of the steps).
    """
    out = {
        "DDIM inversion, guidance 1": lambda p, z, c: (ddim_inversion(p, z, c, steps), 1.0),
        f"DDIM inversion, guidance {guidance:g}": lambda p, z, c: (ddim_inversion(p, z, c, steps), guidance),
        "negative-prompt inversion": lambda p, z, c: (negative_prompt_inversion(p, z, c, steps, guidance), guidance),
    }
    for name, kw in (variants or {"null-text, reference": {}}).items():
        kw = dict(kw)
        if isinstance(kw.get("optimise_steps"), float):
            kw["optimise_steps"] = max(1, round(kw["optimise_steps"] * steps))
        out[name] = (lambda kw: lambda p, z, c: (null_text_inversion(p, z, c, steps, guidance, progress=False, **kw),
                                                 guidance))(kw)
    return out


def compare_inversions(pipe, scenes, methods: dict, progress: bool = True) -> dict:
    """Run every method on every toy scene, in one run: {name: {"psnr", "evals", "seconds": per-scene lists}}.

    PSNR of the reconstruction against the input image; "VAE round trip" (the ceiling) comes first. Seconds are the
    inversion's wall time (compare them as ratios); evals its UNet evaluations.
    """
    import numpy as np
    from .images import decode, encode, tensor_to_pil
    from .metrics import psnr
    table = {name: {"psnr": [], "evals": [], "seconds": []} for name in ["VAE round trip", *methods]}
    for sc in tqdm(scenes, desc="scenes", disable=not progress):
        z = encode(pipe, sc.image)
        for name in table:
            if name == "VAE round trip":
                inv, g, rec = None, None, decode(pipe, z)
            else:
                inv, g = methods[name](pipe, z, sc.caption)
                rec = decode(pipe, reconstruct(pipe, inv, guidance=g))
            table[name]["psnr"].append(psnr(np.asarray(tensor_to_pil(rec)[0]), sc.image))
            table[name]["evals"].append(inv.evals if inv else 0)
            table[name]["seconds"].append(inv.seconds if inv else 0.0)
    return table


def inversion_table_text(table: dict, reference: str = "null-text, reference") -> str:
    """A markdown table: mean PSNR ± std, difference to the reference, UNet evaluations, share, wall-time ratio."""
    import numpy as np
    ref_e, ref_s, ref_p = (np.mean(table[reference][k]) for k in ("evals", "seconds", "psnr"))
    lines = ["| method | PSNR (dB) | Δ vs reference | UNet evaluations | share of reference | time ratio |",
             "|---|---|---|---|---|---|"]
    for name, r in table.items():
        p, e, s = np.mean(r["psnr"]), np.mean(r["evals"]), np.mean(r["seconds"])
        lines.append(f"| {name} | {p:.2f} ± {np.std(r['psnr']):.2f} | {p - ref_p:+.2f} | {e:.0f} | "
                     f"{e / ref_e:.0%} | {s / ref_s:.2f} |")
    return "\n".join(lines)
