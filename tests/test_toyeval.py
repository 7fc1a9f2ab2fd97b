"""The model card's measurements, on a few held-out scenes (the full run is bench/toy_model_card.py).

Bars here are the model card's, loosened only for the smaller sample: these fail if the bundled model or the
measuring code breaks.
"""
from helpers import toyeval


def test_vae_psnr(pipe):
    assert toyeval.vae_psnr(pipe, n=8) >= 25


def test_prompt_adherence(pipe):
    rate, images, caps = toyeval.adherence(pipe, n=8, batch=8)
    assert len(images) == len(caps) == 8 and images[0].shape == (64, 64, 3)
    assert rate >= 0.6


def test_cross_attention_localises_words(pipe):
    r = toyeval.cross_attention_iou(pipe, n=8)
    assert r["shape"] >= 0.4 and r["colour"] >= 0.4


def test_self_attention_groups_objects(pipe):
    r = toyeval.self_attention_share(pipe, n=8)
    assert r["16x16"] >= 0.5 and r["16x16"] > r["16x16 uniform"]
    assert r["16x16 objects"] >= 0.3 and r["16x16 objects"] > 3 * r["16x16 objects uniform"]
