"""The operations both transports serve (Rerank, Retrieve, RetrieveAndRerank, Upsert, Delete,
Embed, ListModels): proto request in, validation, model and index work, proto messages out.
No transport here: each call gets a CallContext (its deadline and where its stats go), and
errors are raised as domain errors (errors.py), which the gRPC servicers and the HTTP dialects
each turn into their own status."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rankstream.v1 import rankstream_pb2 as pb
from rankstream_server.config import Settings
from rankstream_server.errors import InvalidArgument, Unavailable
from rankstream_server.index.corpus import passage_text
from rankstream_server.index.local import Hit
from rankstream_server.index.store import Document
from rankstream_server.inference.batcher import INTERACTIVE
from rankstream_server.inference.scoring import ModelCall, refusal
from rankstream_server.inference.tokenization import TooLong
from rankstream_server.serving.metrics import Metrics
from rankstream_server.serving.pipeline import ScoredChunk, pair_options, retrieved_chunk, scored_chunks
from rankstream_server.serving.registry import ModelRegistry
from rankstream_server.serving.validation import (
    REFUSE,
    check_delete,
    check_embed,
    check_rerank,
    check_retrieve,
    check_retrieve_and_rerank,
    check_upsert,
)

log = logging.getLogger(__name__)


class CallContext(Protocol):
    """What an operation needs from the transport carrying the call."""

    def time_remaining(self) -> float | None:
        """Seconds until the caller's deadline; None = no deadline."""

    def report(self, stats: pb.RerankStats) -> None:
        """The call's timings and counts, once it ends however it ends (gRPC: trailing metadata)."""


MODES = {pb.DENSE: "dense", pb.SPARSE: "sparse", pb.HYBRID: "hybrid"}
MODE_VALUES = {name: value for value, name in MODES.items()}


def retrieval_mode(requested: int, index) -> str:
    """The request's mode, else the index's default; sparse and hybrid need a keyword side."""
    if requested != pb.MODE_DEFAULT and requested not in MODES:
        raise InvalidArgument(f"mode: unknown value {requested}; use DENSE (1), SPARSE (2) or HYBRID (3)")
    mode = MODES.get(requested, index.config.mode)
    if mode != "dense" and not index.has_sparse:
        raise InvalidArgument(f"mode: {mode.upper()} needs a keyword side, and index {index.config.name!r} has none "
                              "(local backend with indexes[].sparse.enabled: true)")
    return mode


class Readiness:
    """Set once models are loaded and warm; calls before that get UNAVAILABLE. `serving` follows
    the health status (false while loading, draining or with a failing model), `closing` is set
    once the server stops."""

    def __init__(self) -> None:
        self.registry: ModelRegistry | None = None
        self.serving = False
        self.closing = False

    def require(self) -> ModelRegistry:
        if self.registry is None:
            raise Unavailable("models are still loading; retry shortly (health reports SERVING when ready)")
        return self.registry


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


def _hit_source(hits: list[Hit]) -> Callable[[int], tuple]:
    def source(index: int) -> tuple:
        doc = hits[index].document
        return doc.id, doc.text, doc.title, doc.metadata

    return source


