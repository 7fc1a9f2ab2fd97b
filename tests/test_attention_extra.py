"""Attention store additions for notebook 04: layout from the UNet's structure, predicted memory, per-step maps,
clear errors (empty store, split words, missing words)."""
import warnings

import pytest
import torch
from diffusers import UNet2DConditionModel

from helpers.attention import (AttentionStore, EmptyStoreError, SplitWordWarning, attention_layout,
                               capture_attention, cross_maps, word_heatmap)
from helpers.text import describe_tokens, embed, token_positions, word_tokens
from tests.test_attention import SD15_UNET


def _sd15_meta():
    from accelerate import init_empty_weights
    with init_empty_weights():
        return UNet2DConditionModel(**SD15_UNET)


def _run(unet, store, x, ctx, calls=1):
    with capture_attention(unet, store), torch.no_grad():
        for _ in range(calls):
            unet(x, 500, encoder_hidden_states=ctx)
    return store


@pytest.mark.parametrize("hw", [(16, 16), (16, 24)])
def test_layout_from_structure_matches_hooked_layers_toy(pipe, hw):
    s = _run(pipe.unet, AttentionStore(kinds=("cross", "self")), torch.randn(1, 4, *hw), embed(pipe, "a red circle"))
    hooked = {k: len(v) for k, v in s.layers_seen.items()}
    assert attention_layout(pipe.unet, hw) == hooked
    assert sum(hooked.values()) == len(pipe.unet.attn_processors)


def test_layout_from_structure_matches_hooked_layers_sd15():
    unet = _sd15_meta()
    s = _run(unet, AttentionStore(kinds=("cross", "self")), torch.randn(1, 4, 64, 64, device="meta"),
             torch.randn(1, 77, 768, device="meta"))
    assert attention_layout(unet) == {k: len(v) for k, v in s.layers_seen.items()}
    assert attention_layout(unet)[("cross", (8, 8))] == 1 and attention_layout(unet)[("self", (64, 64))] == 5


OPTIONS = [dict(kinds=("cross",)), dict(kinds=("cross",), half="cond"), dict(kinds=("self",), resolutions=[8]),
           dict(kinds=("cross", "self"), half="uncond", resolutions=[(16, 16), 4]),
           dict(kinds=("cross",), half="cond", per_step=True),
           dict(kinds=("cross", "self"), per_step=True, steps=[0, 2, 7])]


@pytest.mark.parametrize("opts", OPTIONS)
def test_expected_nbytes_equals_measured_toy(pipe, opts):
    batch, calls = 4, 3
    x, ctx = torch.randn(batch, 4, 16, 16), embed(pipe, ["", "a red circle"] * 2)
    expected = AttentionStore(**opts).expected_nbytes(pipe.unet, batch, (16, 16), pipe.tokenizer.model_max_length,
                                                      n_steps=calls)
    store = _run(pipe.unet, AttentionStore(**opts), x, ctx, calls)
    assert store.nbytes() == expected > 0


def test_expected_nbytes_equals_measured_sd15_shape():
    unet = _sd15_meta()
    opts = dict(kinds=("cross", "self"), half="cond", resolutions=[16, 8])
    store = _run(unet, AttentionStore(**opts), torch.randn(2, 4, 64, 64, device="meta"),
                 torch.randn(2, 77, 768, device="meta"))
    expected = AttentionStore(**opts).expected_nbytes(unet, 2, n_tokens=77)
    assert store.nbytes() == expected == 4 * (256 * 77 + 256 * 256 + 64 * 77 + 64 * 64)


def test_expected_nbytes_needs_what_it_cannot_guess(pipe):
    with pytest.raises(ValueError, match="n_tokens"):
        AttentionStore(kinds=("cross",)).expected_nbytes(pipe.unet, 2)
    with pytest.raises(ValueError, match="n_steps"):
        AttentionStore(kinds=("self",), per_step=True).expected_nbytes(pipe.unet, 2)
    with pytest.raises(ValueError, match="keep_graph"):
        AttentionStore(keep_graph=True).expected_nbytes(pipe.unet, 2, n_tokens=77)


def test_store_keeps_only_what_was_asked_and_reads_single_steps(pipe):
    ctx = embed(pipe, ["a red circle"])
    xs = [torch.randn(1, 4, 16, 16) for _ in range(4)]
    alone = []
    for x in xs:
        alone.append(_run(pipe.unet, AttentionStore(resolutions=[8]), x, ctx).get("cross", 8))
    store = AttentionStore(resolutions=[8], steps=[1, 3], per_step=True)
    with capture_attention(pipe.unet, store), torch.no_grad():
        for x in xs:
            pipe.unet(x, 500, encoder_hidden_states=ctx)
    assert store.keys() == [("cross", (8, 8))] and store.steps_kept() == [1, 3]
    assert store.nbytes() == 2 * 64 * 77 * 4 and not store.sums
    assert torch.allclose(store.get("cross", 8, steps=[3]), alone[3], atol=1e-6)
    assert torch.allclose(store.get("cross", 8), (alone[1] + alone[3]) / 2, atol=1e-6)
    with pytest.raises(KeyError, match=r"steps \[2\] were not kept; the store holds steps \[1, 3\]"):
        store.get("cross", 8, steps=[2])
    plain = _run(pipe.unet, AttentionStore(), xs[0], ctx)
    with pytest.raises(ValueError, match="per_step=True"):
        plain.get("cross", 8, steps=[0])


def test_reading_before_any_step_is_a_clear_error(pipe):
    prompt = "a red circle"
    with capture_attention(pipe.unet) as store:
        for read in (lambda: store.get("cross", 16), lambda: cross_maps(store),
                     lambda: word_heatmap(store, pipe.tokenizer, prompt, "circle")):
            with pytest.raises(EmptyStoreError, match="no UNet call has run inside `capture_attention` yet"):
                read()
    with pytest.raises(ValueError, match="choose one"):
        AttentionStore(per_step=True, keep_graph=True)


def test_cross_maps_tokens_is_a_slice(pipe):
    s = _run(pipe.unet, AttentionStore(), torch.randn(2, 4, 16, 16), embed(pipe, ["a red circle", "a blue star"]))
    assert torch.allclose(cross_maps(s, 64, tokens=5), cross_maps(s, 64)[:, :5])


def test_split_word_is_aggregated_with_a_warning_naming_its_tokens(pipe):
    prompt = "a zebra on a circle"
    s = _run(pipe.unet, AttentionStore(), torch.randn(1, 4, 16, 16), embed(pipe, prompt))
    (word, pieces), = word_tokens(pipe.tokenizer, "zebra")
    assert len(pieces) > 1
    with pytest.warns(SplitWordWarning, match=r"'zebra' is \d tokens \[.*'" + pieces[-1].replace("/", r"\/")):
        h = word_heatmap(s, pipe.tokenizer, prompt, "zebra", size=64)
    pos = token_positions(pipe.tokenizer, prompt, "zebra")
    assert [t for p, t in describe_tokens(pipe.tokenizer, prompt) if p in pos] == pieces
    assert torch.allclose(h, cross_maps(s, 64)[0, pos].mean(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a one-token word must not warn
        word_heatmap(s, pipe.tokenizer, prompt, "circle")
    with pytest.raises(ValueError, match=r"'star' is not in the prompt .*\['a', 'zebra', 'on', 'a', 'circle'\]"):
        word_heatmap(s, pipe.tokenizer, prompt, "star")
