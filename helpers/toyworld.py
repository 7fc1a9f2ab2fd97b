"""The toy world: procedural scenes of coloured shapes with exact ground truth.

Every scene is a pure function of an integer seed. Training uses seeds below ``HELDOUT_SEED_BASE``;
held-out scenes (what notebooks, tests and the model card measure on) use seeds from it upward, so the
two splits never share a scene.

A scene holds the RGB image (uint8, H×W×3), a caption such as "a red circle and a blue square",
one boolean instance mask per object, and a semantic map (0 = background, 1 + shape index per pixel).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {  # name -> RGB (saturated, far from the neutral backgrounds and from each other)
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
COLOUR_NAMES = tuple(COLOURS)
# Light neutral backgrounds: grey, warm, cool, beige. Objects never share their colours.
BACKGROUNDS = ((200, 200, 200), (225, 215, 200), (195, 205, 215), (235, 235, 225))
IMAGE_SIZE = 64
HELDOUT_SEED_BASE = 10**8
MAX_OBJECTS = 3
SUPERSAMPLE = 4
OBJECT_RADIUS = (0.12, 0.22)  # of the image size
STAR_INNER = 0.62  # star's inner radius ÷ r (version 1 of the world: 0.5, spikes too thin for 16×16 latents)
TRIANGLE_OUTER = 1.3  # triangle's corner distance ÷ r (version 1: 1.15)
WORLD_VERSION = 3  # bump whenever scenes change: train_toy refuses to resume checkpoints of another version


@dataclass
class ToyObject:
    shape: str
    colour: str
    centre: tuple[float, float]  # (x, y) in pixels
    radius: float
    angle: float
    mask: np.ndarray = field(repr=False)  # bool H×W, visible part (after occlusion)

    @property
    def words(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    seed: int
    image: np.ndarray = field(repr=False)  # uint8 H×W×3
    objects: list[ToyObject]
    background: tuple[int, int, int]
    caption: str
    texture_seed: int | None = None

    @property
    def semantic(self) -> np.ndarray:
        """int64 H×W map: 0 background, 1 + SHAPES.index(shape) where that shape is visible."""
        sem = np.zeros(self.image.shape[:2], dtype=np.int64)
        for o in self.objects:
            sem[o.mask] = 1 + SHAPES.index(o.shape)
        return sem

    @property
    def instances(self) -> np.ndarray:
        """int64 H×W map: 0 background, i + 1 for the i-th object."""
        ins = np.zeros(self.image.shape[:2], dtype=np.int64)
        for i, o in enumerate(self.objects):
            ins[o.mask] = i + 1
        return ins

    def mask_of(self, word: str) -> np.ndarray:
        """Union of the masks of the objects a shape or colour word names (bool H×W)."""
        if word not in SHAPES and word not in COLOURS:
            raise ValueError(f"'{word}' is not a toy-world word; use one of {SHAPES + COLOUR_NAMES}")
        m = np.zeros(self.image.shape[:2], dtype=bool)
        for o in self.objects:
            if word in o.words:
                m |= o.mask
        return m

    @property
    def words(self) -> list[str]:
        """The caption's words, commas as words of their own (as a CLIP tokenizer splits them)."""
        return self.caption.replace(",", " ,").split()

    def phrase_index(self, index: int) -> int:
        """Index in `words` of object `index`'s colour word (its shape word follows)."""
        o = self.objects[index]
        w = self.words
        (i,) = [i for i in range(len(w) - 1) if w[i] == o.colour and w[i + 1] == o.shape]
        return i

    def occurrence(self, index: int, word: str) -> int:
        """Which occurrence (0-based) of `word` in the caption belongs to object `index` (for repeated shapes)."""
        o = self.objects[index]
        if word not in o.words:
            raise ValueError(f"object {index} is a {o.phrase}; '{word}' does not describe it")
        at = self.phrase_index(index) + (0 if word == o.colour else 1)
        return self.words[:at].count(word)

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    if shape == "circle":
        return None
    if shape == "square":
        k, rr, offs = 4, r * 0.9 * math.sqrt(2), math.pi / 4
        pts = [(rr * math.cos(angle + offs + 2 * math.pi * i / k), rr * math.sin(angle + offs + 2 * math.pi * i / k))
               for i in range(k)]
    elif shape == "triangle":
        rr = r * TRIANGLE_OUTER
        pts = [(rr * math.cos(angle - math.pi / 2 + 2 * math.pi * i / 3),
                rr * math.sin(angle - math.pi / 2 + 2 * math.pi * i / 3)) for i in range(3)]
    elif shape == "star":
        pts = []
        for i in range(10):
            rr = r * 1.15 if i % 2 == 0 else r * STAR_INNER
            a = angle - math.pi / 2 + math.pi * i / 5
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    else:
        raise ValueError(f"unknown shape '{shape}'; choose from {SHAPES}")
    return [(cx + x, cy + y) for x, y in pts]


