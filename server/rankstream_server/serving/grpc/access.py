"""The outermost gRPC interceptor: every RPC goes through the shared admission (serving/admission.py):
a request id, a place under the concurrency cap, one access-log line and its request metrics.

The request id is the client's `x-request-id` metadata when usable, else a new one; it goes back
in the trailing metadata, however the call ends. Health checks are neither capped nor logged at INFO.

Admission is decided on the raw request: the message stays bytes (the deserializer is deferred)
until the call is admitted, so a call refused by the cap or the load gate (from its size and
deadline) is never parsed. A refusal gets RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms` in its
trailers: when to come back, from the queue's drain rate (-1: do not retry, the deadline cannot be
met), which gRPC's built-in retry honours; the refusal is held first (Admission.hold).
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from rankstream_server.errors import RankstreamError, ResourceExhausted
from rankstream_server.serving.admission import REQUEST_ID, Admission, CallRecord, usable_request_id

QUIET_PREFIX = "/grpc.health.v1.Health/"
PUSHBACK = "grpc-retry-pushback-ms"


def pushback_trailer(error: RankstreamError) -> tuple[tuple[str, str], ...]:
    """`grpc-retry-pushback-ms` for a refusal that says when to retry (-1: do not), else nothing."""
    after = getattr(error, "retry_after", None)
    if after is None:
        return ()
    return ((PUSHBACK, str(round(after * 1000)) if after >= 0 else "-1"),)


def _identity(data: bytes) -> bytes:
    return data


def request_id_of(metadata) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID:
            return usable_request_id(value)
    return usable_request_id(None)


def _count_in(request) -> int:
    for field in ("passages", "ids", "inputs"):
        items = getattr(request, field, None)
        if items is not None and not isinstance(items, (str, bytes)):
            return len(items)
    return 0


class CallObserver(grpc.aio.ServerInterceptor):
    def __init__(self, admission: Admission):
        self.admission = admission

    @property
    def active(self) -> int:
        return self.admission.active

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        quiet = method.startswith(QUIET_PREFIX)
        rpc = method.rsplit("/", 1)[-1]
        request_id = request_id_of(handler_call_details.invocation_metadata)
        admission = self.admission

        decode = handler.request_deserializer or _identity

        async def begin(context, raw: bytes | None) -> CallRecord:
            """Admits the call from its raw message (None: a request stream, not sized), or ends it."""
            context.set_trailing_metadata(((REQUEST_ID, request_id),))
            call = CallRecord(rpc, request_id, context.peer(), quiet)
            time_remaining = context.time_remaining()
            try:
                admission.enter(call, None if raw is None else len(raw), time_remaining)
            except ResourceExhausted as refused:
                await admission.hold(refused, time_remaining, call)
                context.set_trailing_metadata(((REQUEST_ID, request_id), *pushback_trailer(refused)))
                await context.abort(refused.code, str(refused))
            return call

        def decoded(call: CallRecord, raw: bytes):
            request = decode(raw)
            call.passages_in = _count_in(request)
            return request

        def settle(call: CallRecord, context, error: BaseException | None) -> None:
            if isinstance(error, asyncio.CancelledError):
                call.code = "CANCELLED"
            elif error is not None and not isinstance(error, grpc.aio.AbortError):
                call.code = "UNKNOWN"
            else:
                code = context.code()
                call.code = code.name if isinstance(code, grpc.StatusCode) else "OK"
            admission.leave(call)

        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary_unary(raw, context):
                call = await begin(context, raw)
                error = None
                try:
                    return await inner_unary(decoded(call, raw), context)
                except BaseException as caught:
                    error = caught
                    raise
                finally:
                    settle(call, context, error)

            return handler._replace(unary_unary=unary_unary, request_deserializer=_identity)

        async def observed(call: CallRecord, context, messages):
            """The messages of a streaming call, counted; the call is settled however it ends."""
            error = None
            try:
                async for message in messages:
                    items = getattr(message, "passages", None)
                    if items is not None:
                        call.passages_out += len(items)
                    yield message
            except BaseException as caught:
                error = caught
                raise
            finally:
                settle(call, context, error)

        def streaming(inner, request_streams: bool):
            async def observed_stream(request, context):
                call = await begin(context, None if request_streams else request)
                if not request_streams:
                    request = decoded(call, request)
                # aclosing: the call is settled at once, even when the client goes away mid-stream.
                async with contextlib.aclosing(observed(call, context, inner(request, context))) as messages:
                    async for message in messages:
                        yield message

            return observed_stream

        if handler.unary_stream is not None:
            return handler._replace(unary_stream=streaming(handler.unary_stream, request_streams=False),
                                    request_deserializer=_identity)
        if handler.stream_stream is not None:  # server reflection
            return handler._replace(stream_stream=streaming(handler.stream_stream, request_streams=True))
        return handler
