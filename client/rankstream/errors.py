"""Errors a client call raises: one small hierarchy that keeps the gRPC status and message."""

from __future__ import annotations

import grpc


class RankstreamError(Exception):
    """A failed call. `code` is the grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(RankstreamError):
    """The request broke a limit; `details` names the field and the limit."""


class NotFound(RankstreamError):
    """Unknown model or index."""


class ResourceExhausted(RankstreamError):
    """The server's queue is full: back off and retry."""


class DeadlineExceeded(RankstreamError):
    """The call's deadline passed."""


class Unavailable(RankstreamError):
    """The server is unreachable, still loading, or shutting down (retried automatically first)."""


class Unauthenticated(RankstreamError):
    """Missing or wrong credentials."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def from_rpc_error(error: grpc.RpcError) -> RankstreamError:
    code = error.code()
    return _BY_CODE.get(code, RankstreamError)(code, error.details() or "")
