import numpy as np
import pytest
from PIL import Image

from helpers import toyworld as tw
from helpers.images import (check_size, decode, encode, load_image, native_size, pil_to_tensor, size_multiple,
                            tensor_to_pil, vae_factor)
from helpers.metrics import psnr


def test_sizes_come_from_the_config(pipe):
    assert vae_factor(pipe) == 4 and native_size(pipe) == 64 and size_multiple(pipe) == 16


def test_bad_sizes_and_modes(pipe):
    with pytest.raises(ValueError, match="not a multiple of 16.*resize"):
        check_size(pipe, 60, 64)
    with pytest.raises(ValueError, match="not a multiple"):
        encode(pipe, Image.new("RGB", (72, 64)))
    with pytest.raises(ValueError, match="convert"):
        pil_to_tensor(Image.new("RGBA", (64, 64)))
    with pytest.raises(ValueError, match="greyscale"):
        pil_to_tensor(np.zeros((64, 64), np.uint8))


def test_load_image_converts_and_resizes(tmp_path):
    p = tmp_path / "grey.png"
    Image.new("L", (40, 30), 128).save(p)
    img = load_image(p, size=64)
    assert img.mode == "RGB" and img.size == (64, 64)
    with pytest.raises(FileNotFoundError, match="no image"):
        load_image(tmp_path / "missing.png")


def test_tensor_round_trip():
    a = tw.scene(1).image
    back = np.asarray(tensor_to_pil(pil_to_tensor(a))[0])
    assert np.array_equal(a, back)


def test_vae_round_trip_psnr(pipe):
    scenes = [tw.heldout_scene(i) for i in range(8)]
    z = encode(pipe, [s.image for s in scenes])
    assert z.shape == (8, 4, 16, 16)
    x = decode(pipe, z)
    score = np.mean([psnr(np.asarray(tensor_to_pil(x[i:i + 1])[0]), s.image) for i, s in enumerate(scenes)])
    assert score >= 25
    assert 0.5 < z.std().item() < 2  # the scaling factor puts latents near unit variance


def test_url_falls_back_to_the_bundled_copy_offline():
    img = load_image("https://example.invalid/images/toy_scene_64.png")
    assert img.size == (64, 64) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img), tw.heldout_scene(0).image)
    with pytest.raises(FileNotFoundError, match="no bundled copy"):
        load_image("https://example.invalid/images/not_bundled.png")
