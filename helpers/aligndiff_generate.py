"""AlignDiff synthesis at scale: images and coarse masks for one category, sharded across processes.

    python -m helpers.aligndiff_generate --out data/synth/star --category star --n 1000
    accelerate launch --num_processes 4 -m helpers.aligndiff_generate --out data/synth/star --category star --n 1000
    accelerate launch --cpu --num_processes 2 -m helpers.aligndiff_generate ...      # two CPU processes

Image i uses prompt i (cycling through the prompt bank) and seed `seed + i`: every image has its own seed, whichever
process makes it (the reference code ran the same seeds on every GPU). Images are cut into fixed batches of
`--batch` consecutive numbers and the batches are split between processes (accelerate's `split_between_processes`),
so one process or many write the same files. Each item is written once, as `000123.png` and `000123_mask.png`
(written to a temporary name, then renamed), listed with its prompt and seed in `manifest.json`.

Resume: run the same command again and finished items are skipped. A folder whose manifest records a different run
(other prompts, model, steps, guidance, threshold, seed or learned embeddings) is refused with an error that says
what differs — nothing is overwritten.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

MANIFEST = "manifest.json"
IDENTITY = ("model", "category", "prompts", "steps", "guidance", "threshold", "seed", "embeddings")


class DifferentRun(ValueError):
    """The output folder already holds a run made with other settings."""


def item_name(i: int) -> str:
    return f"{i:06d}"


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def settings_for(model: str, category: str, prompts: list[str], steps: int, guidance: float, threshold: float,
                 seed: int, embeddings: str | None = None, colours: list | None = None) -> dict:
    from .loading import resolve_model
    return dict(model=str(resolve_model(model)), category=category, prompts=list(prompts), steps=int(steps),
                guidance=float(guidance), threshold=float(threshold), seed=int(seed),
                embeddings=None if embeddings is None else file_sha256(embeddings),
                colours=list(colours) if colours is not None else [None] * len(prompts))


def check_folder(out: Path, settings: dict) -> dict | None:
    """The manifest already in `out` (None if there is none); DifferentRun if it records another run."""
    path = out / MANIFEST
    if not path.exists():
        stray = sorted(p.name for p in out.glob("*.png")) if out.exists() else []
        if stray:
            raise DifferentRun(f"{out} holds {len(stray)} images ({stray[0]}, …) but no {MANIFEST}, so they may come "
                               "from another run; choose an empty --out folder or move those files away")
        return None
    try:
        old = json.loads(path.read_text())["settings"]
    except (ValueError, KeyError) as e:
        raise DifferentRun(f"{path} is not a manifest this script wrote ({e}); choose another --out folder") from e
    diff = [k for k in IDENTITY if old.get(k) != settings.get(k)]
    if diff:
        lines = "; ".join(f"{k}: folder has {_short(old.get(k))}, this run {_short(settings.get(k))}" for k in diff)
        raise DifferentRun(f"{out} already holds a different run ({lines}). Use another --out folder, or delete "
                           f"this one to start over; to resume, rerun with the settings in {path}")
    return old


def _short(v):
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "…"


def plan(settings: dict, n: int) -> list[dict]:
    p, c = settings["prompts"], settings["colours"]
    return [dict(name=item_name(i), prompt=p[i % len(p)], colour=c[i % len(c)], seed=settings["seed"] + i)
            for i in range(n)]


def done(out: Path, i: int) -> bool:
    return (out / f"{item_name(i)}.png").exists() and (out / f"{item_name(i)}_mask.png").exists()


def _save(img: np.ndarray, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(img).save(tmp, format="PNG")
    os.replace(tmp, path)


def write_manifest(out: Path, settings: dict, n: int):
    old = out / MANIFEST
    n = max(n, len(json.loads(old.read_text()).get("items", []))) if old.exists() else n
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(dict(settings=settings, items=plan(settings, n)), indent=1))
    os.replace(tmp, out / MANIFEST)


def run(out, category: str = "star", n: int = 16, prompts: list[str] | None = None, model: str | None = None,
        steps: int = 50, guidance: float = 7.5, threshold: float = 0.4, seed: int = 0, batch: int = 8,
        embeddings: str | None = None, state=None, pipe=None, progress: bool = True) -> list[int]:
    """Generate items 0 … n−1 into `out` (this process's share); returns the item numbers this process wrote."""
    from tqdm.auto import tqdm
    from . import aligndiff as ad
    from .loading import load_pipeline
    if state is None:
        from accelerate import PartialState
        state = PartialState()
    out = Path(out)
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if prompts:
        entries = [(p, None) for p in prompts]
    else:
        entries = ad.plain_texts(category)
    bank = ad.PromptBank(category)
    for p, c in entries:
        bank.add_text(p, c)  # checks that each prompt names the category
    settings = settings_for(model, category, bank.prompts, steps, guidance, threshold, seed, embeddings,
                            [c for _, c in bank.entries])
    check_folder(out, settings)  # every process checks (the same answer everywhere), so all stop on a mismatch
    state.wait_for_everyone()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, settings, n)
    state.wait_for_everyone()
    if pipe is None:
        pipe = load_pipeline(model, device=str(state.device))
    ad.category_id(pipe.tokenizer, category)
    if embeddings is not None:
        load_embeddings(pipe, embeddings, category)
    batches = [list(range(b, min(b + batch, n))) for b in range(0, n, batch)]
    wrote = []
    with state.split_between_processes(batches) as mine:
        todo = [[i for i in b if not done(out, i)] for b in mine]
        todo = [b for b in todo if b]
        bar = tqdm(total=sum(map(len, todo)), desc=f"process {state.process_index}", position=state.process_index,
                   disable=not progress)
        for idx in todo:
            syn = ad.synthesize(pipe, bank, steps=steps, guidance=guidance, seed=seed, threshold=threshold,
                                batch=len(idx), indices=idx, progress=False)
            for i, img, m in zip(idx, syn.images, syn.masks):
                _save((m * 255).astype(np.uint8), out / f"{item_name(i)}_mask.png")
                _save(img, out / f"{item_name(i)}.png")
                wrote.append(i)
            bar.update(len(idx))
        bar.close()
    state.wait_for_everyone()
    return wrote


