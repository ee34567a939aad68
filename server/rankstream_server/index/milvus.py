"""An index held by Milvus (`indexes[].backend: milvus`), behind the same interface as the local
SQLite + FAISS CorpusIndex, so any number of replicas share one corpus.

- Milvus holds each passage's id (the primary key), text, title, metadata (a JSON field) and
  vector; rankstream still embeds with its own bi-encoder.
- Similarity is the inner product: the bi-encoder's own score for `dot` models, and cosine for
  `cosine` ones, whose vectors are unit length.
- Filters become Milvus expressions, `metadata["key"] == "value"` joined by `and`, every key and
  value quoted, so no filter can inject an expression.
- The collection is created on first use with Strong consistency, so a write acknowledged by
  one replica is visible to a search through any other at once.
- `version` is Milvus's own: the greatest write timestamp this process has seen (Milvus's hybrid
  timestamps grow with every write, across replicas), so it increases with each write here.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from rankstream_server.config import IndexConfig
from rankstream_server.errors import ModelLoadError, Unavailable
from rankstream_server.index.local import Hit
from rankstream_server.index.store import Document, StoredDocument

log = logging.getLogger(__name__)

ID_BYTES = 512
TEXT_BYTES = 65535
TITLE_BYTES = 4096
FIELDS = ["text", "title", "metadata"]
DIMENSION_KEY = "rankstream_dimension"


def filter_expression(metadata_filter: dict[str, str] | None) -> str:
    """Every key present with exactly this value. Keys and values are JSON string literals, which
    Milvus's expression grammar reads the same way, quotes and backslashes escaped."""
    if not metadata_filter:
        return ""
    return " and ".join(f"metadata[{json.dumps(key)}] == {json.dumps(value)}"
                        for key, value in sorted(metadata_filter.items()))


def _token(config) -> str:
    if config.token_file:
        return Path(config.token_file).read_text(encoding="utf-8").strip()
    return config.token or ""


class MilvusIndex:
    """Search and online changes over one Milvus collection. Thread-safe; every method blocks."""

    backend = "milvus"
    has_sparse = False  # dense only: see the README on Milvus's BM25

    def __init__(self, config: IndexConfig, client, dimension: int, similarity: str):
        self.config = config
        self._client = client
        self._dimension = dimension
        self._similarity = similarity
        self._collection = config.milvus.collection
        self._timeout = config.milvus.timeout_seconds
        self._version = 0
        self._lock = threading.Lock()

    @classmethod
    def open(cls, config: IndexConfig, identity: dict, dimension: int) -> MilvusIndex:
        from pymilvus import MilvusClient  # the milvus extra: only servers that use it need it

        settings = config.milvus
        try:
            client = MilvusClient(uri=settings.uri, token=_token(settings), db_name=settings.db_name,
                                  timeout=settings.timeout_seconds)
        except Exception as error:  # noqa: BLE001 - one line naming the index and the uri
            raise ModelLoadError(f"index {config.name!r}: cannot reach Milvus at {settings.uri} ({error})") from None
        index = cls(config, client, dimension, identity.get("similarity", "dot"))
        index._ensure_collection()
        log.info("index %s: Milvus collection %s at %s, %d passages", config.name, settings.collection, settings.uri,
                 index.count)
        return index

    def _ensure_collection(self) -> None:
        from pymilvus import DataType

        client, name = self._client, self._collection
        if client.has_collection(name):
            fields = {f["name"]: f for f in client.describe_collection(name)["fields"]}
            dim = int(fields.get("vector", {}).get("params", {}).get("dim", -1))
            if dim != self._dimension:
                raise ModelLoadError(f"index {self.config.name!r}: Milvus collection {name} holds {dim}-d vectors, "
                                     f"the model {self.config.model!r} makes {self._dimension}-d ones")
            client.load_collection(name)
            return
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_BYTES)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self._dimension)
        schema.add_field("text", DataType.VARCHAR, max_length=TEXT_BYTES)
        schema.add_field("title", DataType.VARCHAR, max_length=TITLE_BYTES, nullable=True)
        schema.add_field("metadata", DataType.JSON)
        params = client.prepare_index_params()
        params.add_index("vector", index_type=self.config.milvus.index_type, metric_type="IP")
        client.create_collection(name, schema=schema, index_params=params, consistency_level="Strong")

    # -- the CorpusIndex interface ---------------------------------------------------------

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def similarity(self) -> str:
        return self._similarity

    @property
    def index_type(self) -> str:
        return f"milvus:{self.config.milvus.index_type}"

    @property
    def device(self) -> str:
        return "milvus"

    @property
    def version(self) -> int:
        return self._version

    @property
    def count(self) -> int:
        rows = self._call(self._client.query, self._collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def search(self, query: np.ndarray, k: int, metadata_filter: dict[str, str] | None = None) -> list[Hit]:
        results = self._call(
            self._client.search, self._collection, data=[np.asarray(query, dtype=np.float32).tolist()], limit=k,
            filter=filter_expression(metadata_filter), output_fields=FIELDS, search_params={"metric_type": "IP"},
        )
        hits = []
        for rank, found in enumerate(results[0] if results else []):
            entity = found["entity"]
            document = StoredDocument(id=found["id"], text=entity["text"], title=entity.get("title"),
                                      metadata=dict(entity.get("metadata") or {}), key=rank)
            hits.append(Hit(document, float(found["distance"])))
        hits.sort(key=lambda hit: (-hit.score, hit.document.id))  # ties in a stable order, as the local index
        return hits

    def upsert(self, documents: Sequence[Document], embeddings: np.ndarray) -> int:
        rows = [
            {"id": d.id, "vector": np.asarray(v, dtype=np.float32).tolist(), "text": d.text, "title": d.title,
             "metadata": dict(d.metadata)}
            for d, v in zip(documents, embeddings)
        ]
        result = self._call(self._client.upsert, self._collection, rows)
        return self._advance(result)

    def delete(self, ids: Sequence[str]) -> tuple[int, int]:
        present = self._call(self._client.get, self._collection, ids=list(ids), output_fields=["id"])
        found = [row["id"] for row in present]
        if not found:
            return 0, self._version
        result = self._call(self._client.delete, self._collection, ids=found)
        return len(found), self._advance(result)

    def save(self) -> bool:
        """Milvus persists every write itself."""
        return False

    def close(self, save: bool = True) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001 - closing a client that lost its server
            log.debug("index %s: closing the Milvus client failed", self.config.name, exc_info=True)

    # -- plumbing ----------------------------------------------------------------------

    def _advance(self, result) -> int:
        stamp = 0
        if isinstance(result, dict):
            stamp = int(result.get("timestamp") or 0)
        with self._lock:
            self._version = max(self._version + 1, stamp)
            return self._version

    def _call(self, method, *args, **kwargs):
        """One Milvus call; a Milvus that cannot be reached is UNAVAILABLE (retrying is safe)."""
        from pymilvus.exceptions import MilvusException

        try:
            return method(*args, timeout=self._timeout, **kwargs)
        except (MilvusException, grpc.RpcError, ConnectionError) as error:
            log.warning("index %s: Milvus call %s failed: %s", self.config.name, method.__name__, error)
            reason = getattr(error, "message", None) or type(error).__name__
            raise Unavailable(f"index {self.config.name!r}: Milvus call failed ({reason}); retrying is safe") from None
