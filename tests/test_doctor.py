"""`python -m helpers.doctor`: each failure it must catch, its verdict line and its exit code."""
import io
import json
import os
import subprocess
import sys
import time

import pytest

from helpers import doctor
from helpers.doctor import FAIL, OK, WARN, Check

REQS = ["diffusers==0.42.1", "transformers==5.23.0", "ipywidgets>=8"]
GOOD = {"torch": "2.13.0+cpu", "diffusers": "0.42.1", "transformers": "5.23.0", "ipywidgets": "8.1.9"}


def by_name(checks):
    return {c.name: c for c in checks}


def test_versions_ok_and_the_named_ones_are_reported():
    c = by_name(doctor.check_versions(REQS, "torch==2.13.0", GOOD.get, colab=False))
    assert c["torch"].status == OK and c["requirements"].status == OK
    assert "diffusers 0.42.1" in c["requirements"].detail and "transformers 5.23.0" in c["requirements"].detail


def test_wrong_torch_version_is_a_problem_with_its_fix_but_colab_keeps_its_own():
    wrong = dict(GOOD, torch="2.5.1+cu121")
    c = by_name(doctor.check_versions(REQS, "torch==2.13.0", wrong.get, colab=False))["torch"]
    assert c.status == FAIL and "2.5.1" in c.detail and "torch==2.13.0" in c.fix
    c = by_name(doctor.check_versions(REQS, "torch==2.13.0", wrong.get, colab=True))["torch"]
    assert c.status == OK and "Colab" in c.detail
    gpu_build = dict(GOOD, torch="2.13.0+cu126")  # the same release, another build: fine
    assert by_name(doctor.check_versions(REQS, "torch==2.13.0", gpu_build.get, colab=False))["torch"].status == OK
    missing = {k: v for k, v in GOOD.items() if k != "torch"}
    c = by_name(doctor.check_versions(REQS, "torch==2.13.0", missing.get, colab=True))["torch"]
    assert c.status == FAIL and ".venv/bin/activate" in c.fix


def test_requirements_mismatch_and_missing_package():
    bad = dict(GOOD, diffusers="0.30.0")
    del bad["ipywidgets"]
    c = by_name(doctor.check_versions(REQS, "torch==2.13.0", bad.get, colab=False))["requirements"]
    assert c.status == FAIL and "diffusers 0.30.0" in c.detail and "ipywidgets is missing" in c.detail
    assert "make setup" in c.fix


def test_torch_pin_comes_from_the_makefile_or_TORCH(monkeypatch):
    monkeypatch.delenv("TORCH", raising=False)
    assert doctor.torch_pin() == "torch==2.13.0"
    monkeypatch.setenv("TORCH", "torch==2.5.1")  # `make doctor TORCH=...` passes the choice on
    assert doctor.torch_pin() == "torch==2.5.1"


def test_missing_model_folder(monkeypatch, tmp_path):
    import helpers.loading
    monkeypatch.setattr(helpers.loading, "BUNDLED", tmp_path / "toy-sd")
    checks, pipe = doctor.check_model()
    assert pipe is None and checks[0].status == FAIL
    assert "model_index.json" in checks[0].detail and "git checkout -- data/toy-sd" in checks[0].fix


def test_bundled_model_loads():
    checks, pipe = doctor.check_model()
    assert checks[0].status == OK and pipe is not None and pipe.unet is not None


def test_no_widgets(tmp_path):
    c = doctor.check_widgets(find_spec=lambda name: None, labext_dirs=[], colab=False)
    assert c.status == FAIL and "ipywidgets is not installed" in c.detail
    present = lambda name: object()  # noqa: E731
    c = doctor.check_widgets(find_spec=present, labext_dirs=[tmp_path], colab=False)
    assert c.status == FAIL and "jupyterlab-manager" in c.detail and "jupyterlab_widgets" in c.fix
    (tmp_path / "@jupyter-widgets" / "jupyterlab-manager").mkdir(parents=True)
    assert doctor.check_widgets(find_spec=present, labext_dirs=[tmp_path], colab=False).status == OK
    assert doctor.check_widgets().status == OK  # this environment, as `make setup` made it