class Messages:
    """Turns scored chunks into ScoredPassages messages: one per chunk, split only where one
    would pass `max_bytes` (clients refuse messages over their receive limit, 4 MiB by default).

    `source(i)` gives request position i's (id, text, title, metadata); text and metadata go
    out only when asked for."""

    def __init__(self, source: Callable[[int], tuple], want_text: bool, want_metadata: bool, max_bytes: int,
                 stage: int = pb.STAGE_UNSPECIFIED, retrieval_scores: np.ndarray | None = None,
                 hits: list[Hit] | None = None):
        self._source = source
        self._hits = hits  # retrieved passages: each side's score and rank go out with them
        self._want_text = want_text
        self._want_metadata = want_metadata
        self._max_bytes = max_bytes
        self._stage = stage
        self.retrieval_scores = retrieval_scores
        self.sent_passages = 0
        self.sent_messages = 0

    @classmethod
    def of_hits(cls, hits: list[Hit], request, max_bytes: int, stage: int) -> Messages:
        """Messages over retrieved passages: each one's id, text, metadata and retrieval score
        come from its hit; text and metadata as the request asks."""
        return cls(_hit_source(hits), request.return_text, request.return_metadata, max_bytes, stage=stage,
                   retrieval_scores=np.array([hit.score for hit in hits], dtype=np.float32), hits=hits)

    def build(self, chunk: ScoredChunk) -> list[pb.ScoredPassages]:
        """The chunk's messages (none for an empty chunk), each at most max_bytes on the wire
        unless a single passage is larger."""
        if not len(chunk):
            return []
        current = pb.ScoredPassages()
        messages = [current]
        size = 0
        want_text, want_metadata, stage, limit = self._want_text, self._want_metadata, self._stage, self._max_bytes
        retrieval = self.retrieval_scores
        for index, score, rank_ in zip(chunk.indices.tolist(), chunk.scores.tolist(), chunk.ranks.tolist()):
            doc_id, text, title, metadata = self._source(index)
            out = current.passages.add(
                id=doc_id, index=index, score=score, rank=rank_, stage=stage,
                retrieval_score=retrieval[index] if retrieval is not None else 0.0,
            )
            if want_text:
                out.text = text
                if title is not None:
                    out.title = title
            if want_metadata:
                out.metadata.update(metadata)
            if self._hits is not None:
                hit = self._hits[index]
                if hit.dense_rank:
                    out.dense_score, out.dense_rank = hit.dense_score, hit.dense_rank
                if hit.sparse_rank:
                    out.sparse_score, out.sparse_rank = hit.sparse_score, hit.sparse_rank
            item = out.ByteSize() + 6  # field tag and length prefix
            if size + item > limit and len(current.passages) > 1:
                moved = current.passages.pop()
                current = pb.ScoredPassages()
                messages.append(current)
                current.passages.append(moved)
                size = 0
            size += item
        self.sent_passages += len(chunk)
        self.sent_messages += len(messages)
        return messages


class _Trailer:
    """Collects a call's stats and reports them to the call's context however the call ends."""

    def __init__(self, context: CallContext, call: ModelCall, model_name: str, metrics: Metrics | None):
        self.arrived = time.perf_counter()
        self._metrics = metrics
        self.messages: Messages | None = None
        self.retrieve_s = 0.0
        self.candidates = 0
        self._context = context
        self._call = call
        self._model_name = model_name

    def send(self) -> None:
        stats = pb.RerankStats(
            model=self._model_name,
            returned=self.messages.sent_passages if self.messages else 0,
            messages=self.messages.sent_messages if self.messages else 0,
            total_ms=_ms(time.perf_counter() - self.arrived),
            retrieve_ms=_ms(self.retrieve_s),
            candidates=self.candidates,
            **self._call.stats(),
        )
        self._context.report(stats)
        if self._metrics is not None and stats.scored:
            self._metrics.observe_stages(self._model_name, stats.tokenize_ms / 1000, stats.queue_ms / 1000,
                                         stats.inference_ms / 1000)


class _ModelServicer:
    """What the Reranker, Retriever and Embedder services share: settings, readiness, the tokenizing
    threads and the metrics."""

    def __init__(self, settings: Settings, readiness: Readiness, tokenize_pool: ThreadPoolExecutor,
                 metrics: Metrics | None = None):
        self._metrics = metrics
        self._settings = settings
        self._readiness = readiness
        self._tokenize_pool = tokenize_pool


class RerankerService(_ModelServicer):

    async def Rerank(self, request: pb.RerankRequest, context: CallContext) -> AsyncIterator[pb.ScoredPassages]:
        registry = self._readiness.require()
        model = registry.get(request.model)
        check_rerank(request, self._settings.limits)
        options = pair_options(request, model, self._settings.limits)
        passages = request.passages
        texts = [passage_text(p.text, _optional(p, "title")) for p in passages]

        def source(index: int) -> tuple:
            passage = passages[index]
            return passage.id, passage.text, _optional(passage, "title"), passage.metadata

        call = ModelCall(self._tokenize_pool, context.time_remaining())
        trailer = _Trailer(context, call, model.name, self._metrics)
        trailer.messages = messages = Messages(
            source, request.return_text, request.return_metadata, self._settings.server.max_message_bytes
        )
        try:
            async for chunk in scored_chunks(
                call, model, request.query, texts, request.order == pb.AS_SCORED, request.top_n,
                _optional(request, "score_threshold"), request.raw_scores, options=options,
            ):
                for message in messages.build(chunk):
                    yield message
        finally:
            call.close()
            trailer.send()


