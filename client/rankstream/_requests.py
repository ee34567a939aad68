"""Building requests from Python values (shared by both clients)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rankstream.v1 import rankstream_pb2 as pb

from .types import PassageLike, to_passage

STATS_TRAILER = "rankstream-stats-bin"  # trailing metadata: a serialized rankstream.v1.RerankStats
_ORDERS = {"ranked": pb.RANKED, "as_scored": pb.AS_SCORED}
_MODES = {"": pb.MODE_DEFAULT, "dense": pb.DENSE, "sparse": pb.SPARSE, "hybrid": pb.HYBRID}
_LONG_PASSAGES = {"truncate": pb.TRUNCATE, "chunk": pb.CHUNK, "refuse": pb.REFUSE}


def long_passages_of(choice: str) -> int:
    try:
        return _LONG_PASSAGES[choice.lower()]
    except KeyError:
        raise ValueError(f"long_passages must be one of {sorted(_LONG_PASSAGES)}, got {choice!r}") from None


def mode_of(mode: str) -> int:
    try:
        return _MODES[mode.lower()]
    except KeyError:
        raise ValueError(f"mode must be one of dense, sparse, hybrid (or '' for the index's default), got {mode!r}") from None


def order_of(order: str) -> int:
    try:
        return _ORDERS[order]
    except KeyError:
        raise ValueError(f"order must be one of {sorted(_ORDERS)}, got {order!r}") from None


def rerank(query: str, passages: Iterable[PassageLike], *, top_n: int, model: str, raw_scores: bool,
           score_threshold: float | None, return_text: bool, return_metadata: bool, order: str,
           instruction: str = "", long_passages: str = "truncate", max_chunks_per_passage: int = 0,
           max_passage_tokens: int = 0) -> pb.RerankRequest:
    return pb.RerankRequest(
        query=query, passages=[to_passage(p, i) for i, p in enumerate(passages)], top_n=top_n, model=model,
        raw_scores=raw_scores, score_threshold=score_threshold, return_text=return_text,
        return_metadata=return_metadata, order=order_of(order), instruction=instruction,
        long_passages=long_passages_of(long_passages), max_chunks_per_passage=max_chunks_per_passage,
        max_passage_tokens=max_passage_tokens,
    )


_INPUT_TYPES = {"passage": pb.INPUT_TYPE_PASSAGE, "query": pb.INPUT_TYPE_QUERY}


def embed(texts: Iterable[str], *, model: str, input_type: str, normalize: bool) -> pb.EmbedRequest:
    if input_type not in _INPUT_TYPES:
        raise ValueError(f"input_type must be one of {sorted(_INPUT_TYPES)}, got {input_type!r}")
    if isinstance(texts, str):
        raise TypeError("texts: a list of strings (for one text, pass [text])")
    return pb.EmbedRequest(inputs=list(texts), model=model, input_type=_INPUT_TYPES[input_type], normalize=normalize)


def retrieve(query: str, *, top_k: int, filter: Mapping[str, str] | None, index: str, score_threshold: float | None,
             return_text: bool, return_metadata: bool, mode: str = "") -> pb.RetrieveRequest:
    return pb.RetrieveRequest(
        query=query, top_k=top_k, filter=dict(filter or {}), index=index, score_threshold=score_threshold,
        return_text=return_text, return_metadata=return_metadata, mode=mode_of(mode),
    )


def retrieve_and_rerank(query: str, *, top_k: int, top_n: int, reranker: str, filter: Mapping[str, str] | None,
                        index: str, raw_scores: bool, score_threshold: float | None, return_text: bool,
                        return_metadata: bool, order: str, mode: str = "", instruction: str = "",
                        long_passages: str = "truncate", max_chunks_per_passage: int = 0,
                        max_passage_tokens: int = 0) -> pb.RetrieveAndRerankRequest:
    return pb.RetrieveAndRerankRequest(
        query=query, top_k=top_k, top_n=top_n, reranker=reranker, filter=dict(filter or {}), index=index,
        raw_scores=raw_scores, score_threshold=score_threshold, return_text=return_text,
        return_metadata=return_metadata, order=order_of(order), mode=mode_of(mode), instruction=instruction,
        long_passages=long_passages_of(long_passages), max_chunks_per_passage=max_chunks_per_passage,
        max_passage_tokens=max_passage_tokens,
    )


def upsert(passages: Iterable[PassageLike], index: str) -> pb.UpsertPassagesRequest:
    return pb.UpsertPassagesRequest(index=index, passages=[to_passage(p, i) for i, p in enumerate(passages)])


def delete(ids: Iterable[str], index: str) -> pb.DeletePassagesRequest:
    return pb.DeletePassagesRequest(index=index, ids=list(ids))


def stats_from(trailing) -> pb.RerankStats | None:
    for key, value in trailing or ():
        if key == STATS_TRAILER:
            return pb.RerankStats.FromString(value)
    return None
