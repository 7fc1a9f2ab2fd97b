"""The Makefile as a classroom meets it: root in a container, a failing notebook, no network, saving in Lab.

Every target runs from a copy of the Makefile in a temporary folder, with this repository's .venv marked up to date
(`-o`), so that nothing here rebuilds the environment or changes this repository's files or git configuration."""
import json
import os
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None or not (VENV / ".installed").exists(),
                                reason="needs make and the .venv that `make setup` builds")


def make(tmp, *args, env=None, timeout=600, venv=VENV):
    shutil.copy(ROOT / "Makefile", tmp / "Makefile")
    cmd = [MAKE, "-C", str(tmp), f"VENV={venv}", f"REQS={ROOT / 'requirements.txt'}", "-o",
           f"{VENV}/.installed", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or os.environ.copy())


def fake_id(tmp, uid):
    bindir = tmp / f"bin{uid}"
    bindir.mkdir()
    (bindir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (bindir / "id").chmod(0o755)
    return dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")


def test_lab_passes_allow_root_only_as_root(tmp_path):
    as_root = make(tmp_path, "-n", "lab", env=fake_id(tmp_path, 0)).stdout
    lab = [ln for ln in as_root.splitlines() if "jupyter lab" in ln]
    assert len(lab) == 1 and "--allow-root" in lab[0]
    as_user = make(tmp_path, "-n", "lab", env=fake_id(tmp_path, 1000)).stdout
    lab = [ln for ln in as_user.splitlines() if "jupyter lab" in ln]
    assert len(lab) == 1 and "--allow-root" not in lab[0]
    assert "OMP_WAIT_POLICY ?= PASSIVE" in (ROOT / "Makefile").read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="shows the root case only when run as root")
def test_lab_starts_as_root(tmp_path):
    """Jupyter refuses root without --allow-root; `make lab` must start anyway (as in a container)."""
    (tmp_path / "notebooks").mkdir()
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    proc = subprocess.Popen([MAKE, "-C", str(tmp_path), f"VENV={VENV}", f"REQS={ROOT / 'requirements.txt'}", "-o",
                             f"{VENV}/.installed", "lab", "LAB_ARGS=--no-browser --port=18931 "
                             "--ServerApp.port_retries=50"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    seen = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "is running at" in line:
                break
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    text = "".join(seen)
    assert "is running at" in text, text[-2000:]
    assert "--allow-root" in text


def _notebook(path, code):
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)],
                                            metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                     "display_name": "Python 3 (ipykernel)"}}), path)


def test_notebooks_go_on_after_a_failure_and_name_it(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "a_broken.ipynb", "raise RuntimeError('a broken notebook')")
    _notebook(nbs / "b_fine.ipynb", "print(6 * 7)")
    out = make(tmp_path, "notebooks", f"NOTEBOOKS={nbs / 'a_broken.ipynb'} {nbs / 'b_fine.ipynb'}",
               f"NB_OUT={tmp_path / 'out'}")
    assert out.returncode != 0
    assert (tmp_path / "out" / "b_fine.html").exists()  # the notebook after the failing one still ran
    assert not (tmp_path / "out" / "a_broken.html").exists()
    assert f"Notebooks that failed: {nbs / 'a_broken.ipynb'}" in out.stdout


