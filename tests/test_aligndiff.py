"""AlignDiff helpers: input checks, the normalised masked loss, textual inversion, token-only attention, synthesis,
the few-shot segmenter and refinement, the tiny segmenter."""
import numpy as np
import pytest
import torch

from helpers import aligndiff as ad
from helpers import toyworld as tw
from helpers.attention import AttentionStore, capture_attention
from helpers.metrics import iou
from helpers.text import embed


@pytest.fixture(scope="module")
def pipe():
    """A pipeline of this module's own: textual inversion adds tokens to its tokenizer and text encoder, which must
    not leak into the session-wide `pipe` other test files share (they check the bundled vocabulary)."""
    from helpers.loading import load_pipeline
    return load_pipeline("toy")


@pytest.fixture(scope="module")
def real():
    ims, ms, cols = ad.real_examples("star", 2)
    return ims, ms, cols


# -- bad input ------------------------------------------------------------------------------------------------------
def test_k_zero_is_refused(pipe):
    with pytest.raises(ValueError, match="k = 0"):
        ad.check_examples([], [])
    with pytest.raises(ValueError, match="k = 0"):
        ad.textual_inversion(pipe, [], [], "star", steps=1)


def test_mask_of_another_size_is_refused(real):
    ims, ms, _ = real
    with pytest.raises(ValueError, match=r"example 1: mask \(32, 32\) does not match its image \(64, 64\)"):
        ad.check_examples(ims, [ms[0], ms[1][::2, ::2]])
    with pytest.raises(ValueError, match="2 images but 1 masks"):
        ad.check_examples(ims, ms[:1])


def test_empty_mask_is_refused(real, pipe):
    ims, ms, _ = real
    with pytest.raises(ValueError, match="example 0: the mask is empty"):
        ad.check_examples(ims, [np.zeros_like(ms[0]), ms[1]])
    with pytest.raises(ValueError, match="mask is empty"):
        ad.refine(pipe, None, ims, [np.zeros_like(ms[0]), ms[1]])
    ad.check_examples(ims, [np.zeros_like(ms[0]), ms[1]], allow_empty=True)  # training sets may hold empty masks


def test_split_category_word_is_refused(pipe, real):
    assert ad.category_id(pipe.tokenizer, "star") == pipe.tokenizer("star", add_special_tokens=False).input_ids[0]
    with pytest.raises(ValueError, match=r"splits the category word 'sunflower' into \d+ tokens"):
        ad.category_id(pipe.tokenizer, "sunflower")
    with pytest.raises(ValueError, match="splits the category word"):
        ad.textual_inversion(pipe, *real[:2], "sunflower", steps=1)
    bank = ad.PromptBank("sunflower")
    bank.add_text("a red sunflower")
    with pytest.raises(ValueError, match="splits the category word"):
        ad.synthesize(pipe, bank, 1, steps=1, progress=False)
    with pytest.raises(ValueError, match="one word"):
        ad.category_id(pipe.tokenizer, "red star")


def test_prompt_without_the_category_is_refused():
    with pytest.raises(ValueError, match="does not contain the category word 'star'"):
        ad.PromptBank("star").add_text("a red circle")


# -- step 1: loss and textual inversion ----------------------------------------------------------------------------
def test_masked_loss_averages_each_region_over_its_own_pixels():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    fg = torch.zeros(2, 8, 8, dtype=torch.bool)
    fg[0, :2, :3] = True
    fg[1, 4:, :] = True
    want = []
    for b in range(2):
        se = ((pred[b] - target[b]) ** 2).mean(0)
        want.append(se[fg[b]].mean() + 0.6 * se[~fg[b]].mean())
    assert torch.allclose(ad.masked_loss(pred, target, fg, 0.6), torch.stack(want).mean())
    # bg_lambda = 0: the background does not count at all; a small object weighs as much as a big one
    changed = target.clone()
    changed[~fg[:, None].expand_as(target)] += 5
    assert torch.allclose(ad.masked_loss(pred, changed, fg, 0.0), ad.masked_loss(pred, target, fg, 0.0))


