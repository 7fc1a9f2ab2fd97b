import numpy as np
import pytest
import torch

from helpers.metrics import (SegmentationScore, binarise, hungarian_counts, iou, match_segments, otsu, psnr,
                             resize_mask)


def test_iou():
    a = np.zeros((4, 4), bool); a[:2] = True
    b = np.zeros((4, 4), bool); b[1:3] = True
    assert iou(a, b) == pytest.approx(4 / 12)
    assert iou(a, a) == 1.0 and iou(a, ~a) == 0.0
    assert iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        iou(a, np.zeros((8, 8)))


def test_psnr_known_values():
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy(); b[...] = 16  # mse 256 -> 10·log10(255²/256)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 256))
    assert psnr(a, a) == float("inf")
    t = torch.zeros(3, 8, 8); u = t + 0.2
    assert psnr(t, u) == pytest.approx(10 * np.log10(4 / 0.04))
    m = np.zeros((8, 8), bool); m[:4] = True
    b2 = a.copy(); b2[4:] = 100
    assert psnr(a, b2, mask=m) == float("inf")
    with pytest.raises(ValueError, match="no pixels"):
        psnr(a, b, mask=np.zeros((8, 8), bool))


def test_hungarian_is_invariant_to_label_names():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]])
    pred = (gt + 5) * 3  # same partition, other ids
    assert match_segments(pred, gt) == {15: 0, 18: 1, 21: 2}
    assert match_segments(pred, gt, n_classes=4) == {15: 0, 18: 1, 21: 2}
    for s in (SegmentationScore(4), SegmentationScore(present_only=True)):
        s.add(pred, gt)
        assert s.miou == 1.0 and s.accuracy == 1.0


def test_hungarian_scores_against_hand_computation():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[7, 7, 7, 9]])  # 7 -> 0 (2 px overlap), 9 -> 1
    for s in (SegmentationScore(2), SegmentationScore(present_only=True)):
        s.add(pred, gt)
        # class 0: inter 2, union 3; class 1: inter 1, union 2
        assert s.miou == pytest.approx((2 / 3 + 1 / 2) / 2)
        assert s.accuracy == pytest.approx(3 / 4)
    # more segments than classes: the extra one matches nothing and counts as wrong; ignored pixels do not count
    s2 = SegmentationScore(present_only=True).add(np.array([[1, 2, 3, 5]]), np.array([[0, 0, 1, -1]]))
    assert s2.accuracy == pytest.approx(2 / 3)


# -- the reference's protocol: a transcription of google/diffseg's `hungarian_matching` (diffseg/utils.py) ------------
def reference_hungarian(preds, labels, n_class):
    """Batch of segment-id maps and label maps -> (tp, fp, fn, labelled), step by step as the reference counts."""
    from scipy.optimize import linear_sum_assignment
    tp, fp, fn, labelled = np.zeros(n_class), np.zeros(n_class), np.zeros(n_class), 0
    for pred, label in zip(preds, labels):
        y, x = np.asarray(label).ravel(), np.asarray(pred).ravel()
        columns = max(n_class, x.max() + 1)
        keep = (y >= 0) & (y < n_class)                      # unlabelled pixels excluded
        hist = np.bincount(columns * y[keep] + x[keep], minlength=n_class * columns).reshape(n_class, columns)
        r, c = linear_sum_assignment(hist, maximize=True)
        labelled += hist.sum()
        fn += hist.sum(1) - hist[r, c]
        tp += hist[r, c]
        aligned = hist[:, c]                                 # column k = the segment matched to class k
        fp += aligned.sum(0) - np.diag(aligned)
    return tp, fp, fn, labelled


def reference_scores(preds, labels, n_class):
    tp, fp, fn, labelled = reference_hungarian(preds, labels, n_class)
    with np.errstate(invalid="ignore"):
        return float(np.nanmean(tp / (tp + fp + fn))), float(tp.sum() / labelled)


def _score(preds, labels, **kw):
    s = SegmentationScore(**kw)
    for p, g in zip(preds, labels):
        s.add(p, g)
    return s.miou, s.accuracy


