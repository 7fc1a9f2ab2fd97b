"""Is this machine ready for the course? One command checks it and gives one verdict.

    python -m helpers.doctor                  # versions, bundled model, CPU/GPU, widgets, threads, a timed UNet call
    python -m helpers.doctor --model sd15     # also: can a hub model be fetched from here?
    python -m helpers.doctor --skip-timing    # leave out the timed UNet call (and the run-time predictions)

In a notebook: `from helpers.doctor import run; run()` prints the same report and returns the exit code.
It exits 0 when the course will run (warnings are listed, with their fix) and 1 when something is broken, with the
fix for each problem. Each notebook's run time here is predicted from one timed UNet call, scaled by the ratio to
the reference call recorded with the notebooks' measured times in bench/results/notebook_times.json.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements.txt"
MAKEFILE = ROOT / "Makefile"
TIMES = ROOT / "bench" / "results" / "notebook_times.json"
OK, WARN, FAIL = "ok", "warning", "PROBLEM"
HUB_TIMEOUT_S = 5.0
SETUP_FIX = "run `make setup` (or `pip install -r requirements.txt` in the course's environment)"


@dataclass
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    detail: str
    fix: str = ""


# ---------------------------------------------------------------------------------------------------------------------
# versions
def on_colab() -> bool:
    """In a Colab kernel `google.colab` is imported; in a `!python ...` subprocess there, COLAB_RELEASE_TAG is set."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def torch_pin(makefile: Path = MAKEFILE) -> str | None:
    """The torch requirement `make setup` installs: $TORCH if set (as `make ... TORCH=...` passes it), else the
    Makefile's `TORCH ?=` line."""
    if os.environ.get("TORCH"):
        return os.environ["TORCH"].strip()
    if makefile.is_file():
        m = re.search(r"^TORCH\s*\?=\s*(\S+)", makefile.read_text(), re.M)
        if m:
            return m.group(1)
    return None


def requirements(path: Path = REQUIREMENTS) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(line)
    return out


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def check_versions(reqs: list[str] | None = None, pin: str | None = None, installed=_installed,
                   colab: bool | None = None) -> list[Check]:
    """Python, torch (against the Makefile's pin; on Colab the preinstalled one is accepted) and every line of
    requirements.txt (diffusers and transformers are named in the report)."""
    from packaging.requirements import Requirement
    from packaging.version import Version
    reqs = requirements() if reqs is None else reqs
    pin = torch_pin() if pin is None else pin
    colab = on_colab() if colab is None else colab
    checks = []
    py = sys.version_info
    if py < (3, 10):
        checks.append(Check("python", FAIL, f"Python {py.major}.{py.minor} is too old for the pinned libraries",
                            "use Python 3.11 (the version the course is tested with): `make setup PYTHON=python3.11`"))
    else:
        checks.append(Check("python", OK if py[:2] == (3, 11) else WARN,
                            f"Python {py.major}.{py.minor}.{py.micro}"
                            + ("" if py[:2] == (3, 11) else " (the course is tested with 3.11)"),
                            "" if py[:2] == (3, 11) else
                            "if something fails, use 3.11: `make setup PYTHON=python3.11`"))
    tv = installed("torch")
    if tv is None:
        checks.append(Check("torch", FAIL, "torch is not installed in this Python (" + sys.executable + ")",
                            "activate the course's environment (`. .venv/bin/activate`) or run `make setup`"))
    elif colab:
        checks.append(Check("torch", OK, f"torch {tv} (Colab's preinstalled build, kept on purpose)"))
    elif pin:
        r = Requirement(pin)
        if r.specifier.contains(Version(tv).public, prereleases=True):
            checks.append(Check("torch", OK, f"torch {tv} (pinned: {pin})"))
        else:
            checks.append(Check("torch", FAIL, f"torch {tv} is installed, but the course pins {pin}",
                                f"install the pinned build: `make setup` in a fresh clone, or `pip install \"{pin}\" "
                                f"--index-url <PyTorch's CPU wheel index>` (see PyTorch's install page); to choose "
                                f"another build on purpose, pass it: `make doctor TORCH=\"torch=={tv}\"`"))
    else:
        checks.append(Check("torch", WARN, f"torch {tv}; no pin found (Makefile missing?)", "run from the repository"))
    bad, named = [], {}
    for line in reqs:
        r = Requirement(line)
        v = installed(r.name)
        if r.name.lower() in ("diffusers", "transformers"):
            named[r.name] = (v, str(r.specifier))
        if v is None:
            bad.append(f"{r.name} is missing (needs {r.specifier or 'any version'})")
        elif not r.specifier.contains(Version(v), prereleases=True):
            bad.append(f"{r.name} {v} does not satisfy {r}")
    summary = ", ".join(f"{n} {v or 'missing'} (needs {s})" for n, (v, s) in named.items())
    if bad:
        checks.append(Check("requirements", FAIL, "; ".join(bad) + (f"; {summary}" if summary else ""), SETUP_FIX))
    else:
        checks.append(Check("requirements", OK, f"{summary}; all {len(reqs)} lines of requirements.txt satisfied"))
    return checks


