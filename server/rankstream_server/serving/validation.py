"""Request checks before any work: each failure names the field and the limit."""

from __future__ import annotations

import math

from rankstream_server.config import LimitsConfig
from rankstream_server.errors import InvalidArgument, TooLarge

KNOWN_ORDERS = (0, 1)  # rankstream.v1.Order: RANKED, AS_SCORED
TRUNCATE, CHUNK, REFUSE = 0, 1, 2  # rankstream.v1.LongPassages


def _has_content(text: str) -> bool:
    """Something a model can read: not only spaces, control or zero-width characters.
    Nearly every real text starts with such a character: that check runs at C speed."""
    first = text[:1]
    if first and first.isprintable() and not first.isspace():
        return True
    return any(ch.isprintable() and not ch.isspace() for ch in text)


def check_query(query: str, limits: LimitsConfig) -> None:
    if len(query) > limits.max_query_chars:
        raise InvalidArgument(f"query: {len(query)} characters, limit is max_query_chars={limits.max_query_chars}")
    if not _has_content(query):
        raise InvalidArgument("query: must not be empty (or only spaces and control characters)")


def _utf8_over(text: str, limit: int) -> int | None:
    """The text's UTF-8 size when it is over `limit` bytes, else None (encoded only when it could be)."""
    if len(text) * 4 <= limit:
        return None
    size = len(text.encode("utf-8", "surrogatepass"))
    return size if size > limit else None


def _check_metadata(entries, field: str, count_limit: int, count_name: str, limits: LimitsConfig) -> None:
    if len(entries) > count_limit:
        raise InvalidArgument(f"{field}: {len(entries)} entries, limit is {count_name}={count_limit}")
    for key, value in entries.items():
        if not key:
            raise InvalidArgument(f"{field}: keys must not be empty")
        if (size := _utf8_over(key, limits.max_metadata_key_bytes)) is not None:
            raise InvalidArgument(f"{field}: a key of {size} bytes, limit is max_metadata_key_bytes={limits.max_metadata_key_bytes}")
        if (size := _utf8_over(value, limits.max_metadata_value_bytes)) is not None:
            raise InvalidArgument(f"{field}[{key[:40]!r}]: {size} bytes, limit is max_metadata_value_bytes="
                                  f"{limits.max_metadata_value_bytes}")


def _check_id(value: str, field: str, limits: LimitsConfig) -> None:
    if (size := _utf8_over(value, limits.max_id_bytes)) is not None:
        raise InvalidArgument(f"{field}: {size} bytes, limit is max_id_bytes={limits.max_id_bytes}")


def _check_passages(passages, limits: LimitsConfig) -> None:
    """Sizes first, for every passage (cheap), then content (a scan of the text)."""
    count = len(passages)
    if count == 0:
        raise InvalidArgument("passages: at least one passage is required")
    if count > limits.max_passages:
        raise TooLarge(f"passages: {count} passages, limit is max_passages={limits.max_passages}")
    for i, passage in enumerate(passages):
        length = len(passage.text) + len(passage.title)
        if length > limits.max_passage_chars:
            raise InvalidArgument(
                f"passages[{i}]: {length} characters (title + text), limit is max_passage_chars={limits.max_passage_chars}"
            )
        _check_id(passage.id, f"passages[{i}].id", limits)
        if passage.metadata:
            _check_metadata(passage.metadata, f"passages[{i}].metadata", limits.max_metadata_entries,
                            "max_metadata_entries", limits)
    for i, passage in enumerate(passages):
        if not _has_content(passage.text):
            raise InvalidArgument(f"passages[{i}].text: must not be empty (or only spaces and control characters)")


def _check_top_n(request) -> None:
    if request.top_n < 0:
        raise InvalidArgument(f"top_n: must be >= 0 (0 = all), got {request.top_n}")


def _check_threshold(request) -> None:
    if request.HasField("score_threshold") and not math.isfinite(request.score_threshold):
        raise InvalidArgument(f"score_threshold: must be a finite number, got {request.score_threshold}")


def _check_top_k(request, limits: LimitsConfig) -> None:
    if not 1 <= request.top_k <= limits.max_top_k:
        raise InvalidArgument(f"top_k: must be between 1 and max_top_k={limits.max_top_k}, got {request.top_k}")


def _check_filter(request, limits: LimitsConfig) -> None:
    _check_metadata(request.filter, "filter", limits.max_filter_entries, "max_filter_entries", limits)


def _check_order(request) -> None:
    if request.order not in KNOWN_ORDERS:
        raise InvalidArgument(f"order: unknown value {request.order}; use RANKED (0) or AS_SCORED (1)")


def check_rerank(request, limits: LimitsConfig) -> None:
    """Validates a rankstream.v1.RerankRequest."""
    check_query(request.query, limits)
    _check_passages(request.passages, limits)
    _check_top_n(request)
    _check_threshold(request)
    _check_order(request)


def check_retrieve(request, limits: LimitsConfig) -> None:
    check_query(request.query, limits)
    _check_top_k(request, limits)
    _check_filter(request, limits)
    _check_threshold(request)


def check_retrieve_and_rerank(request, limits: LimitsConfig) -> None:
    check_retrieve(request, limits)
    _check_top_n(request)
    _check_order(request)
    if request.long_passages == REFUSE:  # an answer would fail on whichever long passage the index returned
        raise InvalidArgument("long_passages: REFUSE is for passages the caller sends (Rerank); RetrieveAndRerank "
                              "scores corpus passages: use TRUNCATE (0) or CHUNK (1)")


def check_upsert(request, limits: LimitsConfig) -> None:
    _check_passages(request.passages, limits)
    seen: set[str] = set()
    for i, passage in enumerate(request.passages):
        if not passage.id:
            raise InvalidArgument(f"passages[{i}].id: must not be empty (upserts are keyed by id)")
        if passage.id in seen:
            raise InvalidArgument(f"passages[{i}].id: {passage.id!r} appears twice in the request")
        seen.add(passage.id)


def check_delete(request, limits: LimitsConfig) -> None:
    if not request.ids:
        raise InvalidArgument("ids: at least one id is required")
    if len(request.ids) > limits.max_passages:
        raise TooLarge(f"ids: {len(request.ids)} ids, limit is max_passages={limits.max_passages}")
    for i, value in enumerate(request.ids):
        if not value:
            raise InvalidArgument("ids: ids must not be empty")
        _check_id(value, f"ids[{i}]", limits)


def check_embed(request, limits: LimitsConfig) -> None:
    """Validates a rankstream.v1.EmbedRequest: as many inputs as passages, each as long as one."""
    count = len(request.inputs)
    if count == 0:
        raise InvalidArgument("inputs: at least one input is required")
    if count > limits.max_passages:
        raise TooLarge(f"inputs: {count} inputs, limit is max_passages={limits.max_passages}")
    for i, text in enumerate(request.inputs):
        if len(text) > limits.max_passage_chars:
            raise InvalidArgument(f"inputs[{i}]: {len(text)} characters, limit is max_passage_chars={limits.max_passage_chars}")
    for i, text in enumerate(request.inputs):
        if not _has_content(text):
            raise InvalidArgument(f"inputs[{i}]: must not be empty (or only spaces and control characters)")
    if request.long_inputs not in (TRUNCATE, REFUSE):
        raise InvalidArgument(f"long_inputs: {request.long_inputs} is not taken; use TRUNCATE (0) or REFUSE (2)")
