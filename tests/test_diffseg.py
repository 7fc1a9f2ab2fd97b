"""DiffSeg: the PyTorch version against a plain transcription of the reference algorithm, on the same tensors.

`Reference` below is written the way the reference implementation (TensorFlow/KerasCV) does it — nested loops over
anchors and proposals, the KL as an elementwise tensor per anchor chunk, a Python set of merged proposals — in NumPy,
and in float64 throughout (the reference casts iteration 0 to float16 on its GPUs; we do not transcribe that cast).
helpers.diffseg must give the same segments on the same attention, at toy sizes and on random attention with the
reference's 16 × 16 anchor grid. bench/diffseg_merge.py times the two.
"""
import numpy as np
import pytest
import torch

from helpers import diffseg as ds
from helpers import toyworld as tw
from helpers.attention import capture_attention
from helpers.images import encode
from helpers.metrics import SegmentationScore
from helpers.text import embed


class Reference:
    """A straightforward transcription of DiffSeg's reference algorithm (loops, NumPy, float64)."""

    @staticmethod
    def grid(num_points, side):
        # the reference's generate_sampling_grid, written for side 64 (it uses 63 = side − 1)
        segment_len = (side - 1) // (num_points - 1)
        total_len = segment_len * (num_points - 1)
        start = (side - 1 - total_len) // 2
        x = np.linspace(start, total_len + start, num_points)
        xx, yy = np.meshgrid(x, x, indexing="ij")
        return np.concatenate([xx.reshape(-1, 1), yy.reshape(-1, 1)], -1).astype(int)

    @staticmethod
    def upsample(maps, ratio):
        """Bilinear upsampling by an integer ratio with half-pixel centres (TF2's UpSampling2D), maps: N × s × s."""
        s = maps.shape[-1]
        out_side = s * ratio
        out = np.zeros((maps.shape[0], out_side, out_side))
        for oy in range(out_side):
            sy = max((oy + 0.5) / ratio - 0.5, 0.0)
            y0 = int(np.floor(sy)); y1 = min(y0 + 1, s - 1); wy = sy - y0
            for ox in range(out_side):
                sx = max((ox + 0.5) / ratio - 0.5, 0.0)
                x0 = int(np.floor(sx)); x1 = min(x0 + 1, s - 1); wx = sx - x0
                out[:, oy, ox] = ((1 - wy) * ((1 - wx) * maps[:, y0, x0] + wx * maps[:, y0, x1])
                                  + wy * ((1 - wx) * maps[:, y1, x0] + wx * maps[:, y1, x1]))
        return out

    @classmethod
    def aggregate(cls, weight_list, big):
        sizes = [np.sqrt(w.shape[-2]) for w in weight_list]
        ratio_w = np.array(sizes) / np.sum(sizes)
        aggre = np.zeros((big, big, big, big))
        for index, weights in enumerate(weight_list):
            size = int(np.sqrt(weights.shape[-1]))
            ratio = big // size
            w = weights.reshape(-1, size, size)
            w = cls.upsample(w, ratio) if ratio > 1 else w
            w = w.reshape(size, size, big, big)
            w = w / w.sum((2, 3), keepdims=True)
            w = np.repeat(w, ratio, axis=0)
            w = np.repeat(w, ratio, axis=1)
            aggre += w * ratio_w[index]
        return aggre

    @staticmethod
    def kl(x, y):
        q = np.log(x) - np.log(y)
        return (x * q).sum((-2, -1)) / 2 - (y * q).sum((-2, -1)) / 2

    @classmethod
    def mask_merge(cls, it, attns, thr, grid=None, split=None):
        if it == 0:
            side = attns.shape[0]
            anchors = attns[grid[:, 0], grid[:, 1], :, :][:, None]
            flat = attns.reshape(1, side * side, side, side)
            split = split or int(np.sqrt(grid.shape[0]))  # anchors per chunk: the reference's 16 (GPU memory)
            kl_bin = []
            for i in range(0, len(anchors), split):
                kl_bin.append(cls.kl(anchors[i:i + split], flat) < thr)
            kl_bin = np.concatenate(kl_bin, 0).astype(np.float64)
            new = (kl_bin @ flat.reshape(-1, side * side)) / kl_bin.sum(1, keepdims=True)
            return new.reshape(-1, side, side)
        matched, new = set(), []
        for i, anchor in enumerate(attns):
            if i in matched:
                continue
            matched.add(i)
            kl_bin = cls.kl(anchor, attns) < thr
            if kl_bin.sum() > 0:
                for idx in np.arange(len(attns))[kl_bin.reshape(-1)]:
                    matched.add(idx)
                new.append(attns[kl_bin.reshape(-1)].mean(0))
        return np.array(new)

    @classmethod
    def merge(cls, aggre, thresholds, num_points, split=None):
        grid = cls.grid(num_points, aggre.shape[0])
        merged = None
        for i, thr in enumerate(thresholds):
            merged = cls.mask_merge(i, aggre if i == 0 else merged, thr, grid, split)
        return merged

    @classmethod
    def segment(cls, aggre, thresholds, num_points, image_side):
        side = aggre.shape[0]
        merged = cls.merge(aggre, thresholds, num_points)
        ratio = image_side // side
        up = cls.upsample(merged, ratio) if ratio > 1 else merged
        return up.argmax(0), len(merged)


