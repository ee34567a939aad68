"""Request checks before any work: each failure names the field and the limit."""

from __future__ import annotations

import math

from .config import LimitsConfig
from .errors import InvalidArgument


def check_query(query: str, limits: LimitsConfig) -> None:
    if not query.strip():
        raise InvalidArgument("query: must not be empty")
    if len(query) > limits.max_query_chars:
        raise InvalidArgument(f"query: {len(query)} characters, limit is max_query_chars={limits.max_query_chars}")


def check_rerank(request, limits: LimitsConfig) -> None:
    """Validates a rankstream.v1.RerankRequest."""
    check_query(request.query, limits)
    count = len(request.passages)
    if count == 0:
        raise InvalidArgument("passages: at least one passage is required")
    if count > limits.max_passages:
        raise InvalidArgument(f"passages: {count} passages, limit is max_passages={limits.max_passages}")
    for i, passage in enumerate(request.passages):
        if not passage.text.strip():
            raise InvalidArgument(f"passages[{i}].text: must not be empty")
        length = len(passage.text) + len(passage.title)
        if length > limits.max_passage_chars:
            raise InvalidArgument(
                f"passages[{i}]: {length} characters (title + text), limit is max_passage_chars={limits.max_passage_chars}"
            )
    if request.top_n < 0:
        raise InvalidArgument(f"top_n: must be >= 0 (0 = all), got {request.top_n}")
    if request.HasField("score_threshold") and not math.isfinite(request.score_threshold):
        raise InvalidArgument(f"score_threshold: must be a finite number, got {request.score_threshold}")
