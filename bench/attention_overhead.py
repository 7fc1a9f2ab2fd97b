"""What capturing attention costs: time of a captured UNet call over a bare one, and the store's memory.

    python bench/attention_overhead.py                  # 200 interleaved repeats per setting, toy model
    python bench/attention_overhead.py --n 500 --json overhead.json

Time: the same guided UNet call (batch 2: unconditional + conditional halves, as in a sampling step) run bare and
under `capture_attention` with several store options, interleaved repeat by repeat so that load from other processes
hits every setting alike; reported: the ratio of median wall times, of the fastest wall times, and of median thread
CPU times (the steadiest when other processes share the CPU). Bar: captured ≤ 1.25× bare for the default capture
(cross-attention of the conditional half), on the median wall-time ratio and the CPU-time ratio. Memory: `AttentionStore.expected_nbytes` predicted before the run and
`store.nbytes()` measured after it, for the toy model and (predicted only) for Stable Diffusion 1.x at 512 px.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from helpers.attention import AttentionStore, capture_attention, layer_infos, layer_resolutions  # noqa: E402
from helpers.loading import load_pipeline  # noqa: E402
from helpers.sampling import random_latents  # noqa: E402
from helpers.text import embed  # noqa: E402
from tests.test_attention import SD15_UNET  # noqa: E402  (Stable Diffusion 1.x's UNet config, no weights needed)

SETTINGS = {  # name -> AttentionStore options
    "cross, cond half (default)": dict(kinds=("cross",), half="cond"),
    "cross, cond half, 16×16 only": dict(kinds=("cross",), half="cond", resolutions="largest"),
    "cross, cond half, per step": dict(kinds=("cross",), half="cond", per_step=True),
    "cross + self, all": dict(kinds=("cross", "self"), half="all"),
}
BAR = 1.25
def options(opts, latent_hw):
    o = dict(opts)
    if o.get("resolutions") == "largest":
        o["resolutions"] = [latent_hw]
    return o


@torch.no_grad()
def measure(pipe, n: int, batch: int = 2, warmup: int = 10) -> dict:
    x = random_latents(pipe, batch, seed=0)
    ctx = embed(pipe, [""] * (batch // 2) + ["a red circle and a blue square"] * (batch - batch // 2))
    latent_hw = tuple(x.shape[-2:])
    n_tokens = ctx.shape[1]
    t = 500

    def call():
        pipe.unet(x, t, encoder_hidden_states=ctx)

    def timed():
        w, c = time.perf_counter(), time.thread_time()
        call()
        return time.perf_counter() - w, time.thread_time() - c

    names = ["bare", *SETTINGS]
    wall, cpu = {k: [] for k in names}, {k: [] for k in names}
    stores = {}
    for r in range(warmup + n):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order too
            if name == "bare":
                dw, dc = timed()
            else:
                store = AttentionStore(**options(SETTINGS[name], latent_hw))
                with capture_attention(pipe.unet, store):
                    dw, dc = timed()
                stores[name] = store
            if r >= warmup:
                wall[name].append(dw); cpu[name].append(dc)
    med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in names}
    bare, bare_cpu = med["bare"]
    out = {"repeats": n, "batch": batch, "threads": torch.get_num_threads(), "bare_ms": round(1e3 * bare, 2),
           "bare_cpu_ms": round(1e3 * bare_cpu, 2), "bar": BAR, "settings": {}}
    for name, opts in SETTINGS.items():
        st = stores[name]
        expected = AttentionStore(**options(opts, latent_hw)).expected_nbytes(pipe.unet, batch, latent_hw, n_tokens,
                                                                              n_steps=1)
        out["settings"][name] = {"ratio": round(med[name][0] / bare, 3), "cpu_ratio": round(med[name][1] / bare_cpu, 3),
                                 "min_ratio": round(min(wall[name]) / min(wall["bare"]), 3),
                                 "ms": round(1e3 * med[name][0], 2),
                                 "expected_bytes": expected, "bytes": st.nbytes()}
    return out


def sd15_prediction(batch: int = 2, steps: int = 50) -> dict:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET)
    res = {}
    for name, opts in SETTINGS.items():
        st = AttentionStore(**options(opts, (64, 64)))
        res[name] = st.expected_nbytes(unet, batch, (64, 64), 77, n_steps=steps)
    # what keeping every map would cost: each layer's maps unaveraged, all heads, every step
    from diffusers.models.attention_processor import Attention
    heads = {n + ".processor": m.heads for n, m in unet.named_modules() if isinstance(m, Attention)}
    every = 0
    for info in layer_infos(unet):
        h, w = layer_resolutions(unet)[info.name]
        every += batch * heads[info.name] * h * w * (77 if info.is_cross else h * w) * 4 * steps
    res["cross + self, every head, layer and step kept unaveraged"] = every
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n", type=int, default=200, help="interleaved repeats per setting")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is; 1 is steadiest when "
                    "other processes share the CPU, and makes thread CPU time meaningful)")
    ap.add_argument("--json", help="write the results to this file")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model)
    r = measure(pipe, a.n, a.batch)
    r["sd15_expected_bytes"] = sd15_prediction()
    print(f"bare UNet call (batch {a.batch}, {r['threads']} thread(s)): median {r['bare_ms']:.1f} ms wall, "
          f"{r['bare_cpu_ms']:.1f} ms CPU, over {a.n} interleaved repeats")
    print("time ratios to the bare call: median wall time, fastest wall time, median thread CPU time")
    print(f"{'setting':30s} {'wall':>7s} {'fastest':>8s} {'CPU':>7s}   store bytes: predicted / measured")
    for name, s in r["settings"].items():
        print(f"{name:30s} {s['ratio']:>6.3f}× {s['min_ratio']:>7.3f}× {s['cpu_ratio']:>6.3f}×   "
              f"{s['expected_bytes']:>10,d} / {s['bytes']:,d}")
    d = r["settings"]["cross, cond half (default)"]
    print(f"default capture: {d['ratio']:.3f}× (wall), {d['cpu_ratio']:.3f}× (CPU) a bare call (bar ≤ {BAR}×): "
          f"{'ok' if max(d['ratio'], d['cpu_ratio']) <= BAR else 'MISSED'}")
    print("SD 1.x at 512 px, guided batch of 2, 50 steps (predicted):")
    for name, b in r["sd15_expected_bytes"].items():
        print(f"  {name:34s} {b / 2**20:10.1f} MiB")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
