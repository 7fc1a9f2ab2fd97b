from collections import Counter

import pytest
import torch
from diffusers import UNet2DConditionModel

from helpers.attention import AttentionStore, capture_attention, cross_maps, layer_infos, word_heatmap
from helpers.text import embed

SD15_UNET = dict(  # the UNet config of Stable Diffusion 1.x (no weights needed)
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)


def _layers_per_resolution(unet, latent, context):
    with capture_attention(unet, kinds=("cross", "self")) as store, torch.no_grad():
        unet(latent, 10, encoder_hidden_states=context)
    return {k: len(v) for k, v in store.layers_seen.items()}


def test_hooked_layers_per_resolution_toy(pipe):
    got = _layers_per_resolution(pipe.unet, torch.randn(1, 4, 16, 16), embed(pipe, "a red circle"))
    assert got == {("cross", (16, 16)): 3, ("self", (16, 16)): 3, ("cross", (8, 8)): 3, ("self", (8, 8)): 3,
                   ("cross", (4, 4)): 1, ("self", (4, 4)): 1}


def test_hooked_layers_per_resolution_sd15_shape():
    from accelerate import init_empty_weights
    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET)
    assert Counter(i.kind for i in layer_infos(unet)) == {"cross": 16, "self": 16}
    got = _layers_per_resolution(unet, torch.randn(1, 4, 64, 64, device="meta"),
                                 torch.randn(1, 77, 768, device="meta"))
    for kind in ("cross", "self"):
        assert [got[(kind, (r, r))] for r in (64, 32, 16, 8)] == [5, 5, 5, 1]


def test_capture_changes_nothing_and_restores_processors(pipe):
    x, ctx = torch.randn(2, 4, 16, 16), embed(pipe, ["a red circle", "a blue star"])
    before = dict(pipe.unet.attn_processors)
    with torch.no_grad():
        bare = pipe.unet(x, 500, encoder_hidden_states=ctx).sample
        with capture_attention(pipe.unet, kinds=("cross", "self")):
            hooked = pipe.unet(x, 500, encoder_hidden_states=ctx).sample
    assert torch.allclose(bare, hooked, atol=1e-5)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


def test_running_mean_half_steps_and_resolutions(pipe):
    ctx = embed(pipe, ["", "a red circle"])
    xs = [torch.randn(2, 4, 16, 16) for _ in range(3)]
    per_call = []
    for x in xs:  # each call alone
        with capture_attention(pipe.unet, kinds=("cross",), resolutions=[16]) as s, torch.no_grad():
            pipe.unet(x, 300, encoder_hidden_states=ctx)
        per_call.append(s.get("cross", 16))
    with capture_attention(pipe.unet, kinds=("cross",), resolutions=[16], steps=[0, 2], half="cond") as s, \
            torch.no_grad():
        for x in xs:
            pipe.unet(x, 300, encoder_hidden_states=ctx)
    assert s.keys() == [("cross", (16, 16))]
    expect = (per_call[0][1:] + per_call[2][1:]) / 2
    assert torch.allclose(s.get("cross", 16), expect, atol=1e-6)
    assert s.get("cross", 16).shape == (1, 256, 77)
    assert s.nbytes() == 1 * 256 * 77 * 4  # bounded: one running mean per (kind, resolution)
    with pytest.raises(KeyError, match="no self-attention was captured"):
        s.get("self", 16)


def test_bad_options():
    with pytest.raises(ValueError, match="kinds"):
        AttentionStore(kinds=("crosss",))
    with pytest.raises(ValueError, match="half"):
        AttentionStore(half="conditional")


def test_word_heatmap(pipe):
    prompt = "a red circle and a blue square"
    with capture_attention(pipe.unet, kinds=("cross",)) as s, torch.no_grad():
        pipe.unet(torch.randn(1, 4, 16, 16), 300, encoder_hidden_states=embed(pipe, prompt))
    h = word_heatmap(s, pipe.tokenizer, prompt, "square", size=64)
    assert h.shape == (64, 64) and h.min() >= 0
    maps = cross_maps(s, size=64)
    assert torch.allclose(h, maps[0, 7])
    with pytest.raises(ValueError, match="not in the prompt"):
        word_heatmap(s, pipe.tokenizer, prompt, "star")