def _toy_self_maps(pipe, n=2, start=0):
    scenes = [tw.heldout_scene(start + i) for i in range(n)]
    with capture_attention(pipe.unet, kinds=("self",)) as store, torch.no_grad():
        pipe.unet(encode(pipe, [s.image for s in scenes]), 300, encoder_hidden_states=embed(pipe, [""] * n))
    return scenes, store


def test_anchor_grid_follows_the_reference_rule():
    for side, n in ((64, 16), (16, 16), (16, 4), (32, 16), (64, 5)):
        g = Reference.grid(n, side)
        assert ds.anchor_grid(side, n).tolist() == (g[:, 0] * side + g[:, 1]).tolist()
    assert ds.anchor_grid(64, 16)[:3].tolist() == [64 * 1 + 1, 64 * 1 + 5, 64 * 1 + 9]  # rows/cols 1, 5, 9, … 61
    assert ds.anchor_grid(16, 16).tolist() == list(range(256))                           # toy: every cell


def test_kl_matrix_equals_the_elementwise_formula():
    a = torch.rand(7, 50, dtype=torch.float64).softmax(-1)
    b = torch.rand(30, 50, dtype=torch.float64).softmax(-1)
    direct = 0.5 * ((a[:, None] - b[None]) * (a[:, None].log() - b[None].log())).sum(-1)
    for chunk in (1, 7, 1000):
        assert torch.allclose(ds.kl_matrix(a, b, chunk), direct, atol=1e-12)


def test_aggregate_matches_the_transcription(pipe):
    scenes, store = _toy_self_maps(pipe, n=1)
    maps = ds.self_attention(store)
    assert sorted(maps) == [(4, 4), (8, 8), (16, 16)]
    ours = ds.aggregate(maps, dtype=torch.float64)[0].numpy()
    order = sorted(maps, reverse=True)
    ref = Reference.aggregate([maps[r][0].double().numpy() for r in order], 16).reshape(256, 256)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours.sum(1), 1, rtol=1e-9)
    w = ds.resolution_weights(maps)
    assert abs(w[(16, 16)] - 16 / 28) < 1e-12 and abs(sum(w.values()) - 1) < 1e-12


@pytest.mark.parametrize("threshold", [0.3, 1.1])
def test_same_segments_as_the_transcription_on_toy_attention(pipe, threshold):
    scenes, store = _toy_self_maps(pipe, n=2, start=3)
    agg = ds.aggregate(store, dtype=torch.float64)
    for a in agg:
        ref, n_ref = Reference.segment(a.numpy().reshape(16, 16, 16, 16), [threshold] * 3, 16, 64)
        props = ds.merge(a, (16, 16), threshold, 16, 3)
        assert len(props) == n_ref
        assert (ds.nms(props, (16, 16), (64, 64)).numpy() == ref).all()
        chunked = ds.merge(a, (16, 16), threshold, 16, 3, chunk=32)   # the memory-bounded path, as SD sizes use
        assert torch.allclose(chunked, props, atol=1e-12)


