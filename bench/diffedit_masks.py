"""DiffEdit masks compared on held-out toy edits: purist vs fast vs diffusers' generate_mask (notebook 02's table).

    python bench/diffedit_masks.py            # 21 edits: colour, shape, one object of three
    python bench/diffedit_masks.py --n 60 --model sd15

Mask IoU against the ground-truth region, UNet evaluations, and seconds (as ratios to the fast mask, measured in
this one run).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import toyworld as tw  # noqa: E402
from helpers.diffedit import compare_masks, mask_methods, table_text  # noqa: E402
from helpers.images import native_size  # noqa: E402
from helpers.loading import load_pipeline  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n", type=int, default=21)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    pipe = load_pipeline(a.model)
    cases = tw.edit_cases(a.n, size=native_size(pipe))
    table = compare_masks(pipe, cases, mask_methods(pipe, seed=a.seed))
    print(f"{a.n} held-out edits ({', '.join(sorted({c.kind for c in cases}))})")
    print(table_text(table, cases))


if __name__ == "__main__":
    main()