class RetrieverService(_ModelServicer):

    async def _retrieve(self, call: ModelCall, trailer: _Trailer, request) -> list[Hit]:
        """Candidates by the request's mode: dense (embed, then search), sparse (BM25 only, no
        embedding), or hybrid (the BM25 search runs while the query is embedded, then fusion)."""
        index, encoder = self._readiness.require().index(request.index)
        mode = retrieval_mode(request.mode, index)
        metadata_filter = dict(request.filter) or None
        started = time.perf_counter()
        if mode == "sparse":
            hits = await asyncio.to_thread(index.sparse_search, request.query, request.top_k, metadata_filter)
        elif mode == "hybrid":
            keywords = asyncio.ensure_future(asyncio.to_thread(
                index.keyword_candidates, request.query, index.hybrid_depth(request.top_k), metadata_filter))
            try:
                query_vector = await call.embed(encoder, [request.query], "query")
            except BaseException:
                keywords.cancel()
                raise
            hits = await asyncio.to_thread(index.hybrid_search, query_vector[0], await keywords, request.top_k, metadata_filter)
        else:
            query_vector = await call.embed(encoder, [request.query], "query")
            hits = await asyncio.to_thread(index.search, query_vector[0], request.top_k, metadata_filter)
        trailer.retrieve_s = time.perf_counter() - started
        trailer.candidates = len(hits)
        return hits

    async def Retrieve(self, request: pb.RetrieveRequest, context: CallContext) -> AsyncIterator[pb.ScoredPassages]:
        registry = self._readiness.require()
        _, encoder = registry.index(request.index)
        check_retrieve(request, self._settings.limits)
        call = ModelCall(self._tokenize_pool, context.time_remaining())
        trailer = _Trailer(context, call, encoder.name, self._metrics)
        try:
            hits = await self._retrieve(call, trailer, request)
            trailer.messages = messages = Messages.of_hits(hits, request, self._settings.server.max_message_bytes,
                                                           pb.STAGE_RETRIEVE)
            chunk = retrieved_chunk(messages.retrieval_scores, _optional(request, "score_threshold"))
            if len(chunk):
                for message in messages.build(chunk):
                    yield message
        finally:
            call.close()
            trailer.send()

    async def RetrieveAndRerank(
        self, request: pb.RetrieveAndRerankRequest, context: CallContext
    ) -> AsyncIterator[pb.ScoredPassages]:
        registry = self._readiness.require()
        registry.index(request.index)
        reranker = registry.get(request.reranker)
        check_retrieve_and_rerank(request, self._settings.limits)
        options = pair_options(request, reranker, self._settings.limits)
        call = ModelCall(self._tokenize_pool, context.time_remaining())
        trailer = _Trailer(context, call, reranker.name, self._metrics)
        try:
            hits = await self._retrieve(call, trailer, request)
            trailer.messages = messages = Messages.of_hits(hits, request, self._settings.server.max_message_bytes,
                                                           pb.STAGE_RERANK)
            if hits:
                texts = [passage_text(hit.document.text, hit.document.title) for hit in hits]
                async for chunk in scored_chunks(
                    call, reranker, request.query, texts, request.order == pb.AS_SCORED, request.top_n,
                    _optional(request, "score_threshold"), request.raw_scores, reuse=True, options=options,
                ):
                    for message in messages.build(chunk):
                        yield message
        finally:
            call.close()
            trailer.send()

    async def UpsertPassages(self, request: pb.UpsertPassagesRequest, context: CallContext) -> pb.UpsertPassagesResponse:
        registry = self._readiness.require()
        index, encoder = registry.index(request.index)
        check_upsert(request, self._settings.limits)
        documents = [
            Document(id=p.id, text=p.text, title=_optional(p, "title"), metadata=dict(p.metadata)) for p in request.passages
        ]
        call = ModelCall(self._tokenize_pool, context.time_remaining())
        try:
            embeddings = await call.embed(encoder, [passage_text(d.text, d.title) for d in documents], "passage")
        finally:
            call.close()
        # Shielded: once the write starts it finishes, even if the client goes away.
        def write() -> tuple[int, int]:  # the store and FAISS work stays off the event loop
            return index.upsert(documents, embeddings), index.count

        version, count = await asyncio.shield(asyncio.to_thread(write))
        return pb.UpsertPassagesResponse(upserted=len(documents), count=count, version=version)

    async def DeletePassages(self, request: pb.DeletePassagesRequest, context: CallContext) -> pb.DeletePassagesResponse:
        registry = self._readiness.require()
        index, _ = registry.index(request.index)
        check_delete(request, self._settings.limits)
        ids = list(dict.fromkeys(request.ids))

        def write() -> tuple[int, int, int]:
            return (*index.delete(ids), index.count)

        deleted, version, count = await asyncio.shield(asyncio.to_thread(write))
        return pb.DeletePassagesResponse(deleted=deleted, not_found=len(ids) - deleted, count=count, version=version)


