"""Train the bundled toy Stable Diffusion from scratch on the toy world, on a CPU.

    python -m helpers.train_toy                    # the shipped recipe, into .cache/toy-train/model (resumable)
    python -m helpers.train_toy --out data/toy-sd --replace-bundled   # ...and replace the bundled model

By default the result goes to .cache/toy-train/model (use it with DIFFUSION_MODEL=.cache/toy-train/model);
the bundled model in data/toy-sd is only overwritten with --replace-bundled. Once trained, rerunning with other
--out only exports again from the checkpoints (seconds).

Three phases, each checkpointed in --work (stop with Ctrl-C and rerun the same command to resume):
1. the VAE (diffusers AutoencoderKL, 4× down-sampling): L1 + MSE + a small KL term;
2. the training scenes encoded once to latents (with their token ids and object masks);
3. the UNet (UNet2DConditionModel, cross-attention at 16×16, 8×8 and 4×4) and the CLIP text encoder, jointly:
   min-SNR-5-weighted ε-MSE + a grounding loss on cross-attention (each object's colour and shape token should
   attend inside that object's mask, TokenCompose-style) + a self-attention term (pixels of an object attend to
   their own object). These two terms are how a 1.5 M-parameter model learns in an hour the grounding that real
   Stable Diffusion learns from billions of captioned images; the model card says so. 10% caption dropout trains
   classifier-free guidance. An EMA of the weights is what ships.
The pipeline is exported with `save_pretrained` (safetensors) so that `StableDiffusionPipeline.from_pretrained`
loads it exactly as it loads real Stable Diffusion.
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
from .attention import AttentionStore, capture_attention
from .toytokenizer import MODEL_MAX_LENGTH, vocab_size, write_tokenizer

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "data" / "toy-sd"
DEFAULT_WORK = ROOT / ".cache" / "toy-train"
DEFAULT_OUT = DEFAULT_WORK / "model"


# ---------------------------------------------------------------------------------------------------------------------
# the components (SD's exact types, small)
def build_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=tw.IMAGE_SIZE)


def build_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=tw.IMAGE_SIZE // 4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=64,
        attention_head_dim=1,  # diffusers reads this as the number of heads: one wide head per block
        norm_num_groups=8)


def build_text_encoder(tok_dir: Path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    cfg = CLIPTextConfig(vocab_size=vocab_size(), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=MODEL_MAX_LENGTH, projection_dim=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return CLIPTextModel(cfg), tok


def build_scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 -> float N×3×H×W in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------------------------------
# phase 1: VAE
def train_vae(work: Path, steps: int, batch: int, seed: int):
    ck = work / "vae.pt"
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    start = 0
    if ck.exists():
        st = torch.load(ck, weights_only=False)
        vae.load_state_dict(st["vae"]); opt.load_state_dict(st["opt"]); start = st["step"]
    if start >= steps:
        return vae
    g = torch.Generator().manual_seed(seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    for _ in range(start):
        sched.step()
    vae.train()
    bar = tqdm(range(start, steps), desc="VAE", initial=start, total=steps)
    for step in bar:
        idx = torch.randint(0, 10**7, (batch,), generator=g).tolist()
        x = to_tensor(np.stack([tw.train_scene(i).image for i in idx]))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        psnr = 10 * math.log10(4 / F.mse_loss(rec.detach().clamp(-1, 1), x).item())
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            torch.save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ck)
    return vae


# ---------------------------------------------------------------------------------------------------------------------
# phase 2: encode the training scenes
N_SLOTS = 2 * tw.MAX_OBJECTS  # (colour token, shape token) per object


def token_slots(tok, sc: tw.Scene):
    """Token ids of the caption, and for each object the token positions of its colour and shape words."""
    ids = tok(sc.caption, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True).input_ids
    # every toy-world word is a single token, so word i sits at token position i + 1 (after the start token)
    slots = []
    for j in range(len(sc.objects)):
        i = sc.phrase_index(j)
        slots += [i + 1, i + 2]
    return ids, slots


def encode_dataset(work: Path, vae, tok, n: int, batch: int = 256):
    path = work / f"latents_{n}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    vae.eval()
    lat, ids, slots, masks, nobj = [], [], [], [], []
    for s0 in tqdm(range(0, n, batch), desc="encode scenes"):
        scenes = [tw.train_scene(i) for i in range(s0, min(n, s0 + batch))]
        with torch.no_grad():
            lat.append(vae.encode(to_tensor(np.stack([s.image for s in scenes]))).latent_dist.mean)
        for s in scenes:
            i, sl = token_slots(tok, s)
            ids.append(i)
            sl = sl + [0] * (N_SLOTS - len(sl))
            slots.append(sl)
            m = np.zeros((tw.MAX_OBJECTS, tw.IMAGE_SIZE, tw.IMAGE_SIZE), dtype=bool)
            for j, o in enumerate(s.objects):
                m[j] = o.mask
            masks.append(np.packbits(m, axis=-1))
            nobj.append(len(s.objects))
    data = {"latents": torch.cat(lat), "ids": torch.tensor(ids), "slots": torch.tensor(slots),
            "masks": torch.from_numpy(np.stack(masks)), "nobj": torch.tensor(nobj)}
    torch.save(data, path)
    return data


# ---------------------------------------------------------------------------------------------------------------------
# phase 3: UNet + text encoder
def attention_losses(store: AttentionStore, obj_masks: torch.Tensor, nobj: torch.Tensor, slots: torch.Tensor,
                     keep: torch.Tensor, colour_weight: float):
    """Grounding loss (cross-attention) and own-object loss (self-attention), per sample (B,).

    obj_masks: B×MAX_OBJECTS×H×W float masks at image size; slots: B×N_SLOTS token positions (colour, shape per
    object); keep: B bool, False for caption-dropped samples (no grounding for them).
    """
    B = obj_masks.shape[0]
    slot_valid = (torch.arange(tw.MAX_OBJECTS)[None] < nobj[:, None])  # B×O
    slot_valid = slot_valid.repeat_interleave(2, 1) & keep[:, None]     # B×S
    slot_w = torch.tensor([colour_weight, 1.0] * tw.MAX_OBJECTS)[None]  # B×S
    ground, own, n_cross, n_self = torch.zeros(B), torch.zeros(B), 0, 0
    pooled = {}
    for info, (h, w), probs in store.maps:
        if (h, w) not in pooled:
            pooled[(h, w)] = F.adaptive_avg_pool2d(obj_masks, (h, w)).flatten(2)  # B×O×HW
        m = pooled[(h, w)]
        p = probs.mean(1)  # B×Q×K (heads averaged)
        if info.is_cross:
            ms = m.repeat_interleave(2, 1)                                           # B×S×Q
            a = torch.gather(p, 2, slots[:, None, :].expand(-1, p.shape[1], -1)).transpose(1, 2)  # B×S×Q
            mass = (a * ms).sum(-1) / (a.sum(-1) + 1e-8)
            an = a / (a.amax(-1, keepdim=True) + 1e-8)
            bce = F.binary_cross_entropy(an.clamp(1e-6, 1 - 1e-6), ms, reduction="none").mean(-1)
            ground = ground + ((1 - mass) ** 2 + bce).mul(slot_w).mul(slot_valid).sum(1)
            n_cross += 1
        elif h * w > 16:  # self-attention at 16×16 and 8×8
            share = p @ m.transpose(1, 2)               # B×Q×O: attention each query puts on each object
            inside = (m.transpose(1, 2) > 0.5).float()  # B×Q×O
            ov = (torch.arange(tw.MAX_OBJECTS)[None, None] < nobj[:, None, None]).float()
            sel = inside * ov
            own = own + ((1 - share) ** 2 * sel).sum((1, 2)) / sel.sum((1, 2)).clamp(min=1)
            n_self += 1
    return ground / max(n_cross, 1), own / max(n_self, 1)


def export(out: Path, vae, unet, text_encoder, tok, scaling_factor: float, meta: dict):
    from diffusers import StableDiffusionPipeline
    vae.register_to_config(scaling_factor=scaling_factor)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out / "tokenizer")  # also vocab.json + merges.txt, which older transformers releases need
    (out / "training.json").write_text(json.dumps(meta, indent=1))


def check_world(work: Path):
    """Checkpoints and cached latents belong to one version of the toy world; refuse to mix versions."""
    marker = work / "world-version.txt"
    stale = [p.name for p in (work / "vae.pt", work / "unet.pt", *work.glob("latents_*.pt")) if p.exists()]
    if marker.exists():
        found = marker.read_text().strip()
    else:
        found = "1 (no marker)" if stale else None
    if found is not None and found != str(tw.WORLD_VERSION):
        raise SystemExit(f"{work} holds checkpoints of toy-world version {found} ({', '.join(stale) or 'none'}), "
                         f"but the world is now version {tw.WORLD_VERSION}. Delete that folder or pass another "
                         f"--work to train from scratch.")
    marker.write_text(str(tw.WORLD_VERSION))


def check_out(out: Path, replace_bundled: bool):
    """Refuse to overwrite the bundled model unless asked to in so many words."""
    if out.resolve() == BUNDLED.resolve() and not replace_bundled:
        raise SystemExit(f"--out {out} is the bundled model, which every notebook and measured number uses: pass "
                         f"--replace-bundled to overwrite it, or leave --out at its default ({DEFAULT_OUT}).")


def train(args):
    out = Path(args.out)
    check_out(out, args.replace_bundled)
    torch.manual_seed(args.seed)
    work = Path(args.work); work.mkdir(parents=True, exist_ok=True)
    check_world(work)
    tok_dir = write_tokenizer(work / "tokenizer")
    t0 = time.time()
    vae = train_vae(work, args.vae_steps, args.vae_batch, args.seed)
    vae.eval().requires_grad_(False)
    text_encoder, tok = build_text_encoder(tok_dir)
    data = encode_dataset(work, vae, tok, args.scenes)
    scaling = float(1 / data["latents"].std())
    latents = data["latents"] * scaling
    unet = build_unet()
    sched = build_scheduler()
    # token identity: a linear probe must read each caption token back from the text encoder's output at its
    # position. Without it, the grounding loss (which asks a colour word and its shape word to attend to the same
    # place) lets "circle" and "square" collapse onto one embedding. The probe is training-only; it is not exported.
    # The probe compares directions (cosine, temperature 10), so tiny differences cannot satisfy it.
    probe = torch.nn.Linear(text_encoder.config.hidden_size, text_encoder.config.vocab_size, bias=False)
    params = list(unet.parameters()) + list(text_encoder.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    start, spent = 0, 0.0
    ck = work / "unet.pt"
    if ck.exists():
        st = torch.load(ck, weights_only=False)
        unet.load_state_dict(st["unet"]); text_encoder.load_state_dict(st["te"]); probe.load_state_dict(st["probe"])
        opt.load_state_dict(st["opt"])
        ema_unet.load_state_dict(st["ema_unet"]); ema_te.load_state_dict(st["ema_te"])
        start, spent = st["step"], st.get("seconds", 0.0)
        torch.set_rng_state(st["rng"])
    warm = 200
    lr_at = lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    for gp in opt.param_groups:
        gp["lr"] = args.lr * lr_at(start)
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    empty_ids = torch.tensor(tok("", padding="max_length", max_length=MODEL_MAX_LENGTH).input_ids)
    n = latents.shape[0]
    store = AttentionStore(kinds=("cross", "self"), keep_graph=True)
    unet.train(); text_encoder.train()
    end = min(args.steps, args.stop_at or args.steps)
    bar = tqdm(range(start, end), desc="UNet + text encoder", initial=start, total=args.steps)
    tick = time.time()
    def save(done):
        meta = dict({k: v for k, v in vars(args).items() if k not in ("out", "work", "replace_bundled")},
                    step=done, unet_seconds=round(spent), scaling_factor=scaling, world_version=tw.WORLD_VERSION,
                    command="python -m helpers.train_toy " + " ".join(
                        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                        if k not in ("out", "work", "replace_bundled") and v != PARSER_DEFAULTS.get(k)))
        export(out if done == args.steps else work / f"export-{done}", vae, ema_unet, ema_te, tok, scaling, meta)

    if start >= args.steps:  # already trained: export the finished model (e.g. to another --out)
        save(args.steps)
    with capture_attention(unet, store):
        for step in bar:
            idx = torch.randint(0, n, (args.batch,))
            x0 = latents[idx]
            ids = data["ids"][idx].clone()
            keep = torch.rand(args.batch) >= args.drop
            ids[~keep] = empty_ids
            t = torch.randint(0, 1000, (args.batch,))
            noise = torch.randn_like(x0)
            xt = sched.add_noise(x0, noise, t)
            cond = text_encoder(ids)[0]
            pred = unet(xt, t, encoder_hidden_states=cond).sample
            w = snr[t].clamp(max=5.0) / snr[t]
            mse = ((pred - noise) ** 2).mean((1, 2, 3))
            masks = torch.from_numpy(np.unpackbits(data["masks"][idx].numpy(), axis=-1)[..., :tw.IMAGE_SIZE]).float()
            ground, own = attention_losses(store, masks, data["nobj"][idx], data["slots"][idx], keep,
                                           args.colour_weight)
            words = (ids != tok.bos_token_id) & (ids != tok.eos_token_id)
            logits = 10 * F.normalize(cond[words], dim=-1) @ F.normalize(probe.weight, dim=-1).T
            ident = F.cross_entropy(logits, ids[words]) if words.any() else cond.sum() * 0
            at = alphas[t].sqrt()
            loss = (w * mse).mean() + args.ground * (at * ground).sum() / keep.sum().clamp(min=1) \
                + args.self_weight * (at * own).mean() + args.identity * ident
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            for gp in opt.param_groups:
                gp["lr"] = args.lr * lr_at(step + 1)
            d = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for m_ema, m in ((ema_unet, unet), (ema_te, text_encoder)):
                    for pe, p in zip(m_ema.parameters(), m.parameters()):
                        pe.lerp_(p, 1 - d)
            bar.set_postfix(mse=f"{mse.mean().item():.3f}", ground=f"{ground[keep].mean().item():.3f}",
                            own=f"{own.mean().item():.3f}", ident=f"{ident.item():.2f}")
            now = time.time(); spent += now - tick; tick = now
            done = step + 1
            if done % args.ckpt_every == 0 or done in (args.steps, end):
                torch.save({"unet": unet.state_dict(), "te": text_encoder.state_dict(), "probe": probe.state_dict(),
                            "opt": opt.state_dict(),
                            "ema_unet": ema_unet.state_dict(), "ema_te": ema_te.state_dict(), "step": done,
                            "seconds": spent, "rng": torch.get_rng_state()}, ck)
            if done % args.export_every == 0 or done == args.steps:
                save(done)
    print(f"done: {args.steps} steps, {spent / 60:.1f} min in phase 3, {(time.time() - t0) / 60:.1f} min this run")
    if max(start, end) >= args.steps:
        print(f"the model is in {out}: try it with DIFFUSION_MODEL={out} (or load_pipeline({str(out)!r}))"
              + ("" if out.resolve() == BUNDLED.resolve() else
                 "; to make it the bundled model: the same command with --out data/toy-sd --replace-bundled"))


PARSER = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
PARSER.add_argument("--out", default=str(DEFAULT_OUT), help="where the pipeline folder is written at the end")
PARSER.add_argument("--replace-bundled", action="store_true",
                    help="allow --out to be the bundled model (data/toy-sd), which is otherwise refused")
PARSER.add_argument("--work", default=str(DEFAULT_WORK), help="checkpoints and cached latents (resumable)")
PARSER.add_argument("--seed", type=int, default=0)
PARSER.add_argument("--vae-steps", type=int, default=600)
PARSER.add_argument("--vae-batch", type=int, default=32)
PARSER.add_argument("--scenes", type=int, default=40000, help="training scenes encoded once (seeds 0..N-1)")
PARSER.add_argument("--steps", type=int, default=7000)
PARSER.add_argument("--batch", type=int, default=64)
PARSER.add_argument("--lr", type=float, default=8e-4)
PARSER.add_argument("--ema", type=float, default=0.998)
PARSER.add_argument("--drop", type=float, default=0.1, help="caption dropout (trains classifier-free guidance)")
PARSER.add_argument("--ground", type=float, default=0.5, help="weight of the cross-attention grounding loss")
PARSER.add_argument("--colour-weight", type=float, default=2.0, help="colour token's weight inside grounding")
PARSER.add_argument("--self-weight", type=float, default=0.3, help="weight of the self-attention own-object term")
PARSER.add_argument("--identity", type=float, default=0.1, help="weight of the token-identity probe loss")
PARSER.add_argument("--stop-at", type=int, default=None,
                    help="stop (checkpointed) after this step without changing the schedule; rerun to go on")
PARSER.add_argument("--ckpt-every", type=int, default=100)
PARSER.add_argument("--export-every", type=int, default=1000)
PARSER_DEFAULTS = {a.dest: a.default for a in PARSER._actions}

if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("TOY_THREADS", torch.get_num_threads())))
    train(PARSER.parse_args())
