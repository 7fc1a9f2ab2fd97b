"""helpers/exercises (notebook 05): every check accepts its solution, rejects typical wrong answers with a specific hint, and
says "not attempted yet" (without raising) for the placeholders the committed notebooks keep.

The solutions here are written independently of the checks' reference code (de.toy_sweep, ds.noun_maps, a one-hot
k-means); notebooks/solutions/05_diffseg_solutions.ipynb runs the same solutions under nbval in strict mode.
"""
import numpy as np
import pytest
import torch

from helpers import diffseg as ds
from helpers import diffseg_eval as de
from helpers import exercises as ex
from helpers import toyworld as tw
from helpers.metrics import SegmentationScore
from tests.exercise_checking import verdict

TH = 0.7  # an input: the KL threshold notebook 05 chooses for the bundled model (any threshold > 0 would do)


@pytest.fixture(scope="module")
def ex_scenes(pipe):
    return ex.scenes(pipe)


@pytest.fixture(scope="module")
def cap(pipe, ex_scenes):
    return ds.capture(pipe, [s.image for s in ex_scenes])


def miou(labels, scenes):
    score = SegmentationScore(de.toy_classes())
    for lab, s in zip(labels, scenes):
        score.add(lab, s.semantic)
    return score.miou


# -- the framework -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("placeholder", [None, ..., NotImplemented])
@pytest.mark.parametrize("name", sorted(ex.CHECKS))
def test_placeholder_is_not_attempted_and_never_raises(name, placeholder, capsys):
    ok, out = verdict(capsys, ex.CHECKS[name], placeholder)   # no pipe needed: nothing is computed
    assert ok is None and ex.NOT_ATTEMPTED in out and name in out


def test_strict_raises_on_placeholder_and_on_a_wrong_answer():
    with pytest.raises(AssertionError, match="not attempted"):
        ex.check_05_6(None, strict=True)
    scene = tw.heldout_scene(8)
    with pytest.raises(AssertionError, match="05.6"):
        ex.check_05_6(np.zeros_like(scene.semantic), scene, strict=True)


def test_dispatch_and_unknown_exercise(capsys):
    scene = tw.heldout_scene(8)
    assert ex.check("05.6", scene.semantic, scene) is False
    with pytest.raises(KeyError, match="05.1"):
        ex.check("99.1", None)


def test_missing_context_is_a_clear_error():
    with pytest.raises(TypeError, match="pipeline"):
        ex.check_05_1({100: 0.5, 300: 0.5, 600: 0.5})


# -- 05.1 timestep -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sol_05_1(pipe, ex_scenes):
    return {t: de.toy_sweep(pipe, ex_scenes, thresholds=(TH,), t=t)[TH]["miou"] for t in (100, 300, 600)}


def test_05_1(pipe, sol_05_1, capsys):
    assert verdict(capsys, ex.check_05_1, sol_05_1, pipe, TH) == (True, f"05.1: {ex.OK}")
    ok, out = verdict(capsys, ex.check_05_1, {str(k): v for k, v in sol_05_1.items()}, pipe, TH)
    assert ok is False and "expected the keys" in out   # string keys: a hint, not a crash
    wrong = {
        "forgot t": ({t: sol_05_1[300] for t in sol_05_1}, "did you pass t=100"),
        "missing T": ({100: sol_05_1[100], 300: sol_05_1[300]}, "expected the keys"),
        "not a dict": ([sol_05_1[t] for t in sol_05_1], "expected a dict"),
        "reference threshold": ({t: ex.diffseg_scores(pipe, 1.1, t=t)["miou"] for t in sol_05_1}, "1.1"),
        "accuracy": ({t: ex.diffseg_scores(pipe, TH, t=t)["accuracy"] for t in sol_05_1}, "pixel accuracy"),
        "present rule": ({t: ex.diffseg_scores(pipe, TH, t=t)["miou_present"] for t in sol_05_1}, "present"),
        "out of range": ({**sol_05_1, 600: 43.2}, "not an mIoU"),
    }
    for name, (answer, hint) in wrong.items():
        ok, out = verdict(capsys, ex.check_05_1, answer, pipe, TH)
        assert ok is False and hint in out, (name, out)


# -- 05.2 resolutions --------------------------------------------------------------------------------------------
def test_05_2(pipe, cap, ex_scenes, capsys):
    maps = cap.self_maps
    finest = max(maps)
    weights = {"all": None, "finest": {r: float(r == finest) for r in maps},
               "coarse": {r: float(r != finest) / (len(maps) - 1) for r in maps}}
    sol = {k: miou(ds.segment(ds.aggregate(maps, weights=w), cap.image_hw, TH), ex_scenes)
           for k, w in weights.items()}
    assert verdict(capsys, ex.check_05_2, sol, pipe, TH)[0] is True
    wrong = {"no weights": ({**sol, "finest": sol["all"]}, "did you pass weights"),
             "swapped": ({**sol, "finest": sol["coarse"], "coarse": sol["finest"]}, "'coarse' weights"),
             "missing key": ({"all": sol["all"], "finest": sol["finest"]}, "expected a dict with the keys"),
             "not a number": ({**sol, "coarse": "low"}, "expected a number")}
    for name, (answer, hint) in wrong.items():
        ok, out = verdict(capsys, ex.check_05_2, answer, pipe, TH)
        assert ok is False and hint in out, (name, out)


# -- 05.3 background word ----------------------------------------------------------------------------------------
def _named(maps, labels, names):
    lab = torch.as_tensor(np.asarray(labels))
    return {int(s): names[int(maps[:, lab == s].mean(1).argmax())] for s in torch.unique(lab).tolist()}


