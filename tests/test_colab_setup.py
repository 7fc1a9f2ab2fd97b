"""A rehearsed Colab start: the setup cell (helpers.colab.SETUP_CELL) run as Colab runs it, and the links that
must agree for a fork (badges, REPO_URL, requirements)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from helpers.colab import DEFAULT_REPO_URL, SETUP_CELL, cell_source, is_setup_cell, sync_setup_cells

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))

# Runs in a fresh Python, as a Colab kernel would: `google.colab` imported, the cell executed `runs` times in one
# namespace. pip is the real pip in dry-run mode against this environment, offline: it reports what it would change.
DRIVER = textwrap.dedent(r'''
    import json, os, subprocess, sys, types
    cell_file, report, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sys.modules["google"] = types.ModuleType("google")
    sys.modules["google.colab"] = types.ModuleType("google.colab")
    real_run, calls = subprocess.run, []
    def recording_run(cmd, *a, **k):
        calls[-1].append(list(cmd))
        if list(cmd[1:4]) == ["-m", "pip", "install"]:
            cmd = [*cmd, "--dry-run", "--no-index", "--report", report]
        return real_run(cmd, *a, **k)
    subprocess.run = recording_run
    ns = {}
    for _ in range(runs):
        calls.append([])
        exec(open(cell_file).read(), ns)
    import helpers.loading
    print(json.dumps({"calls": calls, "cwd": os.getcwd(), "helpers": helpers.loading.__file__,
                      "omp": os.environ.get("OMP_WAIT_POLICY"), "path_entries": sys.path.count(os.getcwd())}))
''')


def _run_cell(tmp_path, workdir, repo_url, runs):
    cell = tmp_path / "cell.py"
    cell.write_text(cell_source(repo_url))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    report = tmp_path / f"pip-report-{runs}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "PYTHONPATH")}
    out = subprocess.run([sys.executable, str(driver), str(cell), str(report), str(runs)], cwd=workdir, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), report


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
    if not (ROOT / ".git").exists():
        pytest.skip("needs the repository's git history to clone from")
    tmp = tmp_path_factory.mktemp("colab")
    content = tmp / "content"  # Colab's fresh working directory
    content.mkdir()
    first, report = _run_cell(tmp, content, f"file://{ROOT}", runs=2)
    return tmp, content, first, report


def test_clones_the_repository_and_helpers_import(colab):
    tmp, content, first, _ = colab
    clone = content / "repo"
    assert first["calls"][0][0][:2] == ["git", "clone"] and first["calls"][0][0][-1] == "repo"
    assert Path(first["cwd"]) == clone
    assert Path(first["helpers"]).resolve() == (clone / "helpers" / "loading.py").resolve()
    assert first["omp"] == "PASSIVE"  # set before torch is imported


def test_requirements_install_leaves_torch_alone(colab):
    tmp, content, first, report = colab
    pip = [c for c in first["calls"][0] if c[1:4] == ["-m", "pip", "install"]]
    assert len(pip) == 1 and ["-r", "repo/requirements.txt"] == pip[0][5:7] and "-c" in pip[0]
    import torch
    held = (content / "repo" / ".held.txt").read_text().split()
    assert f"torch=={torch.__version__}" in held  # the installed torch is held at its exact version
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not [ln for ln in lines if ln.lower().startswith("torch")], "requirements.txt must not name torch"
    would = json.loads(report.read_text())["install"]
    assert [i["metadata"]["name"] for i in would if i["metadata"]["name"].lower().startswith("torch")] == []


def test_second_run_and_kernel_restart_are_no_ops(colab):
    tmp, content, first, _ = colab
    assert first["calls"][1] == []  # the second run in the same kernel
    assert first["path_entries"] == 1  # and `helpers` is on sys.path once
    restarted, _ = _run_cell(tmp, content, f"file://{ROOT}", runs=1)  # Runtime > Restart: cwd is /content again
    assert restarted["calls"] == [[]]
    assert Path(restarted["cwd"]) == content / "repo"


def test_parameters_cells_take_the_gpu_path_when_cuda_is_present(monkeypatch):
    import torch

    from helpers.loading import MODELS, default_inpaint_model, is_bundled, resolve_model
    monkeypatch.delenv("DIFFUSION_MODEL", raising=False)
    for nb_path in NOTEBOOKS:
        nb = nbformat.read(nb_path, as_version=4)
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, nb_path.name
        for cuda, want_toy in ((True, False), (False, True)):
            monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
            ns = {}
            exec(params[0].source, ns)
            model = resolve_model(ns["MODEL"])
            assert is_bundled(model) == want_toy, (nb_path.name, cuda)
            inpaint = ns.get("INPAINT_MODEL")
            if inpaint == "auto":  # resolved after loading, as notebook 02's loading cell does
                inpaint = default_inpaint_model(model)
            if cuda:
                assert model == MODELS["sd15"]
                if "INPAINT_MODEL" in ns:
                    assert resolve_model(inpaint) == MODELS["sd15-inpaint"]
            elif "INPAINT_MODEL" in ns:  # the toy model gets its own inpainting checkpoint
                assert resolve_model(inpaint) == MODELS["toy-inpaint"]


def test_outside_colab_the_cell_only_makes_helpers_importable(tmp_path):
    ns = {}
    cwd, path = os.getcwd(), list(sys.path)
    try:
        os.chdir(ROOT / "notebooks")
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
        before = set(os.listdir(ROOT))
        exec(SETUP_CELL, ns)  # no google.colab here: nothing is cloned or installed
        assert set(os.listdir(ROOT)) == before and Path.cwd() == ROOT / "notebooks"
        assert sys.path[0] == str(ROOT)
    finally:
        os.chdir(cwd)
        sys.path[:] = path


def test_sync_setup_cells_keeps_ids_outputs_and_each_fork(tmp_path):
    copies = []
    for p in NOTEBOOKS[:2]:
        shutil.copy(p, tmp_path / p.name)
        copies.append(tmp_path / p.name)
    fork = "https://github.com/teacher/fork"
    nb = nbformat.read(copies[1], as_version=4)
    cell = next(c for c in nb.cells if is_setup_cell(c))
    cell.source = cell.source.replace(DEFAULT_REPO_URL, fork)
    nbformat.write(nb, copies[1])
    before = [nbformat.read(p, as_version=4) for p in copies]
    sync_setup_cells(copies)
    for p, old in zip(copies, before):
        new = nbformat.read(p, as_version=4)
        assert [c.id for c in new.cells] == [c.id for c in old.cells]
        assert [c.get("outputs") for c in new.cells] == [c.get("outputs") for c in old.cells]
        setup = [c.source for c in new.cells if is_setup_cell(c)]
        assert setup == [cell_source(fork if p == copies[1] else DEFAULT_REPO_URL)]
    assert sync_setup_cells(copies) == []  # a second sync changes nothing
    bare = tmp_path / "bare.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), bare)
    with pytest.raises(ValueError, match="setup cell"):
        sync_setup_cells([bare])


def test_notebooks_carry_the_current_setup_cell():
    """Every notebook's setup cell is helpers.colab.SETUP_CELL (with its REPO_URL): `python -m helpers.colab
    notebooks/*.ipynb` brings them in step."""
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        cells = [c.source for c in nb.cells if is_setup_cell(c)]
        assert len(cells) == 1, p.name
        url = cells[0].split('REPO_URL = "', 1)[1].split('"', 1)[0]
        assert cells[0] == cell_source(url), f"{p.name}: run `python -m helpers.colab notebooks/*.ipynb`"


def test_command_line_help_and_missing_notebook():
    run = lambda *a: subprocess.run([sys.executable, "-m", "helpers.colab", *a], cwd=ROOT, capture_output=True,
                                    text=True)
    h = run("--help")
    assert h.returncode != 0 and "SETUP_CELL" in h.stderr and "Traceback" not in h.stderr
    m = run("notebooks/no_such.ipynb")
    assert m.returncode != 0 and "no such notebook: notebooks/no_such.ipynb" in m.stderr