def _draw(draw: ImageDraw.ImageDraw, shape, cx, cy, r, angle, fill, s):
    poly = _polygon(shape, cx * s, cy * s, r * s, angle)
    if poly is None:
        draw.ellipse([cx * s - r * s, cy * s - r * s, cx * s + r * s, cy * s + r * s], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def render(objects: list[dict], background=(200, 200, 200), size: int = IMAGE_SIZE, texture_seed: int | None = 0,
           texture: float = 6.0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw objects (dicts with shape, colour, centre, radius, angle) in order, later ones on top.

    Returns the uint8 image and the visible (occlusion-aware) bool mask of each object.
    Anti-aliased by drawing at SUPERSAMPLE× and averaging; a pixel belongs to a mask when more than half covered.
    """
    s = SUPERSAMPLE
    big = size * s
    label = Image.new("L", (big, big), 0)
    ld = ImageDraw.Draw(label)
    for i, o in enumerate(objects):
        _draw(ld, o["shape"], *o["centre"], o["radius"], o["angle"], i + 1, s)
    lab = np.asarray(label)
    # background with a light, smooth texture (a random low-frequency field)
    bg = np.empty((size, size, 3), dtype=np.float32)
    bg[:] = background
    if texture_seed is not None and texture > 0:
        rng = np.random.default_rng(texture_seed)
        coarse = rng.normal(0, 1, (4, 4, 1)).astype(np.float32)
        field_ = np.asarray(Image.fromarray(coarse[..., 0]).resize((size, size), Image.BICUBIC))[..., None]
        bg += texture * field_
    colours = np.zeros((len(objects) + 1, 3), dtype=np.float32)
    for i, o in enumerate(objects):
        colours[i + 1] = COLOURS[o["colour"]]
    # average the supersampled colours; background pixels take the textured background
    onehot = np.stack([(lab == i) for i in range(len(objects) + 1)], -1).astype(np.float32)  # big,big,K
    cover = onehot.reshape(size, s, size, s, -1).mean((1, 3))  # size,size,K
    img = cover[..., :1] * bg + cover[..., 1:] @ colours[1:]
    masks = [cover[..., i + 1] > 0.5 for i in range(len(objects))]
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), masks


def caption_for(objects: list[dict], order=None) -> str:
    """"a red circle, a blue square and a green star" from object dicts, in `order` if given."""
    phrases = [f"a {o['colour']} {o['shape']}" for o in objects]
    if order is not None:
        phrases = [phrases[i] for i in order]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def scene(seed: int, n_objects: int | None = None, size: int = IMAGE_SIZE) -> Scene:
    """The scene of a seed: 1–3 objects of distinct (colour, shape) pairs, placed with little overlap."""
    if seed < 0:
        raise ValueError("seeds are non-negative integers")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, not {n}")
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    colours = rng.permutation(len(COLOURS))[:n]  # distinct colours: each colour word names one object
    objs: list[dict] = []
    for i in range(n):
        best = None
        for _attempt in range(50):
            r = float(rng.uniform(*OBJECT_RADIUS) * size)
            cx = float(rng.uniform(r, size - r))
            cy = float(rng.uniform(r, size - r))
            # keep objects mostly apart: centre distance > 0.9 × sum of radii
            gap = min((math.hypot(cx - o["centre"][0], cy - o["centre"][1]) / (r + o["radius"]) for o in objs),
                      default=1.0)
            if best is None or gap > best[0]:
                best = (gap, r, cx, cy)
            if gap > 0.9:
                break
        else:  # no place found in 50 tries (rare, crowded three-object scenes): take the least overlapping one
            _, r, cx, cy = best
        objs.append(dict(shape=SHAPES[int(rng.integers(len(SHAPES)))], colour=COLOUR_NAMES[int(colours[i])],
                         centre=(cx, cy), radius=r, angle=float(rng.uniform(0, 2 * math.pi))))
    texture_seed = int(rng.integers(2**31))
    image, masks = render(objs, background, size, texture_seed=texture_seed)
    objects = [ToyObject(mask=m, **o) for o, m in zip(objs, masks)]
    caption = caption_for(objs, order=rng.permutation(n))
    return Scene(seed=seed, image=image, objects=objects, background=background, caption=caption,
                 texture_seed=texture_seed)


def heldout_scene(i: int, **kw) -> Scene:
    """The i-th held-out scene (never used in training)."""
    return scene(HELDOUT_SEED_BASE + i, **kw)


def train_scene(i: int, **kw) -> Scene:
    if not 0 <= i < HELDOUT_SEED_BASE:
        raise ValueError(f"training seeds lie in [0, {HELDOUT_SEED_BASE})")
    return scene(i, **kw)


def with_colour(sc: Scene, index: int, colour: str) -> Scene:
    """The same scene with object `index` recoloured: the ground truth of a colour edit."""
    return _edited(sc, index, colour=colour)


def with_shape(sc: Scene, index: int, shape: str) -> Scene:
    """The same scene with object `index` drawn as another shape: the ground truth of a shape edit."""
    return _edited(sc, index, shape=shape)


def _edited(sc: Scene, index: int, **change) -> Scene:
    objs = [dict(shape=o.shape, colour=o.colour, centre=o.centre, radius=o.radius, angle=o.angle) for o in sc.objects]
    if not 0 <= index < len(objs):
        raise IndexError(f"the scene has {len(objs)} objects; index {index} is out of range")
    for k, v in change.items():
        valid = COLOURS if k == "colour" else SHAPES
        if v not in valid:
            raise ValueError(f"unknown {k} '{v}'; choose from {tuple(valid)}")
    objs[index].update(change)
    image, masks = render(objs, sc.background, sc.image.shape[0], texture_seed=sc.texture_seed)
    objects = [ToyObject(mask=m, **o) for o, m in zip(objs, masks)]
    caption = sc.caption.replace(sc.objects[index].phrase, f"{objs[index]['colour']} {objs[index]['shape']}")
    return Scene(seed=sc.seed, image=image, objects=objects, background=sc.background, caption=caption,
                 texture_seed=sc.texture_seed)


def colour_masses(image: np.ndarray, max_dist: float = 60.0) -> dict[str, float]:
    """Fraction of the image's pixels whose colour is within `max_dist` (RGB) of each palette colour."""
    px = image.reshape(-1, 3).astype(np.float32)
    names = list(COLOURS)
    pal = np.array([COLOURS[c] for c in names], dtype=np.float32)
    d = np.linalg.norm(px[:, None, :] - pal[None], axis=-1)
    nearest = d.argmin(1)
    close = d.min(1) < max_dist
    return {c: float(np.mean(close & (nearest == i))) for i, c in enumerate(names)}


def colour_mask(image: np.ndarray, colour: str, max_dist: float = 60.0) -> np.ndarray:
    """Pixels within `max_dist` (RGB) of a palette colour: the ground truth of a generated toy object of that colour."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour '{colour}'; choose from {COLOUR_NAMES}")
    return np.linalg.norm(image.astype(np.float32) - np.array(COLOURS[colour], np.float32), axis=-1) < max_dist


def colour_fraction(image: np.ndarray, mask: np.ndarray, colour: str, max_dist: float = 60.0) -> float:
    """Share of the pixels under `mask` whose colour is within `max_dist` of the palette colour `colour`."""
    m = np.asarray(mask, dtype=bool)
    if m.shape != image.shape[:2]:
        raise ValueError(f"mask {m.shape} and image {image.shape[:2]} differ in size")
    return float(colour_mask(image, colour, max_dist)[m].mean()) if m.any() else 0.0


def colours_in_caption(caption: str) -> set[str]:
    words = caption.replace(",", " ").split()
    return {w for w in words if w in COLOURS}


def adheres(image: np.ndarray, caption: str, present: float = 0.015, absent: float = 0.005) -> bool:
    """Does an image contain each colour its caption names (≥ `present` of the pixels) and no other (< `absent`)?"""
    masses = colour_masses(image)
    named = colours_in_caption(caption)
    return all(masses[c] >= present for c in named) and all(masses[c] < absent for c in COLOURS if c not in named)


@dataclass
class EditCase:
    """A held-out edit with its ground truth: where the image must change (`region`) and what it should become."""
    kind: str              # "colour", "shape" or "one of three"
    scene: Scene
    reference: str         # the input's caption
    query: str             # the edited caption
    target: Scene          # the toy world's rendering of the edited scene
    region: np.ndarray = field(repr=False)  # bool H×W: the edited object's pixels before or after the edit
    index: int = 0         # which object is edited
    new_colour: str | None = None


def edit_cases(n: int, start: int = 0, size: int = IMAGE_SIZE, kinds=("colour", "shape", "one of three")) -> list[EditCase]:
    """n held-out edits cycling through `kinds`: recolour an object of a 1–2-object scene, change an object's
    shape, or recolour one object of three. Deterministic; held-out seeds from HELDOUT_SEED_BASE + 10**6 + start."""
    cases = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        sc = heldout_scene(10**6 + start + i, n_objects=3 if kind == "one of three" else 1 + (i // len(kinds)) % 2,
                           size=size)
        o = sc.objects[0]
        if kind == "shape":
            new_shape = SHAPES[(SHAPES.index(o.shape) + 1 + i % (len(SHAPES) - 1)) % len(SHAPES)]
            target, colour = with_shape(sc, 0, new_shape), None
        else:
            colour = next(c for c in COLOUR_NAMES[i % 4:] + COLOUR_NAMES[:i % 4] if c not in colours_in_caption(sc.caption))
            target = with_colour(sc, 0, colour)
        cases.append(EditCase(kind, sc, sc.caption, target.caption, target, o.mask | target.objects[0].mask, 0, colour))
    return cases


# ---------------------------------------------------------------------------------------------------------------
# A detector for toy objects in any image (real or generated): it can say "nothing is there".

@dataclass
class Found:
    """One detected object: a connected blob of pixels close to one palette colour."""
    colour: str
    shape: str | None      # classified from the blob's outline; None when the blob fits no shape well
    mask: np.ndarray = field(repr=False)  # bool H×W
    pixels: int = 0


def _classify_shape(mask: np.ndarray) -> str | None:
    """circle / square / triangle / star from two outline measures, or None for an unshaped blob.

    solidity = area ÷ convex-hull area (a star's notches make it low); fill = area ÷ the area of the circle around
    the blob's centroid through its farthest pixel (circle ≈ 1, square 2/π ≈ 0.64, triangle ≈ 0.41).
    """
    from scipy.spatial import ConvexHull, QhullError
    ys, xs = np.nonzero(mask)
    if len(xs) < 12:
        return None
    # pixel corners, so a blob's hull covers its pixels' full area
    pts = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(np.float64)
    try:
        hull = ConvexHull(pts).volume  # in 2-D, volume is the area
    except QhullError:
        return None
    area = float(len(xs))
    solidity = area / hull
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    r_max = np.sqrt(((pts[:, 0] - cx) ** 2 + (pts[:, 1] - cy) ** 2).max())
    fill = area / (math.pi * r_max ** 2)
    if solidity < 0.55:
        return None
    if solidity < 0.78:  # measured on 300 one-object scenes: stars ≤ 0.73, other shapes ≥ 0.83
        return "star"
    if fill > 0.8:
        return "circle"
    if fill > 0.52:
        return "square"
    if fill > 0.3:
        return "triangle"
    return None


def find_objects(image: np.ndarray, min_pixels: int | None = None, max_dist: float = 60.0) -> list[Found]:
    """Every blob of one palette colour with at least `min_pixels` pixels (default: 0.4% of the image), largest first.

    A generated image with no object in it returns []: this is the detector that can say "no object".
    """
    from scipy import ndimage
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (0–255), got {image.dtype}; convert with np.array(pil_image)")
    if min_pixels is None:
        min_pixels = max(4, round(0.004 * image.shape[0] * image.shape[1]))
    found = []
    for c in COLOUR_NAMES:
        labels, n = ndimage.label(colour_mask(image, c, max_dist))
        for k in range(1, n + 1):
            m = labels == k
            if m.sum() >= min_pixels:
                found.append(Found(c, _classify_shape(m), m, int(m.sum())))
    return sorted(found, key=lambda f: -f.pixels)


def object_in(image: np.ndarray, region: np.ndarray, min_share: float = 0.25, **kw) -> Found | None:
    """The detected object overlapping `region` the most, if it covers at least `min_share` of the region;
    None means there is no object there."""
    region = np.asarray(region, dtype=bool)
    if region.shape != np.asarray(image).shape[:2]:
        raise ValueError(f"region {region.shape} and image {np.asarray(image).shape[:2]} differ in size")
    if not region.any():
        raise ValueError("the region is empty: pass the pixels where the object should be")
    best, best_share = None, 0.0
    for f in find_objects(image, **kw):
        share = (f.mask & region).sum() / region.sum()
        if share > best_share:
            best, best_share = f, share
    return best if best_share >= min_share else None


@dataclass
class Verdict:
    success: bool
    found: Found | None
    colour_share: float  # share of the region in the target colour (nan when no colour was asked for)
    reason: str


def edit_verdict(image: np.ndarray, region: np.ndarray, colour: str | None = None, shape: str | None = None,
                 min_share: float = 0.25) -> Verdict:
    """Did an edit put an object of `colour` and/or `shape` into `region`? Success needs an object found there and,
    the object there in that colour (its nearest palette colour) and, for a shape, its blob classified as that shape."""
    if colour is None and shape is None:
        raise ValueError("say what the edit should produce: colour=..., shape=... or both")
    if colour is not None and colour not in COLOURS:
        raise ValueError(f"unknown colour '{colour}'; choose from {COLOUR_NAMES}")
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown shape '{shape}'; choose from {SHAPES}")
    image = np.asarray(image)
    region = np.asarray(region, dtype=bool)
    share = colour_fraction(image, region, colour) if colour else float("nan")
    f = object_in(image, region, min_share=min_share)
    if f is None:
        return Verdict(False, None, share, "no object in the region")
    problems = []
    if colour is not None and f.colour != colour:
        problems.append(f"the object there is {f.colour}, not {colour}")
    if shape is not None and f.shape != shape:
        problems.append(f"the object there looks like a {f.shape or 'shapeless blob'}, not a {shape}")
    return Verdict(not problems, f, share, "; ".join(problems) or "edit found")
