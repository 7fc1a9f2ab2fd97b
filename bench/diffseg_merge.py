"""DiffSeg's merging: helpers.diffseg.merge against a loop transcription of the reference, side by side.

    python bench/diffseg_merge.py                  # toy sizes (real toy attention) and SD-1.x sizes (random), n = 2
    python bench/diffseg_merge.py --n 5 --threads 1 --json merge.json

For each attention tensor: wall time of the 3 merging iterations in both implementations (the speed-up is their
ratio, measured in this one run; at toy sizes the best of --repeat runs each, since one run takes milliseconds), whether they give the same segments (same proposals, same argmax labels), and the
peak memory our merging allocates (PyTorch profiler's memory events; the transcription's through tracemalloc), also
relative to the aggregated attention tensor itself (its input, not counted in the peak). The transcription is `Reference` in tests/test_diffseg.py; at SD sizes it runs
its first iteration 2 anchors per chunk instead of the reference's 16, to fit in a few GB of memory.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from helpers import diffseg as ds  # noqa: E402
from test_diffseg import Reference  # noqa: E402


def torch_peak(fn):
    """(result, peak bytes) of what `fn` allocates through PyTorch on the CPU, from the profiler's memory events:
    allocations (each op's own) and frees in time order, the peak of their running sum."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    ev = prof.events()
    items = [(e.time_range.start, e.self_cpu_memory_usage) for e in ev
             if e.name != "[memory]" and e.self_cpu_memory_usage > 0]
    items += [(e.time_range.start, e.cpu_memory_usage) for e in ev if e.name == "[memory]"]
    cur = peak = 0
    for _, b in sorted(items):
        cur += b
        peak = max(peak, cur)
    return out, peak


def numpy_peak(fn):
    """(result, peak bytes) that `fn` allocates through NumPy (NumPy reports its buffers to tracemalloc)."""
    import tracemalloc
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def toy_attention(n):
    from helpers import toyworld as tw
    from helpers.loading import load_pipeline
    pipe = load_pipeline("toy")
    cap = ds.capture(pipe, [tw.heldout_scene(i).image for i in range(n)])
    return list(ds.aggregate(cap.self_maps)), 64


def best_of(fn, repeat):
    """(result, shortest wall time of `repeat` calls): the least disturbed run on a shared machine."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def run_case(attn, side, image_side, threshold, split, repeat, chunk=None):
    res = (side, side)
    merge = lambda: ds.merge(attn, res, threshold, ds.REFERENCE_ANCHORS, ds.REFERENCE_ITERATIONS, chunk)  # noqa: E731
    a = attn.numpy().reshape(side, side, side, side)
    transcription = lambda: Reference.merge(a, [threshold] * ds.REFERENCE_ITERATIONS,  # noqa: E731
                                            ds.REFERENCE_ANCHORS, split)
    ours, t_ours = best_of(merge, repeat)
    ref, t_ref = best_of(transcription, repeat)
    same = len(ref) == len(ours) and bool(
        (ds.nms(ours, res, image_side) == ds.nms(torch.from_numpy(ref.reshape(len(ref), -1)), res, image_side)).all())
    _, ours_peak = torch_peak(merge)         # memory measured in separate, untimed runs
    _, ref_peak = numpy_peak(transcription)
    return dict(ours_s=t_ours, reference_s=t_ref, same=same, segments=len(ours),
                ours_extra_mb=ours_peak / 2**20, reference_extra_mb=ref_peak / 2**20,
                attention_mb=attn.numel() * attn.element_size() / 2**20)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2, help="attention tensors per size")
    ap.add_argument("--sizes", nargs="+", default=["toy", "sd"], choices=["toy", "sd"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per tensor at toy sizes (best kept); SD: 1")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    results = {}
    for size in a.sizes:
        results_before = set(results)
        if size == "toy":
            tensors, image_side = toy_attention(a.n)
            side, threshold, split = 16, 0.3, None
            label = "toy model (real attention, 16×16 = 256 queries), KL 0.3"
        else:
            side, image_side, threshold, split = 64, 512, 1.1, 2
            tensors = [ds.synthetic_attention(64, regions=8, sharpness=9.0, seed=i, dtype=torch.float32)
                       for i in range(a.n)]
            label = "SD 1.x sizes (random attention, 64×64 = 4096 queries), KL 1.1"
        rows = [run_case(t.float(), side, image_side, threshold, split, a.repeat if size == "toy" else 1)
                for t in tensors]
        results[label] = rows
        if size == "toy":  # the default works in blocks of 32 rows; the whole toy tensor in one block, for contrast:
            results[label.replace("KL 0.3", "KL 0.3, one block of 256 rows")] = [
                run_case(t.float(), side, image_side, threshold, split, a.repeat, chunk=256) for t in tensors]
        for r in [(k, r) for k, v in results.items() if k not in results_before for r in v]:
            (name, r) = r
            print(f"{name}: ours {r['ours_s']:.3f} s, transcription {r['reference_s']:.2f} s "
                  f"(× {r['reference_s'] / r['ours_s']:.0f}); same segments: {r['same']} ({r['segments']}); "
                  f"peak memory allocated beside the attention ({r['attention_mb']:.2f} MB): ours "
                  f"{r['ours_extra_mb']:.2f} MB, transcription {r['reference_extra_mb']:.0f} MB", flush=True)
    print(f"\n{torch.get_num_threads()} torch thread(s)\n")
    print("| attention | queries × keys | speed-up (transcription ÷ ours) | ours (s) | transcription (s) | "
          "same segments | peak working memory ÷ attention tensor: ours | transcription |")
    print("|---|---|---|---|---|---|---|---|")
    for label, rows in results.items():
        q = 256 if label.startswith("toy") else 4096
        sp = [r["reference_s"] / r["ours_s"] for r in rows]
        ratio = [r["ours_extra_mb"] / r["attention_mb"] for r in rows]
        ratio_ref = [r["reference_extra_mb"] / r["attention_mb"] for r in rows]
        print(f"| {label} | {q} × {q} | {np.mean(sp):.0f}× (min {min(sp):.0f}×) | "
              f"{np.mean([r['ours_s'] for r in rows]):.3f} | {np.mean([r['reference_s'] for r in rows]):.2f} | "
              f"{sum(r['same'] for r in rows)}/{len(rows)} | {max(ratio):.2f} | {max(ratio_ref):.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
