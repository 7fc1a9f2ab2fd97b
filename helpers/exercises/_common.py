"""Shared machinery of the exercise checks: verdicts, placeholders, the per-pipeline cache, the exercise scenes.

See helpers/exercises/__init__.py for how a check is used.
"""
from __future__ import annotations

import weakref
from numbers import Real

import numpy as np
import torch

PLACEHOLDERS = (None, Ellipsis, NotImplemented)
OK = "✅ correct"
NOT_ATTEMPTED = "not attempted yet"
EXERCISE_SCENES = range(8)  # held-out toy scenes 0…7: every DiffSeg exercise grades on these
TOL = 2e-3                  # mIoU tolerance: the same computation in another batch layout may flip a pixel or two
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pipe -> {key: value}; freed with the pipe


# -- verdicts ----------------------------------------------------------------------------------------------------
def _verdict(exercise: str, answer, grade, strict: bool):
    """Run `grade(answer)` (None if right, else a hint) unless the answer is a placeholder; print and return."""
    if any(answer is p for p in PLACEHOLDERS):
        message, ok = f"⏳ {exercise}: {NOT_ATTEMPTED} (replace the placeholder with your answer)", None
    else:
        hint = grade(answer)
        ok = hint is None
        message = f"{exercise}: {OK}" if ok else f"❌ {exercise}: {hint}"
    if strict and not ok:
        raise AssertionError(message)
    print(message)
    return ok


def _call(fn, *args):
    """(result, None) or (None, a hint naming the exception the student's function raised)."""
    if not callable(fn):
        return None, f"expected a function, got {type(fn).__name__}"
    try:
        return fn(*args), None
    except Exception as e:  # a student's function may fail in any way: that is a hint, not a crash
        return None, f"your function raised {type(e).__name__}: {e}"


def _close(a, b, tol=TOL) -> bool:
    return _number(a) and _number(b) and abs(float(a) - float(b)) <= tol


def _number(v) -> bool:
    return isinstance(v, (Real, np.floating, np.integer)) and not isinstance(v, bool) and np.isfinite(float(v))


def _pct(x) -> str:
    return f"{100 * x:.0f}%"


# -- reference computations (cached per pipeline) ---------------------------------------------------------------
def _store(pipe) -> dict:
    try:
        return _CACHE.setdefault(pipe, {})
    except TypeError:  # not weak-referenceable: no cache
        return {}


def scenes(pipe_or_size) -> list:
    """The exercises' held-out toy scenes (EXERCISE_SCENES), drawn at the pipeline's native size (or a given side)."""
    from .. import toyworld as tw
    from ..images import native_size
    size = pipe_or_size if isinstance(pipe_or_size, int) else native_size(pipe_or_size)
    return [tw.heldout_scene(i, size=size) for i in EXERCISE_SCENES]


def _scenes(pipe) -> list:
    store = _store(pipe)
    if "scenes" not in store:
        store["scenes"] = scenes(pipe)
    return store["scenes"]


def _check_pipe(pipe):
    if pipe is None or not hasattr(pipe, "unet"):
        raise TypeError(f"this check needs the loaded pipeline as its second argument (got {type(pipe).__name__}), "
                        "e.g. exercises.check_05_1(answer, pipe, THRESHOLD): the check names what it needs in its docstring")


def _capture(pipe, t: int = 300, captions: bool = False):
    """(aggregated self-attention, capture) of the exercise scenes at timestep t, cached."""
    from .. import diffseg as ds
    key = ("capture", int(t), bool(captions))
    store = _store(pipe)
    if key not in store:
        sc = _scenes(pipe)
        cap = ds.capture(pipe, [s.image for s in sc], t=int(t),
                         captions=[s.caption for s in sc] if captions else None)
        store[key] = (cap.self_maps, cap)
    return store[key]


def _need_pipe(pipe, call: str):
    """TypeError naming the call to write when a check that needs the loaded pipeline did not get it."""
    if pipe is None or not hasattr(pipe, "unet"):
        raise TypeError(f"this check needs the loaded pipeline as its second argument (got {type(pipe).__name__}): "
                        f"{call}")


def _keys_hint(ans, keys, what: str, example: str):
    """(answer keyed like `keys`, None) or (None, a hint). Numeric keys compare as floats."""
    if not isinstance(ans, dict):
        return None, f"expected a dict {example}, got {type(ans).__name__}"
    numeric = all(_number(k) for k in keys)
    if numeric:
        ok = all(_number(k) for k in ans) and len(ans) == len(keys) and {float(k) for k in ans} == set(map(float, keys))
        return ({float(k): v for k, v in ans.items()}, None) if ok else \
            (None, f"expected the keys {list(keys)} ({what}), got {list(ans)}")
    if set(ans) != set(keys):
        return None, f"expected the keys {list(keys)} ({what}), got {sorted(map(str, ans))}"
    return ans, None


def _case_latents(pipe, case):
    """The VAE latents of an edit case's input image, encoded once per pipeline (cached)."""
    from ..images import encode
    store = _store(pipe)
    key = ("latents", case.scene.seed, case.scene.image.shape)
    if key not in store:
        store[key] = encode(pipe, case.scene.image)
    return store[key]


# -- hints shared by the edit exercises (01, 02, 03) -------------------------------------------------------------
PSNR_TOL = 0.01  # dB: the same edit gives the same image


def _iou_hint(v, where: str):
    if not _number(v):
        return f"{where}: expected a number (an IoU), got {v!r}"
    if not 0 <= float(v) <= 1:
        return f"{where}: {float(v):g} is not an IoU (those lie in [0, 1])"
    return None


def _match(v, candidates: dict, tol: float):
    """The label of the first candidate value within tol of v, or None."""
    for label, fn in candidates.items():
        if abs(float(v) - fn()) <= tol:
            return label
    return None


def _psnr_hint(v, where: str):
    if not _number(v):
        return f"{where}: expected a number (a PSNR in dB), got {v!r}"
    if not 0 < float(v) < 100:
        return f"{where}: {float(v):g} is not a PSNR in dB (between 0 and 100 for these images)"
    return None


def _diagnose_psnr(v, where: str, expected: float, others: dict, tol: float = PSNR_TOL) -> str | None:
    """None when v is the expected PSNR; else the label of the first of `others` it matches, or a plain hint."""
    if abs(float(v) - expected) <= tol:
        return None
    label = _match(v, others, tol)
    if label:
        return f"{where}: {float(v):.2f} dB is {label}"
    return f"{where}: {float(v):.2f} dB; the reference is not that (measure with edit_report(image, case)['psnr_out'])"
