"""A CLIP byte-level BPE vocabulary for the toy world, written in the files `CLIPTokenizer` reads.

Like CLIP's own vocabulary it holds the 256 byte symbols, each also with the end-of-word marker `</w>`, merges,
and the two special tokens. Merges are chosen so that every toy-world word is exactly one token; any other word
still tokenises (into smaller pieces, down to single bytes), as it would with a real CLIP tokenizer.
The ids are fixed by the word list below: change it and the bundled model must be retrained.
"""
from __future__ import annotations

import json
from pathlib import Path

from .toyworld import COLOUR_NAMES, SHAPES

# Order matters (it fixes the token ids). Extra words that notebooks use in prompts are included so that they are
# single tokens too, even where the model saw them rarely or never (their embeddings stay near initialisation).
WORDS = (("a", "and", ",") + COLOUR_NAMES + SHAPES
         + ("an", "the", "of", "photo", "picture", "with", "on", "big", "small", "shape", "shapes", "background",
            "purple", "orange", "heart", "cross", "."))
MODEL_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    # the same reversible byte -> printable character table CLIP and GPT-2 use
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the adjacent pair of lowest rank."""
    syms = list(word[:-1]) + [word[-1] + "</w>"]
    while len(syms) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(syms, syms[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        syms = syms[:i] + [syms[i] + syms[i + 1]] + syms[i + 2:]
    return syms


def build_vocab(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    base = list(_bytes_to_unicode().values())
    chains = {}
    for w in words:  # each word's left-to-right chain of merges: ((c1 c2) c3) ... cn</w>
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        chain, left = [], syms[0]
        for s in syms[1:]:
            chain.append((left, s))
            left += s
        chains[w] = chain
    order = list(words)
    for _ in range(100):  # give priority to the chains of words that do not come out whole, until all do
        merges = list(dict.fromkeys(m for w in order for m in chains[w]))
        ranks = {m: i for i, m in enumerate(merges)}
        broken = [w for w in order if len(_bpe(w, ranks)) != 1]
        if not broken:
            break
        order = broken + [w for w in order if w not in broken]
    else:
        raise RuntimeError(f"could not make {broken} single tokens")
    vocab_list = base + [b + "</w>" for b in base]
    vocab_list += list(dict.fromkeys(a + b for a, b in merges if a + b not in vocab_list))
    vocab_list += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab_list)}, merges


def write_tokenizer(folder: str | Path, words=WORDS) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH, "do_lower_case": True,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, "errors": "replace",
        "add_prefix_space": False}, indent=1))
    return folder


def vocab_size(words=WORDS) -> int:
    return len(build_vocab(words)[0])
