from transformers import CLIPTokenizer

from helpers.toytokenizer import WORDS, vocab_size, write_tokenizer


def test_every_toy_word_is_one_token_and_others_still_tokenise(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path))
    for w in WORDS:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    pieces = tok.tokenize("zebra")
    assert len(pieces) > 1 and "".join(pieces).replace("</w>", "") == "zebra"
    assert len(tok.get_vocab()) == vocab_size()


def test_bundled_tokenizer_has_the_fixed_ids(pipe, tmp_path):
    fresh = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path))
    text = "a red circle, a blue square and a yellow star"
    assert pipe.tokenizer(text).input_ids == fresh(text).input_ids
    assert pipe.text_encoder.config.vocab_size == vocab_size()
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
