"""Images and latents: load (path, URL, bundled copy), PIL ↔ tensors ↔ latents, sizes from the pipeline's configs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "images"


def vae_factor(pipe) -> int:
    """Pixels per latent cell (8 for SD, 4 for the toy model)."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def size_multiple(pipe) -> int:
    """Image sides must be multiples of this: the VAE factor times the UNet's own down-sampling."""
    return vae_factor(pipe) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def native_size(pipe) -> int:
    """The image side the model was trained at (512 for SD 1.x, 64 for the toy model)."""
    return pipe.unet.config.sample_size * vae_factor(pipe)


def load_image(src, size: int | tuple[int, int] | None = None) -> Image.Image:
    """Open an image from a local path or a URL, as RGB, optionally resized to `size` (side or (w, h)).

    A URL is fetched with fastdownload into its cache; offline, a copy bundled in data/images under the URL's file
    name is used instead, and the error says so when there is none.
    """
    if isinstance(src, Image.Image):
        img = src
    else:
        s = str(src)
        if s.startswith(("http://", "https://")):
            local = SAMPLES / s.rsplit("/", 1)[-1].split("?")[0]
            try:
                from fastdownload import FastDownload
                path = FastDownload(base=str(ROOT / ".cache"), archive="downloads", data="images").download(s)
            except Exception as e:  # offline, or the host refused
                if not local.exists():
                    raise FileNotFoundError(f"could not download {s} ({type(e).__name__}) and there is no bundled "
                                            f"copy at {local}; download it by hand or pass a local path") from e
                path = local
        else:
            path = Path(s)
            if not path.exists() and (SAMPLES / s).exists():
                path = SAMPLES / s
            if not path.exists():
                raise FileNotFoundError(f"no image at {s}; bundled samples: {sorted(p.name for p in SAMPLES.glob('*'))}")
        img = Image.open(path)
    if img.mode != "RGB":
        img = img.convert("RGB")  # greyscale, palette or RGBA files are turned into RGB here, on purpose
    if size is not None:
        img = img.resize((size, size) if isinstance(size, int) else size, Image.BICUBIC)
    return img


def check_size(pipe, h: int, w: int):
    m = size_multiple(pipe)
    if h % m or w % m:
        raise ValueError(f"image size {w}×{h} is not a multiple of {m} (VAE factor {vae_factor(pipe)} × UNet "
                         f"down-sampling); resize it, e.g. load_image(src, size={native_size(pipe)}), "
                         f"or crop to {w - w % m}×{h - h % m}")


def pil_to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB PIL image or uint8 H×W×3 array -> float 1×3×H×W in [-1, 1]."""
    if isinstance(img, Image.Image):
        if img.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {img.mode!r}; convert it with img.convert('RGB') "
                             "(or load it with helpers.load_image, which does)")
        arr = np.asarray(img)
    else:
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"expected an H×W×3 RGB array, got shape {arr.shape}; greyscale needs "
                             "np.repeat(a[..., None], 3, -1), RGBA needs a[..., :3]")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """float B×3×H×W in [-1, 1] -> list of PIL images."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def encode(pipe, images, sample: bool = False, generator=None) -> torch.Tensor:
    """PIL image(s), uint8 array(s) or a [-1, 1] tensor -> scaled latents (B×4×h×w), as the UNet sees them."""
    if isinstance(images, torch.Tensor):
        x = images
    else:
        images = images if isinstance(images, (list, tuple)) else [images]
        x = torch.cat([pil_to_tensor(i) for i in images])
    check_size(pipe, *x.shape[-2:])
    x = x.to(pipe.device, pipe.vae.dtype)
    dist = pipe.vae.encode(x).latent_dist
    z = dist.sample(generator=generator) if sample else dist.mean
    return z * pipe.vae.config.scaling_factor


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images as a float tensor in [-1, 1]."""
    return pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample.float().clamp(-1, 1)


def decode_pil(pipe, latents: torch.Tensor) -> list[Image.Image]:
    return tensor_to_pil(decode(pipe, latents))
