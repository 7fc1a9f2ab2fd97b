"""Smoke test on a GPU with real Stable Diffusion 1.5 weights: time each notebook's main call, check the invariants
the twin tests check on random weights (tests/test_twins.py).

    python bench/gpu_smoke.py                      # SD 1.5 ("sd15": from the hub cache, or downloaded)
    python bench/gpu_smoke.py --model /path/to/sd15-folder

It refuses, with exit code 2 and one line saying why, on a machine without CUDA or without the weights. Runs in
float16 (the pipeline stays float16; null-text inversion upcasts to a float32 UNet copy, with a warning). Prints one
line per check and per timed call (seconds, peak GPU memory), and exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "a photo of a cat sitting on a wooden bench"
EDIT = "a photo of a dog sitting on a wooden bench"


class Refusal(RuntimeError):
    pass


def load(model: str):
    """The pipeline in float16 on CUDA, or a Refusal saying what is missing."""
    if not torch.cuda.is_available():
        raise Refusal("gpu_smoke needs a CUDA GPU (torch.cuda.is_available() is False here); run it on a GPU machine")
    from helpers.loading import load_pipeline
    try:
        return load_pipeline(model, device="cuda", dtype=torch.float16)
    except (OSError, RuntimeError, ValueError) as e:
        raise Refusal(f"gpu_smoke needs the SD 1.5 weights ('{model}'), which could not be loaded: "
                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


class Report:
    def __init__(self):
        self.failed = 0

    def check(self, name: str, ok: bool, detail: str = ""):
        self.failed += not ok
        print(f"[{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)

    def timed(self, name: str, fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        print(f"[time] {name}: {time.perf_counter() - t0:.2f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} "
              f"GiB", flush=True)
        return out


def run(pipe, steps: int = 50) -> int:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from helpers import diffedit as de, diffseg as ds, p2p
    from helpers.attention import AttentionStore, capture_attention
    from helpers.images import encode, native_size
    from helpers.inversion import ddim_inversion, negative_prompt_inversion, null_text_inversion, reconstruct
    from helpers.sampling import (UNetCounter, convert_output, ddim_step, generate, prompt_embeddings,
                                  step_gap, timesteps)
    from helpers.xattn_seg import trace
    r = Report()
    r.check("float16 kept", pipe.unet.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16)
    r.check("DDIM sampler", type(pipe.scheduler).__name__ == "DDIMScheduler", type(pipe.scheduler).__name__)
    ts = timesteps(pipe, steps).tolist()
    r.check("timesteps unique", len(set(ts)) == steps, f"{ts[:3]} … {ts[-2:]}")
    side = native_size(pipe) // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, side, side, generator=g).to("cuda", torch.float16)
    cond = prompt_embeddings(pipe, PROMPT)
    t = timesteps(pipe, steps)[steps // 2]
    with torch.no_grad():
        out = pipe.unet(x, t, encoder_hidden_states=cond).sample
    ref = DDIMScheduler.from_config(pipe.scheduler.config)
    ref.set_timesteps(steps)
    theirs = ref.step(out.float(), t, x.float()).prev_sample
    mine = ddim_step(pipe, x.float(), convert_output(pipe, out.float(), x.float(), t), t, int(t) - step_gap(pipe, steps))
    r.check("one DDIM step == DDIMScheduler.step", torch.allclose(mine, theirs, atol=1e-4),
            f"max diff {(mine - theirs).abs().max().item():.1e}")

    stock = StableDiffusionPipeline(**pipe.components)
    stock.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    stock.set_progress_bar_config(disable=True)
    a = r.timed("00 stock pipeline, 25 DDIM steps", lambda: stock(
        PROMPT, num_inference_steps=25, output_type="latent", generator=torch.Generator().manual_seed(1)).images)
    with UNetCounter(pipe.unet) as c:
        b = r.timed("00 generate, 25 steps", lambda: generate(pipe, PROMPT, steps=25, seed=1))
    d = ((a.float() - b.float()).norm() / a.float().norm()).item()
    r.check("generate == stock pipeline (float16)", d < 2e-2, f"relative difference {d:.1e}")
    r.check("generate cost", c.evals == 50, f"{c.evals} evaluations")

    image = stock(PROMPT, num_inference_steps=25, generator=torch.Generator().manual_seed(2)).images[0]
    z = encode(pipe, image)
    with UNetCounter(pipe.unet) as c:
        r.timed("01 purist_mask, n=10", lambda: de.purist_mask(pipe, z, PROMPT, EDIT, n=10))
    r.check("purist_mask cost", c.evals == 25 * 10 * 2 * 2, f"{c.evals} evaluations")
    with UNetCounter(pipe.unet) as c:
        m = r.timed("02 fast_mask, n=20", lambda: de.fast_mask(pipe, z, PROMPT, EDIT, n=20))
    r.check("fast_mask cost and size", c.evals == 80 and tuple(m.shape) == (side, side), f"{c.evals} evaluations")

    inv = r.timed(f"03 DDIM inversion, {steps} steps", lambda: ddim_inversion(pipe, z, PROMPT, steps))
    rec = reconstruct(pipe, inv)
    err = ((rec.float() - z.float()).norm() / z.float().norm()).item()
    r.check("DDIM inversion + reconstruction at guidance 1", err < 0.1 and inv.evals == steps,
            f"relative error {err:.3f}, {inv.evals} evaluations")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        nti = r.timed(f"03 null-text inversion, {steps} steps", lambda: null_text_inversion(pipe, z, PROMPT, steps,
                                                                                             progress=False))
    r.check("null-text upcasts float16 and returns float16", any("upcasts" in str(x.message) for x in w)
            and nti.null_embeddings[0].dtype == torch.float16)
    r.check("null-text cost", nti.evals == steps + sum(1 + k + 1 for k in nti.inner_iterations()),
            f"{nti.evals} evaluations")
    npi = negative_prompt_inversion(pipe, z, PROMPT, steps)
    with UNetCounter(pipe.unet) as c:
        e = r.timed("03 prompt-to-prompt edit", lambda: p2p.edit(pipe, npi, EDIT, mode="swap", blend=("cat", "dog")))
    r.check("p2p cost and mask size", c.evals == steps * 4 and e.mask.shape[-1] == side, f"{c.evals} evaluations")

    store = AttentionStore(kinds=("cross", "self"), half="cond")
    with capture_attention(pipe.unet, store):
        generate(pipe, PROMPT, steps=2)
    want = store.expected_nbytes(pipe.unet, 2, (side, side), pipe.tokenizer.model_max_length)
    r.check("attention store memory prediction exact", store.nbytes() == want, f"{store.nbytes()} bytes")
    with trace(pipe, PROMPT) as tr:
        r.timed("04 traced generation, 25 steps", lambda: generate(pipe, PROMPT, steps=25))
    heat = tr.heatmap("cat")
    r.check("heat map at image size", tuple(heat.shape) == (native_size(pipe),) * 2)
    labels = r.timed("05 DiffSeg, one image", lambda: ds.diffseg(pipe, [image]))
    r.check("DiffSeg labels at image size", labels.shape[1:] == (native_size(pipe),) * 2)
    from helpers import aligndiff as ad
    bank = ad.PromptBank("cat")
    bank.add_text(PROMPT)
    syn = r.timed("06 AlignDiff synthesis, 4 images", lambda: ad.synthesize(pipe, bank, n=4, steps=25,
                                                                           progress=False))
    r.check("AlignDiff masks at image size", syn.masks.shape[1:] == (native_size(pipe),) * 2)
    print(f"{r.failed} check(s) failed" if r.failed else "all checks passed")
    return 1 if r.failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd15", help="short name, hub id or local folder of SD 1.5 (default sd15)")
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args(argv)
    try:
        pipe = load(a.model)
    except Refusal as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    return run(pipe, a.steps)


if __name__ == "__main__":
    sys.exit(main())