class InfoService:
    def __init__(self, readiness: Readiness):
        self._readiness = readiness

    async def ListModels(self, request: pb.ListModelsRequest, context: CallContext) -> pb.ListModelsResponse:
        registry = self._readiness.require()
        return await asyncio.to_thread(self._describe, registry)  # index counts read SQLite: not on the loop

    @staticmethod
    def _describe(registry: ModelRegistry) -> pb.ListModelsResponse:
        response = pb.ListModelsResponse(default_model=registry.default_name, default_index=registry.default_index)
        for index in registry.indexes:
            response.indexes.append(
                pb.IndexInfo(
                    name=index.config.name, model=index.config.model, count=index.count, dimension=index.dimension,
                    similarity=index.similarity, index_type=index.index_type, device=index.device, version=index.version,
                    sparse=index.has_sparse, default_mode=MODE_VALUES[index.config.mode],
                )
            )
        for model in registry.models:
            counters = model.batcher.counters
            response.models.append(
                pb.ModelInfo(
                    kind=pb.MODEL_KIND_CROSS if model.kind == "cross" else pb.MODEL_KIND_BI,
                    batcher=pb.BatcherStats(
                        batches=counters.batches,
                        items=counters.items,
                        dropped=counters.dropped,
                        in_flight=model.batcher.in_flight,
                        capacity=model.batcher.capacity,
                        rejected=counters.rejected,
                        max_requests_per_batch=counters.max_requests_per_batch,
                        max_batch_size=counters.max_batch_size,
                        tokens=counters.tokens,
                        padded_tokens=counters.padded_tokens,
                    ),
                    **model.describe(),
                )
            )
        return response


@dataclass(frozen=True)
class Services:
    """The operations a server offers, one object per rankstream.v1 service; both transports call these."""

    reranker: RerankerService
    retriever: RetrieverService
    embedder: EmbedderService
    info: InfoService


class EmbedderService(_ModelServicer):

    async def Embed(self, request: pb.EmbedRequest, context: CallContext) -> pb.EmbedResponse:
        name, vectors, stats = await self.embed(request, context)
        response = pb.EmbedResponse(model=name, dimension=vectors.shape[1], tokens=stats.tokens, truncated=stats.truncated)
        for row in vectors.tolist():
            response.embeddings.add().values.extend(row)
        return response

    async def embed(self, request: pb.EmbedRequest, context: CallContext) -> tuple[str, np.ndarray, pb.RerankStats]:
        """The model's name and the vectors as an array (rows in input order): what Embed and the
        HTTP embedding dialects each put in their own shape."""
        registry = self._readiness.require()
        model = registry.embedder(request.model)
        check_embed(request, self._settings.limits)
        if request.input_type not in INPUT_ROLES:
            raise InvalidArgument(f"input_type: unknown value {request.input_type}; use QUERY (1) or PASSAGE (2)")
        call = ModelCall(self._tokenize_pool, context.time_remaining())
        try:
            # Interactive: a caller waits on these, unlike an upsert's passages (the bulk lane).
            vectors = await call.embed(model, list(request.inputs), INPUT_ROLES[request.input_type], lane=INTERACTIVE,
                                       refuse=request.long_inputs == REFUSE)
        except TooLong as long:
            raise refusal(model, long, "inputs", "long_inputs") from None
        finally:
            call.close()
        if request.normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        stats = pb.RerankStats(model=model.name, returned=len(request.inputs), **call.stats())
        context.report(stats)
        return model.name, vectors, stats


INPUT_ROLES = {pb.INPUT_TYPE_UNSPECIFIED: "passage", pb.INPUT_TYPE_PASSAGE: "passage", pb.INPUT_TYPE_QUERY: "query"}