def test_hub_check_is_fast_and_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = doctor.check_hub("someone/not-cached-model")
    assert c.status == FAIL and "HF_HUB_OFFLINE=1" in c.detail and "toy" in c.fix
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    t0 = time.perf_counter()
    c = doctor.check_hub("someone/model", probe=lambda repo: time.sleep(30), timeout=0.5)  # a hanging network
    assert time.perf_counter() - t0 < 5 and c.status == FAIL and "no answer within" in c.detail

    def refused(repo):
        raise ConnectionError("connection refused")
    c = doctor.check_hub("someone/model", probe=refused, timeout=2)
    assert c.status == FAIL and "ConnectionError" in c.detail
    assert doctor.check_hub("someone/model", probe=lambda repo: None, timeout=2).status == OK


def test_thread_advice():
    c = doctor.check_threads(env={}, cores=4, load=0.0)
    assert c.status == WARN and "OMP_WAIT_POLICY=PASSIVE" in c.fix
    assert doctor.check_threads(env={"OMP_WAIT_POLICY": "PASSIVE"}, cores=4, load=0.2).status == OK
    c = doctor.check_threads(env={"OMP_WAIT_POLICY": "PASSIVE"}, cores=4, load=3.5)  # others use the CPU
    assert c.status == WARN and "OMP_NUM_THREADS=2" in c.fix
    assert doctor.check_threads(env={"OMP_WAIT_POLICY": "passive", "OMP_NUM_THREADS": "1"}, cores=4,
                                load=3.5).status == OK


def test_predicted_times_scale_with_the_unet_call(tmp_path):
    f = tmp_path / "notebook_times.json"
    pred, note = doctor.predict_times(0.02, f)
    assert pred is None and "no prediction available" in note
    f.write_text(json.dumps({"notebooks": {"00_a.ipynb": {"seconds": 30.0, "peak_mb": 900}}}))
    pred, note = doctor.predict_times(0.02, f)
    assert pred is None and "no prediction available" in note
    f.write_text(json.dumps({"notebooks": {"00_a.ipynb": {"seconds": 30.0, "peak_mb": 900},
                                           "01_b.ipynb": {"seconds": 60.0, "peak_mb": 900}},
                             "unet_call_s": 0.01, "date": "2026-01-01", "machine": "2-core test"}))
    pred, note = doctor.predict_times(0.02, f)
    assert pred == pytest.approx({"00_a.ipynb": 60.0, "01_b.ipynb": 120.0}) and "2.00×" in note


def test_time_unet_call(pipe):
    s = doctor.time_unet_call(pipe, repeats=3)
    assert 0 < s < 60


def test_verdict_and_exit_code(monkeypatch):
    ok = Check("a", OK, "fine")
    assert doctor.verdict([ok]) == ("VERDICT: READY: the course runs on this machine", 0)
    line, code = doctor.verdict([ok, Check("b", WARN, "slow", "do x")])
    assert code == 0 and line.startswith("VERDICT: READY, with 1 warning(s) (b)")
    line, code = doctor.verdict([ok, Check("b", WARN, "w"), Check("c", FAIL, "broken", "do y")])
    assert code == 1 and line.startswith("VERDICT: NOT READY: 1 problem(s) (c)")
    # the whole report: a broken piece gives exit code 1, its fix is printed, the verdict comes last
    monkeypatch.setattr(doctor, "check_widgets", lambda: Check("widgets", FAIL, "no widgets", "install them"))
    out = io.StringIO()
    assert doctor.run(timing=False, out=out) == 1
    lines = out.getvalue().strip().splitlines()
    assert "fix: install them" in out.getvalue() and lines[-1].startswith("VERDICT: NOT READY")


def test_command_line_exit_codes():
    """The command as a teacher runs it: a pinned torch that is not installed -> exit 1 with the fix."""
    env = dict(os.environ, TORCH="torch==1.0.0", OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, "-m", "helpers.doctor", "--skip-timing"], env=env, cwd=doctor.ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "the course pins torch==1.0.0" in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("VERDICT: NOT READY: 1 problem(s) (torch)")