def with_background(labels, cross, tokenizer, caption, nouns):
    per_pixel = cross / cross.sum(0, keepdim=True)
    start = per_pixel[0] / per_pixel[0].norm()
    maps = torch.cat([start[None], ds.noun_maps(cross, tokenizer, caption, nouns)])
    return _named(maps, labels, ["background", *nouns])


def raw_start(labels, cross, tokenizer, caption, nouns):   # the start token's map not normalised like the nouns'
    maps = torch.cat([cross[:1], ds.noun_maps(cross, tokenizer, caption, nouns)])
    return _named(maps, labels, ["background", *nouns])


def test_05_3(pipe, capsys):
    assert verdict(capsys, ex.check_05_3, with_background, pipe, TH)[0] is True
    wrong = {"nouns only": (ds.label_segments, "No segment was ever named 'background'"),
             "raw start token": (raw_start, "normalised like the nouns'"),
             "all background": (lambda lab, *a: {int(s): "background" for s in np.unique(lab)},
                                "objects lose their names"),
             "raises": (lambda *a: 1 / 0, "raised ZeroDivisionError"),
             "not a function": (42, "expected a function"),
             "misses a segment": (lambda lab, *a: {0: "background"}, "name each one once"),
             "unknown name": (lambda lab, *a: {int(s): "sky" for s in np.unique(lab)}, "'sky'")}
    for name, (answer, hint) in wrong.items():
        ok, out = verdict(capsys, ex.check_05_3, answer, pipe, TH)
        assert ok is False and hint in out, (name, out)


# -- 05.4 anchors ------------------------------------------------------------------------------------------------
def test_05_4(pipe, cap, ex_scenes, capsys):
    agg = ds.aggregate(cap.self_maps)
    side, _ = ds.latent_res(agg, cap.image_hw)
    sol = {a: miou(ds.segment(agg, cap.image_hw, TH, anchors=a), ex_scenes) for a in range(2, side + 1)}
    assert verdict(capsys, ex.check_05_4, sol, pipe, TH)[0] is True
    wrong = {"range stops early": ({a: v for a, v in sol.items() if a < side}, "off by one"),
             "shifted": ({2: sol[2]} | {a: sol[a - 1] for a in sol if a > 2}, "off by one?"),
             "anchors not passed": ({a: sol[side] for a in sol}, "did you pass anchors=2"),
             "starts at 1": ({1: sol[2], **sol}, "extra [1]")}
    for name, (answer, hint) in wrong.items():
        ok, out = verdict(capsys, ex.check_05_4, answer, pipe, TH)
        assert ok is False and hint in out, (name, out)


# -- 05.5 refinement ---------------------------------------------------------------------------------------------
def lloyd(proposals, attn, max_iter=300):
    c = proposals.clone()
    for _ in range(max_iter):
        onehot = torch.nn.functional.one_hot(torch.cdist(attn, c).argmin(1), len(c)).to(attn.dtype)
        count = onehot.sum(0)[:, None]
        new = torch.where(count > 0, onehot.T @ attn / count.clamp_min(1), c)
        if torch.equal(new, c):
            break
        c = new
    return c


def test_05_5(pipe, capsys):
    assert verdict(capsys, ex.check_05_5, lloyd, pipe, TH)[0] is True
    assert verdict(capsys, ex.check_05_5, lambda p, a: lloyd(p, a).numpy(), pipe, TH)[0] is True  # numpy is fine
    g = torch.Generator().manual_seed(0)
    wrong = {"unchanged": (lambda p, a: p, "unchanged"),
             "one step": (lambda p, a: lloyd(p, a, max_iter=1), "not the mean of the"),
             "drops centres": (lambda p, a: lloyd(p[:1], a), "one centre per proposal"),
             "random start": (lambda p, a: lloyd(a[torch.randperm(len(a), generator=g)[:len(p)]], a),
                              "not the one reached from the proposals"),
             "NaN for empty": (lambda p, a: torch.full_like(p, float("nan")), "NaN"),
             "raises": (lambda p, a: p.foo, "raised AttributeError")}
    for name, (answer, hint) in wrong.items():
        ok, out = verdict(capsys, ex.check_05_5, answer, pipe, TH)
        assert ok is False and hint in out, (name, out)


# -- 05.6 scoring rules ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [8, 0, 1])   # 4, 3 and 2 classes present
def test_05_6(index, capsys):
    scene = tw.heldout_scene(index)
    k = de.toy_classes()
    seg = scene.semantic.copy()
    absent = k - len(np.unique(seg))
    for j, (y, x) in enumerate(np.argwhere(seg == 0)[:absent]):
        seg[y, x] = k + j
    assert verdict(capsys, ex.check_05_6, ds.relabel(seg), scene)[0] is True
    wrong = {"ids with gaps": (seg, "skip numbers"),
             "ground truth": (scene.semantic, "both rules agree"),
             "empty (one segment)": (np.zeros_like(seg), "at least 0.9"),
             "every pixel its own segment": (np.arange(seg.size).reshape(seg.shape), "at least 0.9"),
             "wrong shape": (seg[:10], "got shape (10, 64)"),
             "floats": (seg.astype(float), "integers"),
             "not an array": ("segments", "got shape ()")}
    for name, (answer, hint) in wrong.items():
        ok, out = verdict(capsys, ex.check_05_6, answer, scene)
        assert ok is False and hint in out, (name, out)
    if absent > 1:   # one surplus segment where several classes are absent: too small a gap
        one = scene.semantic.copy()
        one[tuple(np.argwhere(one == 0)[0])] = k
        ok, out = verdict(capsys, ex.check_05_6, ds.relabel(one), scene, gap=0.9 * absent / k)
        assert ok is False and "give each absent class a surplus segment" in out, out
