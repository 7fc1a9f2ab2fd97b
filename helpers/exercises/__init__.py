"""Auto-checked exercises: one check per exercise, graded on the model the notebook loaded.

In a notebook:

    from helpers import exercises
    answer = None  # your code here
    exercises.check_05_1(answer, pipe, THRESHOLD);

prints one verdict and returns it: True ("✅ correct"), False (a hint computed from the answer: what is wrong with
it and where to look) or None ("not attempted yet", when the answer is still the placeholder None, ``...`` or
NotImplemented). A wrong answer, or a function given as an answer that raises, never raises here: the committed
notebooks keep their placeholders and still run under nbval. ``strict=True`` (the solutions notebooks and the
tests) raises AssertionError instead of returning False or None, so a wrong solution fails its notebook.

The reference answers are computed with the helpers on the loaded pipeline and cached (the UNet passes are the
expensive part), so a second check costs almost nothing. ``check("05.1", answer, pipe, THRESHOLD)`` dispatches by
exercise number.
"""
from __future__ import annotations

import re

from . import _common
from ._common import NOT_ATTEMPTED, OK, PLACEHOLDERS, TOL, EXERCISE_SCENES, scenes  # noqa: F401
from .nb00 import *  # noqa: F401,F403
from .nb01 import *  # noqa: F401,F403
from .nb02 import *  # noqa: F401,F403
from .nb03 import *  # noqa: F401,F403
from .nb04 import *  # noqa: F401,F403
from .nb05 import *  # noqa: F401,F403
from .nb05 import background_shares, diffseg_scores, label_with_background_reference, refine_reference  # noqa: F401
from .nb06 import *  # noqa: F401,F403

# one module per notebook (nbNN.py); every function named check_NN_k is an exercise "NN.k"
CHECKS = {f"{m[1]}.{m[2]}": fn for name, fn in sorted(globals().items())
          if (m := re.fullmatch(r"check_(\d\d)_(\d+)", name)) and callable(fn)}


def check(exercise: str, answer, *context, strict: bool = False, **kw):
    """Dispatch by exercise number: check("05.1", answer, pipe, THRESHOLD) = check_05_1(answer, pipe, THRESHOLD)."""
    if exercise not in CHECKS:
        raise KeyError(f"no exercise {exercise!r}; the checked exercises are {sorted(CHECKS)}")
    return CHECKS[exercise](answer, *context, strict=strict, **kw)
