"""One way to load a model: explicit argument → $DIFFUSION_MODEL → real SD where CUDA is available → the bundled model.

    pipe = load_pipeline()                 # the bundled toy model on a CPU, real Stable Diffusion on a GPU
    pipe = load_pipeline("sd15")           # a short name from MODELS, a hub id, or a local folder
Model ids live here and nowhere else.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "data" / "toy-sd"
RETRAIN = "python -m helpers.train_toy"
ENV_VAR = "DIFFUSION_MODEL"
# Short names -> model ids (all ungated). The toy model is a folder in this repository.
MODELS = {
    "toy": str(BUNDLED),
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd15-inpaint": "stable-diffusion-v1-5/stable-diffusion-inpainting",
}
GPU_DEFAULT = "sd15"


def resolve_model(model: str | None = None) -> str:
    """The model to load, by the rule above, as a local path or a hub id."""
    choice = model or os.environ.get(ENV_VAR) or (GPU_DEFAULT if torch.cuda.is_available() else "toy")
    return MODELS.get(choice, choice)


def is_bundled(model_id: str) -> bool:
    return Path(model_id).resolve() == BUNDLED.resolve()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def check_bundled(path: Path = BUNDLED):
    """Raise a clear error if the bundled model is missing or damaged."""
    needed = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
              "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
              "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json",
              "scheduler/scheduler_config.json"]
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The bundled toy model in {path} is incomplete (missing: {', '.join(missing)}). Restore it with "
            f"`git checkout -- {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}` or retrain it with "
            f"`{RETRAIN}` (about an hour on 2 CPU cores).")
    try:
        json.loads((path / "model_index.json").read_text())
    except ValueError as e:
        raise ValueError(f"{path}/model_index.json is not valid JSON ({e}); restore it from git or retrain with "
                         f"`{RETRAIN}`") from e


def load_pipeline(model: str | None = None, cls=None, device: str | None = None, dtype: torch.dtype | None = None,
                  progress: bool = False, **kw):
    """Load a diffusers pipeline (StableDiffusionPipeline unless `cls` says otherwise) by the rule above.

    The bundled model loads with the same `from_pretrained` call as real Stable Diffusion.
    """
    from transformers.utils import logging as tlog
    level = tlog.get_verbosity()
    tlog.set_verbosity_error()  # importing pipelines warns that torchvision is absent: it is not needed here
    try:
        from diffusers import StableDiffusionPipeline
    finally:
        tlog.set_verbosity(level)
    from diffusers.utils import logging as dlog
    cls = cls or StableDiffusionPipeline
    if not progress:  # loading bars would only clutter notebooks: the model is small or cached
        dlog.disable_progress_bar(); tlog.disable_progress_bar()
    model_id = resolve_model(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if dtype == torch.float16 and device == "cpu":
        raise ValueError("float16 was asked for on the CPU, where it is slow or unsupported; "
                         "use dtype=torch.float32 on the CPU (float16 is for GPUs)")
    local = Path(model_id)
    if is_bundled(model_id):
        check_bundled(local)
    elif not local.exists() and _offline():
        raise RuntimeError(f"'{model_id}' is a hub id, but the hub is offline here (HF_HUB_OFFLINE=1). "
                           f"Use the bundled toy model instead: load_pipeline('toy') or unset ${ENV_VAR}.")
    extra = {}
    if cls.__name__.startswith("StableDiffusion") and not is_bundled(model_id):
        extra = dict(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(model_id, dtype=dtype, **extra, **kw)
    except OSError as e:
        if local.exists():
            raise
        raise RuntimeError(f"Could not fetch '{model_id}' from the hub ({type(e).__name__}). Without a network, "
                           f"use the bundled toy model: load_pipeline('toy').") from e
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe
