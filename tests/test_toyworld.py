import numpy as np
import pytest

from helpers import toyworld as tw


def test_scene_is_a_function_of_its_seed():
    a, b = tw.scene(123), tw.scene(123)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(tw.scene(124).image, a.image)


def test_splits_are_disjoint():
    with pytest.raises(ValueError, match="training seeds"):
        tw.train_scene(tw.HELDOUT_SEED_BASE)
    assert tw.heldout_scene(0).seed == tw.HELDOUT_SEED_BASE


@pytest.mark.parametrize("seed", range(20))
def test_ground_truth_matches_the_pixels(seed):
    s = tw.scene(seed)
    assert 1 <= len(s.objects) <= tw.MAX_OBJECTS
    for o in s.objects:
        assert f"{o.colour} {o.shape}" in s.caption
        assert o.mask.sum() > 30
        # pixels of an object's mask carry its colour (anti-aliased edges aside)
        mean = s.image[o.mask].astype(float).mean(0)
        assert np.abs(mean - tw.COLOURS[o.colour]).max() < 25
    sem = s.semantic
    assert set(np.unique(sem)) <= {0} | {1 + tw.SHAPES.index(o.shape) for o in s.objects}
    assert (s.instances > 0).sum() == sum(o.mask.sum() for o in s.objects)


def test_world_covers_all_shapes_colours_and_counts():
    scenes = [tw.scene(i) for i in range(200)]
    assert {o.shape for s in scenes for o in s.objects} == set(tw.SHAPES)
    assert {o.colour for s in scenes for o in s.objects} == set(tw.COLOURS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert len({s.background for s in scenes}) > 1


def test_mask_of_word_and_bad_word():
    s = tw.scene(5)
    o = s.objects[0]
    assert (s.mask_of(o.colour) == o.mask).all()
    with pytest.raises(ValueError, match="not a toy-world word"):
        s.mask_of("horse")


def test_edits_change_only_the_edited_object():
    s = tw.scene(7, n_objects=2)
    new = [c for c in tw.COLOURS if c != s.objects[0].colour and c != s.objects[1].colour][0]
    e = tw.with_colour(s, 0, new)
    assert e.caption == s.caption.replace(s.objects[0].phrase, f"{new} {s.objects[0].shape}")
    changed = np.any(e.image != s.image, -1)
    assert changed.any()
    # only pixels the object touches change (its mask, grown by two pixels for anti-aliased edges and corners)
    from scipy.ndimage import binary_dilation
    assert not (changed & ~binary_dilation(s.objects[0].mask, iterations=2)).any()
    assert (np.abs(e.image[s.objects[0].mask].astype(int) - tw.COLOURS[new]).max(-1) < 40).mean() > 0.8
    sh = tw.with_shape(s, 1, "star" if s.objects[1].shape != "star" else "circle")
    assert sh.objects[1].shape != s.objects[1].shape
    with pytest.raises(ValueError, match="unknown colour"):
        tw.with_colour(s, 0, "mauve")
    with pytest.raises(IndexError):
        tw.with_colour(s, 5, "red")


def test_colour_adherence_check_on_real_scenes():
    scenes = [tw.heldout_scene(i) for i in range(50)]
    assert np.mean([tw.adheres(s.image, s.caption) for s in scenes]) >= 0.95
    s = scenes[0]
    blank = np.full_like(s.image, 200)
    assert not tw.adheres(blank, s.caption)
    others = [c for c in tw.COLOURS if c not in tw.colours_in_caption(s.caption)]
    if others:  # a caption that names a colour the image does not have fails
        assert not tw.adheres(s.image, s.caption + f" and a {others[0]} star")


def test_colour_fraction():
    s = tw.scene(3)
    o = s.objects[0]
    assert tw.colour_fraction(s.image, o.mask, o.colour) > 0.9
    other = next(c for c in tw.COLOURS if c != o.colour)
    assert tw.colour_fraction(s.image, o.mask, other) < 0.05
    with pytest.raises(ValueError, match="differ in size"):
        tw.colour_fraction(s.image, np.ones((8, 8), bool), o.colour)


def test_edit_cases_cover_kinds_and_carry_ground_truth():
    cases = tw.edit_cases(6)
    assert [c.kind for c in cases] == ["colour", "shape", "one of three"] * 2
    for c in cases:
        assert c.reference != c.query and c.reference == c.scene.caption and c.query == c.target.caption
        changed = np.any(c.scene.image != c.target.image, -1)
        from scipy.ndimage import binary_dilation
        assert not (changed & ~binary_dilation(c.region, iterations=2)).any()  # nothing changes outside the region
        assert c.region.sum() > 30
    assert len(cases[2].scene.objects) == 3
    assert tw.edit_cases(3)[1].query == cases[1].query  # deterministic


def test_objects_have_the_documented_sizes_and_stay_mostly_apart():
    import math
    lo, hi = tw.OBJECT_RADIUS
    worst = 1.0
    for seed in range(300):
        sc = tw.scene(seed, n_objects=3)
        for o in sc.objects:
            assert lo * tw.IMAGE_SIZE <= o.radius <= hi * tw.IMAGE_SIZE
            assert o.mask.sum() > 0  # no object hidden entirely behind another
        for a in sc.objects:
            for b in sc.objects:
                if a is not b:
                    worst = min(worst, math.hypot(a.centre[0] - b.centre[0], a.centre[1] - b.centre[1])
                                / (a.radius + b.radius))
    # the placement retries 50 times for a gap > 0.9 x the radii, and otherwise takes the least overlapping try
    assert worst > 0.5


def test_detector_finds_each_shape_and_colour_of_single_objects():
    from collections import Counter
    wrong = Counter()
    for i in range(80):
        sc = tw.heldout_scene(5000 + i, n_objects=1)
        o = sc.objects[0]
        f = tw.object_in(sc.image, o.mask)
        if f is None or (f.shape, f.colour) != (o.shape, o.colour):
            wrong[o.shape] += 1
    assert sum(wrong.values()) <= 2, wrong


def test_detector_says_no_object_on_an_empty_background():
    sc = tw.heldout_scene(3, n_objects=1)
    empty = np.full_like(sc.image, 200)
    assert tw.find_objects(empty) == []
    assert tw.object_in(empty, sc.objects[0].mask) is None
    v = tw.edit_verdict(empty, sc.objects[0].mask, colour="red")
    assert not v.success and v.found is None and "no object" in v.reason


def test_edit_verdict_checks_colour_and_shape():
    sc = tw.heldout_scene(11, n_objects=1)
    o = sc.objects[0]
    other = next(c for c in tw.COLOUR_NAMES if c != o.colour)
    assert tw.edit_verdict(sc.image, o.mask, colour=o.colour).success
    v = tw.edit_verdict(sc.image, o.mask, colour=other)
    assert not v.success and o.colour in v.reason
    recoloured = tw.with_colour(sc, 0, other)
    assert tw.edit_verdict(recoloured.image, o.mask, colour=other, shape=o.shape).success
    wrong_shape = next(s for s in tw.SHAPES if s != o.shape)
    assert not tw.edit_verdict(sc.image, o.mask, shape=wrong_shape).success
    with pytest.raises(ValueError, match="unknown colour"):
        tw.edit_verdict(sc.image, o.mask, colour="purple")
    with pytest.raises(ValueError, match="uint8"):
        tw.find_objects(sc.image.astype(np.float32))
