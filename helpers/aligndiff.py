"""AlignDiff: synthetic training data (images + masks) for a novel class from a few real masked examples.

Three steps, each a function here (notebook 06 builds them up and checks against these):
1. the prompt bank: plain texts plus one learned token per real object (`textual_inversion`, normalised and masked:
   foreground and background losses each averaged over their own pixels, the background weighted by `bg_lambda`);
2. synthesis (`synthesize`): one seed per image; a coarse mask from the category token's cross-attention in the
   down and up layers at every resolution they have (not the mid block, as the reference), upsampled,
   max-normalised and averaged. The attention store keeps only that token's maps;
3. refinement (`refine`): a few-shot segmenter (prototype matching on UNet features, no downloaded weights) with the
   real examples as support; where its prediction agrees with the attention mask the sample is accepted and labelled
   with the prediction (as the reference), the accepted samples join the support set, and the rest are
   pseudo-labelled.
Then `train_segmenter` / `evaluate_segmenter`: a tiny conv net trained on real, synthetic or both sets.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import toyworld as tw
from .attention import AttentionStore, capture_attention
from .images import encode, decode, native_size, vae_factor
from .metrics import iou
from .toyworld import colour_mask
from .sampling import add_noise, denoise, prediction_target, seeded_noise
from .text import embed

TEMPLATE = "a {token} {category}"  # toy captions say "a red star": the learned token takes the colour word's place


# ---------------------------------------------------------------------------------------------------------------
# Checks on input
# ---------------------------------------------------------------------------------------------------------------
def category_id(tokenizer, word: str) -> int:
    """The single token id of a category word; a clear error if the tokenizer splits it (its maps would be split)."""
    if not isinstance(word, str) or not word.strip() or len(word.split()) != 1:
        raise ValueError(f"the category must be one word, e.g. 'star'; got {word!r}")
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"the tokenizer splits the category word {word!r} into {len(ids)} tokens {pieces}; AlignDiff "
                         "reads one token's cross-attention, so choose a word that is a single token (on the toy "
                         f"model: one of {tw.SHAPES}) or a synonym the tokenizer keeps whole")
    return ids[0]


def check_examples(images, masks, allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Real masked examples → (uint8 k×H×W×3, bool k×H×W), with clear errors for what AlignDiff cannot use.
    allow_empty: accept empty masks (training sets may hold images without the object)."""
    images, masks = list(images), list(masks)
    if len(images) == 0:
        raise ValueError("no real examples were given (k = 0): AlignDiff needs at least one real image of the novel "
                         "class with its mask (k = 1–5) to learn its token and to seed the few-shot segmenter")
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks; give one mask per image")
    ims, ms = [], []
    for i, (im, m) in enumerate(zip(images, masks)):
        im, m = np.asarray(im), np.asarray(m)
        if im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"example {i}: expected an H×W×3 RGB image, got shape {im.shape}")
        if m.shape != im.shape[:2]:
            raise ValueError(f"example {i}: mask {m.shape} does not match its image {im.shape[:2]}; resize the mask "
                             "to the image (nearest neighbour) or pass the mask that belongs to this image")
        m = m.astype(bool) if m.dtype == bool else m > 0.5
        if not allow_empty and not m.any():
            raise ValueError(f"example {i}: the mask is empty (no foreground pixel); an example must show the object "
                             "— drop it or fix its mask")
        if im.dtype != np.uint8:
            raise ValueError(f"example {i}: images are uint8 arrays (0–255), got {im.dtype}")
        ims.append(im); ms.append(m)
    shapes = {im.shape for im in ims}
    if len(shapes) > 1:
        raise ValueError(f"the examples differ in size {sorted(shapes)}; resize them to one size")
    return np.stack(ims), np.stack(ms)


# ---------------------------------------------------------------------------------------------------------------
# Toy-world data: the k real examples and the held-out test scenes
# ---------------------------------------------------------------------------------------------------------------
def has(sc: tw.Scene, category: str, min_pixels: int = 20) -> bool:
    return int(sc.mask_of(category).sum()) >= min_pixels


def _scenes_showing(category: str, n: int, split, start: int, size: int):
    """The first n scenes of a split (tw.train_scene / tw.heldout_scene) from `start` that show the category."""
    found, i = [], start
    while len(found) < n:
        sc = split(i, size=size)
        i += 1
        if has(sc, category):
            found.append(sc)
    return found


