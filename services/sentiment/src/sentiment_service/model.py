"""The sentiment model: texts in (BYTES), tokenised per batch, run by TorchScript or ONNX Runtime.

Tokenisation happens inside `infer` (on the batcher's executor thread), so each batch is
padded only to its longest member; the batcher groups requests by token count
(`sequence_lengths`) so short texts are not padded to long ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mlplatform.backends import RuntimeModel
from mlplatform.model import Tensors
from mlplatform.repository import ModelVersion
from sentiment_service.text import TextEncoder, decode_texts

INPUT = "text"
PROBABILITIES = "probabilities"
LABEL = "label"
TRUNCATED = "truncated"
TOKENS = "tokens"

# Warm-up texts of different lengths, so warm-up batches exercise several sequence lengths.
_WARMUP_TEXTS = [
    "Great.",
    "The service was slow but the food was fine.",
    "I ordered the blender last week and it already makes a strange grinding noise when I use it. " * 3,
]


class SentimentModel(RuntimeModel):
    """Classifies texts; outputs per-class probabilities, the label index, truncation flag and token count."""

    variable_length = True

    def __init__(self, version: ModelVersion, runtime: str | None = None) -> None:
        super().__init__(version, runtime)
        params = self.config.parameters
        try:
            self.labels = [str(label) for label in params["labels"]]
            self.max_sequence_length = int(params.get("max_sequence_length", 128))
            self.max_text_chars = int(params["max_text_chars"])
            tokenizer_file = version.path / params.get("tokenizer", "tokenizer.json")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"sentiment v{self.version} config: parameters need 'labels', "
                             f"'max_text_chars' (and optionally 'max_sequence_length', 'tokenizer'): {exc}") from None
        if not tokenizer_file.is_file():
            raise ValueError(f"sentiment v{self.version}: tokenizer file {tokenizer_file} is missing")
        self.encoder = TextEncoder(tokenizer_file, self.max_sequence_length)

    def text_problem(self, text: str) -> str | None:
        """Why a text cannot be classified, or None."""
        if not text.strip():
            return "text is empty or only whitespace"
        if len(text) > self.max_text_chars:
            return f"text has {len(text)} characters, at most {self.max_text_chars} are allowed"
        return None

    def validate_rows(self, inputs: Mapping[str, np.ndarray]) -> list[str | None]:
        problems: list[str | None] = []
        for value in inputs[INPUT].reshape(-1):
            try:
                text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            except UnicodeDecodeError:
                problems.append("text is not valid UTF-8")
                continue
            problems.append(self.text_problem(text))
        return problems

    def sequence_lengths(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Tokens per text (after truncation): the batcher groups requests by it."""
        return self.encoder.lengths(decode_texts(inputs[INPUT]))

    def infer(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        """Tokenise (padded to this batch's longest text), run the runtime, add label and flags."""
        batch = self.encoder.encode(decode_texts(inputs[INPUT]))
        out = self.run_runtime({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
        probabilities = np.asarray(out[PROBABILITIES], dtype=np.float32)
        return {
            PROBABILITIES: probabilities,
            LABEL: probabilities.argmax(axis=1).astype(np.int64),
            TRUNCATED: batch.truncated,
            TOKENS: batch.tokens,
        }

    def warmup_inputs(self, batch_size: int) -> Tensors:
        texts = np.empty(batch_size, dtype=object)
        texts[:] = [_WARMUP_TEXTS[i % len(_WARMUP_TEXTS)].encode() for i in range(batch_size)]
        return {INPUT: texts}
