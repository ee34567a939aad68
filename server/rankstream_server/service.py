"""gRPC servicers: proto in, domain calls, proto out. Domain errors become statuses here, and
unexpected errors become a plain INTERNAL (the traceback stays in the server log)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc

from .batcher import Job
from .config import Settings
from .errors import RankstreamError, Unavailable
from .ranking import activate, passing, rank
from .registry import ModelRegistry
from .tokenization import passage_text
from .validation import check_rerank

log = logging.getLogger(__name__)

STATS_TRAILER = "rankstream-stats-bin"


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext) -> None:
    if isinstance(exc, RankstreamError):
        await context.abort(exc.code, str(exc))
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s", incident, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (server log reference {incident})")


def streaming_errors(method: Callable) -> Callable:
    """Maps errors of a server-streaming handler to statuses."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for message in method(self, request, context):
                yield message
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - every error gets a status
            await _abort_for(exc, context)

    return wrapper


def unary_errors(method: Callable) -> Callable:
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort_for(exc, context)

    return wrapper


class Readiness:
    """Set once models are loaded and warm; RPCs before that get UNAVAILABLE."""

    def __init__(self) -> None:
        self.registry: ModelRegistry | None = None

    def require(self) -> ModelRegistry:
        if self.registry is None:
            raise Unavailable("models are still loading; retry shortly (health reports SERVING when ready)")
        return self.registry


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class RerankerService(pb_grpc.RerankerServicer):
    def __init__(self, settings: Settings, readiness: Readiness, tokenize_pool: ThreadPoolExecutor):
        self._settings = settings
        self._readiness = readiness
        self._tokenize_pool = tokenize_pool

    @streaming_errors
    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ScoredPassage]:
        arrived = time.perf_counter()
        registry = self._readiness.require()
        model = registry.get(request.model)
        check_rerank(request, self._settings.limits)
        passages = request.passages
        texts = [passage_text(p.text, p.title if p.HasField("title") else None) for p in passages]
        loop = asyncio.get_running_loop()
        pairs = await loop.run_in_executor(self._tokenize_pool, model.tokenizer.encode, request.query, texts)
        tokenized = time.perf_counter()

        remaining = context.time_remaining()
        job = Job(size=len(pairs), deadline=None if remaining is None else time.monotonic() + remaining)
        model.batcher.submit(job, pairs)
        threshold = request.score_threshold if request.HasField("score_threshold") else None
        activation = "none" if request.raw_scores else model.activation
        returned = 0

        def message(index: int, score: float, rank_: int) -> pb.ScoredPassage:
            passage = passages[index]
            out = pb.ScoredPassage(id=passage.id, index=index, score=score, rank=rank_)
            if request.return_text:
                out.text = passage.text
                if passage.HasField("title"):
                    out.title = passage.title
            if request.return_metadata:
                out.metadata.update(passage.metadata)
            return out

        try:
            if request.order == pb.AS_SCORED:
                async for indices, logits in job.results():
                    scores = activate(logits, activation)
                    for index, score in zip(indices[passing(scores, threshold)], scores[passing(scores, threshold)]):
                        returned += 1
                        yield message(int(index), float(score), 0)
            else:
                scores = np.empty(len(pairs), dtype=np.float32)
                async for indices, logits in job.results():
                    scores[indices] = activate(logits, activation)
                for position, index in enumerate(rank(scores, request.top_n, threshold), start=1):
                    returned += 1
                    yield message(int(index), float(scores[index]), position)
        finally:
            if not job.done:
                model.batcher.cancel(job)
            stats = job.stats
            first = stats.first_batch_at
            summary = pb.RerankStats(
                model=model.name,
                passages=len(pairs),
                scored=stats.scored,
                returned=returned,
                truncated=sum(p.truncated for p in pairs),
                tokenize_ms=_ms(tokenized - arrived),
                queue_ms=_ms(first - stats.enqueued_at) if first is not None else 0.0,
                inference_ms=_ms(stats.inference_s),
                total_ms=_ms(time.perf_counter() - arrived),
                batches=stats.batches,
                max_batch_size=stats.max_batch_size,
                shared_batches=stats.shared_batches,
            )
            context.set_trailing_metadata(((STATS_TRAILER, summary.SerializeToString()),))


class InfoService(pb_grpc.InfoServicer):
    def __init__(self, readiness: Readiness):
        self._readiness = readiness

    @unary_errors
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        registry = self._readiness.require()
        response = pb.ListModelsResponse(default_model=registry.default_name)
        for model in registry.models:
            counters = model.batcher.counters
            response.models.append(
                pb.ModelInfo(
                    kind=pb.MODEL_KIND_CROSS,
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
