"""Turning text into token ids: (query, passage) pairs for cross-encoders, where truncation cuts
the passage and never the query, and single texts for bi-encoders.

Runs on a thread pool (fast tokenizers release the GIL), never on the event loop.
"""

from __future__ import annotations

import copy
import threading
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


class _PerThread:
    """A tokenizer copy per thread: a Hugging Face tokenizer call switches truncation and
    padding on the shared Rust object, so threads sharing one would race."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self._original = tokenizer
        self._local = threading.local()

    @property
    def _tokenizer(self) -> PreTrainedTokenizerBase:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = copy.deepcopy(self._original)
        return tokenizer

    def _checked(self, ids: list[int], max_length: int) -> list[int]:
        if len(ids) > max_length:  # would break the model (or a CUDA device): never let it through
            raise RuntimeError(f"tokenizer produced {len(ids)} tokens, over max_length {max_length}")
        return ids


class PairTokenizer(_PerThread):
    """Tokenizes a query against many passages for one cross-encoder."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, model_name: str, uses_token_type_ids: bool):
        super().__init__(tokenizer)
        self._max_length = max_length
        self._model_name = model_name
        self._uses_token_type_ids = uses_token_type_ids
        self._pair_specials = tokenizer.num_special_tokens_to_add(pair=True)

    def _check_query(self, query: str) -> None:
        query_tokens = len(self._tokenizer(query, add_special_tokens=False)["input_ids"])
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
        batch = self._tokenizer(
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


class TextTokenizer(_PerThread):
    """Tokenizes single texts for one bi-encoder, with its query or passage prefix."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, query_prefix: str, passage_prefix: str):
        super().__init__(tokenizer)
        self._max_length = max_length
        self._prefixes = {"query": query_prefix, "passage": passage_prefix}

    def encode(self, texts: list[str], role: str) -> list[TokenizedInput]:
        """role: "query" or "passage"."""
        prefix = self._prefixes[role]
        batch = self._tokenizer(
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
