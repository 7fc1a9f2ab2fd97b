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


def test_bundled_model_comes_out_unchanged(pipe, monkeypatch):
    """The loader's DDIM step changes nothing for the bundled model: same scheduler values, bit-identical samples."""
    from diffusers import StableDiffusionPipeline
    from helpers.sampling import denoise, random_latents
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    old = StableDiffusionPipeline.from_pretrained(str(BUNDLED))  # the scheduler as saved, no conversion
    strip = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}
    assert type(pipe.scheduler) is type(old.scheduler) and strip(pipe.scheduler.config) == strip(old.scheduler.config)
    a = denoise(pipe, random_latents(pipe, 1, seed=5), "a red circle", steps=6, guidance=7.5)
    b = denoise(old, random_latents(old, 1, seed=5), "a red circle", steps=6, guidance=7.5)
    assert torch.equal(a, b)


def test_missing_local_folder_is_named_as_such(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        load_pipeline(str(missing), device="cpu", dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="no model folder"):
        load_pipeline("./models/sd15-local", device="cpu", dtype=torch.float32)


def test_typo_lists_the_known_names():
    with pytest.raises(ValueError, match=r"unknown model name 'tyo'\. Did you mean 'toy'\?.*toy, toy-inpaint, sd15, sd15-inpaint"):
        load_pipeline("tyo", device="cpu", dtype=torch.float32)


def test_unreachable_hub_fails_fast_and_short(monkeypatch):
    """Without HF_HUB_OFFLINE, a hub id that cannot be reached gives one short error within seconds (the endpoint is
    pointed at a closed local port: no network is touched)."""
    import time
    from huggingface_hub import constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert not loading._hub_reachable(1.0)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="cannot reach the model hub") as e:
        load_pipeline("someone/not-cached-model", device="cpu", dtype=torch.float32)
    assert time.perf_counter() - t0 < loading.HUB_TIMEOUT + 2
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback
    assert len(str(e.value).splitlines()) == 1 and "load_pipeline('toy')" in str(e.value)


def test_a_pndm_scheduler_becomes_ddim_with_the_same_schedule(capsys):
    """SD 1.5 ships PNDM: the loader's fit gives DDIM with the model's betas, prediction type and steps_offset, says so
    in one line, and its timesteps never repeat (PNDM's do)."""
    from types import SimpleNamespace
    from diffusers import PNDMScheduler
    from tests.twins import SD15_SCHEDULER
    pndm = PNDMScheduler.from_config({k: v for k, v in SD15_SCHEDULER.items() if not k.startswith("_")})
    fake = SimpleNamespace(scheduler=pndm)
    loading.fit_scheduler(fake)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "DDIM" in out[0] and "PNDMScheduler" in out[0]
    ddim = fake.scheduler
    assert type(ddim).__name__ == "DDIMScheduler"
    for k in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "set_alpha_to_one", "prediction_type",
              "num_train_timesteps"):
        assert ddim.config[k] == pndm.config[k], k
    assert ddim.config.clip_sample is False
    assert torch.equal(ddim.alphas_cumprod, pndm.alphas_cumprod)
    ddim.set_timesteps(50)
    assert len(set(ddim.timesteps.tolist())) == 50 and ddim.timesteps[-1] == 1
    loading.fit_scheduler(fake)  # already DDIM: kept, nothing said
    assert fake.scheduler is ddim and capsys.readouterr().out == ""


def test_gpu_smoke_refuses_without_cuda_or_weights(monkeypatch, tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_smoke", loading.ROOT / "bench" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert smoke.main(["--model", "sd15"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, but no weights here
    assert smoke.main(["--model", str(tmp_path / "no-sd15")]) == 2
    err = capsys.readouterr().err
    assert "needs the SD 1.5 weights" in err and "no model folder" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert smoke.main(["--model", "sd15"]) == 2
    assert "needs the SD 1.5 weights" in capsys.readouterr().err


def test_t4_memory_estimate_prints_every_notebook(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("t4_memory", loading.ROOT / "bench" / "t4_memory.py")
    t4 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t4)
    rows = t4.estimate()
    assert len(rows) == 7 and all(r["fits"] for r in rows)
    n03 = next(r for r in rows if r["notebook"].startswith("03"))
    assert n03["extra"] > 1.5 * n03["weights"]  # null-text's float32 UNet copy: 4 bytes × the UNet's 860 M weights
    assert 1.9e9 < rows[0]["weights"] < 2.3e9  # SD 1.5: about 1.07 billion parameters in float16
    t4.main()
    out = capsys.readouterr().out
    assert all(r["notebook"] in out for r in rows) and len(out.strip().splitlines()) == 2 + len(rows)


def test_bundled_inpainting_checkpoint_loads_as_sd15_inpaint_does():
    """'toy-inpaint' is a 9-channel StableDiffusionInpaintPipeline folder beside the base model; the doctor's bundled
    check covers it, and a damaged copy names the command that rebuilds it."""
    from diffusers import StableDiffusionInpaintPipeline

    from helpers.loading import BUNDLED_INPAINT, RETRAIN_INPAINT, default_inpaint_model
    ip = load_pipeline("toy-inpaint", cls=StableDiffusionInpaintPipeline)
    assert ip.unet.config.in_channels == 9 and ip.unet.config.sample_size == 16
    assert default_inpaint_model(str(BUNDLED)) == str(BUNDLED_INPAINT)
    assert default_inpaint_model("some/hub-id", cuda=False) is None
    assert default_inpaint_model("some/hub-id", cuda=True) == "sd15-inpaint"
    base = load_pipeline("toy")
    for name, p in base.text_encoder.named_parameters():  # the text encoder is the base model's, unchanged
        assert torch.equal(p, dict(ip.text_encoder.named_parameters())[name])
    assert RETRAIN_INPAINT.startswith("python -m helpers.train_inpaint")


def test_damaged_inpainting_checkpoint_names_its_command(tmp_path, monkeypatch):
    damaged = tmp_path / "toy-sd-inpaint"
    shutil.copytree(loading.BUNDLED_INPAINT, damaged)
    (damaged / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    monkeypatch.setattr(loading, "BUNDLED_INPAINT", damaged)
    with pytest.raises(FileNotFoundError, match=r"unet/diffusion_pytorch_model.safetensors.*train_inpaint"):
        check_bundled(damaged)
