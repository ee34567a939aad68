"""gRPC servicers: each RPC hands its request to the shared operation (serving/operations.py)
and maps what it raises to a status: domain errors keep their code and message, anything else
becomes a plain INTERNAL (the traceback stays in the server log)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable

import grpc

from rankstream import STATS_TRAILER
from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc
from rankstream_server.errors import RankstreamError, ResourceExhausted
from rankstream_server.serving.grpc.access import pushback_trailer
from rankstream_server.serving.operations import EmbedderService, InfoService, RerankerService, RetrieverService

log = logging.getLogger(__name__)


class GrpcCall:
    """An operation's CallContext over a gRPC call: its deadline, and stats as trailing metadata."""

    __slots__ = ("_context",)

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def report(self, stats: pb.RerankStats) -> None:
        context = self._context
        context.set_trailing_metadata((*context.trailing_metadata(), (STATS_TRAILER, stats.SerializeToString())))


Hold = Callable[[ResourceExhausted, float | None], Awaitable[None]]


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, hold: Hold | None = None) -> None:
    if isinstance(exc, RankstreamError):
        if isinstance(exc, ResourceExhausted) and hold is not None:
            # Refused after decoding (the exact check): held like a refusal before it, so clients
            # that retry at once cannot turn the server's CPU into refusals this way either.
            await hold(exc, context.time_remaining())
        pushback = pushback_trailer(exc)
        if pushback:
            context.set_trailing_metadata((*context.trailing_metadata(), *pushback))
        await context.abort(exc.code, str(exc))
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s", incident, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (server log reference {incident})")


async def _stream(operation: Callable, request, context: grpc.aio.ServicerContext, hold: Hold | None = None):
    """A server-streaming RPC's messages, from an operation that yields them."""
    try:
        # aclosing: the operation's cleanup (cancelling queued work, stats) runs here, at
        # once, even when the client goes away mid-stream.
        async with contextlib.aclosing(operation(request, GrpcCall(context))) as messages:
            async for message in messages:
                yield message
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as exc:  # noqa: BLE001 - every error gets a status
        await _abort_for(exc, context, hold)


async def _unary(operation: Callable, request, context: grpc.aio.ServicerContext, hold: Hold | None = None):
    try:
        return await operation(request, GrpcCall(context))
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as exc:  # noqa: BLE001
        await _abort_for(exc, context, hold)


class RerankerServicer(pb_grpc.RerankerServicer):
    def __init__(self, service: RerankerService, hold: Hold | None = None):
        self._service = service
        self._hold = hold

    async def Rerank(self, request, context):
        async for message in _stream(self._service.Rerank, request, context, self._hold):
            yield message


class RetrieverServicer(pb_grpc.RetrieverServicer):
    def __init__(self, service: RetrieverService, hold: Hold | None = None):
        self._service = service
        self._hold = hold

    async def Retrieve(self, request, context):
        async for message in _stream(self._service.Retrieve, request, context, self._hold):
            yield message

    async def RetrieveAndRerank(self, request, context):
        async for message in _stream(self._service.RetrieveAndRerank, request, context, self._hold):
            yield message

    async def UpsertPassages(self, request, context):
        return await _unary(self._service.UpsertPassages, request, context, self._hold)

    async def DeletePassages(self, request, context):
        return await _unary(self._service.DeletePassages, request, context, self._hold)


class EmbedderServicer(pb_grpc.EmbedderServicer):
    def __init__(self, service: EmbedderService, hold: Hold | None = None):
        self._service = service
        self._hold = hold

    async def Embed(self, request, context):
        return await _unary(self._service.Embed, request, context, self._hold)


class InfoServicer(pb_grpc.InfoServicer):
    def __init__(self, service: InfoService):
        self._service = service

    async def ListModels(self, request, context):
        return await _unary(self._service.ListModels, request, context)
