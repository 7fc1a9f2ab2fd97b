"""Measure the bundled toy model on held-out scenes: the numbers its model card quotes.

    python bench/toy_model_card.py                 # 64 held-out scenes per measure (a few minutes on 2 cores)
    python bench/toy_model_card.py --n 200 --model .cache/toy-train/export-4000 --json out.json

Bars (issue 2): VAE PSNR ≥ 25 dB; colour adherence ≥ 90% of captions; shape-word cross-attention IoU ≥ 0.5;
own-region self-attention share ≥ 0.5.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import toyeval  # noqa: E402
from helpers.loading import load_pipeline  # noqa: E402

BARS = {"vae_psnr_db": 25.0, "adherence": 0.90, "xattn_iou_shape": 0.5, "self_share_16x16": 0.5,
        "self_share_8x8": 0.5, "self_share_4x4": 0.5}


def measure(pipe, n: int, t_cross: int = 500, t_self: int = 300, samples: str | None = None) -> dict:
    r = {}
    t0 = time.time()
    r["vae_psnr_db"] = toyeval.vae_psnr(pipe, n)
    r["adherence"], images, caps = toyeval.adherence(pipe, n)
    if samples:  # a small grid of the first 16 generations with their captions
        import matplotlib
        matplotlib.use("Agg")
        from helpers.plotting import show_images
        k = min(16, len(images))
        fig = show_images(images[:k], [c.replace(" and", "\nand").replace(", ", ",\n") for c in caps[:k]], ncols=8,
                          size=1.3)
        fig.savefig(samples, dpi=60)
    x = toyeval.cross_attention_iou(pipe, n, t=t_cross)
    r["xattn_iou_shape"], r["xattn_iou_colour"] = x["shape"], x["colour"]
    for k, v in toyeval.self_attention_share(pipe, n, t=t_self).items():
        r[f"self_share_{k.replace(' ', '_')}"] = v
    r["seconds"] = round(time.time() - t0, 1)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--samples", default=None, help="write a PNG grid of generated samples here")
    a = ap.parse_args()
    pipe = load_pipeline(a.model)
    r = measure(pipe, a.n, samples=a.samples)
    r["n_scenes"] = a.n
    for k, v in r.items():
        bar = BARS.get(k)
        flag = "" if bar is None else ("  (bar ≥ %g: %s)" % (bar, "met" if v >= bar else "MISSED"))
        print(f"{k:28s} {v:.3f}{flag}" if isinstance(v, float) else f"{k:28s} {v}{flag}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
