"""Jina's rerank API, which shares Cohere's `POST /v1/rerank` (cohere.py serves the route): its
documents may be `{"text": ...}` objects, it returns documents unless told not to, and its
clients read `model`, `usage.total_tokens` and `results[].document.text`."""

from __future__ import annotations

from typing import Any

from rankstream.v1 import rankstream_pb2 as pb
from rankstream_server.errors import InvalidArgument


def document_text(document: str | dict[str, Any], position: int) -> str:
    """A document's text: the string itself, or the `text` of a `{"text": ...}` object (Cohere v1 and Jina)."""
    if isinstance(document, str):
        return document
    text = document.get("text")
    if not isinstance(text, str):
        other = ", ".join(sorted(document)[:3]) or "nothing"
        raise InvalidArgument(f"documents[{position}]: an object needs a string `text` (it has {other}); "
                              "rankstream reranks text only")
    return text


def returned_document(document: str | dict[str, Any]) -> dict[str, Any]:
    """The document as results echo it: `{"text": ...}` (objects as sent)."""
    return {"text": document} if isinstance(document, str) else document


def fields(model: str, stats: pb.RerankStats | None) -> dict[str, Any]:
    """What Jina's clients read beside the results."""
    return {"model": model, "usage": {"total_tokens": stats.tokens if stats is not None else 0}}