def test_make_test_names_each_notebook_and_ends_with_pytest_summary(tmp_path):
    dry = make(tmp_path, "-n", "test").stdout
    assert "-p tests.progress_plugin" in dry and "--nbval-lax" in dry
    _notebook(tmp_path / "tiny.ipynb", "x = 1")
    (tmp_path / "test_unit.py").write_text("def test_one():\n    assert 1\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([str(VENV / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                          "tests.progress_plugin", "test_unit.py", "--nbval-lax", "--nbval-current-env",
                          "tiny.ipynb"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "running tiny.ipynb" in lines
    assert any(ln.strip().startswith("tiny.ipynb:") and ln.strip().endswith(" s") for ln in lines)
    assert "passed" in lines[-1] and lines[-1].startswith("2 passed")


def _wheel(folder: Path, name: str, version: str, requires=()):
    """A minimal pure-Python wheel (a stand-in for torch and the requirements)."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    files = {f"{name.replace('-', '_')}.py": "OK = True\n", f"{dist}.dist-info/METADATA": meta,
             f"{dist}.dist-info/WHEEL":
                 "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_wheelhouse_then_offline_setup(tmp_path):
    """`make wheelhouse` downloads what setup installs; `make setup WHEELHOUSE=dir` installs it with no index.
    Stand-ins: a local package index with two tiny packages ("torch" and one requirement that depends on it)."""
    src, index = tmp_path / "src", tmp_path / "index"
    src.mkdir()
    wheels = [_wheel(src, "probe-torch", "1.0"), _wheel(src, "probe-lib", "2.0", ["probe-torch>=1"])]
    for w in wheels:  # a file:// "simple" index, as pip reads one
        d = index / w.name.split("-")[0].replace("_", "-")
        d.mkdir(parents=True)
        (d / "index.html").write_text(f'<a href="{w.as_uri()}">{w.name}</a>\n')
    reqs = tmp_path / "req.txt"
    reqs.write_text("probe-lib==2.0\n")
    common = [f"REQS={reqs}", "TORCH=probe-torch==1.0", f"PYTHON={VENV / 'bin' / 'python'}"]
    env = dict(os.environ, PIP_INDEX_URL=index.as_uri(), PIP_DISABLE_PIP_VERSION_CHECK="1")
    out = make(tmp_path, "wheelhouse", f"WHEELHOUSE={tmp_path / 'wh'}", *common, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in (tmp_path / "wh").iterdir()) == sorted(w.name for w in wheels)
    # the room's machine: no index at all (an unreachable one, to be sure), only the copied folder
    env = dict(os.environ, PIP_INDEX_URL="http://127.0.0.1:9/unreachable", PIP_DISABLE_PIP_VERSION_CHECK="1")
    venv = tmp_path / "venv"
    out = make(tmp_path, "setup", f"WHEELHOUSE={tmp_path / 'wh'}", *common, env=env, venv=venv)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "--no-index" in out.stdout
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import probe_torch, probe_lib"], timeout=60)
    assert check.returncode == 0 and (venv / ".installed").exists()


def _lab_save(paths, kernel_name="python3"):
    """What opening and saving a notebook in JupyterLab writes: the kernelspec of the running kernel and the
    language_info of its kernel_info reply, serialised as the Jupyter server serialises (nbformat)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import start_new_kernel
    spec = KernelSpecManager().get_kernel_spec(kernel_name)
    km, kc = start_new_kernel(kernel_name=kernel_name)
    try:
        kc.kernel_info()
        reply = kc.get_shell_msg(timeout=60)
        while reply["msg_type"] != "kernel_info_reply":
            reply = kc.get_shell_msg(timeout=60)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    for path in paths:
        nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        nb.metadata["kernelspec"] = {"display_name": spec.display_name, "language": spec.language,
                                     "name": kernel_name}
        nb.metadata["language_info"] = reply["content"]["language_info"]
        nbformat.write(nb, path)


def test_saving_an_unchanged_notebook_leaves_no_diff(tmp_path):
    """The notebooks carry the metadata JupyterLab writes when it saves them with this environment's kernel, so
    opening and saving one changes no byte. (A git clean filter cannot do this: `git status` reports a file whose
    size changed as modified without running the filter.)"""
    for p in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
        shutil.copy(p, tmp_path / p.name)
    copies = sorted(tmp_path.glob("*.ipynb"))
    _lab_save(copies)
    changed = [p.name for p in copies if p.read_bytes() != (ROOT / "notebooks" / p.name).read_bytes()]
    assert changed == [], (f"saving in JupyterLab rewrites the metadata of {changed}: store kernelspec "
                           f"{json.dumps(nbformat.read(copies[0], as_version=4).metadata.kernelspec)} and the "
                           f"kernel's language_info")
