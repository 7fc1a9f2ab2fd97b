"""AlignDiff's cost on the bundled toy model (or any model): synthesis, textual inversion, attention-store memory.

    python bench/aligndiff_cost.py --n 16 --steps 20 --inversion-steps 20 [--json]

Measured side by side in one run:
- synthesis: UNet evaluations and seconds per synthetic sample (image + coarse mask) with the token-only attention
  store, and the ratio of its wall time to plain generation (same prompts, seeds, steps, no capture);
- textual inversion: UNet evaluations (forward passes; each also has a backward pass) and seconds per step, for k
  examples learned together;
- memory: bytes of the token-only store against a store keeping every token's cross-attention (same run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from helpers import aligndiff as ad  # noqa: E402
from helpers.attention import AttentionStore, capture_attention  # noqa: E402
from helpers.loading import load_pipeline  # noqa: E402
from helpers.sampling import UNetCounter, generate  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16, help="synthetic samples")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per sample")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=3, help="real examples for textual inversion")
    ap.add_argument("--inversion-steps", type=int, default=20)
    ap.add_argument("--category", default="star")
    ap.add_argument("--model", default="toy")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = ap.parse_args(argv)

    pipe = load_pipeline(a.model)
    bank = ad.PromptBank(a.category)
    for p, c in ad.plain_texts(a.category):
        bank.add_text(p, c)
    prompts = [bank.entry(i)[0] for i in range(a.n)]
    ad.synthesize(pipe, bank, 2, steps=2, guidance=a.guidance, progress=False)  # warm-up

    t0 = time.perf_counter()
    for b in range(0, a.n, a.batch):
        generate(pipe, prompts[b:b + a.batch], steps=a.steps, guidance=a.guidance, seed=b)
    t_plain = time.perf_counter() - t0

    with UNetCounter(pipe.unet) as c_syn:
        t0 = time.perf_counter()
        syn = ad.synthesize(pipe, bank, a.n, steps=a.steps, guidance=a.guidance, batch=a.batch, progress=False)
        t_syn = time.perf_counter() - t0

    # a full store on one batch, the same run as the token store's biggest batch
    full = AttentionStore(kinds=("cross",), half="cond")
    with capture_attention(pipe.unet, full), torch.no_grad():
        generate(pipe, prompts[:a.batch], steps=a.steps, guidance=a.guidance, seed=0)

    ims, ms, _ = ad.real_examples(a.category, a.k)
    with UNetCounter(pipe.unet) as c_inv:
        t0 = time.perf_counter()
        inv = ad.textual_inversion(pipe, ims, ms, a.category, steps=a.inversion_steps, progress=False,
                                   prefix=f"<bench-{a.category}-")
        t_inv = time.perf_counter() - t0

    r = dict(model=a.model, n=a.n, steps=a.steps, batch=a.batch, k=a.k, inversion_steps=a.inversion_steps,
             unet_evals_per_sample=c_syn.evals / a.n, seconds_per_sample=t_syn / a.n,
             synthesis_vs_plain_generation=t_syn / t_plain,
             inversion_unet_evals_per_step=c_inv.evals / a.inversion_steps,
             inversion_seconds_per_step=t_inv / a.inversion_steps,
             token_store_bytes=syn.store_bytes, full_store_bytes=full.nbytes(),
             memory_ratio=full.nbytes() / syn.store_bytes, inversion_last_loss=inv.losses[-1])
    if a.json:
        print(json.dumps(r))
        return r
    print(f"| measure ({a.model}, {a.n} samples × {a.steps} steps, batch {a.batch}) | value |\n|---|---|")
    print(f"| UNet evaluations per synthetic sample | {r['unet_evals_per_sample']:.0f} |")
    print(f"| seconds per synthetic sample | {r['seconds_per_sample']:.3f} |")
    print(f"| synthesis wall time / plain generation | {r['synthesis_vs_plain_generation']:.2f}× |")
    print(f"| textual inversion, UNet evaluations per step (k = {a.k}: forward passes, each also runs backward) | "
          f"{r['inversion_unet_evals_per_step']:.0f} |")
    print(f"| textual inversion, seconds per step | {r['inversion_seconds_per_step']:.3f} |")
    print(f"| attention store, category token only | {r['token_store_bytes'] / 1024:.1f} KiB |")
    print(f"| attention store, every token | {r['full_store_bytes'] / 1024:.1f} KiB ({r['memory_ratio']:.0f}×) |")
    return r


if __name__ == "__main__":
    main()
