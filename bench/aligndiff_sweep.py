"""AlignDiff's learned tokens on the bundled toy model: which start word and which `bg_lambda` give tokens that draw
the object? Prints a markdown table (the README's AlignDiff sweep).

    python bench/aligndiff_sweep.py                       # the README's table (about 5 minutes on 2 cores)
    python bench/aligndiff_sweep.py --inversion-steps 20 --per-token 2 --bg-lambdas 0.6   # a quick look

For each start word (the category word, as notebook 06 once did; or each example's colour word, read by the toy
world's detector) and each `bg_lambda`, the k tokens are learned with the same steps, rate and seed (AdamW with weight
decay 1e-2 and a cosine schedule, as the reference), then each draws `--per-token` images ("a <star-0> star", one
seed per image). Measured per row:
- foreground / background error: the noise-prediction error on the real examples, each region averaged over its own
  latent cells, on the same fixed noise draws for every row (training losses of different `bg_lambda` are not
  comparable);
- star found: share of the drawn images in which the toy world's detector finds a star (it says "nothing" when no
  object is there);
- colour kept: share in which it finds a star of the example's colour;
- coarse-mask IoU: the category token's attention mask (threshold 0.4) against the pixels of the example's colour,
  beside the IoU of a mask covering the whole image (the trivial baseline).
Rows "plain text" use the prompts "a {colour} star" without a learned token, at each `--guidances` value.
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

import numpy as np  # noqa: E402

from helpers import aligndiff as ad  # noqa: E402
from helpers import toyworld as tw  # noqa: E402
from helpers.loading import load_pipeline  # noqa: E402
from helpers.metrics import iou  # noqa: E402


def score(pipe, category, prompts, colours, per, steps, guidance, threshold, seed):
    """Draw `per` images for each prompt; detector and coarse-mask measures (see the module docstring)."""
    bank = ad.PromptBank(category)
    for p, c in zip(prompts, colours):
        bank.add_text(p, c)
    syn = ad.synthesize(pipe, bank, per * len(prompts), steps=steps, guidance=guidance, seed=seed,
                        threshold=threshold, progress=False)
    found = [[f for f in tw.find_objects(im) if f.shape == category] for im in syn.images]
    gt = [tw.colour_mask(im, c) for im, c in zip(syn.images, syn.colours)]
    return dict(star_found=float(np.mean([bool(f) for f in found])),
                colour_kept=float(np.mean([any(x.colour == c for x in f) for f, c in zip(found, syn.colours)])),
                coarse_iou=float(np.mean([iou(m, g) for m, g in zip(syn.masks, gt)])),
                whole_image_iou=float(np.mean([g.mean() for g in gt])), n_images=len(syn.images))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--category", default="star")
    ap.add_argument("--k", type=int, default=3, help="real examples (one token each)")
    ap.add_argument("--inversion-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--bg-lambdas", default="0,0.6,2", help="comma-separated bg_lambda values")
    ap.add_argument("--inits", default="category,colour", help="start words: category and/or colour")
    ap.add_argument("--per-token", type=int, default=8, help="images drawn per token (and per plain prompt)")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps")
    ap.add_argument("--guidance", type=float, default=7.5, help="guidance of the learned-token rows")
    ap.add_argument("--guidances", default="7.5,12", help="guidance values of the plain-text rows")
    ap.add_argument("--threshold", type=float, default=0.4)
    ap.add_argument("--seed", type=int, default=1000, help="first image seed (image i: seed + i)")
    ap.add_argument("--model", default="toy")
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    a = ap.parse_args(argv)

    t_start = time.perf_counter()
    pipe = load_pipeline(a.model)
    ims, ms, colours = ad.real_examples(a.category, a.k)
    words = {"category": [a.category] * a.k, "colour": ad.init_words(ims, ms, a.category)}
    bad = set(a.inits.split(",")) - set(words)
    if bad:
        raise SystemExit(f"error: unknown --inits {sorted(bad)}; choose from {sorted(words)}")
    common = dict(per=a.per_token, steps=a.steps, threshold=a.threshold, seed=a.seed)
    rows = []
    for g in [float(x) for x in a.guidances.split(",")]:
        r = score(pipe, a.category, [f"a {c} {a.category}" for c in colours], colours, guidance=g, **common)
        err = ad.inversion_error(pipe, ims, ms, [f"a {c} {a.category}" for c in colours])
        rows.append(dict(tokens="plain text 'a {colour} star'", bg_lambda=None, guidance=g, fg_error=err[0],
                         bg_error=err[1], **r))
    for init in a.inits.split(","):
        err = ad.inversion_error(pipe, ims, ms, [f"a {w} {a.category}" for w in words[init]])
        rows.append(dict(tokens=f"start: '{init}' word, not trained", bg_lambda=None, guidance=None,
                         fg_error=err[0], bg_error=err[1]))
        for lam in [float(x) for x in a.bg_lambdas.split(",")]:
            inv = ad.textual_inversion(pipe, ims, ms, a.category, steps=a.inversion_steps, lr=a.lr, bg_lambda=lam,
                                       init_word=words[init], prefix=f"<{a.category}-{init}-{lam}-",
                                       progress=False)
            err = ad.inversion_error(pipe, ims, ms, inv.prompts)
            r = score(pipe, a.category, inv.prompts, colours, guidance=a.guidance, **common)
            rows.append(dict(tokens=f"learned from the '{init}' word", bg_lambda=lam, guidance=a.guidance,
                             fg_error=err[0], bg_error=err[1], **r))
    if a.json:
        print(json.dumps(rows))
        return rows

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)
    print(f"AlignDiff tokens on {a.model}: k = {a.k}, {a.inversion_steps} inversion steps at lr {a.lr}, "
          f"{a.per_token} images per token, {a.steps} sampling steps, image seeds from {a.seed}\n")
    print("| tokens | bg_lambda | guidance | foreground error | background error | star found | colour kept "
          "| coarse-mask IoU | whole-image mask IoU |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {f(r['bg_lambda'], 'g')} | {f(r['guidance'], 'g')} | {r['fg_error']:.4f} "
              f"| {r['bg_error']:.4f} | {f(r.get('star_found'), '.0%')} | {f(r.get('colour_kept'), '.0%')} "
              f"| {f(r.get('coarse_iou'), '.2f')} | {f(r.get('whole_image_iou'), '.2f')} |")
    print(f"\n({time.perf_counter() - t_start:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
