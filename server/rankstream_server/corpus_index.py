"""An index folder: the document store (source of truth), the FAISS index derived from it,
and a manifest saying which model and settings made the embeddings.

    DIR/manifest.json   model identity, dimension, similarity, counts, index type, checksums
    DIR/docs.sqlite     texts, metadata, embeddings (durable on every write)
    DIR/vectors.faiss   the FAISS index as of DIR/vectors.json's `version`
    DIR/vectors.json    that version, the index type and parameters, a checksum, tombstones

At open, the FAISS index is loaded and caught up with the store's later changes, or rebuilt
from the store when it is missing, damaged, or of another type than configured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import IndexConfig
from .docstore import DocStore, Document, StoredDocument
from .errors import ModelLoadError
from .vector_index import SearchResult, VectorIndex, exact_search

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DOCS = "docs.sqlite"
VECTORS = "vectors.faiss"
VECTORS_STATE = "vectors.json"
FORMAT = 1


class IndexMismatch(ModelLoadError):
    """The index folder was built with another model or settings than the server's config."""


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
    document: StoredDocument
    score: float


class CorpusIndex:
    """Search and online changes over one index folder. Thread-safe; every method blocks."""

    def __init__(self, folder: Path, config: IndexConfig, manifest: dict, store: DocStore, vectors: VectorIndex, saved_version: int):
        self.folder = folder
        self.config = config
        self.manifest = manifest
        self.store = store
        self._vectors = vectors
        self._saved_version = saved_version
        self._lock = threading.Lock()  # the FAISS structure: searches and changes
        self._write_lock = threading.Lock()  # writers and saves, so a saved version is fully applied

    # -- opening and creating ------------------------------------------------------------

    @staticmethod
    def create_empty(folder: Path, identity: dict, dimension: int) -> None:
        """A new, empty index folder, made atomically."""
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        DocStore(staging / DOCS, dimension).close()
        write_manifest(staging, identity, dimension, count=0, index_type="flat", index_params={})
        os.rename(staging, folder)
        fsync_dir(folder.parent)

    @classmethod
    def open(cls, config: IndexConfig, identity: dict, dimension: int) -> CorpusIndex:
        folder = Path(config.path)
        if not (folder / MANIFEST).exists():
            if not config.create:
                raise ModelLoadError(
                    f"index {config.name!r}: no index at {folder}. Build one with "
                    f"`rankstream index build --config FILE --corpus CORPUS.jsonl --out {folder}`, "
                    "or set `create: true` to start empty and add passages with UpsertPassages"
                )
            cls.create_empty(folder, identity, dimension)
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        _check_identity(config.name, folder, manifest, identity, dimension)
        store = DocStore(folder / DOCS, dimension)
        vectors, saved_version = _load_or_rebuild(folder, config, store, dimension)
        index = cls(folder, config, manifest, store, vectors, saved_version)
        if saved_version < 0:  # rebuilt: save now, so the next start only catches up
            index.save()
        log.info("index %s: %d passages, %s on %s", config.name, vectors.count, vectors.built_type, vectors.device)
        return index

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
        with self._lock:
            return self._vectors.count

    @property
    def version(self) -> int:
        return self.store.version

    def search(self, query: np.ndarray, k: int, metadata_filter: dict[str, str] | None = None) -> list[Hit]:
        """The k best passages; with a filter, the k best among matching passages, exactly
        wherever the index is exact, and never fewer than min(k, matches)."""
        allowed = self.store.keys_matching(metadata_filter) if metadata_filter else None
        if allowed is not None and len(allowed) == 0:
            return []
        with self._lock:
            result = self._vectors.search(query, k, allowed)
        wanted = min(k, len(allowed)) if allowed is not None else k
        if result is None or (allowed is not None and len(result.keys) < wanted):
            # The index could not filter, or an approximate index found too few: search the
            # matching passages exactly.
            result = exact_search(query, allowed, self.store.vectors_for(allowed), k)
        return self._hits(result)

    def _hits(self, result: SearchResult) -> list[Hit]:
        documents = self.store.documents(result.keys.tolist())
        # A key can vanish between search and lookup (a concurrent delete): skip it.
        return [Hit(documents[int(k)], float(s)) for s, k in zip(result.scores, result.keys) if int(k) in documents]

    # -- changes ---------------------------------------------------------------------

    def upsert(self, documents: Sequence[Document], embeddings: np.ndarray) -> int:
        """Durable in the store first, then visible in the index. Returns the new version."""
        with self._write_lock:
            keys, replaced, version = self.store.upsert(documents, embeddings)
            with self._lock:
                self._vectors.remove(replaced)
                self._vectors.add(keys, embeddings)
        return version

    def delete(self, ids: Sequence[str]) -> tuple[int, int]:
        """Returns (passages removed, new version)."""
        with self._write_lock:
            removed, version = self.store.delete(ids)
            with self._lock:
                self._vectors.remove(removed)
        return len(removed), version

    def save(self) -> bool:
        """Writes the FAISS index if the store has moved on since the last save."""
        with self._write_lock, self._lock:
            version = self.store.version
            if version == self._saved_version and (self.folder / VECTORS).exists():
                return False
            save_vectors(self.folder, self._vectors, version)
            self._saved_version = version
        self.store.forget_removed_through(version)
        return True

    def close(self) -> None:
        self.save()
        self.store.close()


def _index_params(config: IndexConfig) -> dict:
    """Parameters that change the built structure (search-time knobs are not among them)."""
    if config.type == "hnsw":
        return {"m": config.hnsw.m, "ef_construction": config.hnsw.ef_construction}
    if config.type == "ivf":
        return {"nlist": config.ivf.nlist}
    return {}


def write_manifest(folder: Path, identity: dict, dimension: int, count: int, index_type: str, index_params: dict) -> None:
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
            "checksums": checksums,
        },
    )


def save_vectors(folder: Path, vectors: VectorIndex, version: int) -> None:
    """Writes vectors.faiss (atomically) and vectors.json: the store version it reflects, its
    type and parameters, checksum and tombstones. Used by builds and by CorpusIndex.save."""
    temporary = folder / (VECTORS + ".tmp")
    tombstones = vectors.save(str(temporary))
    checksum = sha256_of(temporary)
    os.replace(temporary, folder / VECTORS)
    _write_json(
        folder / VECTORS_STATE,
        {"version": version, "type": vectors.built_type, "params": _index_params(vectors.config),
         "sha256": checksum, "tombstones": tombstones},
    )


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


def _load_or_rebuild(folder: Path, config: IndexConfig, store: DocStore, dimension: int) -> tuple[VectorIndex, int]:
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
                added, added_vectors, removed = store.changes_since(int(state["version"]))
                vectors.remove(removed)
                vectors.add(added, added_vectors)
                if len(added) or len(removed):
                    log.info("index %s: caught up %d added and %d removed passages", config.name, len(added), len(removed))
                return vectors, int(state["version"])
    level = logging.INFO if reason == "no saved vectors" else logging.WARNING
    log.log(level, "index %s: building vectors from the store (%s)", config.name, reason)
    keys, embeddings = store.all_vectors()
    return VectorIndex.build(dimension, keys, embeddings, config), -1
