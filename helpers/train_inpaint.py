"""Fine-tune the bundled toy model into an inpainting model, as Stable Diffusion's inpainting checkpoint was made.

    python -m helpers.train_inpaint                  # both phases, into .cache/toy-inpaint/model (resumable)
    python -m helpers.train_inpaint --out data/toy-sd-inpaint --replace-bundled   # ...and replace the bundled one
    python -m helpers.train_inpaint --init FOLDER --steps N ...   # one more phase from an inpainting model

Two phases: `--steps` of the recipe below, then `--phase2-steps` that weight the loss outside the mask
(`--outside`, see `loss_weights`). The bundled model's `training.json` holds the arguments and the seconds of
each phase (the first under "previous").

Recipe (the SD inpainting checkpoint's, scaled down to the toy world):
- the UNet gets 5 extra input channels, in diffusers' order: the noisy latents (4), the mask at latent size (1),
  the latents of the masked image (4; the image with the masked pixels set to 0, i.e. mid-grey). The new channels'
  input weights start at zero, so at step 0 the model is exactly the base model;
- training scenes with random masks: grown object masks (the kind DiffEdit produces: an object and a margin,
  sometimes snapped to the latent grid), random boxes and ellipses, blobs, and the whole image (pure generation);
- the full caption of the scene as the prompt (10% dropped, for classifier-free guidance); the VAE and the text
  encoder stay frozen (they are copied unchanged into the exported folder);
- min-SNR-5-weighted ε-MSE, AdamW with warm-up and cosine decay, an EMA of the weights is what ships;
- a second phase (our addition, not SD's recipe) with the loss outside the mask weighted up at high noise
  (`--outside`, see `loss_weights`): after phase 1 the model changed what it should keep (notebook 02).
The folder is written with `StableDiffusionInpaintPipeline.save_pretrained`, so
`StableDiffusionInpaintPipeline.from_pretrained` loads it exactly as it loads `sd15-inpaint`
(`helpers.loading.load_pipeline("toy-inpaint", cls=StableDiffusionInpaintPipeline)`).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import toyworld as tw
from .toytokenizer import MODEL_MAX_LENGTH, write_tokenizer
from .train_toy import to_tensor

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "data" / "toy-sd"
BUNDLED = ROOT / "data" / "toy-sd-inpaint"
DEFAULT_WORK = ROOT / ".cache" / "toy-inpaint"
DEFAULT_OUT = DEFAULT_WORK / "model"
LATENT_FACTOR = 4  # the toy VAE's down-sampling


# ---------------------------------------------------------------------------------------------------------------------
# masks
def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    """Dilate a boolean mask by r pixels (square structuring element)."""
    if r <= 0:
        return mask
    t = torch.from_numpy(mask).float()[None, None]
    return (F.max_pool2d(t, 2 * r + 1, stride=1, padding=r)[0, 0] > 0).numpy()


def _snap(mask: np.ndarray, f: int = LATENT_FACTOR) -> np.ndarray:
    """Every latent cell the mask touches, at image size (a mask made at the latent grid and upsampled)."""
    t = torch.from_numpy(mask).float()[None, None]
    return (F.interpolate(F.max_pool2d(t, f), scale_factor=f, mode="nearest")[0, 0] > 0).numpy()


def _ellipse(size: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size] + 0.5
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1


def random_mask(sc: tw.Scene, rng: np.random.Generator) -> np.ndarray:
    """One training mask (bool H×W, True = repaint) for scene `sc`."""
    size = sc.image.shape[0]
    u = rng.random()
    if u < 0.55:  # one object and a margin: what an edit mask covers
        o = sc.objects[rng.integers(len(sc.objects))]
        v = rng.random()
        if v < 0.45:
            m = _grow(o.mask, int(rng.integers(0, 7)))
        elif v < 0.75:
            ys, xs = np.nonzero(o.mask)
            pad = rng.integers(0, 6, size=4)
            m = np.zeros((size, size), bool)
            m[max(ys.min() - pad[0], 0):ys.max() + 1 + pad[1], max(xs.min() - pad[2], 0):xs.max() + 1 + pad[3]] = True
        else:
            s = rng.uniform(1.0, 1.6)
            m = _ellipse(size, *o.centre, o.radius * s, o.radius * s * rng.uniform(0.8, 1.25)) | o.mask
        if rng.random() < 0.5:
            m = _snap(m)
    elif u < 0.78:  # a box or an ellipse anywhere
        w, h = rng.uniform(0.15, 0.6, size=2) * size
        cx, cy = rng.uniform(0, size, size=2)
        if rng.random() < 0.5:
            m = _ellipse(size, cx, cy, w / 2, h / 2)
        else:
            m = np.zeros((size, size), bool)
            m[int(max(cy - h / 2, 0)):int(cy + h / 2) + 1, int(max(cx - w / 2, 0)):int(cx + w / 2) + 1] = True
    elif u < 0.9:  # blobs at the latent grid
        g = size // LATENT_FACTOR
        noise = torch.from_numpy(rng.standard_normal((1, 1, g // 4, g // 4))).float()
        smooth = F.interpolate(noise, size=(g, g), mode="bicubic", align_corners=False)
        m = (F.interpolate(smooth, scale_factor=LATENT_FACTOR, mode="nearest")[0, 0] > rng.uniform(0.3, 1.2)).numpy()
    else:  # everything: plain text-to-image
        m = np.ones((size, size), bool)
    if not m.any():
        m = _grow(sc.objects[0].mask, 2)
    return m


def inpaint_inputs(images: torch.Tensor, masks: torch.Tensor, vae, scaling: float, generator=None):
    """What StableDiffusionInpaintPipeline feeds the UNet besides the noisy latents: the mask resized (nearest) to
    latent size, and the latents of the image with the masked pixels zeroed (sampled from the VAE, scaled)."""
    masked = images * (masks < 0.5)
    h, w = images.shape[-2] // LATENT_FACTOR, images.shape[-1] // LATENT_FACTOR
    m = F.interpolate(masks, size=(h, w))
    with torch.no_grad():
        z_masked = vae.encode(masked).latent_dist.sample(generator) * scaling
    return m, z_masked


def encode_pairs(work: Path, vae, te, tok, scaling: float, n: int, seed: int, chunk: int = 256) -> dict:
    """n (training scene, random mask) pairs, encoded once: latents, mask at latent size, masked-image latents and
    caption embedding (the VAE and the text encoder are frozen, so this is exact). Resumable by chunks."""
    parts = []
    for c0 in tqdm(range(0, n, chunk), desc="encode scenes and masks"):
        path = work / f"pairs_{seed}_{c0}_{chunk}.pt"
        if not path.exists():
            rng = np.random.default_rng([seed, c0])
            scenes = [tw.train_scene(i) for i in range(c0, min(n, c0 + chunk))]
            x = to_tensor(np.stack([s.image for s in scenes]))
            masks = torch.from_numpy(np.stack([random_mask(s, rng) for s in scenes])).float()[:, None]
            g = torch.Generator().manual_seed(seed * 1009 + c0)
            with torch.no_grad():
                z0 = vae.encode(x).latent_dist.sample(g) * scaling
                m, zm = inpaint_inputs(x, masks, vae, scaling, g)
                ids = torch.tensor([tok(s.caption, padding="max_length", max_length=MODEL_MAX_LENGTH,
                                        truncation=True).input_ids for s in scenes])
                cond = te(ids)[0]
            torch.save({"latents": z0, "mask": m, "masked": zm, "cond": cond}, path)
        parts.append(torch.load(path, weights_only=False))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------------------------------------------------
def widen_unet(unet):
    """A copy of `unet` with in_channels 9; the 5 new input channels' weights are zero (the base model at step 0)."""
    from diffusers import UNet2DConditionModel
    cfg = dict(unet.config)
    cfg["in_channels"] = 9
    wide = UNet2DConditionModel.from_config(cfg)
    state = unet.state_dict()
    w = state["conv_in.weight"]
    new = torch.zeros(w.shape[0], 9, *w.shape[2:])
    new[:, :w.shape[1]] = w
    state["conv_in.weight"] = new
    wide.load_state_dict(state)
    return wide


