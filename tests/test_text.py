import pytest
import torch

from helpers.text import describe_tokens, embed, prompt_words, token_positions, uncond


def test_positions_of_single_repeated_and_multiword(pipe):
    tok = pipe.tokenizer
    p = "a red circle, a blue square and a red star."
    assert token_positions(tok, p, "circle") == [3]
    assert token_positions(tok, p, "red") == [2, 10]
    assert token_positions(tok, p, "red", occurrence=1) == [10]
    assert token_positions(tok, p, "red star") == [10, 11]
    toks = dict(describe_tokens(tok, p))
    assert toks[3] == "circle</w>" and toks[4] == ",</w>"


def test_punctuation_is_not_part_of_a_word(pipe):
    p = "a circle, a star."
    assert token_positions(pipe.tokenizer, p, "star") == [5]
    assert prompt_words(pipe.tokenizer, p) == ["a", "circle", ",", "a", "star", "."]


def test_split_word_gives_all_its_pieces(pipe):
    p = "a zebra on a circle"
    pos = token_positions(pipe.tokenizer, p, "zebra")
    toks = dict(describe_tokens(pipe.tokenizer, p))
    assert len(pos) > 1 and "".join(toks[i] for i in pos).replace("</w>", "") == "zebra"


def test_errors(pipe):
    tok = pipe.tokenizer
    with pytest.raises(ValueError, match=r"not in the prompt.*\['a', 'red', 'circle'\]"):
        token_positions(tok, "a red circle", "square")
    with pytest.raises(ValueError, match="occurs 1 time"):
        token_positions(tok, "a red circle", "red", occurrence=2)
    with pytest.raises(ValueError, match="empty word"):
        token_positions(tok, "a red circle", " ")
    long = " ".join(["a red circle"] * 40)
    with pytest.raises(ValueError, match="at most 77"):
        embed(pipe, long)
    with pytest.raises(ValueError, match="empty prompt"):
        embed(pipe, "", allow_empty=False)


def test_embeddings_shape_and_uncond(pipe):
    e = embed(pipe, ["a red circle", ""])
    assert e.shape == (2, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    assert torch.allclose(uncond(pipe), e[1:])
    assert not torch.allclose(e[0], e[1])
