"""Domain errors, each carrying the gRPC status it maps to (the one error-to-status map)."""

from __future__ import annotations

import grpc


class RankstreamError(Exception):
    """An error the client should see, with its message as is."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(RankstreamError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RankstreamError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(RankstreamError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RankstreamError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RankstreamError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InferenceFailed(RankstreamError):
    """The model failed on a batch; details stay in the server log."""

    code = grpc.StatusCode.INTERNAL


class ModelLoadError(RuntimeError):
    """A configured model could not be loaded at start-up (not a request error)."""