@pytest.mark.parametrize("side,threshold", [(32, 1.0), (32, 2.0), (16, 0.6)])
def test_same_segments_as_the_transcription_on_random_attention(side, threshold):
    a = ds.synthetic_attention(side, regions=7, seed=side)
    ref, n_ref = Reference.segment(a.numpy().reshape(side, side, side, side), [threshold] * 3, 16, side * 2)
    props = ds.merge(a, (side, side), threshold, 16, 3)
    assert 1 < n_ref < 256  # a case where merging does something
    assert len(props) == n_ref
    assert (ds.nms(props, (side, side), side * 2).numpy() == ref).all()


def test_history_shows_each_iteration(pipe):
    _, store = _toy_self_maps(pipe, n=1)
    hist = []
    out = ds.merge(ds.aggregate(store)[0], (16, 16), 0.3, history=hist)
    assert len(hist) == 3 and hist[-1] is out
    assert len(hist[0]) == 256 and len(hist[0]) >= len(hist[1]) >= len(hist[2])
    assert torch.allclose(out.sum(1), torch.ones(len(out)), atol=1e-5)


def test_diffseg_segments_toy_scenes(pipe):
    scenes = [tw.heldout_scene(100 + i) for i in range(8)]
    seg = ds.diffseg(pipe, [s.image for s in scenes], threshold=0.7)
    assert seg.shape == (8, 64, 64)
    n = 1 + len(tw.SHAPES)
    score, one = SegmentationScore(n), SegmentationScore(n)
    for p, s in zip(seg, scenes):
        score.add(p, s.semantic)
        one.add(np.zeros_like(p), s.semantic)
    # reference scoring, toy threshold 0.7: 0.52 on notebook 05's 50 scenes; one segment per image scores 0.17
    assert score.miou >= 0.4 and score.miou > one.miou + 0.2, (score.miou, one.miou)


def test_segments_are_named_by_the_caption_nouns(pipe):
    scenes = [tw.heldout_scene(200 + i) for i in range(8)]
    cap = ds.capture(pipe, [s.image for s in scenes], captions=[s.caption for s in scenes])
    seg = ds.segment(ds.aggregate(cap.self_maps), cap.image_hw, 0.3)
    right, total = 0, 0
    for p, s, cross in zip(seg, scenes, cap.cross):
        names = ds.label_segments(p, cross, pipe.tokenizer, s.caption, ds.toy_nouns(s.caption))
        for o in s.objects:  # the segment holding most of an object should carry the object's shape word
            ids, counts = np.unique(p[o.mask], return_counts=True)
            right += names[int(ids[counts.argmax()])] == o.shape
            total += 1
    assert right / total >= 0.7, (right, total)


def test_nms_takes_the_argmax_per_pixel():
    props = torch.zeros(2, 4)
    props[0, :2] = 1  # left column of a 2 × 2 grid
    props[1, 2:] = 1  # right column... of cells 2, 3 = bottom row
    lab = ds.nms(props, (2, 2), (4, 4))
    assert lab[0].tolist() == [0, 0, 0, 0] and lab[-1].tolist() == [1, 1, 1, 1]
    assert ds.relabel(np.array([[5, 5], [2, 7]])).tolist() == [[0, 0], [1, 2]]


def test_bad_input_is_refused_clearly(pipe):
    a = ds.synthetic_attention(8, dtype=torch.float32)
    for bad in (0, -1.0, [1.0, 0.0, 1.0]):
        with pytest.raises(ValueError, match="thresholds must be > 0"):
            ds.merge(a, (8, 8), bad)
    with pytest.raises(ValueError, match="only 8 × 8 = 64 query cells"):
        ds.merge(a, (8, 8), 1.0, anchors=9)
    with pytest.raises(ValueError, match="positive integer"):
        ds.anchor_grid(8, 0)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        ds.capture(pipe, np.zeros((60, 60, 3), np.uint8))
    with capture_attention(pipe.unet, kinds=("cross",)) as store, torch.no_grad():
        z = encode(pipe, tw.heldout_scene(0).image)
        pipe.unet(z, 300, encoder_hidden_states=embed(pipe, ""))
    with pytest.raises(ValueError, match="no self-attention was captured"):
        ds.aggregate(store)
    with pytest.raises(ValueError, match="captions for"):
        ds.capture(pipe, [tw.heldout_scene(0).image], captions=["a", "b"])
