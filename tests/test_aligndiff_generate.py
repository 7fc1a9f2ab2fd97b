"""Sharded AlignDiff generation: two CPU processes write every item once, identical to one process; safe resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import aligndiff_generate as gen

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--category", "star", "--n", "6", "--steps", "4", "--batch", "2", "--seed", "100", "--model", "toy",
        "--prompt", "a red star", "--prompt", "a blue star and a green circle", "--prompt", "a yellow star"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    env.pop("DIFFUSION_MODEL", None)
    return env


def _launch(cmd, tmp):
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _files(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_two_processes_write_each_item_once_and_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    accelerate = Path(sys.executable).parent / "accelerate"
    _launch([sys.executable, "-m", "helpers.aligndiff_generate", "--out", str(one), *ARGS], tmp_path)
    _launch([str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "helpers.aligndiff_generate",
                 "--out", str(two), *ARGS], tmp_path)
    names = [f"{i:06d}{s}.png" for i in range(6) for s in ("", "_mask")]
    assert _files(one) == _files(two) == sorted(names + ["manifest.json"])  # no temp files, nothing extra
    m = json.loads((two / "manifest.json").read_text())
    assert [it["seed"] for it in m["items"]] == list(range(100, 106))  # distinct seeds, one per item
    assert [it["prompt"] for it in m["items"]][:4] == ["a red star", "a blue star and a green circle", "a yellow star",
                                                      "a red star"]
    for name in names:
        a, b = np.asarray(Image.open(one / name)), np.asarray(Image.open(two / name))
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1, name
    # the two processes split the work: both made images (seeds differ between them by construction)
    imgs = [np.asarray(Image.open(two / f"{i:06d}.png")) for i in range(6)]
    assert not np.array_equal(imgs[0], imgs[3])  # same prompt, different seed -> different image


def _run(out, pipe, **kw):
    from accelerate import PartialState
    args = dict(category="star", n=3, prompts=["a red star"], model="toy", steps=2, guidance=7.5, seed=0, batch=2,
                progress=False)
    args.update(kw)
    return gen.run(out, state=PartialState(), pipe=pipe, **args)


def test_resume_skips_finished_items(tmp_path, pipe):
    assert _run(tmp_path, pipe) == [0, 1, 2]
    (tmp_path / "000001.png").unlink()
    before = (tmp_path / "000000.png").stat().st_mtime_ns
    assert _run(tmp_path, pipe) == [1]  # only the missing item is made again
    assert (tmp_path / "000000.png").stat().st_mtime_ns == before
    assert _run(tmp_path, pipe, n=4) == [3]  # a longer run of the same settings continues
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["items"]) == 4
    assert manifest["settings"]["threshold"] == 0.4  # the default, as the reference


def test_folder_with_a_different_run_is_refused(tmp_path, pipe):
    _run(tmp_path, pipe)
    with pytest.raises(gen.DifferentRun, match="steps: folder has 2, this run 3"):
        _run(tmp_path, pipe, steps=3)
    with pytest.raises(gen.DifferentRun, match="prompts"):
        _run(tmp_path, pipe, prompts=["a blue star"])


def test_folder_of_unknown_images_is_refused(tmp_path, pipe):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "000000.png")
    with pytest.raises(gen.DifferentRun, match="no manifest.json"):
        _run(tmp_path, pipe)


def test_cli_reports_a_different_run_clearly(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"settings": {"model": "elsewhere"}, "items": []}))
    r = subprocess.run([sys.executable, "-m", "helpers.aligndiff_generate", "--out", str(tmp_path), *ARGS],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "already holds a different run" in r.stderr and "model" in r.stderr
    assert _files(tmp_path) == ["manifest.json"]


def test_prompts_must_name_the_category(tmp_path, pipe):
    with pytest.raises(ValueError, match="does not contain the category word"):
        _run(tmp_path, pipe, prompts=["a red circle"])
