"""The document store: SQLite, the source of truth for a corpus (texts, metadata, embeddings).

Every vector gets an integer `key`, never reused: replacing a passage gives it a new key and
records the old key as removed. Each write transaction bumps `version`, so a FAISS index
saved at version V is brought up to date by replaying the keys added and removed after V.
Writes commit with synchronous=FULL in WAL mode: once a write returns, it survives kill -9.
Reads that must agree with each other (the keys, vectors and version a FAISS index is built or
caught up from) are taken in one call, under the store's lock.

The keyword side (sparse.py) lives here too: an FTS5 table `sparse_terms` whose rowid is the
passage's key, written in the same transaction as the passage, and the tokenizer settings it
was built with (table `settings`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    key INTEGER NOT NULL UNIQUE,
    title TEXT,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    embedding BLOB NOT NULL,
    version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_version ON documents(version);
CREATE TABLE IF NOT EXISTS removed_keys (key INTEGER PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('version', 0), ('next_key', 0);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
SPARSE_TABLE = "sparse_terms"
FTS_TOKENIZER = "unicode61 remove_diacritics 0 tokenchars '_'"  # splits on spaces only: the terms come pre-tokenized


@dataclass
class Document:
    id: str
    text: str
    title: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class StoredDocument(Document):
    key: int = -1


@dataclass
class Changes:
    """What a FAISS index saved at some version needs to catch up to `version`."""

    added_keys: np.ndarray
    added_vectors: np.ndarray
    removed_keys: np.ndarray
    version: int


@dataclass
class Contents:
    """Everything about the vectors a store holds, read in one transaction (for checks)."""

    keys: np.ndarray
    vectors: np.ndarray
    versions: np.ndarray  # the version that wrote each document
    removed_keys: np.ndarray
    removed_versions: np.ndarray
    version: int

    def changes(self, version: int) -> Changes:
        """What a FAISS index saved at `version` needs to catch up to this store."""
        added = self.versions > version
        removed = self.removed_keys[self.removed_versions > version]
        return Changes(self.keys[added], self.vectors[added], removed, self.version)


class DocStore:
    """Thread-safe access to one SQLite file (one connection, one lock: writes are serial anyway)."""

    def __init__(self, path: str | Path, dimension: int, read_only: bool = False):
        self.path = Path(path)
        self.dimension = dimension
        self._lock = threading.Lock()
        if read_only:  # for checks and backups of a live index: never writes, not even the schema
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path}: no such file")
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)
            return
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _counter(self, name: str) -> int:
        return self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0]

    @property
    def version(self) -> int:
        with self._lock:
            return self._counter("version")

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]

    def upsert(self, documents: Sequence[Document], embeddings: np.ndarray,
               sparse_terms: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """Writes documents (and, when given, their keyword tokens) in one durable transaction.

        Returns (new keys, keys they replaced, version after the write).
        """
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        if len({d.id for d in documents}) != len(documents):
            # One row would replace the other inside the transaction, its key never recorded as removed.
            raise ValueError("upsert: an id appears twice in one write")
        if vectors.shape != (len(documents), self.dimension):
            raise ValueError(f"upsert: {len(documents)} documents need a ({len(documents)}, {self.dimension}) array, got {vectors.shape}")
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                version = self._counter("version") + 1
                first_key = self._counter("next_key")
                ids = [d.id for d in documents]
                replaced = _keys_of(db, ids)
                db.executemany(
                    "INSERT OR IGNORE INTO removed_keys VALUES (?, ?)", [(int(k), version) for k in replaced]
                )
                keys = np.arange(first_key, first_key + len(documents), dtype=np.int64)
                db.executemany(
                    "INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (d.id, int(k), d.title, d.text, json.dumps(d.metadata, sort_keys=True), vectors[i].tobytes(), version)
                        for i, (d, k) in enumerate(zip(documents, keys))
                    ],
                )
                if sparse_terms is not None:
                    _delete_terms(db, replaced)
                    db.executemany(f"INSERT INTO {SPARSE_TABLE}(rowid, terms) VALUES (?, ?)",
                                   [(int(k), terms) for k, terms in zip(keys, sparse_terms)])
                db.execute("UPDATE counters SET value = ? WHERE name = 'version'", (version,))
                db.execute("UPDATE counters SET value = ? WHERE name = 'next_key'", (first_key + len(documents),))
                db.execute("COMMIT")
            except BaseException:
                _roll_back(db)
                raise
        return keys, replaced, version

    def delete(self, ids: Sequence[str]) -> tuple[np.ndarray, int]:
        """Deletes by id in one durable transaction. Returns (removed keys, version after)."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                removed = _keys_of(db, ids)
                version = self._counter("version")
                if not len(removed):  # nothing to delete: no write, the version stays
                    db.execute("COMMIT")
                    return removed, version
                version += 1
                db.executemany("INSERT OR IGNORE INTO removed_keys VALUES (?, ?)", [(int(k), version) for k in removed])
                db.executemany("DELETE FROM documents WHERE id = ?", [(i,) for i in ids])
                if self._has_sparse_table(db):
                    _delete_terms(db, removed)
                db.execute("UPDATE counters SET value = ? WHERE name = 'version'", (version,))
                db.execute("COMMIT")
            except BaseException:
                _roll_back(db)
                raise
        return removed, version

    def changes(self, version: int) -> Changes:
        """The keys added after `version` with their embeddings, the keys removed after it, and
        the version they bring the index to, read together (one read transaction)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                current = self._counter("version")
                added = self._db.execute("SELECT key, embedding FROM documents WHERE version > ? ORDER BY key", (version,)).fetchall()
                removed = self._db.execute("SELECT key FROM removed_keys WHERE version > ?", (version,)).fetchall()
            finally:
                self._db.execute("COMMIT")
        keys = np.array([k for k, _ in added], dtype=np.int64)
        vectors = _vectors([blob for _, blob in added], self.dimension)
        return Changes(keys, vectors, np.array([k for (k,) in removed], dtype=np.int64), current)

    def contents(self) -> Contents:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                version = self._counter("version")
                rows = self._db.execute("SELECT key, embedding, version FROM documents ORDER BY key").fetchall()
                removed = self._db.execute("SELECT key, version FROM removed_keys ORDER BY key").fetchall()
            finally:
                self._db.execute("COMMIT")
        return Contents(
            keys=np.array([k for k, _, _ in rows], dtype=np.int64),
            vectors=_vectors([blob for _, blob, _ in rows], self.dimension),
            versions=np.array([v for _, _, v in rows], dtype=np.int64),
            removed_keys=np.array([k for k, _ in removed], dtype=np.int64),
            removed_versions=np.array([v for _, v in removed], dtype=np.int64),
            version=version,
        )

    def changes_since(self, version: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys added after `version`, their embeddings, keys removed after `version`)."""
        changes = self.changes(version)
        return changes.added_keys, changes.added_vectors, changes.removed_keys

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        keys, vectors, _ = self.changes_since(-1)
        return keys, vectors

    def snapshot_vectors(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Every key and embedding, and the version they are at."""
        changes = self.changes(-1)
        return changes.added_keys, changes.added_vectors, changes.version

    def vectors_for(self, keys: np.ndarray) -> np.ndarray:
        rows = dict(self._select("SELECT key, embedding FROM documents WHERE key IN ({})", keys.tolist()))
        return _vectors([rows[int(k)] for k in keys], self.dimension)

    def forget_removed_through(self, version: int) -> None:
        """Removed keys already applied to a saved index are history: drop them."""
        with self._lock:
            self._db.execute("DELETE FROM removed_keys WHERE version <= ?", (version,))

    def documents(self, keys: Sequence[int]) -> dict[int, StoredDocument]:
        rows = self._select("SELECT key, id, title, text, metadata FROM documents WHERE key IN ({})", list(keys))
        return {
            key: StoredDocument(id=doc_id, title=title, text=text, metadata=json.loads(metadata), key=key)
            for key, doc_id, title, text, metadata in rows
        }

    def keys_matching(self, metadata_filter: dict[str, str]) -> np.ndarray:
        """Keys of documents whose metadata has every key with exactly the given value."""
        clauses = " AND ".join("json_extract(metadata, ?) = ?" for _ in metadata_filter)
        params: list[str] = []
        for name, value in metadata_filter.items():
            params += [f'$."{name}"', value]
        with self._lock:
            rows = self._db.execute(f"SELECT key FROM documents WHERE {clauses}", params).fetchall()
        return np.array([k for (k,) in rows], dtype=np.int64)

    def integrity_problems(self) -> list[str]:
        """What SQLite's integrity_check finds, and embeddings of the wrong size; empty when sound."""
        with self._lock:
            found = [row[0] for row in self._db.execute("PRAGMA integrity_check").fetchall()]
            wrong_size = self._db.execute(
                "SELECT COUNT(*) FROM documents WHERE length(embedding) != ?", (4 * self.dimension,)
            ).fetchone()[0]
        problems = [] if found == ["ok"] else [f"integrity_check: {'; '.join(found[:5])}"]
        if wrong_size:
            problems.append(f"{wrong_size} embeddings are not {self.dimension} float32 values")
        return problems

    # -- the keyword side -------------------------------------------------------------------

    @staticmethod
    def _has_sparse_table(db: sqlite3.Connection) -> bool:
        return db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (SPARSE_TABLE,)).fetchone() is not None

    def drop_sparse(self) -> None:
        with self._lock:
            self._db.execute(f"DROP TABLE IF EXISTS {SPARSE_TABLE}")
            self._db.execute("DELETE FROM settings WHERE name = 'sparse'")

    def sparse_settings(self) -> dict | None:
        """The tokenizer settings the keyword table was built with; None when there is none."""
        with self._lock:
            if not self._has_sparse_table(self._db):
                return None
            row = self._db.execute("SELECT value FROM settings WHERE name = 'sparse'").fetchone()
        return json.loads(row[0]) if row else None

    def sparse_count(self) -> int:
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM {SPARSE_TABLE}").fetchone()[0]

    def rebuild_sparse(self, keywords, chunk: int = 2000, bump_version: bool = True) -> tuple[int, int]:
        """The keyword table afresh from every passage, in one transaction (writers wait).
        `keywords` is a sparse.BM25Tokenizer: its `identity()` is recorded, its
        `passages([(title, text)]) -> token strings` fills the table. On a live index it is a
        write: the version goes up, so the manifest's checksum of this file is no longer
        expected to hold. A folder being made (its manifest written afterwards) passes
        bump_version=False. Returns (passages indexed, version)."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(f"DROP TABLE IF EXISTS {SPARSE_TABLE}")
                db.execute(f"CREATE VIRTUAL TABLE {SPARSE_TABLE} USING fts5(terms, tokenize=\"{FTS_TOKENIZER}\")")
                rows = db.execute("SELECT key, title, text FROM documents ORDER BY key").fetchall()
                for start in range(0, len(rows), chunk):
                    part = rows[start:start + chunk]
                    terms = keywords.passages([(title, text) for _, title, text in part])
                    db.executemany(f"INSERT INTO {SPARSE_TABLE}(rowid, terms) VALUES (?, ?)",
                                   [(key, t) for (key, _, _), t in zip(part, terms)])
                db.execute("INSERT OR REPLACE INTO settings VALUES ('sparse', ?)",
                           (json.dumps(keywords.identity(), sort_keys=True),))
                version = self._counter("version") + (1 if bump_version else 0)
                db.execute("UPDATE counters SET value = ? WHERE name = 'version'", (version,))
                db.execute("COMMIT")
            except BaseException:
                _roll_back(db)
                raise
        return len(rows), version

    def sparse_search(self, match: str, k: int, metadata_filter: dict[str, str] | None = None) -> list[tuple[int, float]]:
        """(key, FTS5 bm25 rank) of the k best keyword matches, best (lowest rank) first, among
        passages matching the filter when one is given."""
        sql = f"SELECT rowid, bm25({SPARSE_TABLE}) AS r FROM {SPARSE_TABLE} WHERE {SPARSE_TABLE} MATCH ?"
        params: list = [match]
        if metadata_filter:
            clauses = " AND ".join("json_extract(metadata, ?) = ?" for _ in metadata_filter)
            sql += f" AND rowid IN (SELECT key FROM documents WHERE {clauses})"
            for name, value in metadata_filter.items():
                params += [f'$."{name}"', value]
        sql += " ORDER BY r, rowid LIMIT ?"
        params.append(k)
        with self._lock:
            return [(int(key), float(rank)) for key, rank in self._db.execute(sql, params).fetchall()]

    def sparse_problems(self) -> list[str]:
        """The keyword table against the passages: FTS5's integrity check and the row counts."""
        with self._lock:
            if not self._has_sparse_table(self._db):
                return []
            problems = []
            try:
                self._db.execute(f"INSERT INTO {SPARSE_TABLE}({SPARSE_TABLE}) VALUES ('integrity-check')")
            except sqlite3.OperationalError as error:
                if "readonly" not in str(error):  # a read-only connection cannot run it; the counts can
                    problems.append(f"keyword table: {error}")
            except sqlite3.DatabaseError as error:
                problems.append(f"keyword table: {error}")
            terms = self._db.execute(f"SELECT COUNT(*) FROM {SPARSE_TABLE}").fetchone()[0]
            documents = self._db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
        if terms != documents:
            problems.append(f"keyword table holds {terms} passages, the store {documents}")
        return problems

    def backup_to(self, path: str | Path) -> None:
        """A consistent copy of the whole database at `path`, with SQLite's online backup API
        (in one step: one read transaction, so writers in other processes carry on)."""
        target = sqlite3.connect(path)
        try:
            with self._lock:
                self._db.backup(target)
        finally:
            target.close()

    def iter_documents(self) -> Iterator[StoredDocument]:
        with self._lock:
            rows = self._db.execute("SELECT key, id, title, text, metadata FROM documents ORDER BY key").fetchall()
        for key, doc_id, title, text, metadata in rows:
            yield StoredDocument(id=doc_id, title=title, text=text, metadata=json.loads(metadata), key=key)

    def _select(self, sql: str, values: list) -> list[tuple]:
        rows: list[tuple] = []
        with self._lock:
            for start in range(0, len(values), 500):  # stay under SQLite's variable limit
                chunk = values[start : start + 500]
                rows += self._db.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall()
        return rows


def _roll_back(db: sqlite3.Connection) -> None:
    """Ends a failed write transaction without hiding why it failed: after some failures (a
    full disk at COMMIT, say) SQLite has rolled back already, and ROLLBACK would raise its own
    error in place of the real one."""
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the error being raised is the one that matters


def _delete_terms(db: sqlite3.Connection, keys: np.ndarray) -> None:
    db.executemany(f"DELETE FROM {SPARSE_TABLE} WHERE rowid = ?", [(int(k),) for k in keys])


def _keys_of(db: sqlite3.Connection, ids: Sequence[str]) -> np.ndarray:
    keys = []
    for start in range(0, len(ids), 500):
        chunk = list(ids[start : start + 500])
        keys += db.execute(f"SELECT key FROM documents WHERE id IN ({','.join('?' * len(chunk))})", chunk).fetchall()
    return np.array([k for (k,) in keys], dtype=np.int64)


def _vectors(blobs: list[bytes], dimension: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dimension), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dimension)
