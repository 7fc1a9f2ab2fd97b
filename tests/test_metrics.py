import numpy as np
import pytest
import torch

from helpers.metrics import SegmentationScore, binarise, iou, match_segments, otsu, psnr, resize_mask


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
    s = SegmentationScore().add(pred, gt)
    assert s.miou == 1.0 and s.accuracy == 1.0


def test_hungarian_scores_against_hand_computation():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[7, 7, 7, 9]])  # 7 -> 0 (2 px overlap), 9 -> 1
    s = SegmentationScore().add(pred, gt)
    # class 0: inter 2, union 3; class 1: inter 1, union 2
    assert s.miou == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s.accuracy == pytest.approx(3 / 4)
    # more segments than classes: the extra one matches nothing and counts as wrong; ignored pixels do not count
    s2 = SegmentationScore().add(np.array([[1, 2, 3, -5]]), np.array([[0, 0, 1, -1]]))
    assert s2.accuracy == pytest.approx(2 / 3)


def test_binarise_and_otsu():
    h = np.concatenate([np.full(50, 0.1), np.full(50, 0.9)])
    assert 0.1 < otsu(h) < 0.9
    assert binarise(h, "otsu").sum() == 50
    assert binarise(np.array([0.0, 1.0, 0.4]), 0.5).tolist() == [False, True, False]
    assert resize_mask(np.ones((4, 4)), (8, 8)).shape == (8, 8)
