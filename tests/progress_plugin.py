"""pytest plugin used by `make test`: names each notebook when nbval starts it and gives its time when it ends,
so that a long run of dots says which notebook is running. (`-p tests.progress_plugin`)"""
from __future__ import annotations

import time

_state: dict = {"file": None, "t0": 0.0, "config": None}


def pytest_configure(config):
    _state["config"] = config


def _say(msg: str):
    tr = _state["config"].pluginmanager.get_plugin("terminalreporter") if _state["config"] else None
    if tr is not None:
        at_start = getattr(tr._tw, "width_of_current_line", 1) == 0
        tr.write(("" if at_start else "\n") + msg + "\n")


def _finish():
    if _state["file"] is not None:
        _say(f"   {_state['file']}: {time.perf_counter() - _state['t0']:.0f} s")
        _state["file"] = None


def pytest_runtest_logstart(nodeid, location):
    path = nodeid.split("::", 1)[0]
    if path == _state["file"]:
        return
    _finish()
    if path.endswith(".ipynb"):
        _state.update(file=path, t0=time.perf_counter())
        _say(f"running {path}")


def pytest_sessionfinish(session, exitstatus):
    _finish()
