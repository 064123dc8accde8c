"""The character tokenizer: vocabulary, round trip, unknown characters."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.tokenizer import CharTokenizer, UnknownCharacterError

CORPUS = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def corpus() -> str:
    return CORPUS.read_text(encoding="utf-8")


def test_from_text_vocab_is_sorted_unique(corpus):
    tok = CharTokenizer.from_text(corpus)
    assert tok.vocab == sorted(set(corpus))
    assert all(a < b for a, b in zip(tok.vocab, tok.vocab[1:], strict=False))  # strictly increasing: sorted and unique
    assert len(tok) == len(set(corpus))
    assert {"\n", " ", "a", "Z"} <= set(tok.vocab)
    assert CharTokenizer.from_text("banana").vocab == ["a", "b", "n"]


def test_round_trip_on_corpus_sample(corpus):
    tok = CharTokenizer.from_text(corpus)
    for start in (0, len(corpus) // 2, len(corpus) - 5000):
        sample = corpus[start : start + 5000]
        ids = tok.encode(sample)
        assert len(ids) == len(sample)
        assert all(0 <= i < len(tok) for i in ids)
        assert tok.decode(ids) == sample
    # ids are positions in the sorted vocabulary
    assert tok.encode("\n") == [0]
    assert tok.decode([len(tok) - 1]) == max(corpus)


def test_round_trip_beyond_ascii():
    text = "naïve café — 日本語 😀\t\n"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("") == [] and tok.decode([]) == ""


@pytest.mark.parametrize(
    ("vocab_text", "text", "char", "position", "codepoint"),
    [
        ("abc", "abxc", "x", 2, "U+0078"),
        ("abc", "zabc", "z", 0, "U+007A"),
        ("abc ", "abc abc é", "é", 8, "U+00E9"),
        ("ab", "ab\n", "\n", 2, "U+000A"),
    ],
)
def test_unknown_character_names_char_and_position(vocab_text, text, char, position, codepoint):
    tok = CharTokenizer.from_text(vocab_text)
    with pytest.raises(UnknownCharacterError) as info:
        tok.encode(text)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.char == char
    assert err.position == position
    message = str(err)
    assert repr(char) in message
    assert codepoint in message
    assert f"position {position}" in message
    assert "not in the vocabulary" in message


def test_unknown_character_reports_first_offender():
    tok = CharTokenizer.from_text("hello")
    with pytest.raises(UnknownCharacterError) as info:
        tok.encode("hello wörld!")
    assert (info.value.char, info.value.position) == (" ", 5)


def test_invalid_vocabularies_are_refused():
    with pytest.raises(ValueError, match="duplicate"):
        CharTokenizer(["a", "b", "a"])
    with pytest.raises(ValueError, match="exactly one character"):
        CharTokenizer(["a", "bc"])
    with pytest.raises(ValueError, match="exactly one character"):
        CharTokenizer(["a", ""])


def test_vocab_is_kept_in_given_order():
    tok = CharTokenizer(["z", "a", "m"])
    assert tok.encode("amz") == [1, 2, 0]
    assert tok.decode([0, 1, 2]) == "zam"
