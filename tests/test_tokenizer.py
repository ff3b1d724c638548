"""llama/tokenizer.py against transformers' sentencepiece tokenizer (legacy behaviour) and sentencepiece."""

import pytest
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from conftest import LLAMA2_TOKENIZER, train_tiny_sentencepiece
from llama.tokenizer import Tokenizer

SENTENCES = ["Hello world", "The quick brown fox jumps over the lazy dog.", " leading space", "two  spaces",
             "trailing space ", "line one\nline two\n\n  indented", "émigré naïve café", "日本語のテキスト",
             "emoji 🦙🔥", "def f(x):\n    return x ** 2  # square", "1234567890 3.14159 -42", "   ",
             "SELECT name FROM users WHERE id = 7;", "Tabs\tand\rreturns", "a" * 50, ""]


def _hf(model_path):
    # transformers' slow, sentencepiece-based tokenizer; legacy=True is the Llama 2 default behaviour.
    return SentencePieceBackend(vocab_file=str(model_path), legacy=True, unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>")


@pytest.mark.skipif(not LLAMA2_TOKENIZER.is_file(), reason=f"Meta's tokenizer is not at {LLAMA2_TOKENIZER}")
def test_llama2_ids_equal_transformers():
    ours, hf = Tokenizer(LLAMA2_TOKENIZER), _hf(LLAMA2_TOKENIZER)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id) == (32000, 1, 2, -1)
    assert (hf.bos_token_id, hf.eos_token_id, hf.vocab_size) == (ours.bos_id, ours.eos_id, ours.vocab_size)
    for text in SENTENCES:
        expected = [hf.bos_token_id] + hf.encode(text, add_special_tokens=False)
        assert ours.encode(text) == expected, text
        assert ours.encode(text, bos=False, eos=True) == expected[1:] + [hf.eos_token_id], text
    assert ours.encode("Hello world") == [1, 15043, 3186]  # the ids in transformers' Llama docs


@pytest.mark.skipif(not LLAMA2_TOKENIZER.is_file(), reason=f"Meta's tokenizer is not at {LLAMA2_TOKENIZER}")
def test_llama2_decode_round_trips_and_keeps_special_strings_as_text():
    ours = Tokenizer(LLAMA2_TOKENIZER)
    for text in SENTENCES:
        if text.strip() == text:  # sentencepiece drops leading/trailing whitespace on decode
            assert ours.decode(ours.encode(text, eos=True)) == text
    # A literal "<s>" in user text must not become BOS (transformers would split it out as one).
    ids = ours.encode("Hey<s>there", bos=False)
    assert ours.bos_id not in ids and ours.decode(ids) == "Hey<s>there"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("sp") / "tiny.model", vocab_size=320)


def test_tiny_trained_tokenizer_equals_transformers(tiny_model):
    ours, hf = Tokenizer(tiny_model), _hf(tiny_model)
    assert ours.vocab_size == 320 and (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    for text in SENTENCES:
        assert ours.encode(text, bos=False) == hf.encode(text, add_special_tokens=False), text
        if text.strip() == text:
            assert ours.decode(ours.encode(text)) == text, text  # byte fallback covers unseen characters


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "tokenizer.model")


def test_non_sentencepiece_file_raises_value_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text('{"this is": "a json tokenizer"}')
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(bad)


def test_bad_arguments_raise(tiny_model):
    tok = Tokenizer(tiny_model)
    with pytest.raises(ValueError, match="takes a str"):
        tok.encode(["a list"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, 320])