def loss_weights(snr: torch.Tensor, mask: torch.Tensor, outside: float = 0.0) -> torch.Tensor:
    """Per-element weights of the ε-MSE (B×1×h×w, broadcast over channels).

    Everywhere: min-SNR-5 (ε-MSE × min(SNR, 5)/SNR, i.e. x0-MSE × min(SNR, 5)). Outside the mask (mask 0), with
    `outside` β > 0, the x0-space weight is raised to at least β: ε-MSE × max(min(SNR, 5), β)/SNR. Why: outside the
    mask the model is given x0 (the masked image's latents), yet at high noise (SNR ≪ 1) an error there in x0 costs
    only SNR × its size in ε, so plain ε-MSE hardly teaches the model to copy what it sees. That is where the
    background's colour is decided, and it is what a model trained briefly keeps poorly.
    """
    base = snr.clamp(max=5.0)
    w = (base / snr)[:, None, None, None].expand_as(mask).clone()
    if outside > 0:
        w_out = (base.clamp(min=outside) / snr)[:, None, None, None].expand_as(mask)
        w = torch.where(mask < 0.5, w_out, w)
    return w


def check_out(out: Path, replace_bundled: bool):
    if out.resolve() == BUNDLED.resolve() and not replace_bundled:
        raise SystemExit(f"--out {out} is the bundled inpainting model, which notebook 02 and the bench use: pass "
                         f"--replace-bundled to overwrite it, or leave --out at its default ({DEFAULT_OUT}).")