def test_latent_masks_threshold_at_cell_coverage():
    m = np.zeros((1, 8, 8), bool)
    m[0, :2, :2] = True      # cell (0, 0) fully covered
    m[0, 0, 2:4] = True      # cell (0, 1) half covered (0.5 > 0.3)
    m[0, 4, 4] = True        # cell (2, 2) a quarter covered (0.25 < 0.3)
    got = ad.latent_masks(m, (4, 4), mode="area")[0]
    assert got[0, 0] and got[0, 1] and not got[2, 2] and got.sum() == 2


def test_latent_masks_nearest_takes_one_pixel_per_cell_as_the_reference():
    m = np.zeros((1, 8, 8), bool)
    m[0, 0, 0] = True        # the pixel cell (0, 0) samples: in, though a quarter of the cell is covered
    m[0, 3, 3] = True        # cell (1, 1) covered a quarter, but not at the pixel nearest resizing reads
    m[0, 4:6, 4:6] = True    # cell (2, 2) fully covered
    got = ad.latent_masks(m, (4, 4))[0]
    want = torch.nn.functional.interpolate(torch.tensor(m, dtype=torch.float32)[None], size=(4, 4))[0, 0] > 0.3
    assert torch.equal(got, want) and got[0, 0] and not got[1, 1] and got[2, 2] and got.sum() == 2
    with pytest.raises(ValueError, match="mode must be"):
        ad.latent_masks(m, (4, 4), mode="bilinear")


def test_add_token_grows_the_table_from_the_init_word(pipe):
    table = pipe.text_encoder.get_input_embeddings().weight
    tid = ad.add_token(pipe, "<test-tok>", "star")
    star = ad.category_id(pipe.tokenizer, "star")
    assert pipe.tokenizer("a <test-tok> star").input_ids[2] == tid
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[tid], table[star])
    assert ad.add_token(pipe, "<test-tok>", "circle") == tid  # rerun: same id, re-initialised
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[tid],
                       pipe.text_encoder.get_input_embeddings().weight[ad.category_id(pipe.tokenizer, "circle")])


def test_textual_inversion_changes_only_the_new_rows(pipe, real):
    ims, ms, _ = real
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    unet_before = [p.detach().clone() for p in pipe.unet.parameters()][:5]
    flags = [p.requires_grad for p in [*pipe.text_encoder.parameters(), *pipe.unet.parameters()]]
    inv = ad.textual_inversion(pipe, ims, ms, "star", steps=6, lr=5e-3, prefix="<ti-test-", progress=False)
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert inv.tokens == ["<ti-test-0>", "<ti-test-1>"] and len(inv.losses) == 6
    assert inv.prompts[0] == "a <ti-test-0> star"
    old = before.shape[0]
    new_rows = set(inv.token_ids)
    keep = [i for i in range(old) if i not in new_rows]
    assert torch.equal(after[keep], before[keep])  # every other row is exactly as before
    star = after[ad.category_id(pipe.tokenizer, "star")]
    for tid, e in zip(inv.token_ids, inv.embeddings):
        assert torch.equal(after[tid], e) and not torch.allclose(e, star)  # learned: moved away from the init
    assert all(torch.equal(a, b) for a, b in zip(unet_before, list(pipe.unet.parameters())[:5]))
    with pytest.raises(ValueError, match="2 init words for 1 examples"):
        ad.textual_inversion(pipe, ims[:1], ms[:1], "star", steps=1, init_word=["red", "blue"], progress=False)
    with pytest.raises(ValueError, match="schedule must be"):
        ad.textual_inversion(pipe, ims[:1], ms[:1], "star", steps=1, schedule="linear", progress=False)
    _held = pipe.text_encoder.get_input_embeddings().weight[0] * 1  # a live graph on the table, as in a notebook
    again = ad.textual_inversion(pipe, ims[:1], ms[:1], "star", steps=1, prefix="<ti-again-", progress=False)
    assert len(again.losses) == 1  # a second inversion (the table grows again) works
    assert flags == [p.requires_grad for p in [*pipe.text_encoder.parameters(), *pipe.unet.parameters()]]  # restored


