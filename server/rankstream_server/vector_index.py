"""FAISS behind one interface: exact (flat), HNSW or IVF inner-product search over integer keys,
on the CPU, or on a GPU when faiss has GPU support and a device.

Keys removed from an index type that cannot remove vectors (HNSW; any GPU index) become
tombstones: excluded by an ID selector on the CPU, filtered after an over-fetch on the GPU.

How keys are held depends on the type. Flat and HNSW store vectors by position, so an
IndexIDMap2 maps positions to keys. IVF stores each vector's id in its inverted list and
must hold the keys itself: inside an IndexIDMap, `remove_ids` shifts the map's table but not
the ids IVF stored, so every later vector answers with its neighbour's key, and a reopened
index can abort the process in faiss (`j == index->ntotal`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import faiss
import numpy as np

from .config import IndexConfig

log = logging.getLogger(__name__)

IVF_MIN_POINTS_PER_LIST = 39  # faiss's own floor for k-means training


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class SearchResult:
    scores: np.ndarray  # float32, best first
    keys: np.ndarray  # int64, same order


class VectorIndex:
    """Inner-product search over float32 vectors with int64 keys. Not thread-safe: callers lock."""

    def __init__(self, index: faiss.Index, config: IndexConfig, built_type: str):
        self.config = config
        self.built_type = built_type  # what was built: an IVF over too few points is built flat
        self._cpu = index
        self._tombstones: set[int] = set()
        self._gpu = None
        self.device = "cpu"
        want_gpu = config.device.startswith("cuda") or (config.device == "auto" and gpu_available())
        if want_gpu and built_type != "hnsw":
            self._to_gpu(int(config.device.split(":")[1]) if ":" in config.device else 0)
        elif want_gpu:
            log.info("index %s: HNSW has no GPU version; searching on the CPU", config.name)

    # -- building and persistence ------------------------------------------------------

    @classmethod
    def build(cls, dimension: int, keys: np.ndarray, vectors: np.ndarray, config: IndexConfig) -> VectorIndex:
        kind = config.type
        if kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dimension, config.hnsw.m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = config.hnsw.ef_construction
        elif kind == "ivf" and len(vectors) >= IVF_MIN_POINTS_PER_LIST:
            nlist = config.ivf.nlist or max(1, int(4 * math.sqrt(len(vectors))))
            nlist = max(1, min(nlist, len(vectors) // IVF_MIN_POINTS_PER_LIST))
            quantizer = faiss.IndexFlatIP(dimension)
            inner = faiss.IndexIVFFlat(quantizer, dimension, nlist, faiss.METRIC_INNER_PRODUCT)
            inner.train(np.ascontiguousarray(vectors, dtype=np.float32))
        else:
            if kind == "ivf":
                log.info("index %s: %d vectors are too few to train IVF; built flat until the next rebuild", config.name, len(vectors))
            kind = "flat"
            inner = faiss.IndexFlatIP(dimension)
        holder = inner if kind == "ivf" else faiss.IndexIDMap2(inner)  # IVF keeps its own ids
        index = cls(holder, config, kind)
        index.add(keys, vectors)
        return index

    @classmethod
    def load(cls, path: str, config: IndexConfig, built_type: str, tombstones: list[int]) -> VectorIndex:
        stored = faiss.read_index(path)
        if built_type == "ivf" and isinstance(stored, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            # Written before the IVF id fix: its ids may already be wrong, so never trust it.
            raise ValueError("IVF saved in the old id-map layout (ids may be shifted)")
        index = cls(stored, config, built_type)
        index._tombstones = set(tombstones)
        return index

    def save(self, path: str) -> list[int]:
        """Writes the CPU index; returns the tombstones to save beside it."""
        faiss.write_index(self._cpu, path)
        return sorted(self._tombstones)

    def _to_gpu(self, device: int) -> None:
        resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = self.config.gpu_fp16
        gpu_index = faiss.index_cpu_to_gpu(resources, device, self._cpu, options)
        if self.built_type == "ivf":
            faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", self.config.ivf.nprobe)
        self._gpu = (resources, gpu_index)  # the resources must outlive the index
        self.device = f"cuda:{device}"

    def parameters(self) -> str:
        """The structure as built, in words (an IVF's list count depends on the corpus size)."""
        if self.built_type == "ivf":
            inner = faiss.downcast_index(self._cpu)
            return f"nlist={inner.nlist}, nprobe={self.config.ivf.nprobe}"
        if self.built_type == "hnsw":
            return f"M={self.config.hnsw.m}, efConstruction={self.config.hnsw.ef_construction}, efSearch={self.config.hnsw.ef_search}"
        return "exact"

    # -- changes ---------------------------------------------------------------------

    @property
    def count(self) -> int:
        return self._cpu.ntotal - len(self._tombstones)

    @property
    def tombstone_count(self) -> int:
        return len(self._tombstones)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        if len(keys) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        self._cpu.add_with_ids(vectors, keys)
        if self._gpu is not None:
            self._gpu[1].add_with_ids(vectors, keys)

    def remove(self, keys: np.ndarray) -> None:
        if len(keys) == 0:
            return
        if self.built_type == "hnsw" or self._gpu is not None:
            self._tombstones.update(int(k) for k in keys)
            if self.built_type != "hnsw":
                self._cpu.remove_ids(np.ascontiguousarray(keys, dtype=np.int64))  # the saved copy stays exact
            return
        self._cpu.remove_ids(np.ascontiguousarray(keys, dtype=np.int64))

    # -- search ----------------------------------------------------------------------

    def _params(self, selector: faiss.IDSelector | None) -> faiss.SearchParameters:
        if self.built_type == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.config.hnsw.ef_search, 1))
        if self.built_type == "ivf":
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.config.ivf.nprobe)
        return faiss.SearchParameters(sel=selector)

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> SearchResult | None:
        """Top-k keys by inner product, tombstones excluded. With `allowed`, only those keys;
        returns None when this index cannot filter (the GPU), so the caller searches exactly."""
        query = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        total = self._cpu.ntotal
        if total == 0 or k <= 0:
            return SearchResult(np.zeros(0, np.float32), np.zeros(0, np.int64))
        if self._gpu is not None:
            if allowed is not None:
                return None
            fetch = min(total, k + len(self._tombstones))
            scores, keys = self._gpu[1].search(query, fetch)
            return _cut(scores[0], keys[0], k, self._tombstones)
        selectors = []
        if allowed is not None:
            selectors.append(faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64)))
        if self._tombstones:
            dead = np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones))
            selectors.append(faiss.IDSelectorNot(faiss.IDSelectorBatch(dead)))
        selector = None
        if len(selectors) == 1:
            selector = selectors[0]
        elif len(selectors) == 2:
            selector = faiss.IDSelectorAnd(*selectors)
        params = self._params(selector)
        scores, keys = self._cpu.search(query, min(k, total), params=params)  # selectors alive until here
        return _cut(scores[0], keys[0], k, set())


def _cut(scores: np.ndarray, keys: np.ndarray, k: int, excluded: set[int]) -> SearchResult:
    keep = keys >= 0
    if excluded:
        keep &= np.array([int(key) not in excluded for key in keys], dtype=bool)
    return SearchResult(scores[keep][:k].astype(np.float32), keys[keep][:k].astype(np.int64))


def exact_search(query: np.ndarray, keys: np.ndarray, vectors: np.ndarray, k: int) -> SearchResult:
    """Brute force over given vectors: the exact answer for filtered searches."""
    if len(keys) == 0:
        return SearchResult(np.zeros(0, np.float32), np.zeros(0, np.int64))
    scores = vectors @ query.reshape(-1).astype(np.float32)
    order = np.argsort(-scores, kind="stable")[:k]
    return SearchResult(scores[order].astype(np.float32), keys[order])