def real_examples(category: str, k: int, start: int = 0, size: int = tw.IMAGE_SIZE):
    """The first k training scenes from `start` that show the category (the segmenter's only real data of it).

    Returns (images, masks, colours): the colour of the category's object in each (toy world ground truth)."""
    scenes = _scenes_showing(category, k, tw.train_scene, start, size)
    return ([sc.image for sc in scenes], [sc.mask_of(category) for sc in scenes],
            [next(o.colour for o in sc.objects if o.shape == category) for sc in scenes])


def test_scenes(category: str, n: int, start: int = 0, size: int = tw.IMAGE_SIZE):
    """n held-out scenes that show the category (other shapes appear in them as distractors): images, masks."""
    scenes = _scenes_showing(category, n, tw.heldout_scene, start, size)
    return np.stack([sc.image for sc in scenes]), np.stack([sc.mask_of(category) for sc in scenes])


# ---------------------------------------------------------------------------------------------------------------
# Step 1: the prompt bank and normalised masked textual inversion
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PromptBank:
    """Prompts for one category: plain texts and learned per-object tokens, each with the colour it should show
    (toy world only; None where unknown). `prompt(i)` cycles through them."""
    category: str
    entries: list[tuple[str, str | None]] = field(default_factory=list)

    def add_text(self, text: str, colour: str | None = None):
        if self.category not in text.split():
            raise ValueError(f"the prompt {text!r} does not contain the category word {self.category!r}; the coarse "
                             "mask is read from that word's cross-attention")
        self.entries.append((text, colour))

    def add_token(self, token: str, colour: str | None = None, template: str = TEMPLATE):
        self.add_text(template.format(token=token, category=self.category), colour)

    @property
    def prompts(self) -> list[str]:
        return [p for p, _ in self.entries]

    def entry(self, i: int) -> tuple[str, str | None]:
        if not self.entries:
            raise ValueError("the prompt bank is empty; add texts or learned tokens first")
        return self.entries[i % len(self.entries)]


def plain_texts(category: str, distractors: bool = True) -> list[tuple[str, str]]:
    """Toy-world plain texts for a category: "a red star" for each colour, and with a distractor of another shape and
    colour ("a red star and a blue circle") so the segmenter also sees what is *not* the class."""
    out = [(f"a {c} {category}", c) for c in tw.COLOUR_NAMES]
    if distractors:
        others = [s for s in tw.SHAPES if s != category]
        for i, c in enumerate(tw.COLOUR_NAMES):
            c2 = tw.COLOUR_NAMES[(i + 1 + i % 2) % len(tw.COLOUR_NAMES)]
            s2 = others[i % len(others)]
            out.append((f"a {c} {category} and a {c2} {s2}", c))
            out.append((f"a {c2} {s2} and a {c} {category}", c))
    return out


def init_words(images, masks, category: str) -> list[str]:
    """A word to start each example's token from (toy world): the colour of the object under its mask, read by the
    toy world's detector — the word that fills the slot the token takes in "a {token} star". The category word
    where the detector finds no object there. (The reference starts every token from one fixed word, "good".)"""
    images, masks = check_examples(images, masks)
    out = []
    for im, m in zip(images, masks):
        f = tw.object_in(im, m)
        out.append(f.colour if f is not None else category)
    return out