def test_init_words_read_each_example_s_colour(pipe, real):
    ims, ms, cols = real
    words = ad.init_words(ims, ms, "star")
    assert words == cols  # the detector reads the colour the toy world drew
    inv = ad.textual_inversion(pipe, ims, ms, "star", steps=0, init_word=words, prefix="<init-", progress=False)
    table = pipe.text_encoder.get_input_embeddings().weight
    for tid, w in zip(inv.token_ids, words):  # no step: each token is still its own example's colour word
        assert torch.equal(table[tid], table[ad.category_id(pipe.tokenizer, w)])


def test_cosine_schedule_and_weight_decay_change_the_learned_rows(pipe, real):
    ims, ms, _ = real
    kw = dict(steps=4, lr=5e-2, progress=False, seed=1)
    cos = ad.textual_inversion(pipe, ims, ms, "star", prefix="<cos-", **kw)
    const = ad.textual_inversion(pipe, ims, ms, "star", prefix="<const-", schedule="constant", **kw)
    nowd = ad.textual_inversion(pipe, ims, ms, "star", prefix="<nowd-", weight_decay=0.0, **kw)
    assert cos.losses[0] == const.losses[0] == nowd.losses[0]  # same draws, same start
    assert not torch.allclose(cos.embeddings, const.embeddings)  # the rate decays under the cosine schedule
    assert not torch.allclose(cos.embeddings, nowd.embeddings)   # weight decay pulls the rows toward zero


def test_inversion_error_splits_foreground_and_background(pipe, real):
    ims, ms, _ = real
    prompts = ["a star star", "a star star"]
    fg, bg = ad.inversion_error(pipe, ims, ms, prompts, n=2, seed=3)
    assert (fg, bg) == ad.inversion_error(pipe, ims, ms, prompts, n=2, seed=3)  # fixed draws: comparable runs
    g = torch.Generator().manual_seed(3)
    z = torch.cat([ad.encode(pipe, [im]) for im in ims]).repeat_interleave(2, 0)
    m = ad.latent_masks(np.stack(ms), (16, 16)).repeat_interleave(2, 0)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(z.shape, generator=g)
    with torch.no_grad():
        pred = pipe.unet(pipe.scheduler.add_noise(z, noise, t), t, encoder_hidden_states=embed(pipe, ["a star star"] * 4)).sample
    assert np.isclose(fg, float(ad.masked_loss(pred, noise, m, 0.0)), rtol=1e-4)
    assert np.isclose(bg, float(ad.masked_loss(pred, noise, ~m, 0.0)), rtol=1e-4)
    with pytest.raises(ValueError, match="one prompt per example"):
        ad.inversion_error(pipe, ims, ms, prompts[:1])


# -- step 2: token-only attention and synthesis ---------------------------------------------------------------------
def test_token_store_keeps_exactly_the_category_columns(pipe):
    prompts = ["a red star", "a blue circle and a green star"]
    pos = ad.token_index(pipe.tokenizer, prompts, "star")
    assert pos == [3, 7]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = embed(pipe, prompts)
    with torch.no_grad():
        with capture_attention(pipe.unet, kinds=("cross",)) as full:
            pipe.unet(x, 400, encoder_hidden_states=cond)
        with capture_attention(pipe.unet, ad.TokenStore(pos)) as mine:
            pipe.unet(x, 400, encoder_hidden_states=cond)
        with capture_attention(pipe.unet, kinds=("cross",), resolutions=[(4, 4)]) as mid:
            pipe.unet(x, 400, encoder_hidden_states=cond)
    # the toy's 4×4 cross-attention is the mid block only (its 4×4 down/up blocks have no attention): filed apart
    assert [k for k in mine.keys() if k[0] == ad.MID] == [(ad.MID, (4, 4))]
    assert [k for k in mine.keys() if k[0] == "cross"] == [k for k in full.keys() if k[1] != (4, 4)]
    for key in full.keys():
        want = torch.stack([full.get(*key)[b, :, p] for b, p in enumerate(pos)])[..., None]
        got = mine.get(ad.MID if key[1] == (4, 4) else "cross", key[1])
        assert torch.allclose(got, want, atol=1e-6)
    assert mid.layers_seen[("cross", (4, 4))] == {n for n in pipe.unet.attn_processors
                                                   if n.startswith("mid") and "attn2" in n}
    assert mine.nbytes() * pipe.tokenizer.model_max_length == full.nbytes()


