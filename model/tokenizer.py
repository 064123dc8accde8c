"""Character tokenizer: the vocabulary is the sorted set of characters of the training text."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class UnknownCharacterError(ValueError):
    """A character that is not in the vocabulary; names the character and its position."""

    def __init__(self, char: str, position: int) -> None:
        self.char = char
        self.position = position
        super().__init__(
            f"character {char!r} (U+{ord(char):04X}) at position {position} is not in the vocabulary"
        )


class CharTokenizer:
    def __init__(self, vocab: Sequence[str]) -> None:
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocabulary has duplicate entries")
        if any(len(ch) != 1 for ch in vocab):
            raise ValueError("every vocabulary entry must be exactly one character")
        self.vocab: list[str] = list(vocab)
        self._index = {ch: i for i, ch in enumerate(self.vocab)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        index = self._index
        try:
            return [index[ch] for ch in text]
        except KeyError:
            for pos, ch in enumerate(text):
                if ch not in index:
                    raise UnknownCharacterError(ch, pos) from None
            raise

    def decode(self, ids: Iterable[int]) -> str:
        vocab = self.vocab
        return "".join(vocab[i] for i in ids)
