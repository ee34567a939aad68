"""The asyncio client (grpc.aio): the same calls as RankstreamClient, awaited; the streaming
forms are async iterators (by passage, or by message with `batches()`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping

import grpc

from rankstream.v1 import rankstream_pb2 as pb

from . import _requests
from ._channel import ClientBase
from .errors import from_rpc_error
from .types import (
    Embeddings,
    PassageLike,
    Ranking,
    ScoredPassage,
    ServerInfo,
    Stats,
    WriteResult,
    from_embed,
    from_info,
    from_scored,
    from_stats,
)


class AsyncScoredStream:
    """Scored passages as the server streams them. Iterate once with `async for`, by passage or
    by message (`batches()`); then `.stats` is set."""

    def __init__(self, call):
        self._call = call
        self.stats: Stats | None = None

    async def batches(self) -> AsyncIterator[list[ScoredPassage]]:
        """One list per stream message: in RANKED order the whole ranking (split only past the
        server's message size limit), in AS_SCORED order each scored micro-batch."""
        try:
            async for message in self._call:
                yield from_scored(message)
            self.stats = from_stats(_requests.stats_from(await self._call.trailing_metadata()))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def __aiter__(self) -> AsyncIterator[ScoredPassage]:
        async for batch in self.batches():
            for passage in batch:
                yield passage

    def cancel(self) -> None:
        self._call.cancel()


class AsyncRankstreamClient(ClientBase):
    """asyncio client for a rankstream server (options: see ClientBase); create it inside the
    event loop that uses it. Use as an async context manager, or await close()."""

    def _open_channel(self, target: str, credentials: grpc.ChannelCredentials | None, options: list) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options)
        return grpc.aio.secure_channel(target, credentials, options)

    async def _unary(self, method, request, timeout: float | None):
        try:
            return await method(request, **self._kwargs(timeout))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def _collect(self, stream: AsyncScoredStream) -> Ranking:
        passages: list[ScoredPassage] = []
        async for batch in stream.batches():
            passages.extend(batch)
        return Ranking(passages, stream.stats or Stats())

    # -- Rerank -----------------------------------------------------------------------

    def rerank_stream(
        self, query: str, passages: Iterable[PassageLike], *, top_n: int = 0, model: str = "",
        raw_scores: bool = False, score_threshold: float | None = None, return_text: bool = False,
        return_metadata: bool = False, order: str = "as_scored",
        instruction: str = "", long_passages: str = "truncate", max_chunks_per_passage: int = 0,
        max_passage_tokens: int = 0, timeout: float | None = None,
    ) -> AsyncScoredStream:
        """Scores passages, yielding them as they are scored ("as_scored") or best first ("ranked")."""
        request = _requests.rerank(
            query, passages, top_n=top_n, model=model, raw_scores=raw_scores, score_threshold=score_threshold,
            return_text=return_text, return_metadata=return_metadata, order=order,
            instruction=instruction, long_passages=long_passages, max_chunks_per_passage=max_chunks_per_passage,
            max_passage_tokens=max_passage_tokens,
        )
        return AsyncScoredStream(self._reranker.Rerank(request, **self._kwargs(timeout)))

    async def rerank(
        self, query: str, passages: Iterable[PassageLike], *, top_n: int = 0, model: str = "",
        raw_scores: bool = False, score_threshold: float | None = None, return_text: bool = False,
        return_metadata: bool = False,
        instruction: str = "", long_passages: str = "truncate", max_chunks_per_passage: int = 0,
        max_passage_tokens: int = 0, timeout: float | None = None,
    ) -> Ranking:
        """The best `top_n` passages (0 = all), best first. `instruction`: the task instruction for
        rerankers that take one (ListModels: accepts_instruction); `long_passages`: "truncate",
        "chunk" (a long passage is scored in windows and keeps its best window's score) or "refuse"
        (a passage longer than the model takes fails the call, InvalidArgument, before any scoring);
        `max_passage_tokens`: cut each passage (with "chunk": each window) to that many tokens, 0 = as
        many as the model's max_length leaves."""
        return await self._collect(self.rerank_stream(
            query, passages, top_n=top_n, model=model, raw_scores=raw_scores, score_threshold=score_threshold,
            return_text=return_text, return_metadata=return_metadata, order="ranked", timeout=timeout,
            instruction=instruction, long_passages=long_passages, max_chunks_per_passage=max_chunks_per_passage,
            max_passage_tokens=max_passage_tokens,
        ))

    # -- Retrieve ---------------------------------------------------------------------

    def retrieve_stream(
        self, query: str, *, top_k: int = 10, filter: Mapping[str, str] | None = None, index: str = "",
        score_threshold: float | None = None, return_text: bool = True, return_metadata: bool = True,
        mode: str = "", timeout: float | None = None,
    ) -> AsyncScoredStream:
        request = _requests.retrieve(
            query, top_k=top_k, filter=filter, index=index, score_threshold=score_threshold,
            return_text=return_text, return_metadata=return_metadata, mode=mode,
        )
        return AsyncScoredStream(self._retriever.Retrieve(request, **self._kwargs(timeout)))

    async def retrieve(
        self, query: str, *, top_k: int = 10, filter: Mapping[str, str] | None = None, index: str = "",
        score_threshold: float | None = None, return_text: bool = True, return_metadata: bool = True,
        mode: str = "", timeout: float | None = None,
    ) -> Ranking:
        """The `top_k` nearest passages of an index, best first."""
        return await self._collect(self.retrieve_stream(
            query, top_k=top_k, filter=filter, index=index, score_threshold=score_threshold,
            return_text=return_text, return_metadata=return_metadata, mode=mode, timeout=timeout,
        ))

    def retrieve_and_rerank_stream(
        self, query: str, *, top_k: int = 50, top_n: int = 5, reranker: str = "", filter: Mapping[str, str] | None = None,
        index: str = "", raw_scores: bool = False, score_threshold: float | None = None, return_text: bool = True,
        return_metadata: bool = True, order: str = "as_scored", mode: str = "",
        instruction: str = "", long_passages: str = "truncate", max_chunks_per_passage: int = 0,
        max_passage_tokens: int = 0, timeout: float | None = None,
    ) -> AsyncScoredStream:
        request = _requests.retrieve_and_rerank(
            query, top_k=top_k, top_n=top_n, reranker=reranker, filter=filter, index=index, raw_scores=raw_scores,
            score_threshold=score_threshold, return_text=return_text, return_metadata=return_metadata, order=order,
            mode=mode,
            instruction=instruction, long_passages=long_passages, max_chunks_per_passage=max_chunks_per_passage,
            max_passage_tokens=max_passage_tokens,
        )
        return AsyncScoredStream(self._retriever.RetrieveAndRerank(request, **self._kwargs(timeout)))

    async def retrieve_and_rerank(
        self, query: str, *, top_k: int = 50, top_n: int = 5, reranker: str = "", filter: Mapping[str, str] | None = None,
        index: str = "", raw_scores: bool = False, score_threshold: float | None = None, return_text: bool = True,
        return_metadata: bool = True, mode: str = "",
        instruction: str = "", long_passages: str = "truncate", max_chunks_per_passage: int = 0,
        max_passage_tokens: int = 0, timeout: float | None = None,
    ) -> Ranking:
        """Retrieve `top_k` candidates, rerank them, return the best `top_n`: one round trip."""
        return await self._collect(self.retrieve_and_rerank_stream(
            query, top_k=top_k, top_n=top_n, reranker=reranker, filter=filter, index=index, raw_scores=raw_scores,
            score_threshold=score_threshold, return_text=return_text, return_metadata=return_metadata,
            order="ranked", mode=mode, timeout=timeout,
            instruction=instruction, long_passages=long_passages, max_chunks_per_passage=max_chunks_per_passage,
            max_passage_tokens=max_passage_tokens,
        ))

    # -- corpus changes and info ----------------------------------------------------------

    async def upsert(self, passages: Iterable[PassageLike], *, index: str = "", timeout: float | None = None) -> WriteResult:
        """Adds passages or replaces those with the same id; durable once this returns."""
        response = await self._unary(self._retriever.UpsertPassages, _requests.upsert(passages, index), timeout)
        return WriteResult(response.upserted, response.count, response.version)

    async def delete(self, ids: Iterable[str], *, index: str = "", timeout: float | None = None) -> WriteResult:
        response = await self._unary(self._retriever.DeletePassages, _requests.delete(ids, index), timeout)
        return WriteResult(response.deleted, response.count, response.version, response.not_found)

    async def embed(self, texts: Iterable[str], *, model: str = "", input_type: str = "passage", normalize: bool = False,
              timeout: float | None = None) -> Embeddings:
        """Bi-encoder embeddings of `texts` (one vector each, in order). input_type "query" or "passage"
        (models with query/passage prefixes embed each differently); model "" = the server's default embedder."""
        request = _requests.embed(texts, model=model, input_type=input_type, normalize=normalize)
        return from_embed(await self._unary(self._embedder.Embed, request, timeout))

    async def models(self, *, timeout: float | None = None) -> ServerInfo:
        """The server's models and indexes."""
        return from_info(await self._unary(self._info.ListModels, pb.ListModelsRequest(), timeout))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRankstreamClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