def save_embeddings(path, inversion) -> Path:
    """Save learned tokens (an `aligndiff.Inversion`) as a safetensors file: {token: vector}."""
    from safetensors.torch import save_file
    save_file({t: e.contiguous() for t, e in zip(inversion.tokens, inversion.embeddings)}, str(path))
    return Path(path)


def load_embeddings(pipe, path, init_word: str) -> list[str]:
    """Add the tokens of a `save_embeddings` file to the pipeline, with their learned vectors."""
    import torch
    from safetensors.torch import load_file
    from .aligndiff import add_token
    vecs = load_file(str(path))
    table = pipe.text_encoder.get_input_embeddings().weight
    for tok, v in vecs.items():
        if v.shape != table.shape[1:]:
            raise ValueError(f"{path}: the vector of {tok} has {tuple(v.shape)} values but this text encoder's "
                             f"embeddings have {table.shape[1]}; the file was learned with another model")
        tid = add_token(pipe, tok, init_word)
        with torch.no_grad():
            pipe.text_encoder.get_input_embeddings().weight[tid] = v.to(table)
    return list(vecs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (created; resumed if it holds the same run)")
    ap.add_argument("--category", default="star", help="the category word (one token); its attention is the mask")
    ap.add_argument("--n", type=int, default=16, help="number of images")
    ap.add_argument("--prompt", action="append", help="a prompt naming the category (repeatable); default: the toy "
                    "world's plain texts for the category")
    ap.add_argument("--embeddings", help="safetensors file of learned tokens (aligndiff_generate.save_embeddings); "
                    "use them in prompts such as 'a <star-0> star'")
    ap.add_argument("--model", default=None, help="model (default: the loading rule of helpers.loading)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threshold", type=float, default=0.4,
                    help="coarse mask = attention heat > threshold (0.4, as the reference)")
    ap.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args(argv)
    try:
        run(a.out, a.category, a.n, a.prompt, a.model, a.steps, a.guidance, a.threshold, a.seed, a.batch,
            a.embeddings)
    except (DifferentRun, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
