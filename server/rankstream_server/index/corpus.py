"""Reading corpora and evaluation sets: BEIR layout (corpus.jsonl, queries.jsonl, qrels/*.tsv)
and plain JSONL."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from rankstream_server.index.store import Document

log = logging.getLogger(__name__)


def passage_text(text: str, title: str | None) -> str:
    """BEIR convention: the model reads (title + " " + text).strip()."""
    return f"{title} {text}".strip() if title else text

_ID_FIELDS = ("_id", "id")
_KNOWN_FIELDS = {"_id", "id", "title", "text", "metadata"}


def _metadata_value(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def parse_document(record: dict, where: str) -> Document | None:
    """One JSON object: BEIR (`_id`, `title`, `text`) or plain (`id`, `text`, optional `title`,
    `metadata`); any other field becomes metadata (non-strings as JSON). None for a document
    with neither text nor title (real collections have a few)."""
    doc_id = next((record[f] for f in _ID_FIELDS if f in record), None)
    if doc_id is None or str(doc_id) == "":
        raise ValueError(f"{where}: no `_id` or `id`")
    text = record.get("text", "")
    if not isinstance(text, str):
        raise ValueError(f"{where}: `text` must be a string")
    if not text.strip() and not (record.get("title") or "").strip():
        return None
    metadata = {k: _metadata_value(v) for k, v in (record.get("metadata") or {}).items()}
    metadata.update({k: _metadata_value(v) for k, v in record.items() if k not in _KNOWN_FIELDS})
    title = record.get("title") or None
    return Document(id=str(doc_id), text=text, title=title, metadata=metadata)


def read_corpus(path: str | Path) -> Iterator[Document]:
    """Documents of a JSONL file, or of `corpus.jsonl` in a BEIR folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    empty = 0
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc.msg})") from exc
            document = parse_document(record, where)
            if document is None:
                empty += 1
            else:
                yield document
    if empty:
        log.warning("%s: skipped %d documents with neither text nor title", path, empty)


def read_queries(folder: str | Path) -> dict[str, str]:
    with (Path(folder) / "queries.jsonl").open(encoding="utf-8") as lines:
        return {str(q["_id"]): q["text"] for q in map(json.loads, filter(str.strip, lines))}


def read_qrels(folder: str | Path, split: str = "test") -> dict[str, dict[str, int]]:
    """{query id: {doc id: relevance}} from qrels/<split>.tsv (header: query-id, corpus-id, score)."""
    qrels: dict[str, dict[str, int]] = {}
    with (Path(folder) / "qrels" / f"{split}.tsv").open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(row["score"])
    return qrels
