"""`rankstream index check DIR`: is an index folder sound? One line of verdict.

It verifies
- the manifest: readable, of this format, naming a model, a similarity and a dimension;
- the checksums: vectors.faiss against vectors.json (which every save rewrites), and
  docs.sqlite against the manifest while the store is still at the manifest's version;
- docs.sqlite: SQLite's `PRAGMA integrity_check`, and every embedding of the right size;
  the keyword (BM25) table holding exactly the store's passages;
- agreement: the saved vectors, caught up with the store's later changes the way a server
  opens them, hold exactly the store's keys, once each, each with its own embedding.

It writes nothing, takes no lock, and works on a live index: the files are read so that they
belong together (see `read_consistently`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from rankstream_server.config import IndexConfig
from rankstream_server.index.local import DOCS, FORMAT, MANIFEST, VECTORS, VECTORS_STATE, sha256_of
from rankstream_server.index.store import DocStore
from rankstream_server.index.vectors import VectorIndex

T = TypeVar("T")

READ_ATTEMPTS = 8


@dataclass
class SavedVectors:
    state: dict  # vectors.json
    data: np.ndarray  # vectors.faiss, as bytes (uint8)

    @property
    def version(self) -> int:
        return int(self.state["version"])

    def load(self, folder: Path) -> VectorIndex:
        """On the CPU, with the structure parameters it was saved with."""
        return VectorIndex.from_bytes(self.data, config_for(self.state, folder), self.state["type"], self.state.get("tombstones", []))


def config_for(state: dict, folder: Path) -> IndexConfig:
    """An IndexConfig that reproduces a vectors.json's type and parameters."""
    params = state.get("params") or {}
    kind = state["type"] if state["type"] in ("flat", "hnsw", "ivf") else "flat"
    config = IndexConfig(name=folder.name, path=str(folder), model="-", type=kind, device="cpu")
    if kind == "hnsw" and params:
        config.hnsw.m, config.hnsw.ef_construction = params["m"], params["ef_construction"]
    if kind == "ivf" and params.get("nlist"):
        config.ivf.nlist = params["nlist"]
    return config


def _state(folder: Path) -> dict | None:
    if not (folder / VECTORS_STATE).exists() or not (folder / VECTORS).exists():
        return None
    return json.loads((folder / VECTORS_STATE).read_text(encoding="utf-8"))


def read_consistently(folder: Path, read_store: Callable[[], T]) -> tuple[SavedVectors | None, T, str | None]:
    """The saved vectors and what `read_store` reads from the store, as of one moment on a
    live index. A server saves by replacing vectors.faiss, then vectors.json, then dropping
    the store's record of removals the save covers; so vectors.json unchanged from before the
    vectors were read to after the store was read means nothing moved in between. Returns
    (the vectors, or None when the folder has none; the store's answer; a problem, or None)."""
    problem = "the index kept changing while it was read: try again"
    result = None
    for attempt in range(READ_ATTEMPTS):
        try:
            before = _state(folder)
            data = np.frombuffer((folder / VECTORS).read_bytes(), dtype=np.uint8) if before else None
        except (OSError, ValueError) as error:
            return None, read_store(), f"vectors.json or vectors.faiss unreadable: {error}"
        result = read_store()
        try:
            after = _state(folder)
        except (OSError, ValueError):
            after = {}
        if after != before:
            continue  # a save landed in between
        if before is None:
            return None, result, None
        if hashlib.sha256(memoryview(data)).hexdigest() == before.get("sha256"):
            return SavedVectors(before, data), result, None
        problem = "vectors.faiss does not match the checksum in vectors.json"
        time.sleep(0.05 * (attempt + 1))  # perhaps a save between its two renames
    return None, result, problem


@dataclass
class CheckReport:
    folder: Path
    problems: list[str] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    summary: str = ""

    @property
    def healthy(self) -> bool:
        return not self.problems

    def verdict(self) -> str:
        if self.healthy:
            return f"healthy: {self.folder}: {self.summary}; verified {', '.join(self.verified)}"
        return f"DAMAGED: {self.folder}: {'; '.join(self.problems)}"


