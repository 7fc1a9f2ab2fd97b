"""Null-text inversion: the reference schedule against cheaper variants, on held-out toy scenes.

For each scene: DDIM inversion reconstructed at guidance 1 and at the edit guidance, negative-prompt inversion, the
reference null-text schedule, and the variants below. Reported: reconstruction PSNR against the input image (the VAE
round trip is the ceiling), UNet evaluations of the inversion (forward passes; the reference's backward passes are not
counted, so its true cost is higher still), and wall time as a ratio to the reference, all measured in one run.

    python bench/null_text_inversion.py --n 10            # 50 steps, guidance 7.5 (the reference's settings)
    python bench/null_text_inversion.py --n 10 --steps 10 --json out.json
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

from helpers import toyworld as tw  # noqa: E402
from helpers.inversion import compare_inversions, inversion_methods, inversion_table_text  # noqa: E402
from helpers.loading import load_pipeline  # noqa: E402

# name -> keyword arguments of null_text_inversion (the reference schedule first)
VARIANTS = {
    "null-text, reference": {},
    "null-text, 2 inner steps": dict(inner_steps=2),
    "null-text, early-stop bar ×10": dict(tol_scale=10.0),
    "null-text, first 20% of steps only": dict(optimise_steps=0.2),
    "null-text, warm start from negative-prompt": dict(init="prompt", skip_converged=True),
    "null-text, warm start + 2 inner steps": dict(init="prompt", skip_converged=True, inner_steps=2),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10, help="held-out scenes (default 10)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50, the reference's)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--start", type=int, default=0, help="first held-out scene index")
    ap.add_argument("--model", default="toy")
    ap.add_argument("--json", help="also write the per-scene numbers here")
    a = ap.parse_args(argv)
    pipe = load_pipeline(a.model)
    t0 = time.perf_counter()
    scenes = [tw.heldout_scene(a.start + i) for i in range(a.n)]
    table = compare_inversions(pipe, scenes, inversion_methods(a.steps, a.guidance, VARIANTS))
    print(f"{a.n} held-out scenes, {a.steps} DDIM steps, guidance {a.guidance:g}, {time.perf_counter() - t0:.0f} s\n")
    print(inversion_table_text(table))
    if a.json:
        Path(a.json).write_text(json.dumps(dict(args=vars(a), table=table), indent=1))


if __name__ == "__main__":
    main()