# ---------------------------------------------------------------------------------------------------------------------
# the model
def check_model(model: str | None = None, load=True):
    """Is the bundled model there and does it load? Returns (checks, pipe or None)."""
    from .loading import BUNDLED, check_bundled, is_bundled, load_pipeline, resolve_model
    checks, pipe = [], None
    try:
        check_bundled(BUNDLED)
    except (FileNotFoundError, ValueError) as e:
        return [Check("bundled model", FAIL, f"not usable: {e}",
                      "restore it with `git checkout -- data/toy-sd` (or clone the repository again)")], None
    from .loading import BUNDLED_INPAINT
    try:
        check_bundled(BUNDLED_INPAINT)
        checks.append(Check("inpainting checkpoint", OK, f"found in {BUNDLED_INPAINT.relative_to(ROOT)} "
                                                          "(notebook 02)"))
    except (FileNotFoundError, ValueError) as e:
        checks.append(Check("inpainting checkpoint", FAIL, f"not usable: {e}",
                            "restore it with `git checkout -- data/toy-sd-inpaint` (notebook 02 needs it)"))
    if not load:
        return checks + [Check("bundled model", OK, f"found in {BUNDLED.relative_to(ROOT)} (not loaded)")], None
    t0 = time.perf_counter()
    try:
        pipe = load_pipeline("toy", device="cpu")
    except Exception as e:  # noqa: BLE001 -- any failure here is reported with its fix
        return [Check("bundled model", FAIL, f"found but does not load: {type(e).__name__}: {e}",
                      "check the versions above first; then restore it with `git checkout -- data/toy-sd`")], None
    checks.insert(0, Check("bundled model", OK, f"loads in {time.perf_counter() - t0:.1f} s "
                                             f"({BUNDLED.relative_to(ROOT)})"))
    if model is not None and not is_bundled(resolve_model(model)):
        checks.append(check_hub(resolve_model(model)))
    return checks, pipe


def _hub_probe(repo_id: str):
    """Ask the hub for one small file of `repo_id` (raises on failure)."""
    from huggingface_hub import HfApi
    HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)


def check_hub(model_id: str, probe=_hub_probe, timeout: float = HUB_TIMEOUT_S) -> Check:
    """Can `model_id` (a hub id or a local folder) be used from here? Never waits more than `timeout` seconds."""
    if Path(model_id).exists():
        return Check("hub model", OK, f"{model_id} is a local folder")
    cached = False
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = isinstance(try_to_load_from_cache(model_id, "model_index.json"), str)
    except Exception:  # noqa: BLE001 -- a malformed id is reported by the probe below
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline:
        if cached:
            return Check("hub model", OK, f"{model_id} is in the local cache (the hub is switched off: "
                                          f"HF_HUB_OFFLINE=1, which the Makefile sets)")
        return Check("hub model", FAIL, f"{model_id} was asked for, but the hub is switched off here "
                                        f"(HF_HUB_OFFLINE=1, which the Makefile sets) and it is not in the cache",
                     f"with a network, run `HF_HUB_OFFLINE=0 python -m helpers.doctor --model {model_id}` "
                     f"(the first load downloads it); without one, use the bundled model (MODEL = \"toy\")")
    result: dict = {}

    def target():
        try:
            probe(model_id)
            result["ok"] = True
        except Exception as e:  # noqa: BLE001
            result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    th = threading.Thread(target=target, daemon=True)
    t0 = time.perf_counter()
    th.start()
    th.join(timeout)
    took = time.perf_counter() - t0
    if result.get("ok"):
        return Check("hub model", OK, f"{model_id} is reachable on the hub ({took:.1f} s)"
                     + (" and already in the local cache" if cached else ""))
    why = result.get("error", f"no answer within {timeout:.0f} s")
    if cached:
        return Check("hub model", WARN, f"the hub does not answer ({why}), but {model_id} is in the local cache",
                     "set HF_HUB_OFFLINE=1 to load it from the cache without waiting for the network")
    return Check("hub model", FAIL, f"{model_id} cannot be fetched: {why}",
                 "check the network (or a proxy) on this machine; without one, use the bundled model "
                 "(MODEL = \"toy\")")


