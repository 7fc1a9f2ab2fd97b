"""Every command in notebooks/TEACHING.md is run: cheap ones here, the others by a named test or by CI."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "notebooks" / "TEACHING.md"

# command -> the test (file::function) or CI step that runs it
ELSEWHERE = {
    "make setup": "CI: .ci/run runs `make test`, whose first step is `make setup`",
    "make test": "CI: .ci/run",
    "make lab": "tests/test_makefile.py::test_lab_starts_as_root",
    "make notebooks": "tests/test_makefile.py::test_notebooks_go_on_after_a_failure_and_name_it",
    "make wheelhouse": "tests/test_makefile.py::test_wheelhouse_then_offline_setup",
    "make setup WHEELHOUSE=wheelhouse": "tests/test_makefile.py::test_wheelhouse_then_offline_setup",
    "python -m helpers.set_repo_url https://github.com/YOU/YOUR-FORK": "tests/test_set_repo_url.py::test_command_line",
}


def commands():
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), re.S)
    return [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def run(cmd, env=None, timeout=300):
    """A command as a student types it, in an activated environment, from the repository."""
    venv = ROOT / ".venv" / "bin"
    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{venv}:{env['PATH']}" if venv.is_dir() else env["PATH"]
    return subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_command_is_covered():
    here = {"python -m helpers.doctor", "python -m helpers.doctor --model sd15", ". .venv/bin/activate",
            "python bench/threads_under_load.py"}
    missing = [c for c in commands() if c not in here and c not in ELSEWHERE]
    assert missing == [], f"commands in TEACHING.md that nothing runs: {missing}"
    for c in commands():
        where = ELSEWHERE.get(c, "")
        if "::" in where:
            path, func = where.split("::")
            assert f"def {func}(" in (ROOT / path).read_text(), where
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and re.search(r"^test: setup", (ROOT / "Makefile").read_text(), re.M)


def test_guide_is_linked_from_the_readme():
    assert "(notebooks/TEACHING.md)" in (ROOT / "README.md").read_text()


def test_doctor(tmp_path):
    out = run("python -m helpers.doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("VERDICT: READY")
    assert "Predicted run time" in out.stdout


def test_doctor_with_a_hub_model_offline_says_so_fast():
    out = run("python -m helpers.doctor --model sd15", env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 1
    assert "hub is switched off" in out.stdout and out.stdout.strip().splitlines()[-1].startswith(
        "VERDICT: NOT READY: 1 problem(s) (hub model)")


def test_activate_makes_torch_importable():
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        pytest.skip("no .venv")
    out = subprocess.run(["bash", "-c", ". .venv/bin/activate && python -c 'import torch, helpers.loading'"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_threads_under_load_shows_what_the_guide_says():
    """The guide says waiting threads that spin slow everything down under load: the default setting must be
    clearly slower than OMP_WAIT_POLICY=PASSIVE while another job runs."""
    out = run("python bench/threads_under_load.py", timeout=600)
    assert out.returncode == 0, out.stderr
    rows = {ln[:30].strip(): ln for ln in out.stdout.splitlines()}
    ratio = float(rows["torch defaults"].split()[-1].lstrip(">"))
    # "clearly slower": half again as long at least. ci-local runs measured 2.0 to 2.9; a bar at 2 failed once at 2.0
    assert ratio > 1.5, out.stdout
