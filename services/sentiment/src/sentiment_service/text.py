"""Tokenisation with the Rust `tokenizers` fast tokenizer, padded per batch (not to a fixed length).

The shipped MiniLM `tokenizer.json` pads every input to 128 positions; `TextEncoder`
turns that off and pads each batch only to its longest member, truncating at
`max_length` tokens (with [CLS] and [SEP]) and reporting which texts were cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclass(frozen=True)
class EncodedBatch:
    """Token ids and attention mask (int64 [B, S], S = longest member), tokens and truncation per row."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    tokens: np.ndarray  # int32 [B]
    truncated: np.ndarray  # bool [B]


class TextEncoder:
    """Texts -> padded token tensors for the sentiment network."""

    def __init__(self, tokenizer_file: Path, max_length: int) -> None:
        if max_length < 3:
            raise ValueError(f"max_sequence_length must be at least 3, got {max_length}")
        self.max_length = max_length
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_length)
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens per text after truncation (int64 [B])."""
        return np.array([len(e.ids) for e in self.tokenizer.encode_batch(list(texts))], dtype=np.int64)

    def encode(self, texts: Sequence[str]) -> EncodedBatch:
        """Encode `texts`, padded to the longest one."""
        encodings = self.tokenizer.encode_batch(list(texts))
        lengths = [len(e.ids) for e in encodings]
        width = max(lengths)
        ids = np.full((len(texts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for i, enc in enumerate(encodings):
            ids[i, : lengths[i]] = enc.ids
            mask[i, : lengths[i]] = 1
        return EncodedBatch(
            input_ids=ids, attention_mask=mask, tokens=np.array(lengths, dtype=np.int32),
            truncated=np.array([bool(e.overflowing) for e in encodings], dtype=bool),
        )


def decode_texts(values: np.ndarray) -> list[str]:
    """A BYTES tensor (object array of bytes or str) -> Python strings (UTF-8)."""
    return [v.decode("utf-8") if isinstance(v, bytes | bytearray) else str(v) for v in values.reshape(-1)]