# ---------------------------------------------------------------------------------------------------------------------
# hardware, threads, widgets
def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_hardware() -> list[Check]:
    import torch
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        enough = total >= 6 * 2**30
        return [Check("device", OK if enough else WARN,
                      f"GPU: {p.name}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free); real Stable Diffusion "
                      f"runs in float16", "" if enough else "real SD needs ~4 GB of GPU memory: use MODEL = \"toy\"")]
    mem = ""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        mem = f", {int(info['MemAvailable'].split()[0]) / 2**20:.1f} GiB of memory available"
    except (OSError, KeyError, ValueError):
        pass
    return [Check("device", OK, f"CPU: {_cores()} cores usable, torch uses {torch.get_num_threads()} threads{mem} "
                                f"(no GPU: the notebooks run the bundled model)")]


def check_threads(env=None, cores: int | None = None, load: float | None = None) -> Check:
    """OpenMP settings: a waiting thread must sleep (OMP_WAIT_POLICY=PASSIVE), or one other busy job on the machine
    slows every UNet call many times over (bench/threads_under_load.py measures it)."""
    env = os.environ if env is None else env
    cores = _cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    policy, n = env.get("OMP_WAIT_POLICY"), env.get("OMP_NUM_THREADS")
    detail = (f"OMP_WAIT_POLICY={policy or '(unset)'}, OMP_NUM_THREADS={n or '(unset: one thread per core)'}, "
              f"{cores} cores, load average {load:.1f}")
    advice = (f"`export OMP_WAIT_POLICY=PASSIVE` before starting Jupyter or Python (the Makefile's targets and the "
              f"notebooks' setup cell set it); where k notebooks share this machine, also "
              f"`export OMP_NUM_THREADS={max(1, cores // 2)}` (cores ÷ k)")
    if (policy or "").upper() != "PASSIVE":
        return Check("threads", WARN, detail + ": waiting threads spin, and any other job on the CPU slows each "
                                               "UNet call many times over", advice)
    if n is None and load > 0.5 * cores:
        return Check("threads", WARN, detail + ": other jobs are using the CPU",
                     f"give each notebook its share: `export OMP_NUM_THREADS={max(1, cores // 2)}` (cores ÷ "
                     f"number of notebooks running at once)")
    return Check("threads", OK, detail)


def _labextension_dirs() -> list[Path]:
    try:
        from jupyter_core.paths import jupyter_path
        return [Path(p) for p in jupyter_path("labextensions")]
    except ImportError:
        return [Path(sys.prefix) / "share" / "jupyter" / "labextensions"]


def check_widgets(find_spec=importlib.util.find_spec, labext_dirs: list[Path] | None = None,
                  colab: bool | None = None) -> Check:
    """Sliders need ipywidgets in the kernel and, in JupyterLab, the widget manager extension."""
    colab = on_colab() if colab is None else colab
    if find_spec("ipywidgets") is None:
        return Check("widgets", FAIL, "ipywidgets is not installed: sliders show as text or not at all",
                     "`pip install -r requirements.txt` (or `make setup`)")
    v = _installed("ipywidgets") or "?"
    if colab:
        return Check("widgets", OK, f"ipywidgets {v} (Colab draws widgets itself)")
    dirs = _labextension_dirs() if labext_dirs is None else labext_dirs
    manager = [d / "@jupyter-widgets" / "jupyterlab-manager" for d in dirs]
    if not any(m.is_dir() for m in manager):
        return Check("widgets", FAIL, f"ipywidgets {v} is installed, but JupyterLab's widget extension "
                                      f"(@jupyter-widgets/jupyterlab-manager) is not: sliders will not show",
                     "`pip install jupyterlab_widgets` in the environment that runs `jupyter lab`, then restart it")
    return Check("widgets", OK, f"ipywidgets {v} with JupyterLab's widget manager extension")