def check_index(folder: str | Path) -> CheckReport:
    folder = Path(folder)
    report = CheckReport(folder)
    manifest = _check_manifest(folder, report)
    if manifest is None:
        return report
    if not (folder / DOCS).exists():
        report.problems.append(f"{DOCS} is missing")
        return report
    try:
        store = DocStore(folder / DOCS, int(manifest["dimension"]), read_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to open is the verdict
        report.problems.append(f"{DOCS} cannot be opened: {error}")
        return report
    try:
        _check_store(store, folder, manifest, report)
    finally:
        store.close()
    return report


def _check_manifest(folder: Path, report: CheckReport) -> dict | None:
    if not folder.is_dir():
        report.problems.append("no such folder")
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        report.problems.append(f"no {MANIFEST}: not an index folder")
        return None
    except (OSError, ValueError) as error:
        report.problems.append(f"{MANIFEST} unreadable: {error}")
        return None
    if not isinstance(manifest, dict):
        report.problems.append(f"{MANIFEST} is not a JSON object")
        return None
    if manifest.get("format") != FORMAT:
        report.problems.append(f"{MANIFEST}: format {manifest.get('format')!r}, this version reads {FORMAT}")
    dimension = manifest.get("dimension")
    if not isinstance(dimension, int) or dimension <= 0:
        report.problems.append(f"{MANIFEST}: dimension {dimension!r} is not a positive integer")
    if not isinstance(manifest.get("model"), dict) or manifest.get("similarity") not in ("dot", "cosine"):
        report.problems.append(f"{MANIFEST}: no model identity and similarity")
    if report.problems:
        return None
    report.verified.append("manifest")
    return manifest


def _check_store(store: DocStore, folder: Path, manifest: dict, report: CheckReport) -> None:
    try:
        problems = store.integrity_problems()
        saved, contents, problem = read_consistently(folder, store.contents)
    except Exception as error:  # noqa: BLE001 - a store SQLite cannot read is the verdict
        report.problems.append(f"{DOCS} cannot be read: {error}")
        return
    report.problems += [f"{DOCS}: {p}" for p in problems]
    if not problems:
        report.verified.append("SQLite integrity")
    try:
        keyword_problems = store.sparse_problems()
    except Exception as error:  # noqa: BLE001
        keyword_problems = [f"keyword table cannot be read: {error}"]
    report.problems += [f"{DOCS}: {p}" for p in keyword_problems]
    if not keyword_problems and store.sparse_settings() is not None:
        report.verified.append("keyword side")
    if problem:
        report.problems.append(problem)
    checksum = (manifest.get("checksums") or {}).get(DOCS)
    if checksum and manifest.get("version") == contents.version:  # unchanged since the manifest
        if sha256_of(folder / DOCS) == checksum:
            report.verified.append(f"{DOCS} checksum")
        else:
            report.problems.append(f"{DOCS} does not match the checksum in {MANIFEST}")
    report.summary = f"{len(contents.keys)} passages at version {contents.version}"
    if saved is None:
        if not problem:
            report.summary += "; no saved vectors (they are built from the store at the next open)"
        return
    report.verified.append(f"{VECTORS} checksum")
    _check_agreement(saved, contents, folder, report)


def _check_agreement(saved: SavedVectors, contents, folder: Path, report: CheckReport) -> None:
    if saved.version > contents.version:
        report.problems.append(f"{VECTORS_STATE} is at version {saved.version}, ahead of the store at {contents.version}")
        return
    try:
        vectors = saved.load(folder)
        changes = contents.changes(saved.version)
        vectors.remove(changes.removed_keys)
        vectors.add(changes.added_keys, changes.added_vectors)
        keys, held = vectors.entries()
    except (ValueError, RuntimeError, KeyError) as error:  # faiss raises RuntimeError for unreadable files
        report.problems.append(f"{VECTORS} unusable: {error}")
        return
    unique, first = np.unique(keys, return_index=True)
    if len(unique) != len(keys):
        report.problems.append(f"{len(keys) - len(unique)} keys are held more than once in the vectors")
    missing = np.setdiff1d(contents.keys, unique)
    extra = np.setdiff1d(unique, contents.keys)
    if len(missing):
        report.problems.append(f"{len(missing)} passages of the store are missing from the vectors (keys {missing[:5].tolist()})")
    if len(extra):
        report.problems.append(f"{len(extra)} keys in the vectors are not in the store (keys {extra[:5].tolist()})")
    common, in_store, in_vectors = np.intersect1d(contents.keys, keys[first], assume_unique=True, return_indices=True)
    wrong = ~np.all(np.isclose(contents.vectors[in_store], held[first][in_vectors], rtol=0, atol=1e-6), axis=1)
    if wrong.any():
        report.problems.append(f"{int(wrong.sum())} keys hold another passage's vector (keys {common[wrong][:5].tolist()})")
    if not (len(unique) != len(keys) or len(missing) or len(extra) or wrong.any()):
        report.verified.append("store and vectors agree")
    report.summary += f"; {saved.state['type']} vectors saved at version {saved.version}"
    if contents.version > saved.version:
        report.summary += " (the store's later changes replay at the next open)"

