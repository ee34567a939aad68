"""An index folder: the document store (source of truth), the FAISS index derived from it,
and a manifest saying which model and settings made the embeddings.

    DIR/manifest.json   model identity, dimension, similarity, counts, index type, checksums
    DIR/docs.sqlite     texts, metadata, embeddings (durable on every write)
    DIR/vectors.faiss   the FAISS index as of DIR/vectors.json's `version`
    DIR/vectors.json    that version, the index type and parameters, a checksum, tombstones
    DIR/LOCK            held by the one process that writes to the folder (index/lock.py)

At open, the FAISS index is loaded and caught up with the store's later changes, or rebuilt
from the store when it is missing, damaged, of another type than configured, or disagrees with
the store.

Concurrency: searches share a reader-writer lock; a write takes it alone for the store commit
and the FAISS change together, so a search sees both or neither. A save copies the FAISS index
to memory under the shared lock and writes and hashes it with no lock held.

Versions: the store's version moves on every commit. `applied` is the last version FAISS
fully reflects, and only that version is ever saved beside vectors.faiss. A FAISS change that
fails after its commit (an out-of-memory error, say) leaves the store ahead: the client is
told, the index is rebuilt from the store at the next save, and a restart replays the store
from the saved version, so no committed row stays unsearchable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from rankstream_server.config import IndexConfig
from rankstream_server.errors import ModelLoadError, RankstreamError
from rankstream_server.index.lock import IndexLock
from rankstream_server.index.rwlock import ReadWriteLock
from rankstream_server.index.sparse import BM25Tokenizer, reciprocal_rank_fusion, robertson_score
from rankstream_server.index.store import DocStore, Document, StoredDocument
from rankstream_server.index.vectors import SearchResult, VectorIndex, exact_search

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DOCS = "docs.sqlite"
VECTORS = "vectors.faiss"
VECTORS_STATE = "vectors.json"
FORMAT = 1


class IndexMismatch(ModelLoadError):
    """The index folder was built with another model or settings than the server's config."""