def test_surplus_segment_becomes_a_false_positive_of_an_absent_class():
    # left half class 0, right half class 1; the right half is cut into two segments; class 2 is absent
    gt = np.array([[0, 0, 1, 1]] * 4)
    pred = np.array([[0, 0, 1, 1]] * 2 + [[0, 0, 2, 2]] * 2)
    tp, fp, fn, labelled = hungarian_counts(pred, gt, 3)
    assert tp.tolist() == [8, 4, 0] and fn.tolist() == [0, 4, 0] and fp.tolist() == [0, 0, 4] and labelled == 16
    ref = reference_scores([pred], [gt], 3)
    assert ref == pytest.approx((0.5, 0.75))                          # IoUs 1, 1/2 and 0 (class 2: 4 FP)
    assert _score([pred], [gt], n_classes=3) == pytest.approx(ref)
    assert _score([pred], [gt], present_only=True) == pytest.approx((0.75, 0.75))   # IoUs 1 and 1/2 only
    assert set(match_segments(pred, gt, n_classes=3).values()) == {0, 1, 2}
    assert set(match_segments(pred, gt).values()) == {0, 1}


def test_reference_protocol_equals_the_transcription_on_hand_made_sets():
    a = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [-1, -1, 2, 2]])   # -1: unlabelled
    cases = [
        # more segments than classes: a surplus segment must go to an absent class (3) or stay unmatched
        ([np.array([[0, 1, 2, 2], [0, 1, 2, 2], [3, 3, 4, 4], [5, 5, 4, 4]])], [a], 4),
        # fewer segments than classes, one class split over two images, ids not starting at 0
        ([np.array([[4, 4, 4, 4], [4, 4, 4, 4], [6, 6, 6, 6], [6, 6, 6, 6]]), np.full((4, 4), 2)],
         [a, np.where(a == 2, 0, a)], 3),
        # one segment per image
        ([np.zeros((4, 4), int)] * 2, [a, a.T], 5),
    ]
    for preds, labels, n in cases:
        miou, acc = _score(preds, labels, n_classes=n)
        assert (miou, acc) == pytest.approx(reference_scores(preds, labels, n))
    # the protocols differ on the first set, not on the others (no surplus segment there)
    preds, labels, n = cases[0]
    assert _score(preds, labels, present_only=True)[0] > _score(preds, labels, n_classes=n)[0] + 0.05
    for preds, labels, n in cases[1:]:
        assert _score(preds, labels, present_only=True) == pytest.approx(_score(preds, labels, n_classes=n))


def test_reference_protocol_equals_the_transcription_on_random_sets():
    rng = np.random.default_rng(0)
    for trial in range(10):
        n = int(rng.integers(2, 7))
        labels = [rng.integers(-1, n, (12, 12)) for _ in range(3)]
        preds = [rng.integers(0, int(rng.integers(1, 9)), (12, 12)) for _ in range(3)]
        assert _score(preds, labels, n_classes=n) == pytest.approx(reference_scores(preds, labels, n))


def test_scoring_input_errors_are_clear():
    with pytest.raises(ValueError, match="needs n_classes"):
        SegmentationScore()
    with pytest.raises(ValueError, match=r"class\(es\) \[5\] outside 0…2"):
        SegmentationScore(3).add(np.zeros((2, 2), int), np.array([[0, 1], [2, 5]]))
    with pytest.raises(ValueError, match="segment ids must be ≥ 0"):
        SegmentationScore(3).add(np.array([[0, -2], [1, 1]]), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="differ in shape"):
        SegmentationScore(3).add(np.zeros((2, 2), int), np.zeros((3, 3), int))


def test_binarise_and_otsu():
    h = np.concatenate([np.full(50, 0.1), np.full(50, 0.9)])
    assert 0.1 < otsu(h) < 0.9
    assert binarise(h, "otsu").sum() == 50
    assert binarise(np.array([0.0, 1.0, 0.4]), 0.5).tolist() == [False, True, False]
    assert resize_mask(np.ones((4, 4)), (8, 8)).shape == (8, 8)
