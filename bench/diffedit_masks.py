"""DiffEdit on held-out toy edits, measured in one run (notebook 02's tables, the README's DiffEdit section).

    python bench/diffedit_masks.py            # 21 edits: colour, shape, one object of three
    python bench/diffedit_masks.py --n 60 --model sd15
    python bench/diffedit_masks.py --no-edits # masks only

Masks: IoU against the ground-truth region (the object before and after the edit), UNet evaluations, wall time
relative to the fast mask; beside them `improved_mask` without its image guide, and the ceiling of any mask made at
the latent grid (the true region reduced to it). The improved mask's settings were chosen on tuning edits by
bench/diffedit_mask_tuning.py, never on these. Edits: success (the toy world's detector finds an object of the
query's colour and shape in the region; it can say "no object"), PSNR outside the region, UNet evaluations (mask
included). Both tables print as markdown, ready for the README.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from helpers import toyworld as tw  # noqa: E402
from helpers.diffedit import (compare_edits, compare_masks, edit_methods, edit_table_markdown,  # noqa: E402
                              failure_kind, improved_mask, mask_methods, table_markdown)
from helpers.images import native_size, vae_factor  # noqa: E402
from helpers.loading import default_inpaint_model, load_pipeline, resolve_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n", type=int, default=21)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-edits", action="store_true", help="measure the masks only")
    ap.add_argument("--inpaint-model", default="auto",
                    help="9-channel inpainting checkpoint for the edits: 'auto' (toy-inpaint with the toy model, "
                         "sd15-inpaint on a GPU), a name or folder, or 'none'")
    a = ap.parse_args()
    t0 = time.perf_counter()
    pipe = load_pipeline(a.model)
    cases = tw.edit_cases(a.n, size=native_size(pipe))
    kinds = sorted({c.kind for c in cases})
    counts = ", ".join(f"{sum(c.kind == k for c in cases)} {k}" for k in kinds)
    methods = mask_methods(pipe, seed=a.seed)
    f = vae_factor(pipe)
    methods["improved, without the image guide (bilinear only)"] = (
        lambda p, z, c: improved_mask(p, z, c.reference, c.query, guide=False, seed=a.seed))
    methods[f"ceiling: the true region at the {native_size(pipe) // f}² latent grid, nearest (0 evaluations)"] = (
        lambda p, z, c: F.avg_pool2d(torch.from_numpy(c.region).float()[None, None], f)[0, 0] >= 0.5)
    masks = compare_masks(pipe, cases, methods)
    print(f"Masks on {a.n} held-out edits ({counts}), model {a.model}, seed {a.seed}:\n")
    print(table_markdown(masks, cases))
    if not a.no_edits:
        ck = {"auto": default_inpaint_model(resolve_model(a.model)), "none": None}.get(a.inpaint_model,
                                                                                      a.inpaint_model)
        edits = compare_edits(pipe, cases, edit_methods(pipe, seed=a.seed, inpaint_model=ck))
        print(f"\nEdits on the same {a.n} edits (success: the detector finds the query's colour and shape in the "
              "region; PSNR outside the region against the input):\n")
        print(edit_table_markdown(edits, cases))
        for name, r in edits.items():
            reasons = {}
            for why in map(failure_kind, r["reason"]):
                reasons[why] = reasons.get(why, 0) + 1
            print(f"\n{name}: " + "; ".join(f"{k} ×{v}" for k, v in sorted(reasons.items(), key=lambda x: -x[1])))
    print(f"\n({time.perf_counter() - t0:.0f} s on {os.cpu_count()} cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")


if __name__ == "__main__":
    main()
