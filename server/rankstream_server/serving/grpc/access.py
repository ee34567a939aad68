"""The outermost interceptor: every RPC gets a request id, a place under the concurrency cap, one
access-log line and its request metrics.

- The request id is the client's `x-request-id` metadata when it sends a usable one, else a new
  one; it goes back in the trailing metadata, however the call ends.
- Past `server.max_concurrent_rpcs` RPCs in progress, a new one gets RESOURCE_EXHAUSTED at once.
  Health checks are neither capped nor logged at INFO: probes must get through a busy server.
- The access-log line (logger `rankstream.access`, INFO) names the RPC, its status code, duration,
  passages in and out and the request id (and, as a field, the client's address), and never any
  query or document text. Its fields are
  also log-record attributes, so `--log-format json` writes them as JSON keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid

import grpc

from rankstream_server.serving.metrics import Metrics

access_log = logging.getLogger("rankstream.access")

REQUEST_ID = "x-request-id"
_USABLE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
QUIET_PREFIX = "/grpc.health.v1.Health/"


def request_id_of(metadata) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID and isinstance(value, str) and _USABLE_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def _count_in(request) -> int:
    for field in ("passages", "ids"):
        items = getattr(request, field, None)
        if items is not None and not isinstance(items, (str, bytes)):
            return len(items)
    return 0


class _Call:
    """What one RPC's log line and metrics need."""

    __slots__ = ("rpc", "request_id", "started", "passages_in", "passages_out", "code", "peer")

    def __init__(self, rpc: str, request_id: str, peer: str = ""):
        self.peer = peer
        self.rpc = rpc
        self.request_id = request_id
        self.started = time.perf_counter()
        self.passages_in = 0
        self.passages_out = 0
        self.code = "OK"


class CallObserver(grpc.aio.ServerInterceptor):
    def __init__(self, max_concurrent: int, metrics: Metrics | None = None):
        self._max_concurrent = max_concurrent
        self._metrics = metrics
        self.active = 0

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        quiet = method.startswith(QUIET_PREFIX)
        rpc = method.rsplit("/", 1)[-1]
        request_id = request_id_of(handler_call_details.invocation_metadata)
        observer = self

        async def begin(context, request) -> _Call:
            context.set_trailing_metadata(((REQUEST_ID, request_id),))
            call = _Call(rpc, request_id, context.peer())
            if request is not None:
                call.passages_in = _count_in(request)
            if not quiet:
                if observer.active >= observer._max_concurrent:
                    call.code = "RESOURCE_EXHAUSTED"
                    observer._finish(call, quiet)
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"server busy: {observer.active} RPCs in progress, limit is "
                                        f"server.max_concurrent_rpcs={observer._max_concurrent}; retry with backoff")
                observer.active += 1
            return call

        def settle(call: _Call, context, error: BaseException | None) -> None:
            if not quiet:
                observer.active -= 1
            if isinstance(error, asyncio.CancelledError):
                call.code = "CANCELLED"
            elif error is not None and not isinstance(error, grpc.aio.AbortError):
                call.code = "UNKNOWN"
            else:
                code = context.code()
                call.code = code.name if isinstance(code, grpc.StatusCode) else "OK"
            observer._finish(call, quiet)

        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary_unary(request, context):
                call = await begin(context, request)
                error = None
                try:
                    return await inner_unary(request, context)
                except BaseException as caught:
                    error = caught
                    raise
                finally:
                    settle(call, context, error)

            return handler._replace(unary_unary=unary_unary)
        async def observed(call: _Call, context, messages):
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
                # aclosing: the call is settled at once, even when the client goes away mid-stream.
                async with contextlib.aclosing(observed(call, context, inner(request, context))) as messages:
                    async for message in messages:
                        yield message

            return observed_stream

        if handler.unary_stream is not None:
            return handler._replace(unary_stream=streaming(handler.unary_stream, request_streams=False))
        if handler.stream_stream is not None:  # server reflection
            return handler._replace(stream_stream=streaming(handler.stream_stream, request_streams=True))
        return handler

    def _finish(self, call: _Call, quiet: bool) -> None:
        seconds = time.perf_counter() - call.started
        if self._metrics is not None:
            self._metrics.observe_request(call.rpc, call.code, seconds)
        access_log.log(
            logging.DEBUG if quiet else logging.INFO,
            "%s %s %.1f ms passages %d in, %d out request_id=%s",
            call.rpc, call.code, seconds * 1000, call.passages_in, call.passages_out, call.request_id,
            extra={"rpc": call.rpc, "code": call.code, "duration_ms": round(seconds * 1000, 3),
                   "passages_in": call.passages_in, "passages_out": call.passages_out, "request_id": call.request_id,
                   "peer": call.peer},
        )
