"""Index folders without a model: CorpusIndex over random unit vectors of a small dimension."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rankstream_server.config import IndexConfig
from rankstream_server.index.local import CorpusIndex
from rankstream_server.index.store import Document

DIMENSION = 8
IDENTITY = {"weights": "random-unit-vectors", "similarity": "dot"}  # what a model's identity() gives
COLORS = ("red", "green", "blue")


def index_config(folder: Path, **overrides) -> IndexConfig:
    return IndexConfig(**{"name": "t", "path": str(folder), "model": "m", "create": True, "device": "cpu", **overrides})


def open_index(folder: Path, **overrides) -> CorpusIndex:
    return CorpusIndex.open(index_config(folder, **overrides), IDENTITY, DIMENSION)


def unit_vectors(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIMENSION)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def vector_of(seed: int) -> np.ndarray:
    return unit_vectors(1, seed)[0]


def documents(ids: list[str], color_of=lambda i: COLORS[i % len(COLORS)]) -> list[Document]:
    return [Document(id=doc_id, text=f"text of {doc_id}", metadata={"color": color_of(n)}) for n, doc_id in enumerate(ids)]


def fill(index: CorpusIndex, count: int, seed: int = 1, prefix: str = "d") -> dict[str, np.ndarray]:
    """Upserts `count` passages; returns their vectors by id."""
    ids = [f"{prefix}{i}" for i in range(count)]
    vectors = unit_vectors(count, seed)
    index.upsert(documents(ids), vectors)
    return dict(zip(ids, vectors))