def test_coarse_heat_is_the_mean_of_max_normalised_resolutions():
    store = AttentionStore(kinds=("cross",))
    store.step = 0  # as if one UNet call had run
    g = torch.Generator().manual_seed(1)
    maps = {(4, 4): torch.rand(2, 16, 1, generator=g), (2, 2): torch.rand(2, 4, 1, generator=g)}
    for (h, w), m in maps.items():
        store.sums[("cross", (h, w))], store.counts[("cross", (h, w))] = m, 1
    mid = torch.rand(2, 1, 1, generator=g)
    store.sums[(ad.MID, (1, 1))], store.counts[(ad.MID, (1, 1))] = mid, 1
    ups = []
    for (h, w), m in maps.items():
        up = torch.nn.functional.interpolate(m.reshape(2, 1, h, w), size=(4, 4), mode="bicubic",
                                             align_corners=False)[:, 0].clamp(min=0)
        ups.append(up / up.amax((1, 2), keepdim=True))
    heat = ad.coarse_heat(store, 4)  # the reference: down/up layers only, the mid block left out
    assert torch.allclose(heat, sum(ups) / 2) and heat.max() <= 1
    with_mid = ad.coarse_heat(store, 4, places=("down", "mid", "up"))  # a constant 1×1 map: 1 everywhere
    assert torch.allclose(with_mid, (sum(ups) + 1) / 3)
    with pytest.raises(ValueError, match="both or neither"):
        ad.coarse_heat(store, 4, places=("down",))


def test_synthesis_one_seed_per_image_independent_of_batching(pipe):
    bank = ad.PromptBank("star")
    for p, c in ad.plain_texts("star")[:3]:
        bank.add_text(p, c)
    a = ad.synthesize(pipe, bank, 4, steps=3, batch=4, seed=5, progress=False)
    b = ad.synthesize(pipe, bank, indices=[2, 3], steps=3, batch=1, seed=5, progress=False)
    assert a.seeds == [5, 6, 7, 8] and b.seeds == [7, 8] and a.prompts[3] == bank.entry(3)[0]
    assert np.abs(a.images[2:].astype(int) - b.images.astype(int)).max() <= 1
    assert np.allclose(a.heat[2:], b.heat, atol=1e-3)
    assert a.store_bytes * pipe.tokenizer.model_max_length == a.full_store_bytes


def test_coarse_masks_find_the_generated_object(pipe):
    bank = ad.PromptBank("star")
    for p, c in ad.plain_texts("star"):
        bank.add_text(p, c)
    syn = ad.synthesize(pipe, bank, 8, steps=10, progress=False)
    ious = ad.coarse_iou(syn)
    whole = np.mean([tw.colour_mask(im, c).mean() for im, c in zip(syn.images, syn.colours)])
    assert np.mean(ious) > max(0.3, 5 * whole), (ious, whole)  # a whole-image mask scores ≈ 0.05
    # most samples hold the object, by the toy world's detector (which finds nothing in an empty image)
    assert np.mean([any(f.shape == "star" for f in tw.find_objects(im)) for im in syn.images]) > 0.5