def add_token(pipe, token: str, init_word: str) -> int:
    """Add `token` to the pipeline's tokenizer, grow the text encoder's embedding table, initialise its row from
    `init_word`'s embedding. A token that already exists is re-initialised (so a notebook cell can be rerun)."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    init = category_id(tok, init_word)
    if len(tok(token, add_special_tokens=False).input_ids) != 1 or token not in tok.get_vocab():
        if token.lower() != token or " " in token:
            raise ValueError(f"learned tokens are lower-case, without spaces (the tokenizer lower-cases prompts): "
                             f"{token!r}")
        tok.add_tokens([token])
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        emb = te.get_input_embeddings()  # resizing swaps the weight's data in place; a fresh Parameter drops any
        emb.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)  # stale graph
    tid = tok.convert_tokens_to_ids(token)
    with torch.no_grad():
        w = te.get_input_embeddings().weight
        w[tid] = w[init]
    return tid


def latent_masks(masks: np.ndarray, latent_hw: tuple[int, int], threshold: float = 0.3,
                 mode: str = "nearest") -> torch.Tensor:
    """Image masks → boolean masks at latent size, then > threshold (0.3, as the reference).

    mode "nearest" (the reference): each latent cell takes one pixel of the mask (a nearest-neighbour resize);
    "area": each cell takes the share of its pixels in the mask, so a cell counts when more than 30% is covered."""
    if mode not in ("nearest", "area"):
        raise ValueError(f"mode must be 'nearest' (the reference) or 'area', not {mode!r}")
    m = torch.as_tensor(np.asarray(masks, np.float32))[:, None]
    small = F.interpolate(m, size=latent_hw, mode="nearest") if mode == "nearest" else \
        F.adaptive_avg_pool2d(m, latent_hw)
    return (small > threshold)[:, 0]


def masked_loss(pred: torch.Tensor, target: torch.Tensor, fg: torch.Tensor, bg_lambda: float = 0.6) -> torch.Tensor:
    """Normalised masked loss: mean squared error over the foreground + bg_lambda × mean squared error over the
    background, each averaged over its own pixels (and channels), then over the batch. fg: bool B×h×w."""
    se = ((pred.float() - target.float()) ** 2).mean(1)  # B×h×w
    fgf = fg.float()
    fg_loss = (se * fgf).sum((1, 2)) / fgf.sum((1, 2)).clamp(min=1)
    bg_loss = (se * (1 - fgf)).sum((1, 2)) / (1 - fgf).sum((1, 2)).clamp(min=1)
    return (fg_loss + bg_lambda * bg_loss).mean()


@dataclass
class Inversion:
    tokens: list[str]
    token_ids: list[int]
    embeddings: torch.Tensor  # k × dim, the learned rows
    losses: list[float]
    prompts: list[str]


def textual_inversion(pipe, images, masks, category: str, steps: int = 200, lr: float = 5e-4, bg_lambda: float = 0.6,
                      init_word: str | list[str] | None = None, template: str = TEMPLATE, prefix: str | None = None,
                      flips: bool = True, seed: int = 0, progress: bool = True, weight_decay: float = 1e-2,
                      schedule: str = "cosine", mask_mode: str = "nearest") -> Inversion:
    """Learn one token per real example (all in one batched loop): "a <star-0> star" must denoise example 0, etc.

    Only the new rows of the embedding table change: the UNet, the text encoder and every other row stay frozen
    (the other rows are restored after each step). Loss: `masked_loss` on the UNet's prediction (ε, or v for a
    v-prediction model: `helpers.sampling.prediction_target`) at a uniformly drawn
    timestep, with random horizontal flips of image and mask. Optimiser as the reference: AdamW with weight decay
    1e-2 and a cosine learning-rate schedule without warm-up (schedule="constant" keeps lr fixed).
    init_word: the word each token starts from — one word for all, or one per example (default: the category).
    mask_mode: how masks reach the latent grid (`latent_masks`). Returns the tokens, their embeddings and the loss
    per step."""
    images, masks = check_examples(images, masks)
    cid = category_id(pipe.tokenizer, category)
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' (the reference) or 'constant', not {schedule!r}")
    inits = [init_word or category] * len(images) if not isinstance(init_word, (list, tuple)) else list(init_word)
    if len(inits) != len(images):
        raise ValueError(f"{len(inits)} init words for {len(images)} examples; give one word, or one per example")
    prefix = prefix or f"<{category}-"
    tokens = [f"{prefix}{i}>" for i in range(len(images))]
    ids = [add_token(pipe, t, w) for t, w in zip(tokens, inits)]
    prompts = [template.format(token=t, category=category) for t in tokens]
    te, unet = pipe.text_encoder, pipe.unet
    table = te.get_input_embeddings().weight
    keep = table.detach().clone()
    rows = torch.tensor(ids)
    frozen = torch.ones(table.shape[0], dtype=torch.bool)
    frozen[rows] = False
    latents = encode(pipe, list(images))
    fg = latent_masks(masks, tuple(latents.shape[-2:]), mode=mask_mode).to(latents.device)
    token_ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                               return_tensors="pt").input_ids.to(pipe.device)
    assert (token_ids == cid).any(1).all(), "every prompt holds the category token"
    req = [p.requires_grad for p in te.parameters()]
    req_unet = [p.requires_grad for p in unet.parameters()]
    for p in te.parameters():
        p.requires_grad_(False)
    table.requires_grad_(True)
    opt = torch.optim.AdamW([table], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(  # cosine from lr to 0 over the steps (no warm-up), or constant
        opt, lambda i: 0.5 * (1 + np.cos(np.pi * i / max(steps, 1))) if schedule == "cosine" else 1.0)
    g = torch.Generator().manual_seed(seed)
    n_train = pipe.scheduler.config.num_train_timesteps
    losses = []
    unet.requires_grad_(False)
    try:
        for _ in tqdm(range(steps), desc="textual inversion", disable=not progress, leave=False):
            x, m = latents, fg
            if flips:
                flip = torch.rand(len(x), generator=g) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                m = torch.where(flip[:, None, None], m.flip(-1), m)
            t = torch.randint(0, n_train, (len(x),), generator=g).to(x.device)
            noise = torch.randn(x.shape, generator=g).to(x)
            noisy = pipe.scheduler.add_noise(x, noise, t)
            cond = te(token_ids)[0]
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
            loss = masked_loss(pred, prediction_target(pipe, x, noise, t), m, bg_lambda)  # ε, v or x0 target
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                table[frozen] = keep[frozen]
            losses.append(loss.item())
    finally:
        table.grad = None  # a stale gradient would break the next resize of the table (it keeps the Parameter)
        table.requires_grad_(False)
        for p, r in zip(te.parameters(), req):
            p.requires_grad_(r)
        for p, r in zip(unet.parameters(), req_unet):
            p.requires_grad_(r)
    return Inversion(tokens, ids, table[rows].detach().clone(), losses, prompts)


@torch.no_grad()
def inversion_error(pipe, images, masks, prompts, n: int = 8, seed: int = 0) -> tuple[float, float]:
    """(foreground, background) noise-prediction MSE of `prompts` on their examples, each region averaged over its
    own latent cells, over the same n fixed (timestep, noise) draws per example — comparable across runs whatever
    `bg_lambda` they were trained with."""
    images, masks = check_examples(images, masks)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} examples; give one prompt per example")
    z = encode(pipe, list(images)).repeat_interleave(n, 0)
    fg = latent_masks(masks, tuple(z.shape[-2:])).repeat_interleave(n, 0).to(z.device)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(z),), generator=g).to(z.device)
    noise = torch.randn(z.shape, generator=g).to(z)
    cond = embed(pipe, [p for p in prompts for _ in range(n)])
    pred = pipe.unet(pipe.scheduler.add_noise(z, noise, t), t, encoder_hidden_states=cond).sample
    target = prediction_target(pipe, z, noise, t)  # what the UNet predicts: ε, v or x0
    fg_err = float(masked_loss(pred, target, fg, 0.0))
    bg_err = float(masked_loss(pred, target, ~fg, 0.0))
    return fg_err, bg_err


# ---------------------------------------------------------------------------------------------------------------
# Step 2: synthesis with a coarse mask from the category token's cross-attention
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layer:  # what AttentionStore.take reads of a layer: its name and the kind its maps are filed under
    name: str
    kind: str


MID = "cross-mid"  # the kind TokenStore files the mid block's maps under


class TokenStore(AttentionStore):
    """An attention store that keeps only one token's cross-attention per image (position `positions[b]` for batch
    element b): batch × queries × 1 instead of batch × queries × 77 — the reference kept every map and ran out of
    memory. The mid block's maps are filed apart, under the kind "cross-mid", so that a coarse mask can follow the
    reference (down and up layers only) or add them."""

    def __init__(self, positions, **kw):
        super().__init__(kinds=("cross",), **kw)
        self.positions = torch.as_tensor(positions, dtype=torch.long)

    def take(self, info, res, probs):
        if self.half != "all":
            n = probs.shape[0] // 2
            probs = probs[n:] if self.half == "cond" else probs[:n]
        pos = self.positions.to(probs.device)
        if len(pos) != probs.shape[0]:
            raise ValueError(f"{len(pos)} token positions for a batch of {probs.shape[0]}")
        picked = probs[torch.arange(len(pos), device=probs.device), :, :, pos]  # B × heads × Q
        super_half, self.half = self.half, "all"
        try:
            super().take(_Layer(info.name, MID if info.place == "mid" else info.kind), res, picked[..., None])
        finally:
            self.half = super_half


def token_index(tokenizer, prompts, word: str) -> list[int]:
    """Position of the (first) token of `word` in each encoded prompt — by token id, so learned tokens next to it
    do not confuse the lookup."""
    cid = category_id(tokenizer, word)
    out = []
    for p in prompts:
        ids = tokenizer(p).input_ids
        if cid not in ids:
            raise ValueError(f"the prompt {p!r} does not contain the category word {word!r}")
        out.append(ids.index(cid))
    return out


PLACES = ("down", "up")  # the reference's coarse mask: down and up layers at every resolution they have, no mid block


def coarse_heat(store: AttentionStore, size, places=PLACES) -> torch.Tensor:
    """B × H × W: the token's map at each captured resolution (the layers of `places` there averaged) upsampled
    (bicubic, as the reference, clamped at 0) to `size`, max-normalised per image; the resolutions averaged.
    places: ("down", "up") as the reference (on SD 1.x: 64, 32, 16 on its 64 latent; on the toy: 16 and 8); add
    "mid" to count the mid block (SD 8×8, toy 4×4) as one more resolution."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    bad = set(places) - {"down", "up", "mid"}
    if bad or not places:
        raise ValueError(f"places is a non-empty subset of ('down', 'up', 'mid'), not {places}")
    kinds = ({"cross"} if {"down", "up"} & set(places) else set()) | ({MID} if "mid" in places else set())
    if {"down", "up"} & set(places) and set(places) & {"down", "up"} != {"down", "up"}:
        raise ValueError("the store averages down and up layers of one resolution together: use both or neither")
    maps = []
    for kind, (h, w) in store.keys():
        if kind not in kinds:
            continue
        m = store.get(kind, (h, w))[..., 0].reshape(-1, 1, h, w)
        m = F.interpolate(m, size=size, mode="bicubic", align_corners=False)[:, 0].clamp(min=0)
        maps.append(m / m.amax((1, 2), keepdim=True).clamp(min=1e-12))
    if not maps:
        raise KeyError(f"no cross-attention of {places} was captured (the store holds {store.keys() or 'nothing'});"
                       " did the UNet run inside capture_attention?")
    return torch.stack(maps).mean(0)


