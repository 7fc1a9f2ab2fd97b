"""How much does one other busy job on the CPU slow a UNet call, with torch's default OpenMP threads and with
OMP_WAIT_POLICY=PASSIVE? (Why the Makefile, the notebooks' setup cell and `python -m helpers.doctor` set it.)

    python bench/threads_under_load.py            # about 40 s on a quiet 2-core machine

One busy process (a pure-Python loop, standing for a second notebook or another student's job) runs for the whole
measurement. Each setting is measured in a fresh Python process (OpenMP reads its environment at start) that runs
the bundled model's UNet, traced with TorchScript (same layers, weights and inputs as the doctor's
`helpers.doctor.time_unet_call`: one guided call, batch 2): the median of the calls that finish within 6 s after
a first, uncounted one. The ratio compares the time per call over the whole budget (budget ÷ calls finished), which
counts the stalls a student waits through; the median alone hides them. The settings run one after the other under the same load: read the ratios, not the times.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "torch defaults": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "PASSIVE + OMP_NUM_THREADS=1": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"},
}


def child(path: str):
    """Runs in a fresh process: load the traced UNet, say "ready", then print each guided call's seconds."""
    import torch
    unet = torch.jit.load(path)
    x, t, ctx = torch.load(path + ".inputs")
    print(f"ready {torch.get_num_threads()}", flush=True)
    with torch.no_grad():
        while True:
            t0 = time.perf_counter()
            unet(x, t, ctx)
            print(time.perf_counter() - t0, flush=True)


def trace_unet(path: str):
    """The bundled model's UNet, traced with TorchScript: the children then import torch only (loading diffusers
    in each of them would take longer than the measurement). Same layers, same weights, same inputs as
    `helpers.doctor.time_unet_call`."""
    import warnings

    import torch
    from diffusers import UNet2DConditionModel
    sys.path.insert(0, str(ROOT))
    from helpers.loading import BUNDLED
    unet = UNet2DConditionModel.from_pretrained(BUNDLED / "unet").eval()
    n_tok = json.loads((BUNDLED / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"]
    g = torch.Generator().manual_seed(0)
    side = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, side, side, generator=g)
    ctx = torch.randn(2, n_tok, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([500, 500])

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, ctx):
            return self.unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Call(), (x, t, ctx))
        assert torch.equal(traced(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample)
    traced.save(path)
    torch.save((x, t, ctx), path + ".inputs")


def _one(path: str, env: dict, budget: float, load_timeout: float = 90.0) -> dict:
    """Start a child with `env`; after it is ready, collect call times for `budget` seconds, then stop it.

    The first call (one-time set-up) is not counted; it may take up to `budget` seconds too. If no further call
    finishes within the budget, the result is a lower bound: the budget itself."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", path], env=env, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    times = []
    try:
        threads = int(lines.get(timeout=load_timeout).split()[1])
        try:
            lines.get(timeout=budget)  # the uncounted first call
            t0 = time.perf_counter()
            while (left := budget - (time.perf_counter() - t0)) > 0:
                times.append(float(lines.get(timeout=left)))
        except queue.Empty:
            pass
    finally:
        proc.kill()
        proc.wait()
    times.sort()
    if times:
        return {"threads": threads, "calls": len(times), "median_s": times[len(times) // 2],
                "per_call_s": budget / len(times), "bound": False}
    return {"threads": threads, "calls": 0, "median_s": budget, "per_call_s": budget, "bound": True}


def measure(budget: float = 6.0) -> dict:
    path = str(Path(tempfile.mkdtemp()) / "unet.pt")
    trace_unet(path)
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        return {name: _one(path, {**clean, **extra}, budget) for name, extra in SETTINGS.items()}
    finally:
        burner.kill()
        burner.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=6.0, help="seconds of calls per setting")
    a = ap.parse_args()
    if a.child:
        return child(a.child)
    t0 = time.perf_counter()
    res = measure(a.budget)
    ref = res["OMP_WAIT_POLICY=PASSIVE"]["per_call_s"]
    print(f"one toy UNet call (guided, batch 2) while one other process keeps a core busy; {os.cpu_count()} cores")
    print(f"{'setting':30s} {'threads':>7s} {'calls':>5s} {'median':>10s} {'per call':>10s} {'× PASSIVE':>10s}")
    for name, r in res.items():
        more = ">" if r["bound"] else " "
        print(f"{name:30s} {r['threads']:7d} {r['calls']:5d} {more}{r['median_s'] * 1e3:8.1f} ms "
              f"{more}{r['per_call_s'] * 1e3:8.1f} ms {more}{r['per_call_s'] / ref:9.1f}")
    print("(> : no call finished within the budget; the time is a lower bound)")
    print(f"(measured in {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
