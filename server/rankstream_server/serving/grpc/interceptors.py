"""Server interceptors: what every RPC goes through before its servicer.

Authenticator: bearer tokens and roles (serving/auth.py decides; this only refuses the call).

DecodeGuard: a request that is not a valid protobuf message of its type (for example a string
field holding bad UTF-8, which any non-Python client can send) gets INVALID_ARGUMENT naming the
message type, not grpc's UNKNOWN with a Python class name.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from rankstream_server.errors import RankstreamError
from rankstream_server.serving.auth import TokenStore, authorize, bearer_token


class _Undecodable:
    def __init__(self, reason: str):
        self.reason = reason


class DecodeGuard(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        method = handler_call_details.method

        def safe_decode(data: bytes):
            try:
                return decode(data)
            except DecodeError as error:
                return _Undecodable(str(error).split(":", 1)[-1].strip() or "malformed message")

        async def refuse(request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message for {method} ({request.reason})")

        if handler.unary_unary is not None:
            behaviour = handler.unary_unary

            async def unary_unary(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                return await behaviour(request, context)

            return handler._replace(request_deserializer=safe_decode, unary_unary=unary_unary)
        behaviour = handler.unary_stream

        async def unary_stream(request, context):
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            async for message in behaviour(request, context):
                yield message

        return handler._replace(request_deserializer=safe_decode, unary_stream=unary_stream)


def aborting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends every call with `code` and `details`."""

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, details)

    async def refuse_stream(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, details)
        yield  # pragma: no cover - makes this an async generator; abort raises first

    if handler.unary_unary is not None:
        return handler._replace(unary_unary=refuse)
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=refuse_stream)
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=refuse)
    return handler._replace(stream_stream=refuse_stream)


class Authenticator(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenStore):
        self._tokens = tokens

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        try:
            authorize(self._tokens, bearer_token(handler_call_details.invocation_metadata), handler_call_details.method)
        except RankstreamError as refused:
            return aborting_handler(handler, refused.code, str(refused))
        return handler
