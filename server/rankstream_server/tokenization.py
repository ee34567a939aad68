"""Turning text into token ids: (query, passage) pairs for cross-encoders, where truncation cuts
the passage and never the query, and single texts for bi-encoders.

Runs on a thread pool (fast tokenizers release the GIL), never on the event loop.
"""

from __future__ import annotations

import contextlib
import copy
import queue
from collections.abc import Iterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from .errors import InvalidArgument


@dataclass(frozen=True)
class TokenizedInput:
    """One tokenized model input: a (query, passage) pair, or a single text."""

    index: int  # the input's position in its request
    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: bool


def passage_text(text: str, title: str | None) -> str:
    """BEIR convention: the model reads (title + " " + text).strip()."""
    return f"{title} {text}".strip() if title else text


class _TokenizerCopies:
    """Hands each call its own tokenizer copy: a Hugging Face tokenizer call switches truncation
    and padding on the shared Rust object, so concurrent calls on one copy would race. Copies
    are made up front (deep copies take tens of milliseconds) and reused."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, copies: int = 2):
        self._original = tokenizer
        self._idle: queue.SimpleQueue[PreTrainedTokenizerBase] = queue.SimpleQueue()
        for _ in range(copies):
            self._idle.put(copy.deepcopy(tokenizer))

    @contextlib.contextmanager
    def _tokenizer(self) -> Iterator[PreTrainedTokenizerBase]:
        try:
            tokenizer = self._idle.get_nowait()
        except queue.Empty:
            tokenizer = copy.deepcopy(self._original)
        try:
            yield tokenizer
        finally:
            self._idle.put(tokenizer)

    def _checked(self, ids: list[int], max_length: int) -> list[int]:
        if len(ids) > max_length:  # would break the model (or a CUDA device): never let it through
            raise RuntimeError(f"tokenizer produced {len(ids)} tokens, over max_length {max_length}")
        return ids


class PairTokenizer(_TokenizerCopies):
    """Tokenizes a query against many passages for one cross-encoder."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int, model_name: str, uses_token_type_ids: bool, copies: int = 2
    ):
        super().__init__(tokenizer, copies)
        self._max_length = max_length
        self._model_name = model_name
        self._uses_token_type_ids = uses_token_type_ids
        self._pair_specials = tokenizer.num_special_tokens_to_add(pair=True)

    def _check_query(self, query: str) -> None:
        with self._tokenizer() as tokenizer:
            query_tokens = len(tokenizer(query, add_special_tokens=False)["input_ids"])
        if query_tokens == 0:
            raise InvalidArgument("query: has no tokens for this model (only spaces or control characters?)")
        room = self._max_length - self._pair_specials - 1
        if query_tokens > room:
            raise InvalidArgument(
                f"query is {query_tokens} tokens; model {self._model_name!r} takes at most {room} query tokens "
                f"(max_length {self._max_length}, queries are never truncated)"
            )

    def encode(self, query: str, passages: list[str]) -> list[TokenizedInput]:
        self._check_query(query)
        with self._tokenizer() as tokenizer:
            batch = tokenizer(
                [query] * len(passages),
                passages,
                truncation="only_second",
                max_length=self._max_length,
                padding=False,
                return_token_type_ids=self._uses_token_type_ids,
                return_attention_mask=False,
            )
        encodings = getattr(batch, "encodings", None)
        pairs = []
        for i, ids in enumerate(batch["input_ids"]):
            if encodings:
                truncated = bool(encodings[i].overflowing)
            else:  # slow tokenizers do not report overflow: a full-length pair was (almost surely) cut
                truncated = len(ids) >= self._max_length
            pairs.append(
                TokenizedInput(
                    index=i,
                    input_ids=self._checked(ids, self._max_length),
                    token_type_ids=batch["token_type_ids"][i] if self._uses_token_type_ids else None,
                    truncated=truncated,
                )
            )
        return pairs


class TextTokenizer(_TokenizerCopies):
    """Tokenizes single texts for one bi-encoder, with its query or passage prefix."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int, query_prefix: str, passage_prefix: str, copies: int = 2
    ):
        super().__init__(tokenizer, copies)
        self._max_length = max_length
        self._prefixes = {"query": query_prefix, "passage": passage_prefix}

    def encode(self, texts: list[str], role: str) -> list[TokenizedInput]:
        """role: "query" or "passage"."""
        prefix = self._prefixes[role]
        with self._tokenizer() as tokenizer:
            batch = tokenizer(
                [prefix + text for text in texts],
                truncation=True,
                max_length=self._max_length,
                padding=False,
                return_token_type_ids=False,
                return_attention_mask=False,
            )
        encodings = getattr(batch, "encodings", None)
        return [
            TokenizedInput(
                index=i,
                input_ids=self._checked(ids, self._max_length),
                token_type_ids=None,
                truncated=bool(encodings[i].overflowing) if encodings else len(ids) >= self._max_length,
            )
            for i, ids in enumerate(batch["input_ids"])
        ]
