"""Plotting: image grids, mask overlays, heat maps. Small figures, so notebooks stay small on disk."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SEGMENT_COLOURS = np.array([(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
                            (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195)],
                           dtype=np.uint8)


def _img(x) -> np.ndarray:
    if isinstance(x, Image.Image):
        return np.asarray(x.convert("RGB"))
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu()
        if x.ndim == 4:
            x = x[0]
        if x.ndim == 3 and x.shape[0] in (1, 3):
            x = ((x.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0)
        return x.numpy()
    return np.asarray(x)


def show_images(images, titles=None, ncols: int | None = None, size: float = 1.8, cmap=None, suptitle=None):
    """A row (or grid) of images with optional titles; returns the figure."""
    import matplotlib.pyplot as plt
    images = list(images)
    n = len(images)
    ncols = ncols or n
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.3 if suptitle else 0)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, im in enumerate(images):
        ax = axes.ravel()[i]
        a = _img(im)
        ax.imshow(a, cmap=cmap if a.ndim == 2 else None, interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return fig


def overlay(image, mask, colour=(255, 0, 255), alpha: float = 0.5) -> np.ndarray:
    """Tint the pixels of a boolean mask (or a [0, 1] map) in `colour` on top of the image."""
    a = _img(image).astype(np.float32)
    m = np.asarray(mask, dtype=np.float32)
    if m.shape != a.shape[:2]:
        m = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize(a.shape[1::-1], Image.NEAREST)) / 255
    m = m[..., None] * alpha
    return (a * (1 - m) + np.array(colour, dtype=np.float32) * m).astype(np.uint8)


def heat_overlay(image, heat, alpha: float = 0.6, cmap: str = "jet") -> np.ndarray:
    """A heat map (any size; upsampled bicubically) normalised to [0, 1] and blended over the image."""
    import matplotlib
    a = _img(image).astype(np.float32) / 255
    h = heat.detach().float().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, np.float32)
    h = (h - h.min()) / (h.max() - h.min() + 1e-12)
    if h.shape != a.shape[:2]:
        h = np.asarray(Image.fromarray(h.astype(np.float32)).resize(a.shape[1::-1], Image.BICUBIC)).clip(0, 1)
    c = matplotlib.colormaps[cmap](h)[..., :3]
    return ((a * (1 - alpha) + c * alpha) * 255).astype(np.uint8)


def colour_segments(labels) -> np.ndarray:
    """An integer label map -> an RGB picture, one fixed colour per label."""
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    return SEGMENT_COLOURS[lab % len(SEGMENT_COLOURS)]


def static_then_controls(draw, note: str = "controls: they need a live kernel (Jupyter or Colab)", **controls):
    """Draw `draw(**defaults)` once as a plain output (what a notebook read on GitHub or as HTML shows), then attach
    `controls` (ipywidgets, one per keyword of `draw`) and an output area that redraws only when a control changes,
    so a live notebook never shows the default figure twice. Without a kernel the controls' place shows `note`
    instead of a widget's raw repr. Returns the output area."""
    import ipywidgets as widgets
    from IPython.display import display
    if not controls:
        raise ValueError("no controls given: pass one ipywidget per keyword of draw, e.g. t=IntSlider(...)")
    out = widgets.Output()

    def redraw(_change=None):
        with out:
            out.clear_output(wait=True)
            draw(**{k: c.value for k, c in controls.items()})

    for c in controls.values():
        c.observe(redraw, names="value")
    draw(**{k: c.value for k, c in controls.items()})
    box = widgets.VBox([widgets.HBox(list(controls.values())), out])
    bundle = box._repr_mimebundle_()
    bundle["text/plain"] = f"[{note}]"
    display(bundle, raw=True)
    return out
