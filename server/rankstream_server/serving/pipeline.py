"""The rules of Rerank and of retrieve-then-rerank, apart from gRPC: what gets scored, in which
order results come out, and in which chunks. The servicers turn each chunk into one
ScoredPassages message (or a few, past the message size limit)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from rankstream_server.config import LimitsConfig
from rankstream_server.errors import InvalidArgument
from rankstream_server.inference.ranking import activate, passing, rank
from rankstream_server.inference.scoring import ModelCall, PairOptions
from rankstream_server.serving.registry import ServedModel
from rankstream_server.serving.validation import CHUNK, REFUSE, TRUNCATE


@dataclass(frozen=True)
class ScoredChunk:
    """Results to send together: positions in the request, scores, and 1-based ranks (0 when
    not ranked, in AS_SCORED order). Arrays of one length."""

    indices: np.ndarray
    scores: np.ndarray
    ranks: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


async def scored_chunks(
    call: ModelCall,
    model: ServedModel,
    query: str,
    texts: list[str],
    as_scored: bool,
    top_n: int,
    threshold: float | None,
    raw: bool,
    reuse: bool = False,
    options: PairOptions | None = None,
) -> AsyncIterator[ScoredChunk]:
    """Scores texts against the query. AS_SCORED: one chunk per scored micro-batch, as it comes.
    RANKED: one chunk once every text is scored, best first, cut at top_n and the threshold.
    `reuse`: the texts are corpus passages (their tokens may be cached)."""
    activation = "none" if raw else model.loaded.activation
    if as_scored:
        async for indices, raw_scores in call.score(model, query, texts, reuse, options or PairOptions()):
            scores = activate(raw_scores, activation)
            keep = passing(scores, threshold)
            if keep.any():
                yield ScoredChunk(indices[keep], scores[keep], np.zeros(int(keep.sum()), dtype=np.int32))
        return
    scores = np.empty(len(texts), dtype=np.float32)
    async for indices, raw_scores in call.score(model, query, texts, reuse, options or PairOptions()):
        scores[indices] = activate(raw_scores, activation)
    order = rank(scores, top_n, threshold)
    yield ScoredChunk(order, scores[order], np.arange(1, len(order) + 1, dtype=np.int32))


def pair_options(request, model: ServedModel, limits: LimitsConfig) -> PairOptions:
    """A RerankRequest's or RetrieveAndRerankRequest's instruction and long-passage choice, checked
    against the model and the limits."""
    instruction = model.instruction(request.instruction)
    if request.long_passages not in (TRUNCATE, CHUNK, REFUSE):
        raise InvalidArgument(f"long_passages: unknown value {request.long_passages}; "
                              "use TRUNCATE (0), CHUNK (1) or REFUSE (2)")
    if request.max_passage_tokens < 0:
        raise InvalidArgument(f"max_passage_tokens: {request.max_passage_tokens} must not be negative (0 = no cut)")
    if request.max_passage_tokens and model.kind != "cross":
        raise InvalidArgument(f"max_passage_tokens needs a cross-encoder; model {model.name!r} is a bi-encoder")
    if request.max_chunks_per_passage < 0 or request.max_chunks_per_passage > limits.max_chunks_per_passage:
        raise InvalidArgument(f"max_chunks_per_passage: {request.max_chunks_per_passage} is outside "
                              f"0..{limits.max_chunks_per_passage} (0 = the server's default)")
    if request.long_passages != CHUNK and request.max_chunks_per_passage:
        raise InvalidArgument("max_chunks_per_passage: set only with long_passages: CHUNK")
    if request.long_passages == REFUSE:
        if request.max_passage_tokens:
            raise InvalidArgument("max_passage_tokens: not with long_passages: REFUSE (it refuses a long passage, "
                                  "never cuts one)")
        return PairOptions(instruction, refuse=True)
    if request.long_passages == TRUNCATE:
        return PairOptions(instruction, passage_tokens=request.max_passage_tokens)
    if model.kind != "cross":
        raise InvalidArgument(f"long_passages: CHUNK needs a cross-encoder; model {model.name!r} is a bi-encoder")
    return PairOptions(instruction, request.max_chunks_per_passage or limits.max_chunks_per_passage, request.max_passage_tokens)


def retrieved_chunk(scores: np.ndarray, threshold: float | None) -> ScoredChunk:
    """Retrieve's results, already best first: cut at the threshold, ranked 1.."""
    keep = int(passing(scores, threshold).sum()) if threshold is not None else len(scores)
    # Best first, so the passing scores are a prefix.
    return ScoredChunk(np.arange(keep), scores[:keep], np.arange(1, keep + 1, dtype=np.int32))
