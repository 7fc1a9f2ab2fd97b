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
BUNDLED_INPAINT = ROOT / "data" / "toy-sd-inpaint"  # the toy inpainting checkpoint (9 input channels)
RETRAIN = "python -m helpers.train_toy --out data/toy-sd --replace-bundled"
RETRAIN_INPAINT = "python -m helpers.train_inpaint --out data/toy-sd-inpaint --replace-bundled"
ENV_VAR = "DIFFUSION_MODEL"
# Short names -> model ids (all ungated). The toy model is a folder in this repository.
MODELS = {
    "toy": str(BUNDLED),
    "toy-inpaint": str(BUNDLED_INPAINT),
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd15-inpaint": "stable-diffusion-v1-5/stable-diffusion-inpainting",
}
GPU_DEFAULT = "sd15"


def resolve_model(model: str | None = None) -> str:
    """The model to load, by the rule above, as a local path or a hub id."""
    choice = model or os.environ.get(ENV_VAR) or (GPU_DEFAULT if torch.cuda.is_available() else "toy")
    return MODELS.get(choice, choice)


def is_bundled(model_id: str) -> bool:
    """Whether `model_id` is the bundled toy model (the one every notebook's quality checks are measured on)."""
    return Path(model_id).resolve() == BUNDLED.resolve()


def default_inpaint_model(model_id: str, cuda: bool | None = None) -> str | None:
    """The inpainting checkpoint that goes with a base model: the toy one for the bundled model, SD 1.5's on a GPU
    for any other model, and None (reuse the base model's 4-channel UNet) otherwise."""
    if is_bundled(model_id):
        return MODELS["toy-inpaint"]
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "sd15-inpaint" if cuda else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def check_bundled(path: Path = BUNDLED):
    """Raise a clear error if a bundled model (the toy model or its inpainting checkpoint) is missing or damaged."""
    retrain = RETRAIN_INPAINT if Path(path).resolve() == BUNDLED_INPAINT.resolve() else RETRAIN
    needed = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
              "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
              "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json",
              "scheduler/scheduler_config.json"]
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The bundled toy model in {path} is incomplete (missing: {', '.join(missing)}). Restore it with "
            f"`git checkout -- {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}` or retrain it with "
            f"`{retrain}` (about an hour on 2 CPU cores).")
    try:
        json.loads((path / "model_index.json").read_text())
    except ValueError as e:
        raise ValueError(f"{path}/model_index.json is not valid JSON ({e}); restore it from git or retrain with "
                         f"`{retrain}`") from e


HUB_TIMEOUT = 3.0  # seconds to wait for the hub before saying it cannot be reached


def _looks_like_path(name: str) -> bool:
    """A local folder was meant (not a hub id 'owner/name'): absolute, ./ ../ ~, several slashes, a backslash, or
    a relative path whose parent folder exists here."""
    if os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") >= 2 \
            or name.endswith("/"):
        return True
    return name.count("/") == 1 and Path(name).parent.is_dir()


def check_model_name(model_id: str, given: str | None = None):
    """Raise a clear error for a model name that can be neither a local folder nor a hub id.

    given: what the user wrote (a short name, or the value of $DIFFUSION_MODEL), for the message.
    """
    given = given or model_id
    if Path(model_id).expanduser().exists():
        return
    if _looks_like_path(model_id):
        where = f" (from ${ENV_VAR})" if os.environ.get(ENV_VAR) == given else ""
        raise FileNotFoundError(
            f"there is no model folder at {model_id}{where} (looked in {Path(model_id).expanduser().resolve()}); "
            f"check the path, or use a short name: {', '.join(MODELS)}")
    if "/" not in model_id:
        import difflib
        close = difflib.get_close_matches(model_id, list(MODELS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown model name '{model_id}'.{hint} Known names: {', '.join(MODELS)}; or give a hub id "
                         f"('owner/name') or a local folder.")


def _hub_reachable(timeout: float | None = None) -> bool:
    """Whether a TCP connection to the hub's endpoint opens within `timeout` seconds (DNS included)."""
    import socket
    import threading
    from urllib.parse import urlparse
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    ok = []

    def probe():
        try:
            socket.create_connection((url.hostname, port), timeout=timeout or HUB_TIMEOUT).close()
            ok.append(True)
        except OSError:
            pass

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    th.join(timeout or HUB_TIMEOUT)
    return bool(ok)


def _cached(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(model_id, "model_index.json"), str)
    except Exception:  # an id the cache cannot even hold
        return False


def fit_scheduler(pipe, verbose: bool = True):
    """Give `pipe` the DDIM sampler the course's methods are defined on, keeping the model's β-schedule,
    prediction_type and steps_offset (`helpers.sampling.as_ddim`). A DDIM scheduler is kept as it is; otherwise
    one line says what replaced what."""
    from .sampling import as_ddim
    old = getattr(pipe, "scheduler", None)
    if old is None:
        return pipe
    new = as_ddim(old)
    if new is not old:
        pipe.scheduler = new
        if verbose:
            c = new.config
            print(f"Sampler: DDIM built from the model's {type(old).__name__} config (prediction_type "
                  f"{c.prediction_type}, {c.beta_schedule} betas {c.beta_start}-{c.beta_end}, steps_offset "
                  f"{c.steps_offset}); the course's methods are defined on DDIM.")
    return pipe


def load_pipeline(model: str | None = None, cls=None, device: str | None = None, dtype: torch.dtype | None = None,
                  progress: bool = False, **kw):
    """Load a diffusers pipeline (StableDiffusionPipeline unless `cls` says otherwise) by the rule above.

    The bundled model loads with the same `from_pretrained` call as real Stable Diffusion. Every pipeline then
    samples with DDIM (`fit_scheduler`) unless a `scheduler=` is passed.
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
    given = model or os.environ.get(ENV_VAR)
    model_id = resolve_model(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if dtype == torch.float16 and device == "cpu":
        raise ValueError("float16 was asked for on the CPU, where it is slow or unsupported; "
                         "use dtype=torch.float32 on the CPU (float16 is for GPUs)")
    check_model_name(model_id, given)
    local = Path(model_id).expanduser()
    if local.exists():
        model_id = str(local)
    if is_bundled(model_id) or Path(model_id).resolve() == BUNDLED_INPAINT.resolve():
        check_bundled(local)
    elif not local.exists():
        if _offline():
            raise RuntimeError(f"'{model_id}' is a hub id, but the hub is offline here (HF_HUB_OFFLINE=1). "
                               f"Use the bundled toy model instead: load_pipeline('toy') or unset ${ENV_VAR}.")
        if not _hub_reachable():
            if not _cached(model_id):
                raise RuntimeError(
                    f"cannot reach the model hub to fetch '{model_id}' (no answer within {HUB_TIMEOUT:g} s) and it "
                    f"is not in the local cache. Without a network, use the bundled toy model: load_pipeline('toy')"
                    f"; to skip this check, set HF_HUB_OFFLINE=1.") from None
            kw.setdefault("local_files_only", True)  # the cached copy, without waiting for the hub
    extra = {}
    if cls.__name__.startswith("StableDiffusion") and not is_bundled(model_id):
        extra = dict(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(model_id, dtype=dtype, **extra, **kw)
    except OSError as e:
        if local.exists():
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RuntimeError(f"Could not fetch '{model_id}' from the hub ({type(e).__name__}: {first[:200]}). Check "
                           f"the id; without a network, use the bundled toy model: load_pipeline('toy').") from None
    if "scheduler" not in kw:
        fit_scheduler(pipe)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe
