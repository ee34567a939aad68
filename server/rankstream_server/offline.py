"""Batch runs without a server (index builds, evaluation): length-sorted batches straight
through a backend, with a progress bar."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from .backend import backend_for
from .batcher import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS
from .model_loading import LoadedModel
from .tokenization import PairTokenizer, TextTokenizer, TokenizedInput


def _run(loaded: LoadedModel, inputs: Sequence[TokenizedInput], label: str, progress: bool) -> np.ndarray | None:
    backend = backend_for(loaded)
    batch_tokens = GPU_BATCH_TOKENS if backend.asynchronous else CPU_BATCH_TOKENS
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i].input_ids))
    output: np.ndarray | None = None
    with tqdm(total=len(inputs), unit="text", desc=label, disable=not progress) as bar:
        start = 0
        while start < len(order):
            rows = max(1, batch_tokens // len(inputs[order[start]].input_ids))
            chunk = order[start : start + rows]
            result = backend.launch([inputs[i] for i in chunk]).result()
            if output is None:
                output = np.zeros((len(inputs), *result.shape[1:]), dtype=np.float32)
            output[chunk] = result
            bar.update(len(chunk))
            start += rows
    return output


def encode_texts(loaded: LoadedModel, texts: list[str], role: str, progress: bool = False) -> np.ndarray:
    """Bi-encoder embeddings, one row per text; role is "query" or "passage"."""
    tokenizer = TextTokenizer(loaded.tokenizer, loaded.max_length, loaded.config.query_prefix, loaded.config.passage_prefix)
    output = _run(loaded, tokenizer.encode(texts, role), f"encoding {role}s with {loaded.config.name}", progress)
    return output if output is not None else np.zeros((0, 0), dtype=np.float32)


def score_pairs(loaded: LoadedModel, pairs: list[tuple[str, str]], progress: bool = False) -> np.ndarray:
    """Raw cross-encoder scores (logits), or bi-encoder similarities, one per pair."""
    if loaded.kind == "bi":
        queries = encode_texts(loaded, [q for q, _ in pairs], "query")
        passages = encode_texts(loaded, [p for _, p in pairs], "passage", progress)
        return np.einsum("ij,ij->i", queries, passages) if pairs else np.zeros(0, np.float32)
    tokenizer = PairTokenizer(loaded.tokenizer, loaded.max_length, loaded.config.name, loaded.uses_token_type_ids)
    inputs: list[TokenizedInput] = []
    for query, passage in pairs:
        item = tokenizer.encode(query, [passage])[0]
        inputs.append(TokenizedInput(len(inputs), item.input_ids, item.token_type_ids, item.truncated))
    output = _run(loaded, inputs, f"reranking with {loaded.config.name}", progress)
    return output if output is not None else np.zeros(0, np.float32)


def dimension_of(loaded: LoadedModel) -> int:
    """A bi-encoder's embedding size, measured."""
    return int(encode_texts(loaded, ["dimension probe"], "passage").shape[1])
