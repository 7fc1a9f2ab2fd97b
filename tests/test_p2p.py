import pytest
import torch

from helpers import toyworld as tw
from helpers.images import encode
from helpers.inversion import negative_prompt_inversion, reconstruct
from helpers.p2p import (PRESETS, _changed, _word_positions, blend_mask, edit, edit_scores, preset_settings,
                         side_of, token_mapping)

STEPS = 8


@pytest.fixture(scope="module")
def inv(pipe):
    sc = next(s for s in (tw.heldout_scene(i) for i in range(40)) if [o.shape for o in s.objects] == ["circle"])
    return negative_prompt_inversion(pipe, encode(pipe, sc.image), sc.caption, steps=STEPS)


def test_token_mapping(pipe):
    tok = pipe.tokenizer
    assert torch.equal(token_mapping(tok, "a red circle", "a red square", "swap"), torch.arange(tok.model_max_length))
    m = token_mapping(tok, "a circle and a blue star", "a green circle and a blue star", "refine")
    assert m[:9].tolist() == [0, 1, -1, 2, 3, 4, 5, 6, 7]  # "green" is new; the rest (and the end token) shift by one
    assert m[-1] == tok.model_max_length - 2  # padding shifts by one as well
    back = token_mapping(tok, "a green circle and a blue star", "a circle and a blue star", "refine")
    assert back[:8].tolist() == [0, 1, 3, 4, 5, 6, 7, 8] and back[-2] == tok.model_max_length - 1 and back[-1] == -1  # nothing left
    with pytest.raises(ValueError, match="use mode='refine'"):
        token_mapping(tok, "a red circle", "a red and blue circle", "swap")
    with pytest.raises(ValueError, match="re-weighting keeps the prompt"):
        token_mapping(tok, "a red circle", "a red square", "reweight")
    with pytest.raises(ValueError, match="mode must be one of"):
        token_mapping(tok, "a red circle", "a red square", "replace")


def test_words_not_in_the_prompt_are_named(pipe, inv):
    target = inv.prompt.replace("circle", "square")
    with pytest.raises(ValueError, match=r"'star' is not in the prompt .* its words are \['a', "):
        edit(pipe, inv, target, blend=("star", "square"))
    with pytest.raises(ValueError, match="'blue' is not in the prompt"):
        edit(pipe, inv, inv.prompt, "reweight", weights={"blue": 2.0})
    with pytest.raises(ValueError, match="needs weights"):
        edit(pipe, inv, inv.prompt, "reweight")


def test_step_count_must_match_the_inversion(pipe, inv):
    with pytest.raises(ValueError, match=f"inverted with {STEPS} DDIM steps but the edit asks for 50"):
        edit(pipe, inv, inv.prompt.replace("circle", "square"), steps=50)


def test_swap_with_blend_keeps_outside_and_restores_processors(pipe, inv):
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    target = inv.prompt.replace("circle", "square")
    e = edit(pipe, inv, target, "swap", blend=("circle", "square"))
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before
    outside = ~e.mask
    assert 0.02 < e.mask.float().mean() < 0.8  # a region, not nothing or everything
    assert torch.equal(e.edited * outside, e.source * outside)  # local blending: outside is the source's latent
    assert (e.edited - e.source).abs().amax() > 0.1  # inside, the edit changed something
    # the source branch is the plain reconstruction: the controller leaves sample 0 alone
    assert torch.allclose(e.source, reconstruct(pipe, inv), atol=1e-4)


def test_attention_injection_acts_on_the_output(pipe, inv):
    target = inv.prompt.replace("circle", "square")
    plain = reconstruct(pipe, inv, [inv.prompt, target])[1:]
    injected = edit(pipe, inv, target, "swap", cross_steps=1.0, self_steps=1.0, self_max_res=10**6)
    # with all attention shared, the edited sample stays closer to the source than a plain prompt change does
    d_inj, d_plain = (injected.edited - injected.source).pow(2).mean(), (plain - injected.source).pow(2).mean()
    assert d_inj < 0.7 * d_plain, (d_inj, d_plain)
    # re-weighting: factor 1 changes nothing, factor 0 on the shape word does
    word = inv.prompt.split()[-1]
    same = edit(pipe, inv, inv.prompt, "reweight", weights={word: 1.0}, self_steps=0.0)
    zero = edit(pipe, inv, inv.prompt, "reweight", weights={word: 0.0}, self_steps=0.0)
    assert torch.allclose(same.edited, same.source, atol=1e-5)
    assert (zero.edited - zero.source).abs().amax() > 0.05


def test_blend_mask_reads_only_kept_resolutions(pipe, inv):
    target = inv.prompt.replace("circle", "square")
    e = edit(pipe, inv, target, "swap", blend=("circle", "square"), blend_resolutions=[8], use_blend=False)
    assert [k[1] for k in e.store.keys()] == [(8, 8)]
    m = blend_mask(e.store, e.positions, (16, 16))
    assert m.shape == (2, 1, 16, 16) and m.any()
    with pytest.raises(KeyError, match="no cross-attention at"):
        blend_mask(e.store, e.positions, (16, 16), resolutions=[16])