# -- step 3: few-shot segmenter and refinement ----------------------------------------------------------------------
def _toy_features(masks, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.as_tensor(masks, dtype=torch.float32)[:, None]
    fg, bg = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    f = m * fg[:, None, None] + (1 - m) * bg[:, None, None]
    return f + noise * torch.randn(f.shape, generator=g)


def test_prototype_segmenter_separates_prototype_features():
    masks = np.zeros((3, 8, 8), bool)
    masks[0, 2:5, 2:5] = masks[1, :3, 4:] = masks[2, 5:, :4] = True
    seg = ad.PrototypeSegmenter(_toy_features(masks[:1]), masks[:1])
    pred = seg.predict(_toy_features(masks[1:], seed=1), (8, 8))
    assert all(iou(p, m) == 1.0 for p, m in zip(pred, masks[1:]))


def test_refine_accepts_agreeing_samples_and_pseudo_labels_the_rest(real):
    ims, ms, _ = real
    n = 4
    truth = np.zeros((n, 64, 64), bool)
    for i in range(n):
        truth[i, 8 * i:8 * i + 24, 10:40] = True
    coarse = truth.copy()
    coarse[2] = np.roll(truth[2], 30, axis=1)  # a wrong coarse mask
    syn = ad.Synthetic(np.zeros((n, 64, 64, 3), np.uint8), coarse.astype(float), coarse, ["a star"] * n,
                       [None] * n, list(range(n)))
    feats = _toy_features(ad.latent_masks(truth, (16, 16)).numpy(), seed=2)
    real_feats = _toy_features(ad.latent_masks(np.stack(ms), (16, 16)).numpy(), seed=3)
    for recipe in ad.RECIPES:
        ref = ad.refine(None, syn, ims, ms, threshold=0.8, feats=feats, real_feats=real_feats, recipe=recipe)
        assert ref.accepted.tolist() == [True, True, False, True]
        assert ref.support_size == 2 + 3
        assert iou(ref.masks[2], truth[2]) > 0.8 and iou(ref.masks[2], coarse[2]) < 0.3  # pseudo-label, not coarse
        none = ad.refine(None, syn, ims, ms, threshold=1.01, feats=feats, real_feats=real_feats, recipe=recipe)
        assert not none.accepted.any() and none.support_size == 2
    # the reference labels an accepted sample with the few-shot prediction, the sequential variant with its coarse
    # mask: make one coarse mask slightly too big, still accepted
    coarse[0, 8:32, 40:43] = True
    syn = ad.Synthetic(syn.images, coarse.astype(float), coarse, syn.prompts, syn.colours, syn.seeds)
    ref = ad.refine(None, syn, ims, ms, threshold=0.8, feats=feats, real_feats=real_feats)
    seq = ad.refine(None, syn, ims, ms, threshold=0.8, feats=feats, real_feats=real_feats, recipe="sequential")
    assert ref.accepted[0] and seq.accepted[0]
    assert np.array_equal(ref.masks[0], ref.first_pred[0]) and np.array_equal(seq.masks[0], coarse[0])
    assert iou(ref.masks[0], truth[0]) > iou(seq.masks[0], truth[0])
    with pytest.raises(ValueError, match="recipe must be"):
        ad.refine(None, syn, ims, ms, feats=feats, real_feats=real_feats, recipe="mine")


# -- the tiny segmenter ---------------------------------------------------------------------------------------------
def test_tiny_segmenter_learns_a_shape_from_scenes():
    ims, ms = ad.test_scenes("circle", 24, start=500)
    net = ad.train_segmenter(ims[:16], ms[:16], steps=300, batch=8, progress=False)
    whole_image = float(np.mean([m.mean() for m in ms[16:]]))  # IoU of predicting "circle" everywhere
    # measured 0.38-0.59 over three scene sets (16 training scenes are few; 150 steps gave 0.30-0.50)
    assert ad.evaluate_segmenter(net, ims[16:], ms[16:]) > max(0.3, 3 * whole_image)