class VectorsBehind(RankstreamError):
    """A write is durable in the store, but FAISS could not apply it yet."""

    code = grpc.StatusCode.UNAVAILABLE


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    """Atomic: write a temporary file, fsync, rename over."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Hit:
    """One retrieved passage. `score` is the mode's (similarity, BM25, or fused); each side's own
    score and 1-based rank are kept where that side found it (rank 0: it did not)."""

    document: StoredDocument
    score: float
    dense_score: float | None = None
    dense_rank: int = 0
    sparse_score: float | None = None
    sparse_rank: int = 0


class CorpusIndex:
    """Search and online changes over one index folder. Thread-safe; every method blocks."""

    def __init__(self, folder: Path, config: IndexConfig, manifest: dict, store: DocStore, vectors: VectorIndex,
                 applied_version: int, saved_version: int, lock: IndexLock | None = None):
        self.folder = folder
        self.config = config
        self.manifest = manifest
        self.store = store
        self._vectors = vectors
        self._applied_version = applied_version  # FAISS reflects the store up to this version
        self._saved_version = saved_version  # vectors.faiss on disk reflects this one
        self._needs_rebuild = False  # a FAISS change failed: rebuild from the store before saving
        self._folder_lock = lock
        self._rw = ReadWriteLock()  # searches share it; a write (commit + FAISS change) takes it alone
        self._write_mutex = threading.Lock()  # one writer or rebuild at a time (searches go on)
        self._save_mutex = threading.Lock()  # one save at a time
        self._closed = False
        self._keywords = BM25Tokenizer.for_index(config)

    # -- opening and creating ------------------------------------------------------------

    @staticmethod
    def create_empty(folder: Path, identity: dict, dimension: int, keywords: BM25Tokenizer | None = None) -> None:
        """A new, empty index folder (with its empty keyword side when it has one), made atomically."""
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        store = DocStore(staging / DOCS, dimension)
        if keywords is not None:
            store.rebuild_sparse(keywords, bump_version=False)
        store.close()
        write_manifest(staging, identity, dimension, count=0, index_type="flat", index_params={}, version=0)
        os.rename(staging, folder)
        fsync_dir(folder.parent)

    @classmethod
    def open(cls, config: IndexConfig, identity: dict, dimension: int) -> CorpusIndex:
        """Opens the folder for writing: refused (IndexLocked) while another writer has it."""
        folder = Path(config.path)
        if not (folder / MANIFEST).exists():
            if not config.create:
                raise ModelLoadError(
                    f"index {config.name!r}: no index at {folder}. Build one with "
                    f"`rankstream index build --config FILE --corpus CORPUS.jsonl --out {folder}`, "
                    "or set `create: true` to start empty and add passages with UpsertPassages"
                )
            keywords = BM25Tokenizer.for_index(config)
            cls.create_empty(folder, identity, dimension, keywords)
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"index {config.name!r}: {folder / MANIFEST} is unreadable ({error}); "
                                 "restore a backup or rebuild with `rankstream index build`") from error
        _check_identity(config.name, folder, manifest, identity, dimension)
        lock = IndexLock.acquire(folder, f"index {config.name!r}")
        try:
            store = DocStore(folder / DOCS, dimension)
            vectors, applied_version, saved_version = _load_or_rebuild(folder, config, store, dimension)
            vectors.place()
        except sqlite3.DatabaseError as error:
            lock.release()
            raise ModelLoadError(f"index {config.name!r}: {folder / DOCS} is damaged ({error}); restore it with "
                                 "`rankstream index backup` copies, or rebuild with `rankstream index build`") from error
        except BaseException:
            lock.release()
            raise
        index = cls(folder, config, manifest, store, vectors, applied_version, saved_version, lock)
        try:
            index._prepare_keywords()
        except BaseException:
            index.close(save=False)
            raise
        if saved_version < 0:  # rebuilt: save now, so the next start only catches up
            index.save()
        log.info("index %s: %d passages, %s on %s", config.name, vectors.count, vectors.built_type, vectors.device)
        return index

    def _prepare_keywords(self) -> None:
        """The keyword side as configured: built (or rebuilt) when missing, made with other
        tokenizer settings, or not holding every passage; dropped when turned off."""
        store = self.store
        if self._keywords is None:
            if store.sparse_settings() is not None:
                store.drop_sparse()
            return
        wanted = self._keywords.identity()
        if store.sparse_settings() == wanted and store.sparse_count() == store.count():
            return
        started = time.perf_counter()
        with self._write_mutex, self._rw.write():
            caught_up = self._applied_version == store.version
            count, version = store.rebuild_sparse(self._keywords)
            if caught_up:  # no passage changed: the vectors are as current as before
                self._applied_version = version
        log.info("index %s: keyword side built for %d passages in %.1f s", self.config.name, count,
                 time.perf_counter() - started)

    @property
    def has_sparse(self) -> bool:
        return self._keywords is not None

    # -- reading ---------------------------------------------------------------------

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    @property
    def similarity(self) -> str:
        return self.manifest["model"]["similarity"]

    @property
    def index_type(self) -> str:
        return self._vectors.built_type

    @property
    def device(self) -> str:
        return self._vectors.device

    @property
    def count(self) -> int:
        with self._rw.read():
            return self.store.count() if self._needs_rebuild else self._vectors.count

    @property
    def version(self) -> int:
        return self.store.version

    def search(self, query: np.ndarray, k: int, metadata_filter: dict[str, str] | None = None) -> list[Hit]:
        """The k best passages; with a filter, the k best among matching passages, exactly
        wherever the index is exact, and never fewer than min(k, matches). The store and FAISS
        are read under one shared lock, so no write lands in between."""
        with self._rw.read():
            result = self._dense(query, k, metadata_filter)
            hits = self._hits(result.keys.tolist(), result.scores.tolist())
        for rank, hit in enumerate(hits, start=1):
            hit.dense_score, hit.dense_rank = hit.score, rank
        return hits

    def _dense(self, query: np.ndarray, k: int, metadata_filter: dict[str, str] | None) -> SearchResult:
        if not metadata_filter:
            return self._vectors.search(query, k)
        allowed = self.store.keys_matching(metadata_filter)
        if len(allowed) == 0:
            return SearchResult(np.zeros(0, np.float32), np.zeros(0, np.int64))
        result = self._vectors.search(query, k, allowed)
        if len(result.keys) < min(k, len(allowed)):
            # An approximate index found too few: search the matching passages exactly.
            result = exact_search(query, allowed, self.store.vectors_for(allowed), k)
        return result

    def hybrid_depth(self, k: int) -> int:
        """Candidates each side gives the fusion for a top-k hybrid search."""
        return max(k, self.config.hybrid.depth)

    def keyword_candidates(self, query: str, k: int, metadata_filter: dict[str, str] | None = None) -> list[tuple[int, float]]:
        """(key, BM25 score) of the k best keyword matches, best first (needs the keyword side)."""
        match = self._keywords.match_expression(query)
        if match is None:
            return []
        return [(key, robertson_score(rank)) for key, rank in self.store.sparse_search(match, k, metadata_filter)]

    def sparse_search(self, query: str, k: int, metadata_filter: dict[str, str] | None = None) -> list[Hit]:
        """The k best passages by BM25 among those matching the filter."""
        candidates = self.keyword_candidates(query, k, metadata_filter)
        hits = self._hits([key for key, _ in candidates], [score for _, score in candidates])
        for rank, hit in enumerate(hits, start=1):
            hit.sparse_score, hit.sparse_rank = hit.score, rank
        return hits

    def hybrid_search(self, query: np.ndarray, keywords: list[tuple[int, float]], k: int,
                      metadata_filter: dict[str, str] | None = None) -> list[Hit]:
        """Reciprocal rank fusion of the dense side's top `hybrid.depth` and the given keyword
        candidates (keyword_candidates, run beside the query's embedding)."""
        with self._rw.read():
            dense = self._dense(query, self.hybrid_depth(k), metadata_filter)
        fused = reciprocal_rank_fusion(list(zip(dense.keys.tolist(), dense.scores.tolist())), keywords,
                                       self.config.hybrid.rrf_k, k)
        hits = self._hits(fused.keys.tolist(), fused.scores.tolist())
        sides = {int(key): i for i, key in enumerate(fused.keys.tolist())}
        for hit in hits:
            i = sides[hit.document.key]
            if fused.dense_ranks[i]:
                hit.dense_score, hit.dense_rank = float(fused.dense_scores[i]), int(fused.dense_ranks[i])
            if fused.sparse_ranks[i]:
                hit.sparse_score, hit.sparse_rank = float(fused.sparse_scores[i]), int(fused.sparse_ranks[i])
        return hits

    def _hits(self, keys: list[int], scores: list[float]) -> list[Hit]:
        documents = self.store.documents(keys)
        hits, seen = [], set()
        for score, key in zip(scores, keys):
            # Only while a rebuild is pending can FAISS name a key the store no longer has.
            if key in documents and key not in seen:
                seen.add(key)
                hits.append(Hit(documents[key], score))
        return hits

    # -- changes ---------------------------------------------------------------------

    def upsert(self, documents: Sequence[Document], embeddings: np.ndarray) -> int:
        """Durable in the store first, then visible in the index. Returns the new version."""
        terms = self._keywords.passages([(d.title, d.text) for d in documents]) if self._keywords else None
        with self._write_mutex, self._rw.write():
            keys, replaced, version = self.store.upsert(documents, embeddings, terms)
            self._apply(version, replaced, keys, embeddings)
        return version

    def delete(self, ids: Sequence[str]) -> tuple[int, int]:
        """Returns (passages removed, new version)."""
        with self._write_mutex, self._rw.write():
            removed, version = self.store.delete(ids)
            if len(removed):
                self._apply(version, removed, removed[:0], np.zeros((0, self.dimension), np.float32))
        return len(removed), version

    def _apply(self, version: int, removed: np.ndarray, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Applies one committed write to FAISS (the caller holds the write lock)."""
        try:
            self._vectors.remove(removed)
            self._vectors.add(keys, vectors)
        except Exception as error:
            self._needs_rebuild = True
            log.error("index %s: version %d is stored, but applying it to the vector index failed; "
                      "the index is rebuilt from the store at the next save", self.config.name, version, exc_info=True)
            raise VectorsBehind(
                f"index {self.config.name!r}: the change is stored (version {version}) but not yet searchable: "
                f"updating the vector index failed ({type(error).__name__}). It becomes searchable when the index "
                "is rebuilt from the store, within the save interval; retrying the request is safe"
            ) from error
        if not self._needs_rebuild:
            self._applied_version = version

    def _rebuild(self) -> None:
        """FAISS afresh from the store. Writers wait; searches go on with the old index until
        the new one takes its place."""
        with self._write_mutex:
            keys, embeddings, version = self.store.snapshot_vectors()
            fresh = VectorIndex.build(self.dimension, keys, embeddings, self.config, place=False)
            with self._rw.write():
                self._vectors = fresh  # the old one goes first, with any GPU memory it held
                self._applied_version = version
                self._needs_rebuild = False
                fresh.place(strict=False)
        log.warning("index %s: rebuilt the vector index from the store at version %d", self.config.name, version)

    def save(self) -> bool:
        """Writes the FAISS index if it has changed since the last save. Its state is copied to
        memory under the shared lock; writing the file and hashing it hold no lock."""
        with self._save_mutex:
            if self._needs_rebuild:
                self._rebuild()
            if self._vectors.gpu_lost:
                with self._write_mutex, self._rw.write():
                    self._vectors.restore_gpu()  # after a GPU failure dropped the GPU copy
            with self._rw.read():
                version = self._applied_version
                if self._needs_rebuild or (version == self._saved_version and (self.folder / VECTORS).exists()):
                    return False
                data, tombstones = self._vectors.snapshot()
                built_type, params = self._vectors.built_type, _index_params(self._vectors.config)
            save_vectors(self.folder, data, tombstones, built_type, params, version)
            self._saved_version = version
        self.store.forget_removed_through(version)
        return True

    def close(self, save: bool = True) -> None:
        """Saves (unless told not to: what a crash leaves behind), closes the store, and lets
        go of the folder. Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            if save:
                self.save()
        finally:
            self.store.close()
            if self._folder_lock is not None:
                self._folder_lock.release()


def _index_params(config: IndexConfig) -> dict:
    """Parameters that change the built structure (search-time knobs are not among them)."""
    if config.type == "hnsw":
        return {"m": config.hnsw.m, "ef_construction": config.hnsw.ef_construction}
    if config.type == "ivf":
        return {"nlist": config.ivf.nlist}
    return {}


def write_manifest(folder: Path, identity: dict, dimension: int, count: int, index_type: str, index_params: dict,
                   version: int) -> None:
    """The manifest, with checksums of the files as they are now, at store version `version`
    (a checksum holds until the file changes: the store on its next write, the vectors on their
    next save; `rankstream index check` knows which still apply)."""
    checksums = {name: sha256_of(folder / name) for name in (DOCS, VECTORS) if (folder / name).exists()}
    _write_json(
        folder / MANIFEST,
        {
            "format": FORMAT,
            "model": identity,
            "dimension": dimension,
            "similarity": identity["similarity"],
            "count": count,
            "index_type": index_type,
            "index_params": index_params,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "version": version,
            "checksums": checksums,
        },
    )


def save_vectors(folder: Path, data: np.ndarray, tombstones: list[int], built_type: str, params: dict, version: int) -> None:
    """Writes vectors.faiss from a snapshot (VectorIndex.snapshot) atomically and durably, then
    vectors.json: the store version it reflects, its type and parameters, checksum and
    tombstones. Used by builds and by CorpusIndex.save; takes no lock."""
    temporary = folder / (VECTORS + ".tmp")
    payload = memoryview(data)
    with temporary.open("wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    checksum = hashlib.sha256(payload).hexdigest()
    os.replace(temporary, folder / VECTORS)
    _write_json(
        folder / VECTORS_STATE,
        {"version": version, "type": built_type, "params": params, "sha256": checksum, "tombstones": tombstones},
    )
    fsync_dir(folder)


def _check_identity(name: str, folder: Path, manifest: dict, identity: dict, dimension: int) -> None:
    if manifest.get("format") != FORMAT:
        raise IndexMismatch(f"index {name!r} at {folder}: format {manifest.get('format')}, this server reads {FORMAT}")
    built = manifest.get("model", {})
    differences = [
        f"{key}: index built with {built.get(key)!r}, config has {value!r}"
        for key, value in identity.items()
        if built.get(key) != value
    ]
    if manifest.get("dimension") != dimension:
        differences.append(f"dimension: index {manifest.get('dimension')}, model {dimension}")
    if differences:
        raise IndexMismatch(
            f"index {name!r} at {folder} was built with another model or settings ({'; '.join(differences)}). "
            "Rebuild it with `rankstream index build`, or point the index at the model it was built with."
        )


def _load_or_rebuild(folder: Path, config: IndexConfig, store: DocStore, dimension: int) -> tuple[VectorIndex, int, int]:
    """(vectors, the store version they reflect, the version saved on disk: -1 when rebuilt)."""
    state_path = folder / VECTORS_STATE
    vectors_path = folder / VECTORS
    reason = "no saved vectors"
    if state_path.exists() and vectors_path.exists():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        built_type = state.get("type")
        if (built_type, state.get("params")) != (config.type, _index_params(config)):
            reason = f"saved as {built_type} {state.get('params')}, configured as {config.type} {_index_params(config)}"
        elif state.get("sha256") != sha256_of(vectors_path):
            reason = "checksum mismatch"
        else:
            try:
                vectors = VectorIndex.load(str(vectors_path), config, built_type, state.get("tombstones", []))
            except (ValueError, RuntimeError) as error:  # faiss raises RuntimeError for unreadable files
                reason = f"unusable vectors file: {error}"
            else:
                saved_version = int(state["version"])
                changes = store.changes(saved_version)
                vectors.remove(changes.removed_keys)
                vectors.add(changes.added_keys, changes.added_vectors)
                if len(changes.added_keys) or len(changes.removed_keys):
                    log.info("index %s: caught up %d added and %d removed passages", config.name,
                             len(changes.added_keys), len(changes.removed_keys))
                stored = store.count()
                if vectors.count == stored:
                    return vectors, changes.version, saved_version
                # Saved by a version that let FAISS fall behind the store: never trust it.
                reason = f"the vectors hold {vectors.count} passages and the store {stored}"
    level = logging.INFO if reason == "no saved vectors" else logging.WARNING
    log.log(level, "index %s: building vectors from the store (%s)", config.name, reason)
    keys, embeddings, version = store.snapshot_vectors()
    return VectorIndex.build(dimension, keys, embeddings, config, place=False), version, -1
