"""Prompt-to-prompt on inverted toy scenes: local-blend masks and the three kinds of edit, the reference's settings
against the course's, on tuning scenes (held-out 5000…, where the course's settings are chosen) and on held-out ones.

1. Local blend: for each scene, a word-swap edit (object 0's shape → another shape) is run without blending; the blend
   mask (source ∪ edited word maps, 3×3 max-pool, resize, / max, > threshold) is then built from each set of
   cross-attention resolutions (fractions of the latent side), resize mode and threshold, and scored by IoU with the
   ground-truth region (the object before ∪ after the edit).
2. Edits under each configuration (the "reference" and "course" presets of `helpers.p2p.PRESETS`, and the reference
   with one course departure at a time): word swap (shape), refinement (a colour word added to a caption that lacked
   it), re-weighting (the object's colour word scaled). Success is the toy world's detector on the edit (the new
   shape / the new colour / a colour other than the old one in the region; "no object" counts as a failure); PSNR
   outside the region against the input measures what was kept.

    python bench/prompt_to_prompt.py --n 10 --n-tune 8 --steps 20
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
from helpers.p2p import PRESETS, blend_mask, edit, edit_scores  # noqa: E402

TUNE_START = 5000  # held-out scenes 5000… choose the course's settings; the table's scenes are 0…
# blend-mask sweep: cross-attention resolutions as fractions of the latent side (None: every resolution)
SCALE_SETS = {"latent/1": (1,), "latent/2": (1 / 2,), "latent/4": (1 / 4,), "all": None}
THRESHOLDS = (0.3, 0.5, 0.7)
RESIZES = ("nearest", "bilinear")
REF, COURSE = PRESETS["reference"], PRESETS["course"]
BLEND_KEYS = ("blend_scales", "resize", "threshold")
CONFIGS = {  # name -> keyword arguments of helpers.p2p.edit
    "reference": dict(preset="reference"),
    "course": dict(preset="course"),
    "reference + course's self-attention cap": dict(preset="reference", self_max=COURSE["self_max"]),
    "reference + course's blend": dict(preset="reference", **{k: COURSE[k] for k in BLEND_KEYS}),
}


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


def run(pipe, n=10, steps=20, guidance=7.5, method="warm", weight=-2.0, start=0, progress=True, configs=CONFIGS):
    from tqdm.auto import tqdm
    blend_iou = {(r, rz, th): [] for r in SCALE_SETS for rz in RESIZES for th in THRESHOLDS}
    rows = {c: {"word swap": [], "refinement": [], "re-weighting": []} for c in configs}
    for sc in tqdm(scenes(n, start), desc="scenes", disable=not progress):
        z = encode(pipe, sc.image)
        o = sc.objects[0]
        inv = invert(pipe, z, sc.caption, steps, guidance, method)
        target, words, region = swap_case(sc)
        new_shape = words[1]
        probe = edit(pipe, inv, target, "swap", blend=words, use_blend=False)
        for name, scales in SCALE_SETS.items():
            for rz in RESIZES:
                for th in THRESHOLDS:
                    m = blend_mask(probe.store, probe.positions, z.shape[-2:], th, scales=scales, resize=rz)
                    blend_iou[(name, rz, th)].append(iou(latent_to_image_mask(m[0, 0] | m[1, 0], region.shape),
                                                         region))
        source, r_target, r_words, new = refine_case(sc)
        inv_r = invert(pipe, z, source, steps, guidance, method)
        for c, kw in configs.items():
            e = edit(pipe, inv, target, "swap", blend=words, **kw)
            rows[c]["word swap"].append(edit_scores(pipe, e, sc.image, region, shape=new_shape, colour=o.colour))
            e = edit(pipe, inv, sc.caption, "reweight", weights={o.colour: weight}, blend=(o.colour, o.colour), **kw)
            rows[c]["re-weighting"].append(edit_scores(pipe, e, sc.image, o.mask, old_colour=o.colour, away=True))
            e = edit(pipe, inv_r, r_target, "refine", blend=r_words, **kw)
            rows[c]["refinement"].append(edit_scores(pipe, e, sc.image, o.mask, colour=new, old_colour=o.colour))
    for per in rows.values():
        for r in per.values():
            for s in r:
                s.pop("images")
                s.pop("found", None)
                s["success"] = bool(s["success"])
    return {"blend_iou": {f"{k[0]} {k[1]} > {k[2]}": v for k, v in blend_iou.items()}, "edits": rows}


def best_blend(result) -> str:
    """The blend-mask setting with the highest mean IoU."""
    return max(result["blend_iou"], key=lambda k: np.mean(result["blend_iou"][k]))


def text(result, title: str) -> str:
    lines = [f"### {title}", "", "Local-blend mask IoU with the edited object's region (source ∪ target mask):", "",
             "| cross-attention | resize | " + " | ".join(f"> {t}" for t in THRESHOLDS) + " |",
             "|---|---|" + "---|" * len(THRESHOLDS)]
    for name in SCALE_SETS:
        for rz in RESIZES:
            lines.append(f"| {name} | {rz} | " + " | ".join(
                f"{np.mean(result['blend_iou'][f'{name} {rz} > {t}']):.2f}" for t in THRESHOLDS) + " |")
    lines += ["", f"best: {best_blend(result)}", "",
              "| settings | edit | success (detector) | PSNR outside vs input | outside vs source branch |",
              "|---|---|---|---|---|"]
    for c, per in result["edits"].items():
        for name, rows in per.items():
            def m(k):
                return np.mean([r[k] for r in rows])
            lines.append(f"| {c} | {name} | {m('success'):.0%} ({sum(r['success'] for r in rows)}/{len(rows)}) | "
                         f"{m('outside'):.1f} dB | {m('outside_vs_source'):.1f} dB |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10, help="held-out scenes 0… (the reported table)")
    ap.add_argument("--n-tune", type=int, default=8, help=f"tuning scenes ({TUNE_START}…), 0 to skip")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--inversion", choices=("null-text", "warm", "negative-prompt"), default="warm",
                    help="null-text: the reference schedule; warm: null-text warm-started from negative-prompt inversion")
    ap.add_argument("--weight", type=float, default=-2.0, help="re-weighting factor of the colour word")
    ap.add_argument("--model", default="toy")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    pipe = load_pipeline(a.model)
    print(f"presets: {PRESETS}")
    out = {}
    for title, n, start in (("tuning scenes", a.n_tune, TUNE_START), ("held-out scenes", a.n, 0)):
        if n <= 0:
            continue
        t0 = time.perf_counter()
        out[title] = run(pipe, n, a.steps, a.guidance, a.inversion, a.weight, start)
        print(f"\n{n} {title} ({start}…), {a.steps} steps, {a.inversion} inversion, guidance {a.guidance:g}; "
              f"{time.perf_counter() - t0:.0f} s\n")
        print(text(out[title], title), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(args=vars(a), **out), indent=1))


if __name__ == "__main__":
    main()
