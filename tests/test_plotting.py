import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from helpers.plotting import colour_segments, heat_overlay, overlay, show_images  # noqa: E402


def test_show_images_grid_and_titles():
    imgs = [np.zeros((8, 8, 3), np.uint8), torch.zeros(1, 3, 8, 8), np.ones((8, 8))]
    fig = show_images(imgs, ["a", "b", "c"], ncols=2)
    axes = fig.axes
    assert len(axes) == 4 and [a.get_title() for a in axes[:3]] == ["a", "b", "c"]
    assert not axes[3].images  # the spare cell stays empty


def test_overlay_tints_only_the_mask():
    img = np.full((8, 8, 3), 100, np.uint8)
    m = np.zeros((8, 8), bool); m[:2] = True
    out = overlay(img, m, colour=(255, 0, 0), alpha=1.0)
    assert (out[:2] == (255, 0, 0)).all() and (out[2:] == 100).all()
    small = overlay(np.zeros((16, 16, 3), np.uint8), np.ones((4, 4)), alpha=1.0)  # masks are resized to the image
    assert small.shape == (16, 16, 3) and (small == (255, 0, 255)).all()


def test_heat_overlay_and_segments():
    h = torch.zeros(4, 4); h[0, 0] = 1
    out = heat_overlay(np.zeros((16, 16, 3), np.uint8), h, alpha=1.0)
    assert out.shape == (16, 16, 3) and out[0, 0].tolist() != out[15, 15].tolist()
    seg = colour_segments(np.array([[0, 1], [2, 1]]))
    assert seg.shape == (2, 2, 3) and (seg[0, 1] == seg[1, 1]).all() and (seg[0, 0] != seg[0, 1]).any()


def test_static_then_controls_draws_once_then_on_change_only(capsys):
    import ipywidgets as widgets
    calls = []
    slider = widgets.IntSlider(value=3, min=0, max=9)
    from helpers.plotting import static_then_controls
    out = static_then_controls(lambda t: calls.append(t), note="live kernel only", t=slider)
    assert calls == [3]  # the default view, drawn once as plain output
    assert "live kernel only" in capsys.readouterr().out  # the text a reader without a kernel sees
    slider.value = 7
    assert calls == [3, 7] and isinstance(out, widgets.Output)
    import pytest
    with pytest.raises(ValueError, match="no controls"):
        static_then_controls(lambda: None)