def export(out: Path, base, unet, meta: dict):
    from diffusers import StableDiffusionInpaintPipeline
    pipe = StableDiffusionInpaintPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                          unet=unet, scheduler=base.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out / "tokenizer")
    (out / "training.json").write_text(json.dumps(meta, indent=1))


def train(args):
    """Phase 1 (the recipe, `--steps`, no outside weighting) into `--work`/phase1, then phase 2 from it
    (`--phase2-steps` at `--phase2-lr`, loss outside the mask weighted by `--outside`) into `--out`. With `--init`,
    or `--phase2-steps 0`, a single phase into `--out`."""
    command = "python -m helpers.train_inpaint " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("out", "work", "replace_bundled", "run") and v != PARSER_DEFAULTS.get(k))
    if args.init or not args.phase2_steps:
        train_phase(args, command)
        return _bundled_hint(Path(args.out))
    check_out(Path(args.out), args.replace_bundled)
    first = argparse.Namespace(**{**vars(args), "out": str(Path(args.work) / "phase1"), "replace_bundled": False,
                                  "outside": 0.0, "run": "inpaint"})
    train_phase(first, command)
    second = argparse.Namespace(**{**vars(args), "init": first.out, "steps": args.phase2_steps,
                                   "lr": args.phase2_lr, "run": "phase2"})
    train_phase(second, command)
    _bundled_hint(Path(args.out))


def train_phase(args, command: str):
    from diffusers import StableDiffusionPipeline
    out = Path(args.out)
    check_out(out, args.replace_bundled)
    work = Path(args.work); work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    base = StableDiffusionPipeline.from_pretrained(args.base, safety_checker=None, requires_safety_checker=False)
    vae, te, tok, sched = base.vae.eval(), base.text_encoder.eval(), base.tokenizer, base.scheduler
    vae.requires_grad_(False); te.requires_grad_(False)
    scaling = float(vae.config.scaling_factor)
    if args.init:  # a second phase: start from an inpainting UNet already trained (a fresh optimiser and schedule)
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained(Path(args.init) / "unet")
        if unet.config.in_channels != 9:
            raise SystemExit(f"--init {args.init}: its UNet has {unet.config.in_channels} input channels; an "
                             f"inpainting UNet has 9 (a folder written by this command)")
    else:
        unet = widen_unet(base.unet)
    # the phase it continues, as its training.json says (kept in ours, so the model card can give both commands)
    previous = json.loads((Path(args.init) / "training.json").read_text()) if args.init and \
        (Path(args.init) / "training.json").exists() else None
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2)
    start, spent = 0, 0.0
    # each phase resumes its own checkpoint: "inpaint" (phase 1), "phase2", or one named after the --init folder
    run = args.run or (f"from-{Path(args.init).name}" if args.init else "inpaint")
    ck = work / f"{run}.pt"
    if ck.exists():
        st = torch.load(ck, weights_only=False)
        unet.load_state_dict(st["unet"]); ema.load_state_dict(st["ema"]); opt.load_state_dict(st["opt"])
        start, spent = st["step"], st.get("seconds", 0.0)
        torch.set_rng_state(st["rng"])
    warm = 100
    lr_at = lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    for gp in opt.param_groups:
        gp["lr"] = args.lr * lr_at(start)
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    with torch.no_grad():
        empty = te(torch.tensor([tok("", padding="max_length", max_length=MODEL_MAX_LENGTH).input_ids]))[0]

    def meta(done):
        return dict({k: v for k, v in vars(args).items()
                     if k not in ("out", "work", "replace_bundled", "phase2_steps", "phase2_lr")},
                    base=str(Path(args.base).resolve().relative_to(ROOT)) if Path(args.base).resolve()
                    .is_relative_to(ROOT) else args.base, step=done, unet_seconds=round(spent),
                    world_version=tw.WORLD_VERSION, command=command,
                    **({"previous": previous} if previous else {}))

    if start >= args.steps:
        export(out, base, ema, meta(args.steps))
        print(f"already trained: exported to {out}")
        return
    data = encode_pairs(work, vae, te, tok, scaling, args.pairs, args.seed)
    unet.train()
    bar = tqdm(range(start, args.steps), desc="inpainting UNet", initial=start, total=args.steps)
    tick = time.time()
    for step in bar:
        g = torch.Generator().manual_seed(args.seed * 100003 + step + (10_000_000 if args.init else 0))
        idx = torch.randint(0, args.pairs, (args.batch,), generator=g)
        z0, m, zm, cond = (data[k][idx] for k in ("latents", "mask", "masked", "cond"))
        drop = torch.rand(args.batch, generator=g) < args.drop
        cond = torch.where(drop[:, None, None], empty, cond)
        t = torch.randint(0, 1000, (args.batch,))
        noise = torch.randn_like(z0)
        zt = sched.add_noise(z0, noise, t)
        pred = unet(torch.cat([zt, m, zm], 1), t, encoder_hidden_states=cond).sample
        se = (pred - noise) ** 2
        mse = se.mean((1, 2, 3))
        loss = (loss_weights(snr[t], m, args.outside) * se).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        for gp in opt.param_groups:
            gp["lr"] = args.lr * lr_at(step + 1)
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        bar.set_postfix(mse=f"{mse.mean().item():.3f}")
        now = time.time(); spent += now - tick; tick = now
        done = step + 1
        if done % args.ckpt_every == 0 or done == args.steps:
            torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": done,
                        "seconds": spent, "rng": torch.get_rng_state()}, ck)
        if done % args.export_every == 0 and done < args.steps:
            export(work / f"export-{run}-{done}", base, ema, meta(done))
    export(out, base, ema, meta(args.steps))
    print(f"done: {args.steps} steps, {spent / 60:.1f} min; the model is in {out}")


