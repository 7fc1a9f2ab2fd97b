"""Text: prompt embeddings and words → token positions.

Learners ask for "horse", not token 2. `token_positions` maps a word (or a few words) of a prompt to the positions
of its tokens in the encoded prompt, handling punctuation, words that appear several times and words the tokenizer
splits into several pieces.
"""
from __future__ import annotations

from functools import lru_cache

import torch


def _check_length(tokenizer, prompt: str):
    n = len(tokenizer(prompt).input_ids)
    limit = tokenizer.model_max_length
    if n > limit:
        raise ValueError(f"the prompt has {n} tokens (start and end included) but the tokenizer takes at most "
                         f"{limit}; shorten it: {prompt[:60]!r}…")


@torch.no_grad()
def embed(pipe, prompts, allow_empty: bool = True) -> torch.Tensor:
    """Text-encoder output (B × model_max_length × dim) for a prompt or a list of prompts ("" = unconditional)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tok = pipe.tokenizer
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompts are strings, got {type(p).__name__}")
        if not allow_empty and not p.strip():
            raise ValueError("an empty prompt was given where a description is needed; write what the image shows, "
                             "e.g. 'a red circle'")
        _check_length(tok, p)
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(pipe.device)
    return pipe.text_encoder(ids)[0]


def uncond(pipe, n: int = 1) -> torch.Tensor:
    """The empty prompt's embedding, repeated n times: the unconditional half of classifier-free guidance."""
    return embed(pipe, [""] * n)


def _pieces(tokenizer, text: str) -> list[tuple[str, list[int]]]:
    """Split text as the tokenizer does into pre-tokenised words: (word, [token indices]) without special tokens."""
    toks = tokenizer.tokenize(text)
    out, cur, idx = [], [], []
    for i, t in enumerate(toks):
        cur.append(t)
        idx.append(i)
        if t.endswith("</w>") or i == len(toks) - 1:
            out.append((_to_text(cur), idx))
            cur, idx = [], []
    return out


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    from .toytokenizer import _bytes_to_unicode
    return {c: b for b, c in _bytes_to_unicode().items()}


def _to_text(tokens: list[str]) -> str:
    """CLIP BPE pieces -> the text they spell (end-of-word markers removed, byte symbols decoded)."""
    inverse = _unicode_to_bytes()
    s = "".join(tokens).replace("</w>", "")
    try:
        return bytes(inverse[c] for c in s).decode("utf-8", errors="replace")
    except KeyError:  # not a byte-level vocabulary: show the pieces as they are
        return s


def word_tokens(tokenizer, text: str) -> list[tuple[str, list[str]]]:
    """Each word of `text` with the tokens the tokenizer makes of it, e.g. [("zebra", ["ze", "bra</w>"])]."""
    toks = tokenizer.tokenize(text)
    return [(w, [toks[i] for i in idx]) for w, idx in _pieces(tokenizer, text)]


def prompt_words(tokenizer, prompt: str) -> list[str]:
    """The words of a prompt as the tokenizer sees them (lower-cased, punctuation separate)."""
    return [w for w, _ in _pieces(tokenizer, prompt)]


def token_positions(tokenizer, prompt: str, word: str, occurrence: int | None = None) -> list[int]:
    """Positions (in the encoded prompt, start token = 0) of the tokens of `word` in `prompt`.

    `word` may be several words ("red circle"). If it occurs several times, all occurrences' tokens are returned,
    or only the `occurrence`-th (0-based). A word the tokenizer splits gives all its pieces' positions.
    """
    if not word or not word.strip():
        raise ValueError("an empty word was asked for; give a word of the prompt")
    _check_length(tokenizer, prompt)
    have = _pieces(tokenizer, prompt)
    want = [w for w, _ in _pieces(tokenizer, word)]
    hits = [i for i in range(len(have) - len(want) + 1) if [w for w, _ in have[i:i + len(want)]] == want]
    if not hits:
        raise ValueError(f"'{word}' is not in the prompt {prompt!r}; its words are {[w for w, _ in have]}")
    if occurrence is not None:
        if not -len(hits) <= occurrence < len(hits):
            raise ValueError(f"'{word}' occurs {len(hits)} time(s) in the prompt; occurrence={occurrence} is out of range")
        hits = [hits[occurrence]]
    return [1 + t for h in hits for _, idx in have[h:h + len(want)] for t in idx]


def describe_tokens(tokenizer, prompt: str) -> list[tuple[int, str]]:
    """(position, token) for each token of the encoded prompt, start and end tokens included."""
    ids = tokenizer(prompt).input_ids
    return list(enumerate(tokenizer.convert_ids_to_tokens(ids)))