def test_presets_are_relative_to_the_latent_and_checked():
    assert PRESETS["reference"] == dict(self_max=1 / 2, blend_scales=(1 / 4,), resize="nearest", threshold=0.3)
    assert side_of((64, 64), 1 / 2) == 32 and side_of((64, 64), 1 / 4) == 16  # SD: the reference's 32² and 16×16
    assert side_of((16, 16), 1 / 4) == 4 and side_of((16, 16), 1) == 16
    assert preset_settings("reference", threshold=0.5)["threshold"] == 0.5
    assert preset_settings("reference", threshold=None)["threshold"] == 0.3
    with pytest.raises(ValueError, match="preset must be one of"):
        preset_settings("sd")
    with pytest.raises(ValueError, match="fractions of the latent side"):
        preset_settings("course", blend_scales=(16,))
    with pytest.raises(ValueError, match="resize must be"):
        preset_settings("course", resize="bicubic")


def test_repeated_word_blends_only_where_the_edit_changes_it(pipe):
    tok = pipe.tokenizer
    src, tgt = "a green square and a red circle", "a green square and a red square"
    ch_s, ch_t = _changed(tok, src, tgt, token_mapping(tok, src, tgt, "swap"))
    every = _word_positions(tok, tgt, "square")
    assert len(every) == 2                                       # both squares without a change set
    assert _word_positions(tok, tgt, "square", ch_t) == [max(every)]  # only the swapped one
    assert _word_positions(tok, src, "circle", ch_s) == _word_positions(tok, src, "circle")
    # refinement: the new word is the change; a word that did not change keeps every occurrence
    src, tgt = "a square and a circle", "a square and a blue circle"
    ch_s, ch_t = _changed(tok, src, tgt, token_mapping(tok, src, tgt, "refine"))
    assert ch_s == set() and _word_positions(tok, tgt, "blue", ch_t) == sorted(ch_t)


def test_reference_preset_reads_latent_quarter_maps_with_nearest_resize(pipe, inv):
    target = inv.prompt.replace("circle", "square")
    e = edit(pipe, inv, target, "swap", blend=("circle", "square"), preset="reference")
    latent = e.edited.shape[-2:]
    q = side_of(latent, 1 / 4)
    assert [k for k in e.store.keys()] == [("cross", (q, q))]   # only the latent/4 maps are kept for blending
    assert e.settings == PRESETS["reference"]
    # nearest resize: the mask is constant on each (latent/q)² block
    b = latent[0] // q
    m = e.mask[0, 0].float()
    blocks = m.reshape(q, b, q, b)
    assert torch.equal(blocks.amax((1, 3)), blocks.amin((1, 3)))
    assert torch.equal(e.edited * ~e.mask, e.source * ~e.mask)
    # the course's preset reads the finest maps, and its mask differs
    c = edit(pipe, inv, target, "swap", blend=("circle", "square"), preset="course")
    assert [k[1] for k in c.store.keys()] == [tuple(latent)]
    assert not torch.equal(c.mask, e.mask)


def test_self_attention_cap_is_a_fraction_of_the_latent(pipe, inv):
    target = inv.prompt.replace("circle", "square")
    # sharing no self-attention layer (cap below the smallest side) equals sharing none in time
    none = edit(pipe, inv, target, "swap", self_max=1 / 64)
    off = edit(pipe, inv, target, "swap", self_steps=0.0)
    assert torch.allclose(none.edited, off.edited, atol=1e-5)
    half = edit(pipe, inv, target, "swap", self_max=1 / 2)
    quarter = edit(pipe, inv, target, "swap", self_max=1 / 4)
    assert (half.edited - quarter.edited).abs().amax() > 1e-3  # the 8×8 layers (toy) change the result


def test_edit_scores_use_the_detector(pipe, inv):
    sc = next(s for s in (tw.heldout_scene(i) for i in range(40)) if [o.shape for o in s.objects] == ["circle"])
    same = edit(pipe, inv, inv.prompt, "reweight", weights={"circle": 1.0})
    o = sc.objects[0]
    s = edit_scores(pipe, same, sc.image, o.mask, shape="circle", colour=o.colour)
    assert set(s) >= {"success", "reason", "found", "outside"}
    # nothing changed: asking for another colour fails with a reason naming the colour there
    s = edit_scores(pipe, same, sc.image, o.mask, colour=next(c for c in tw.COLOUR_NAMES if c != o.colour))
    assert not s["success"]
    s = edit_scores(pipe, same, sc.image, o.mask, old_colour=o.colour, away=True)
    assert not s["success"] and ("still" in s["reason"] or "no object" in s["reason"])
    with pytest.raises(ValueError, match="pass old_colour"):
        edit_scores(pipe, same, sc.image, o.mask, away=True)