def _bundled_hint(out: Path):
    if out.resolve() != BUNDLED.resolve():
        print("to make it the bundled one: the same command with --out data/toy-sd-inpaint --replace-bundled")


PARSER = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
PARSER.add_argument("--out", default=str(DEFAULT_OUT), help="where the pipeline folder is written at the end")
PARSER.add_argument("--replace-bundled", action="store_true",
                    help="allow --out to be the bundled inpainting model (data/toy-sd-inpaint)")
PARSER.add_argument("--work", default=str(DEFAULT_WORK), help="checkpoints (resumable)")
PARSER.add_argument("--base", default=str(BASE), help="the model to start from (the bundled toy model)")
PARSER.add_argument("--seed", type=int, default=0)
PARSER.add_argument("--pairs", type=int, default=12288,
                    help="training scenes (seeds 0..N-1), each with one random mask, encoded once")
PARSER.add_argument("--steps", type=int, default=2000, help="phase 1 (or the only phase, with --init)")
PARSER.add_argument("--batch", type=int, default=64)
PARSER.add_argument("--lr", type=float, default=4e-4)
PARSER.add_argument("--phase2-steps", type=int, default=2500,
                    help="phase 2: the loss outside the mask weighted by --outside (0: no phase 2)")
PARSER.add_argument("--phase2-lr", type=float, default=2e-4)
PARSER.add_argument("--ema", type=float, default=0.995)
PARSER.add_argument("--drop", type=float, default=0.1, help="caption dropout (trains classifier-free guidance)")
PARSER.add_argument("--outside", type=float, default=1.0,
                    help="phase 2 (or an --init phase): outside the mask, weight the loss at least this much in x0 "
                         "terms (0: min-SNR-5 everywhere, as phase 1)")
PARSER.add_argument("--init", default="",
                    help="one phase only, from this inpainting pipeline folder (e.g. data/toy-sd-inpaint) instead of "
                         "widening the base UNet, with a fresh optimiser and schedule")
PARSER.add_argument("--run", default="",
                    help="with --init: name of its resumable checkpoint in --work (default: from-<init folder name>)")
PARSER.add_argument("--ckpt-every", type=int, default=100)
PARSER.add_argument("--export-every", type=int, default=500)
PARSER_DEFAULTS = {a.dest: a.default for a in PARSER._actions}

if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("TOY_THREADS", torch.get_num_threads())))
    train(PARSER.parse_args())
