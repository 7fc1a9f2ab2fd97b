import shutil

import pytest
import torch

from helpers import loading
from helpers.loading import BUNDLED, MODELS, check_bundled, load_pipeline, resolve_model


def test_resolution_order(monkeypatch):
    monkeypatch.delenv(loading.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_model() == str(BUNDLED)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_model() == MODELS[loading.GPU_DEFAULT]
    monkeypatch.setenv(loading.ENV_VAR, "toy")
    assert resolve_model() == str(BUNDLED)              # the variable beats CUDA
    assert resolve_model("sd15") == MODELS["sd15"]       # an explicit argument beats the variable
    assert resolve_model("some/other-id") == "some/other-id"


def test_hub_id_offline_names_the_bundled_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"load_pipeline\('toy'\)"):
        load_pipeline("sd15", device="cpu", dtype=torch.float32)


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="float16.*CPU"):
        load_pipeline("toy", device="cpu", dtype=torch.float16)


def test_damaged_bundled_model_names_the_retraining_command(tmp_path):
    copy = tmp_path / "toy-sd"
    shutil.copytree(BUNDLED, copy)
    check_bundled(copy)  # intact: no error
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="python -m helpers.train_toy"):
        check_bundled(copy)
    (copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (copy / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        check_bundled(copy)


def test_plain_from_pretrained_generates_offline(monkeypatch):
    from diffusers import StableDiffusionPipeline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = StableDiffusionPipeline.from_pretrained(str(BUNDLED))
    p.set_progress_bar_config(disable=True)
    img = p("a red circle", num_inference_steps=5, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)
