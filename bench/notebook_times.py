"""Execute notebooks top to bottom and record each one's wall time and peak memory; optionally keep the outputs.

    python bench/notebook_times.py                          # time every notebook, write bench/results/notebook_times.json
    python bench/notebook_times.py --inplace notebooks/03_*.ipynb   # run, time, and save the outputs into the file
    python bench/notebook_times.py --update-docs            # rewrite the README table and each notebook's "Run time" line

Run it on a quiet machine (no other CPU job): the times are what the README and the notebooks' headers state.
With --inplace, outputs are cleaned for readers without a live kernel: a finished progress bar becomes one line of
text, interactive controls say that they need a running kernel, widget state is dropped (it is large and useless
without a kernel), and the kernelspec is the one JupyterLab writes, so opening and saving leaves no diff.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import platform
import re
import sys
import time
from datetime import date
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
RESULTS = ROOT / "bench" / "results" / "notebook_times.json"
README = ROOT / "README.md"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
PEAK_CELL = ("import resource as _r\n"
             "print('PEAK_KB', _r.getrusage(_r.RUSAGE_SELF).ru_maxrss, _r.getrusage(_r.RUSAGE_CHILDREN).ru_maxrss)")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()}, Python {platform.python_version()}"


def _widget_text(model_id: str, state: dict) -> str | None:
    """The final text of a tqdm bar (HBox of HTML, progress, HTML), or None for another widget."""
    m = state.get(model_id, {})
    kids = m.get("state", {}).get("children", [])
    if m.get("model_name") != "HBoxModel" or len(kids) != 3:
        return None
    parts = [state.get(k.removeprefix("IPY_MODEL_"), {}) for k in kids]
    if parts[1].get("model_name") != "FloatProgressModel":
        return None
    return html.unescape(" ".join(p["state"].get("value", "") for p in (parts[0], parts[2]))).replace("\u2007", " ")


def clean(nb) -> None:
    """Make executed outputs readable without a kernel; drop widget state; normalise the kernelspec."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outs = []
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if WIDGET_VIEW in data:
                text = _widget_text(data[WIDGET_VIEW].get("model_id", ""), state)
                if text is not None:  # a progress bar: keep its last state as one line
                    outs.append(nbformat.v4.new_output("stream", name="stderr", text=text.strip() + "\n"))
                else:
                    outs.append(nbformat.v4.new_output("display_data", data={
                        "text/plain": "[interactive controls: they appear when the notebook runs in Jupyter]"}))
                continue
            outs.append(o)
        cell.outputs = outs
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)


def run(path: Path, timeout: int, inplace: bool) -> dict:
    nb = nbformat.read(path, as_version=4)
    peak = nbformat.v4.new_code_cell(PEAK_CELL)
    nb.cells.append(peak)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:
        return {"error": str(e).splitlines()[-1][:300] if str(e) else type(e).__name__}
    seconds = time.perf_counter() - t0
    out = "".join(o.get("text", "") for o in peak.outputs)
    m = re.search(r"PEAK_KB (\d+) (\d+)", out)
    peak_mb = round(max(int(m.group(1)), int(m.group(2))) / 1024) if m else None
    nb.cells.pop()
    if inplace:
        clean(nb)
        nbformat.write(nb, path)
    return {"seconds": round(seconds, 1), "peak_mb": peak_mb}


def unet_call_seconds() -> float | None:
    """One timed UNet call on this machine (the doctor predicts run times from it), if the doctor exists."""
    try:
        sys.path.insert(0, str(ROOT))
        from helpers.doctor import time_unet_call
        from helpers.loading import load_pipeline
        return round(float(time_unet_call(load_pipeline("toy"))), 4)
    except ImportError:
        return None


def fmt_time(s: float) -> str:
    return f"{s:.0f} s" if s < 100 else f"{s / 60:.1f} min"


def update_docs(results: dict) -> None:
    when, where = results.get("date", "?"), results.get("machine", "?")
    nbs = results["notebooks"]
    # notebook headers: the "**Run time**:" line
    for name, r in nbs.items():
        p = NOTEBOOKS / name
        if not p.exists() or "seconds" not in r:
            continue
        nb = nbformat.read(p, as_version=4)
        head = nb.cells[0]
        lines = head.source.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("**Run time**:"):
                gpu = line.split(";", 1)[1].strip() if ";" in line else ""
                lines[i] = (f"**Run time**: {fmt_time(r['seconds'])} on a 2-core CPU with the bundled model, peak "
                            f"memory {r['peak_mb']} MB (measured {when} by `bench/notebook_times.py`)"
                            + (f"; {gpu}" if gpu else "."))
        new = "\n".join(lines)
        if new != head.source:
            head.source = new
            nbformat.write(nb, p)
    # README: the time column of the notebook table and the line under it
    text = README.read_text()
    for name, r in nbs.items():
        if "seconds" not in r:
            continue
        pat = re.compile(r"^(\| \[[^\]]*\]\(notebooks/" + re.escape(name) + r"\).*?\| [^|]*\| )([^|]*)(\|.*)$", re.M)
        text = pat.sub(lambda m: f"{m.group(1)}{fmt_time(r['seconds'])}, {r['peak_mb']} MB {m.group(3)}", text)
    total = sum(r.get("seconds", 0) for r in nbs.values())
    line = (f"CPU (toy): wall time and peak resident memory of each notebook, measured {when} on {where} by "
            f"`python bench/notebook_times.py` (all {len(nbs)} together: {fmt_time(total)}); GPU times are "
            "estimates for a Colab T4, not yet measured.")
    text = re.sub(r"^CPU (times?|\(toy\)).*$", line.replace("\\", "\\\\"), text, count=1, flags=re.M)
    README.write_text(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb")
    ap.add_argument("--inplace", action="store_true", help="save the executed, cleaned outputs into each notebook")
    ap.add_argument("--update-docs", action="store_true", help="rewrite README and notebook headers from the results")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    ap.add_argument("--results", type=Path, default=RESULTS, help=f"default: {RESULTS.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    # the kernels run as under `make test`: one sleeping-when-idle thread each (see the Makefile)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    results = json.loads(args.results.read_text()) if args.results.exists() else {"notebooks": {}}
    paths = args.notebooks or ([] if args.update_docs else sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")))
    failed = []
    for p in paths:
        p = p.resolve()
        print(f"{p.name} ...", end=" ", flush=True)
        r = run(p, args.timeout, args.inplace)
        print(r, flush=True)
        if "error" in r:
            failed.append(p.name)
        else:
            results["notebooks"][p.name] = r
    if paths and len(failed) < len(paths):  # record the notebooks that ran, even when another one failed
        results.update(date=str(date.today()), machine=machine(),
                       threads=f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
                               f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
        u = unet_call_seconds()
        if u is not None:
            results["unet_call_s"] = u
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        total = sum(r["seconds"] for r in results["notebooks"].values())
        print(f"all recorded notebooks: {total:.0f} s; slowest "
              f"{max(results['notebooks'].items(), key=lambda kv: kv[1]['seconds'])}")
    if args.update_docs:
        update_docs(results)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
