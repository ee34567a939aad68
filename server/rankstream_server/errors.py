"""Domain errors, each carrying the gRPC status and the HTTP status it maps to (the one
error-to-status map: each transport only picks its column)."""

from __future__ import annotations

import grpc


class RankstreamError(Exception):
    """An error the client should see, with its message as is."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500


class InvalidArgument(RankstreamError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class TooLarge(InvalidArgument):
    """Too many items in one request (passages, ids, inputs): INVALID_ARGUMENT on gRPC, 413 on HTTP."""

    http_status = 413


class NotFound(RankstreamError):
    code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class Unauthenticated(RankstreamError):
    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class PermissionDenied(RankstreamError):
    code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class ResourceExhausted(RankstreamError):
    """Overload: retry later (HTTP 429 with Retry-After)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class Unavailable(RankstreamError):
    """Warming up or shutting down (HTTP 503 with Retry-After)."""

    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class DeadlineExceeded(RankstreamError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class InferenceFailed(RankstreamError):
    """The model failed on a batch; details stay in the server log."""

    code = grpc.StatusCode.INTERNAL


class ModelLoadError(RuntimeError):
    """A configured model could not be loaded at start-up (not a request error)."""