@dataclass
class Synthetic:
    images: np.ndarray     # uint8 N × H × W × 3
    heat: np.ndarray       # float N × H × W in [0, 1]
    masks: np.ndarray      # bool N × H × W: heat > threshold
    prompts: list[str]
    colours: list[str | None]
    seeds: list[int]
    store_bytes: int = 0   # the token-only attention store's memory
    full_store_bytes: int = 0  # what a store keeping every token would hold
    heat_with_mid: np.ndarray | None = None  # the same heat with the mid block's maps as one more resolution


@torch.no_grad()
def synthesize(pipe, bank: PromptBank, n: int | None = None, steps: int = 50, guidance: float = 7.5, seed: int = 0,
               threshold: float = 0.4, batch: int = 16, start: int = 0, attn_steps=None, indices=None,
               progress: bool = True, places=PLACES) -> Synthetic:
    """Images n = start … start+n−1 of the bank: image i uses prompt i (cycling) and seed `seed + i` (one seed per
    image, so any split across processes gives the same images). Coarse mask: `coarse_heat(store, size, places)` >
    threshold (0.4, as the reference); `heat_with_mid` also holds the heat with the mid block added.
    attn_steps: which denoising steps' attention to average (None: all, as the reference). indices: the image
    numbers to make (instead of start … start+n−1), batched in the order given."""
    indices = list(range(start, start + n)) if indices is None else list(indices)
    size = native_size(pipe)
    side = size // vae_factor(pipe)
    out = dict(images=[], heat=[], heat_mid=[], prompts=[], colours=[], seeds=[])
    nbytes, full = 0, 0
    for b0 in tqdm(range(0, len(indices), batch), desc="synthesis", disable=not progress, leave=False):
        idx = indices[b0:b0 + batch]
        entries = [bank.entry(i) for i in idx]
        prompts = [p for p, _ in entries]
        lat = torch.cat([seeded_noise((1, pipe.unet.config.in_channels, side, side), seed + i, pipe.unet)
                         for i in idx])
        store = TokenStore(token_index(pipe.tokenizer, prompts, bank.category),
                           half="cond" if guidance != 1.0 else "all", steps=attn_steps)
        with capture_attention(pipe.unet, store):
            lat = denoise(pipe, lat, prompts, steps, guidance)
        nbytes = max(nbytes, store.nbytes())
        full = max(full, store.nbytes() * pipe.tokenizer.model_max_length)
        img = ((decode(pipe, lat) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        out["images"].append(img)
        out["heat"].append(coarse_heat(store, size, places).cpu().numpy())
        out["heat_mid"].append(coarse_heat(store, size, ("down", "mid", "up")).cpu().numpy())
        out["prompts"] += prompts
        out["colours"] += [c for _, c in entries]
        out["seeds"] += [seed + i for i in idx]
    heat = np.concatenate(out["heat"])
    return Synthetic(np.concatenate(out["images"]), heat, heat > threshold, out["prompts"], out["colours"],
                     out["seeds"], nbytes, full, np.concatenate(out["heat_mid"]))


def coarse_iou(syn: Synthetic) -> list[float | None]:
    """IoU of each coarse mask with the generated object's pixels (by its colour) where the colour is known."""
    return [None if c is None else iou(m, colour_mask(im, c)) for im, m, c in zip(syn.images, syn.masks, syn.colours)]


# ---------------------------------------------------------------------------------------------------------------
# Step 3: a few-shot segmenter (prototype matching on UNet features) and refinement
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def unet_features(pipe, images, t: int = 300, seed: int = 0, prompt: str = "", batch: int = 32) -> torch.Tensor:
    """Per-pixel features at latent resolution: the UNet's up-block outputs for the image noised to `t` under
    `prompt` ("" = no text), each upsampled to the latent grid and L2-normalised, concatenated (B × C × h × w)."""
    feats = []
    for b0 in range(0, len(images), batch):
        lat = encode(pipe, list(images[b0:b0 + batch]))
        noisy = add_noise(pipe, lat, t, seed=seed)
        got = []
        hooks = [blk.register_forward_hook(lambda m, a, o: got.append(o)) for blk in pipe.unet.up_blocks]
        try:
            pipe.unet(noisy, t, encoder_hidden_states=embed(pipe, [prompt] * len(lat)))
        finally:
            for h in hooks:
                h.remove()
        hw = lat.shape[-2:]
        f = [F.normalize(F.interpolate(o.float(), size=hw, mode="bilinear", align_corners=False), dim=1) for o in got]
        feats.append(torch.cat(f, 1).cpu())
    return torch.cat(feats)


class PrototypeSegmenter:
    """Few-shot segmentation by prototype matching: each support image gives a foreground and a background
    prototype (mean feature under / outside its mask); a pixel is foreground when its best cosine similarity to a
    foreground prototype beats its best similarity to a background one. No trained weights beyond the UNet."""

    def __init__(self, feats: torch.Tensor, masks: np.ndarray):
        self.fg, self.bg = [], []
        self.add(feats, masks)

    def add(self, feats: torch.Tensor, masks):
        m = torch.as_tensor(np.asarray(masks, np.float32))[:, None]
        m = F.adaptive_avg_pool2d(m, feats.shape[-2:])
        for f, mm in zip(feats, m):
            w = (mm > 0.5).float()
            if w.sum() == 0 or (1 - w).sum() == 0:
                continue
            self.fg.append(F.normalize((f * w).sum((1, 2)) / w.sum(), dim=0))
            self.bg.append(F.normalize((f * (1 - w)).sum((1, 2)) / (1 - w).sum(), dim=0))

    def score(self, feats: torch.Tensor) -> torch.Tensor:
        """B × h × w: best foreground similarity minus best background similarity (> 0 = foreground)."""
        f = F.normalize(feats, dim=1)
        sf = torch.einsum("bchw,kc->bkhw", f, torch.stack(self.fg)).amax(1)
        sb = torch.einsum("bchw,kc->bkhw", f, torch.stack(self.bg)).amax(1)
        return sf - sb

    def predict(self, feats: torch.Tensor, size) -> np.ndarray:
        s = F.interpolate(self.score(feats)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return (s > 0).numpy()


@dataclass
class Refined:
    masks: np.ndarray          # bool N × H × W: training labels (accepted: see `recipe`; rest: pseudo-label)
    accepted: np.ndarray       # bool N
    agreement: np.ndarray      # IoU of the few-shot prediction with the coarse mask (support: the real examples)
    support_size: int
    first_pred: np.ndarray | None = None  # bool N × H × W: the few-shot prediction with the real support only


RECIPES = ("reference", "sequential")


def refine(pipe, syn: Synthetic, real_images, real_masks, threshold: float = 0.8, t: int = 300, prompt: str = "",
           feats: torch.Tensor | None = None, real_feats: torch.Tensor | None = None,
           recipe: str = "reference") -> Refined:
    """Refine the coarse masks with a few-shot segmenter whose support set starts as the real examples.

    recipe "reference" (RogerQi/AlignDiff's `generate_mask_one_class`): one pass — predict every synthetic sample
    with the real support; a sample whose prediction agrees with its coarse mask (IoU > threshold) is accepted and
    *labelled with that prediction*; the accepted samples join the support set; the grown segmenter pseudo-labels
    the rest.
    recipe "sequential" (a variant, not the reference): accepted samples keep their *coarse mask* as label, and
    acceptance is re-checked one sample at a time (most agreeing first) as the support set grows.
    Features: `unet_features(pipe, images, t, prompt=prompt)` unless given."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, not {recipe!r}")
    real_images, real_masks = check_examples(real_images, real_masks)
    size = syn.masks.shape[1:]
    feats = unet_features(pipe, syn.images, t, prompt=prompt) if feats is None else feats
    real_feats = unet_features(pipe, real_images, t, prompt=prompt) if real_feats is None else real_feats
    seg = PrototypeSegmenter(real_feats, real_masks)
    pred = seg.predict(feats, size)
    agree = np.array([iou(p, m) for p, m in zip(pred, syn.masks)])
    labels = syn.masks.copy()
    if recipe == "reference":
        accepted = (agree > threshold) & pred.any((1, 2))
        labels[accepted] = pred[accepted]
        if accepted.any():
            seg.add(feats[accepted], pred[accepted])
    else:
        accepted = np.zeros(len(agree), bool)
        for i in np.argsort(-agree):
            if agree[i] <= threshold:
                break
            p = seg.predict(feats[i:i + 1], size)[0]  # re-check with the support grown so far
            if iou(p, syn.masks[i]) > threshold and syn.masks[i].any():
                accepted[i] = True
                seg.add(feats[i:i + 1], syn.masks[i:i + 1])
    rest = np.flatnonzero(~accepted)
    if len(rest):
        labels[rest] = seg.predict(feats[rest], size)
    return Refined(labels, accepted, agree, len(seg.fg), pred)


# ---------------------------------------------------------------------------------------------------------------
# The proof: a tiny segmentation network
# ---------------------------------------------------------------------------------------------------------------
class TinySegmenter(nn.Module):
    """A small conv net (≈ 25 k parameters) for binary masks. It works at half resolution (a stride-2 stem), goes
    down once more, gathers context with dilated convolutions, comes back up with a skip from the stem, and
    upsamples its logits to the input size."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, stride=2, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(2 * w, 2 * w, 3, padding=2, dilation=2), nn.ReLU(),
                                  nn.Conv2d(2 * w, 2 * w, 3, padding=4, dilation=4), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(3 * w, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 1, 1))

    def forward(self, x):
        s = self.stem(x)
        d = F.interpolate(self.down(s), size=s.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.head(torch.cat([s, d], 1))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def _to_input(images) -> torch.Tensor:
    return torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_segmenter(images, masks, steps: int = 400, batch: int = 16, lr: float = 3e-3, seed: int = 0,
                    progress: bool = True, desc: str = "segmenter") -> TinySegmenter:
    """Train a TinySegmenter on images (uint8 N×H×W×3) and bool masks, with flips and 90° rotations."""
    images, masks = check_examples(images, masks, allow_empty=True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = TinySegmenter()
    x_all, y_all = _to_input(images), torch.as_tensor(masks).float()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        i = torch.randint(0, len(x_all), (batch,), generator=g)
        x, y = x_all[i], y_all[i]
        k = int(torch.randint(0, 4, (1,), generator=g))
        x, y = x.rot90(k, (-2, -1)), y.rot90(k, (-2, -1))
        if torch.rand(1, generator=g) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        loss = F.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    return net.eval()


@torch.no_grad()
def evaluate_segmenter(net: TinySegmenter, images, masks) -> float:
    """Mean IoU of the net's masks (logit > 0) with the ground truth over the images."""
    pred = (net(_to_input(images)) > 0).numpy()
    return float(np.mean([iou(p, m) for p, m in zip(pred, masks)]))