# ---------------------------------------------------------------------------------------------------------------------
# one timed UNet call and the predicted run times
def time_unet_call(pipe, repeats: int = 5, warmup: int = 1) -> float:
    """Seconds for one guided UNet call (batch 2: conditional + unconditional) at the pipeline's native latent size,
    the median of `repeats` calls after `warmup` untimed ones, under torch.no_grad(). The unit in which the
    notebooks' run times are compared between machines."""
    import torch
    unet = pipe.unet
    p = next(unet.parameters())
    side = unet.config.sample_size
    side = side if isinstance(side, int) else side[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, side, side, generator=g).to(p.device, p.dtype)
    ctx = torch.randn(2, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, generator=g)
    ctx = ctx.to(p.device, p.dtype)
    t = torch.tensor([500, 500], device=p.device)
    sync = torch.cuda.synchronize if p.device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            unet(x, t, encoder_hidden_states=ctx)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def predict_times(unet_s: float, times_file: Path = TIMES) -> tuple[dict[str, float] | None, str]:
    """Each notebook's predicted seconds here: its measured time × (this machine's UNet call ÷ the reference's)."""
    if not times_file.is_file():
        shown = times_file.relative_to(ROOT) if times_file.is_relative_to(ROOT) else times_file
        return None, (f"no prediction available: {shown} does not exist (it is written by "
                      f"`python bench/notebook_times.py`)")
    try:
        ref = json.loads(times_file.read_text())
        ref_unet = float(ref["unet_call_s"])
        nbs = {k: float(v["seconds"]) for k, v in ref["notebooks"].items()}
    except (ValueError, KeyError, TypeError) as e:
        return None, f"no prediction available: {times_file.name} lacks the reference UNet call time ({e!r})"
    if ref_unet <= 0:
        return None, "no prediction available: the reference UNet call time is not positive"
    ratio = unet_s / ref_unet
    where = f" on {ref['machine']}" if ref.get("machine") else ""
    return {k: s * ratio for k, s in nbs.items()}, (
        f"one UNet call takes {unet_s * 1e3:.1f} ms here, {ratio:.2f}× the reference{where}")


# ---------------------------------------------------------------------------------------------------------------------
# report
def verdict(checks: list[Check]) -> tuple[str, int]:
    fails = [c for c in checks if c.status == FAIL]
    warns = [c for c in checks if c.status == WARN]
    if fails:
        return (f"VERDICT: NOT READY: {len(fails)} problem(s) ({', '.join(c.name for c in fails)}); "
                f"fix them as listed above and run `python -m helpers.doctor` again"), 1
    if warns:
        return (f"VERDICT: READY, with {len(warns)} warning(s) ({', '.join(c.name for c in warns)}); "
                f"the course runs, the fixes above make it run better"), 0
    return "VERDICT: READY: the course runs on this machine", 0


def _print(c: Check, out):
    mark = {OK: "  ok ", WARN: " warn", FAIL: "FAIL "}[c.status]
    print(f"[{mark}] {c.name:14s} {c.detail}", file=out)
    if c.fix and c.status != OK:
        print(f"{'':8s}{'':14s} fix: {c.fix}", file=out)


def run(model: str | None = None, timing: bool = True, pipe=None, out=None) -> int:
    """Print the report and the verdict; return the exit code (0 ready, 1 broken)."""
    out = out or sys.stdout
    checks = check_versions()
    for c in checks:
        _print(c, out)
    if any(c.status == FAIL and c.name == "torch" for c in checks):
        more = []  # without torch nothing below can run
    else:
        if pipe is None:
            more, pipe = check_model(model)
        else:
            from .loading import is_bundled, resolve_model
            more = [Check("bundled model", OK, "already loaded in this session")]
            if model is not None and not is_bundled(resolve_model(model)):
                more.append(check_hub(resolve_model(model)))
        more += check_hardware()
    more += [check_threads(), check_widgets()]
    for c in more:
        _print(c, out)
    checks += more
    if timing and pipe is not None:
        unet_s = time_unet_call(pipe)
        pred, note = predict_times(unet_s)
        print(f"\nPredicted run time of each notebook here, with the bundled model ({note}):", file=out)
        if pred:
            for name, s in pred.items():
                print(f"  {name:55s} ~{s:5.0f} s", file=out)
            print("  (a rough guide: notebooks also spend time outside the UNet)", file=out)
    line, code = verdict(checks)
    print("\n" + line, file=out)
    return code


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="also check this model: a short name (sd15), a hub id or a folder")
    ap.add_argument("--skip-timing", action="store_true", help="leave out the timed UNet call")
    a = ap.parse_args(argv)
    sys.exit(run(a.model, timing=not a.skip_timing))


if __name__ == "__main__":
    main()
