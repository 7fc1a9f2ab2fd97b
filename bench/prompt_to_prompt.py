"""Prompt-to-prompt on inverted held-out toy scenes: local-blend masks and the three kinds of edit, measured.

1. Local blend: for each scene, a word-swap edit (object 0's shape → another shape) is run without blending; the blend
   mask (source ∪ edited word maps, 3×3 max-pool, / max, > threshold) is then built from each set of cross-attention
   resolutions and thresholds and scored by IoU with the ground-truth region (the object before ∪ after the edit).
2. Edits with the chosen blend: word swap (shape), refinement (a colour word added to a caption that lacked it),
   re-weighting (the object's colour word scaled): PSNR outside the region against the input and against the source
   branch, PSNR inside between edit and source (low = changed), colour shares inside the region.

    python bench/prompt_to_prompt.py --n 10 --steps 20
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

from helpers import toyworld as tw  # noqa: E402
from helpers.diffedit import latent_to_image_mask  # noqa: E402
from helpers.images import encode  # noqa: E402
from helpers.inversion import negative_prompt_inversion, null_text_inversion  # noqa: E402
from helpers.loading import load_pipeline  # noqa: E402
from helpers.metrics import iou  # noqa: E402
from helpers.p2p import blend_mask, edit, edit_scores  # noqa: E402

RESOLUTION_SETS = {"16×16": [16], "8×8": [8], "4×4": [4], "16+8": [16, 8], "all": None}
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6)


def scenes(n: int, start: int = 0) -> list[tw.Scene]:
    """Held-out scenes whose object 0 has a shape word used once in the caption (so a swap names one object)."""
    out, i = [], start
    while len(out) < n:
        sc = tw.heldout_scene(i)
        i += 1
        if [o.shape for o in sc.objects].count(sc.objects[0].shape) == 1:
            out.append(sc)
    return out


def swap_case(sc: tw.Scene):
    """(target caption, blend words, ground-truth region): object 0's shape → the next shape."""
    o = sc.objects[0]
    new = tw.SHAPES[(tw.SHAPES.index(o.shape) + 1) % len(tw.SHAPES)]
    gt = tw.with_shape(sc, 0, new)
    return gt.caption, (o.shape, new), o.mask | gt.objects[0].mask


def refine_case(sc: tw.Scene):
    """(source caption without object 0's colour, target caption with a new colour, blend words, new colour)."""
    o = sc.objects[0]
    new = next(c for c in tw.COLOUR_NAMES if c not in tw.colours_in_caption(sc.caption))
    source = sc.caption.replace(o.phrase, o.shape)
    return source, sc.caption.replace(o.phrase, f"{new} {o.shape}"), (o.shape, [new, o.shape]), new


def invert(pipe, z, prompt, steps, guidance, method):
    if method == "negative-prompt":
        return negative_prompt_inversion(pipe, z, prompt, steps, guidance)
    kw = dict(init="prompt", skip_converged=True) if method == "warm" else {}
    return null_text_inversion(pipe, z, prompt, steps, guidance, progress=False, **kw)


def run(pipe, n=10, steps=20, guidance=7.5, method="warm", threshold=0.5, resolutions=(16,), weight=-2.0,
        start=0, progress=True):
    from tqdm.auto import tqdm
    blend_iou = {(r, th): [] for r in RESOLUTION_SETS for th in THRESHOLDS}
    rows = {"word swap": [], "refinement": [], "re-weighting": []}
    for sc in tqdm(scenes(n, start), desc="scenes", disable=not progress):
        z = encode(pipe, sc.image)
        o = sc.objects[0]
        inv = invert(pipe, z, sc.caption, steps, guidance, method)
        target, words, region = swap_case(sc)
        probe = edit(pipe, inv, target, "swap", blend=words, use_blend=False)
        for name, res in RESOLUTION_SETS.items():
            for th in THRESHOLDS:
                m = blend_mask(probe.store, probe.positions, z.shape[-2:], th, resolutions=res)
                blend_iou[(name, th)].append(iou(latent_to_image_mask(m[0, 0] | m[1, 0], region.shape), region))
        kw = dict(threshold=threshold, blend_resolutions=resolutions)
        e = edit(pipe, inv, target, "swap", blend=words, **kw)
        rows["word swap"].append(edit_scores(pipe, e, sc.image, region))
        e = edit(pipe, inv, sc.caption, "reweight", weights={o.colour: weight}, blend=(o.colour, o.colour), **kw)
        rows["re-weighting"].append(edit_scores(pipe, e, sc.image, o.mask, old_colour=o.colour))
        source, target, words, new = refine_case(sc)
        inv_r = invert(pipe, z, source, steps, guidance, method)
        e = edit(pipe, inv_r, target, "refine", blend=words, **kw)
        rows["refinement"].append(edit_scores(pipe, e, sc.image, o.mask, colour=new, old_colour=o.colour))
    for r in rows.values():
        for s in r:
            s.pop("images")
    return {"blend_iou": {f"{k[0]} @ {k[1]}": v for k, v in blend_iou.items()}, "edits": rows}


def text(result) -> str:
    lines = ["Local-blend mask IoU with the edited object's region (source ∪ target mask):", "",
             "| resolutions | " + " | ".join(f"> {t}" for t in THRESHOLDS) + " |", "|---" * (len(THRESHOLDS) + 1) + "|"]
    for name in RESOLUTION_SETS:
        lines.append(f"| {name} | " + " | ".join(f"{np.mean(result['blend_iou'][f'{name} @ {t}']):.2f}"
                                              for t in THRESHOLDS) + " |")
    lines += ["", "| edit | PSNR outside vs input | outside vs source branch | inside: edit vs source | colour share "
              "inside (before → after) |", "|---|---|---|---|---|"]
    for name, rows in result["edits"].items():
        def m(k):
            return np.mean([r[k] for r in rows])
        share = []
        for key, label in (("colour", "new colour"), ("old_colour", "old colour")):
            if f"{key}_before" in rows[0]:
                share.append(f"{label} {m(key + '_before'):.2f} → {m(key + '_after'):.2f}")
        lines.append(f"| {name} | {m('outside'):.1f} dB | {m('outside_vs_source'):.1f} dB | "
                     f"{m('inside_change'):.1f} dB | {'; '.join(share) or '—'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--inversion", choices=("null-text", "warm", "negative-prompt"), default="warm",
                    help="null-text: the reference schedule; warm: null-text warm-started from negative-prompt inversion")
    ap.add_argument("--threshold", type=float, default=0.5, help="local-blend threshold (measured best on the toy model)")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[16])
    ap.add_argument("--weight", type=float, default=-2.0, help="re-weighting factor of the colour word")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    pipe = load_pipeline(a.model)
    t0 = time.perf_counter()
    result = run(pipe, a.n, a.steps, a.guidance, a.inversion, a.threshold, a.resolutions, a.weight, a.start)
    print(f"{a.n} held-out scenes, {a.steps} steps, {a.inversion} inversion, guidance {a.guidance:g}, blend "
          f"{a.resolutions} > {a.threshold}; {time.perf_counter() - t0:.0f} s\n")
    print(text(result))
    if a.json:
        Path(a.json).write_text(json.dumps(dict(args=vars(a), **result), indent=1))


if __name__ == "__main__":
    main()
