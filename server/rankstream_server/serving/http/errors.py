"""Errors in each dialect's own shape and status. The status comes from the one map in
errors.py (a dialect may only say 422 where its API does); the message is the shared one, with
the proto's field names turned into the dialect's (passages -> documents, ...)."""

from __future__ import annotations

import math
import re

import grpc
import orjson
from starlette.responses import Response

from rankstream_server.errors import InvalidArgument, RankstreamError

_CODE_OF_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                   405: "UNIMPLEMENTED", 413: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                   499: "CANCELLED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}

# The proto's field names as each dialect calls them.
_FIELDS = {
    "cohere": {"passages": "documents", "max_chunks_per_passage": "max_chunks_per_doc",
               "max_passage_tokens": "max_tokens_per_doc"},
    "tei": {"passages": "texts"},
    "openai": {"inputs": "input"},
}
# Settings a message ends with, in the words of the dialect's request.
_SETTINGS = {"tei": {"long_passages=REFUSE": "truncate=false", "long_inputs=REFUSE": "truncate=false"}}
_LEADING_FIELD = re.compile(r"^([a-z_]+)(?=[\[.:])")

_TEI_TYPES = {401: "Unauthorized", 403: "Unauthorized", 404: "NotFound", 413: "Validation", 422: "Validation",
              429: "Overloaded", 503: "Unhealthy"}
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_exceeded",
                 503: "server_error", 500: "server_error", 504: "server_error"}


def code_name(status: int) -> str:
    return _CODE_OF_STATUS.get(status, "INTERNAL" if status >= 500 else "UNKNOWN")


def status_of(dialect: str, error: RankstreamError) -> int:
    status = error.http_status
    if dialect == "tei" and status == 400:  # TEI answers validation errors with 422
        return 422
    return status


def dialect_message(dialect: str, message: str) -> str:
    for setting, word in _SETTINGS.get(dialect, {}).items():
        message = message.replace(setting, word)
    names = _FIELDS.get(dialect)
    if not names:
        return message
    field = _LEADING_FIELD.match(message)
    if field and field.group(1) in names:
        word = names[field.group(1)]
        message = word + message[field.end():]
        message = message.replace(f" {field.group(1)}, limit", f" {word}, limit", 1)
    return message


def body(dialect: str, status: int, message: str, code: grpc.StatusCode | None = None) -> dict:
    if dialect == "cohere":  # /v1/rerank answers Jina's clients too: `detail` is their key
        return {"message": message, "detail": message}
    if dialect == "tei":
        return {"error": message, "error_type": _TEI_TYPES.get(status, "Backend" if status >= 500 else "Validation")}
    if dialect == "openai":
        field = _LEADING_FIELD.match(message)
        return {"error": {"message": message,
                          "type": _OPENAI_TYPES.get(status, "invalid_request_error"),
                          "param": field.group(1) if field and status < 500 else None,
                          "code": "model_not_found" if status == 404 and message.startswith("model") else None}}
    name = code.name if code is not None else code_name(status)
    return {"code": code.value[0] if code is not None else 2, "status": name, "message": message}


def retry_after(error: RankstreamError) -> str:
    """Retry-After in whole seconds (HTTP allows no fraction): the refusal's own estimate, from
    the queue's drain rate, rounded up; 1 where it has none."""
    after = getattr(error, "retry_after", None)
    return str(max(1, math.ceil(after))) if after is not None and after >= 0 else "1"


def render(dialect: str, error: RankstreamError, status: int | None = None) -> Response:
    status = status or status_of(dialect, error)
    headers = {"retry-after": retry_after(error)} if status in (429, 503) else None
    content = body(dialect, status, dialect_message(dialect, str(error)), error.code)
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


def validation_error(dialect: str, errors: list[dict]) -> Response:
    """A body that does not fit the dialect's schema: 422 (OpenAI: 400), naming the field."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid body"}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    message = f"{where}: {first.get('msg', 'invalid')}"
    return render(dialect, InvalidArgument(message), 400 if dialect == "openai" else 422)


async def respond(dialect: str, error: RankstreamError, scope, receive, send) -> None:
    await render(dialect, error)(scope, receive, send)
