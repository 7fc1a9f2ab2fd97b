"""Segmentation from cross-attention on held-out toy scenes: tuning vs tuning-free vs a single pass (notebook 04's
table), DiffSegX's tuning-free recipe against the reading chosen on tuning scenes, and which timesteps and
resolutions carry the layout.

    python bench/cross_attention_segmentation.py                    # 20 scenes; null-text inversion on all of them
    python bench/cross_attention_segmentation.py --n 60 --n-tuning 20 --json xattn.json
    python bench/cross_attention_segmentation.py --model sd15 --n 20 --n-tuning 5

IoU per object of the shape word's and the colour word's thresholded map and of the argmax over the caption's
object phrases + background (and the background's IoU); UNet evaluations per image (inversion included); seconds per
image as a ratio to the single pass, measured in this one run. Variants: "tuning" (null-text inversion, then the
first --first sampling steps), "tuning (negative-prompt)" (the same with negative-prompt inversion), "tuning-free"
(the clean latent through the last --strength of the schedule), "single pass" (timestep --t).

How an image is read (--read): "tune" scores every reading of the tuning-free variant (clean or noised latent, both
guidance halves or the conditional one, every layer or one grid, as a fraction of the latent side) on --n-tune
tuning scenes and uses the best; "reference" uses DiffSegX's recipe (clean latent, both halves, latent/4 — its 16×16
layers on SD's 64×64 latent); "course" every layer. The same grid is printed on the held-out scenes, and the
tuning-free row of DiffSegX's recipe is always in the table.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from helpers import toyworld as tw  # noqa: E402
from helpers.images import native_size  # noqa: E402
from helpers.loading import load_pipeline  # noqa: E402
from helpers.xattn_seg import (RECIPES, TUNING_START, choose_recipe, evaluate, grid_scores, grid_text,  # noqa: E402
                               layout_sweep, recipe_grid, table_text)

SWEEP_T = [1, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 981]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n", type=int, default=20, help="held-out scenes (tuning-free, single pass, negative-prompt)")
    ap.add_argument("--n-tuning", type=int, default=None, help="of those, scored with null-text inversion "
                    "(default: all)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--strength", type=float, default=0.1)
    ap.add_argument("--first", type=int, default=5, help="tuning: sampling steps captured after inversion")
    ap.add_argument("--t", type=int, default=300, help="single pass: timestep")
    ap.add_argument("--threshold", default="0.5", help="a number or 'otsu'")
    ap.add_argument("--background", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--read", choices=("tune", "reference", "course"), default="tune",
                    help="how the image is read (see above)")
    ap.add_argument("--n-tune", type=int, default=20, help="tuning scenes for --read tune (never scored)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the IoU-over-timestep-and-resolution sweep")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--json", help="write the results to this file")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    threshold = a.threshold if a.threshold == "otsu" else float(a.threshold)
    pipe = load_pipeline(a.model)
    scenes = [tw.heldout_scene(i, size=native_size(pipe)) for i in range(a.n)]
    kw = dict(steps=a.steps, guidance=a.guidance, strength=a.strength, n_steps=a.first, t=a.t, threshold=threshold,
              background=a.background, seed=a.seed, progress=True)
    out = {"args": vars(a), "variants": {}}
    tune_scenes = [tw.heldout_scene(TUNING_START + i, size=native_size(pipe)) for i in range(a.n_tune)]
    grid_tune = recipe_grid(pipe, tune_scenes, **kw)
    chosen = choose_recipe(grid_tune)
    read = {"tune": chosen, "reference": RECIPES["reference"], "course": RECIPES["course"]}[a.read]
    print(f"tuning-free variant read every way, mean shape-word IoU on {a.n_tune} tuning scenes "
          f"(bold: the best):")
    print(grid_text(grid_tune, chosen))
    grid_held = recipe_grid(pipe, scenes, **kw)
    print(f"\nthe same on the {a.n} held-out scenes:")
    print(grid_text(grid_held, chosen))
    print(f"\nread with (--read {a.read}): {read}")
    out["grid"] = {name: {f"{'noised' if n else 'clean'}, {h}, {f if f is None else f'latent*{f:g}'}": v
                          for (n, h, f), v in grid_scores(g).items()}
                   for name, g in (("tuning", grid_tune), ("held-out", grid_held))}
    out["read"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in read.items()}
    n_tuning = a.n if a.n_tuning is None else min(a.n_tuning, a.n)
    results = {"single pass": evaluate(pipe, scenes, "single pass", **kw, **read),
               "tuning-free": evaluate(pipe, scenes, "tuning-free", **kw, **read),
               "tuning-free, DiffSegX (latent/4)": evaluate(pipe, scenes, "tuning-free", reference=True, **kw),
               "tuning": evaluate(pipe, scenes[:n_tuning], "tuning", **kw, **read),
               "tuning (negative-prompt)": evaluate(pipe, scenes, "tuning (negative-prompt)", **kw, **read)}
    n_obj = sum(len(s.objects) for s in scenes)
    print(f"\n{a.n} held-out scenes ({n_obj} objects), {a.steps}-step DDIM, guidance {a.guidance}; null-text "
          f"inversion on the first {n_tuning}")
    print(table_text(results))
    for name, r in results.items():
        out["variants"][name] = {
            "scenes": len(r.iou["background"]), **{f"iou_{k}": float(np.mean(v)) for k, v in r.iou.items()},
            "evals_per_image": r.evals / len(r.iou["background"]), "seconds": r.seconds, "timesteps": r.timesteps,
            "iou_per_step": {str(s): float(np.mean(v)) for s, v in sorted(r.per_step.items())},
            "iou_per_resolution": {f"{h}x{w}": float(np.mean(v)) for (h, w), v in r.per_resolution.items()}}
    if not a.no_sweep:
        sweep = layout_sweep(pipe, scenes, SWEEP_T, seed=a.seed, threshold=threshold)
        print("\nsingle pass, shape-word IoU by timestep and resolution:")
        print("| t | " + " | ".join("all" if k == "all" else f"{k[0]}×{k[1]}" for k in sweep) + " |")
        print("|---" * (len(sweep) + 1) + "|")
        for i, t in enumerate(SWEEP_T):
            print(f"| {t} | " + " | ".join(f"{v[i]:.2f}" for v in sweep.values()) + " |")
        out["sweep"] = {"timesteps": SWEEP_T,
                        **{("all" if k == "all" else f"{k[0]}x{k[1]}"): v for k, v in sweep.items()}}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
