"""FAISS behind one interface: exact (flat), HNSW or IVF inner-product search over integer keys,
on the CPU, or on a GPU when faiss has GPU support and a device.

How keys are held depends on the type. Flat and HNSW store vectors by position, so an
IndexIDMap2 maps positions to keys. IVF stores each vector's id in its inverted list and
must hold the keys itself: inside an IndexIDMap, `remove_ids` shifts the map's table but not
the ids IVF stored, so every later vector answers with its neighbour's key, and a reopened
index can abort the process in faiss (`j == index->ntotal`).

How keys are removed depends on where the index lives:
- The CPU copy is the one saved, and for flat and IVF it is exact: `remove_ids` takes the
  vectors out. HNSW cannot remove, so its removed keys are tombstones, saved beside it and
  excluded from searches by an ID selector.
- A GPU copy (flat and IVF) follows faiss-gpu's rules: vectors can be added but not removed,
  a search takes no ID selector, and k is at most 2048. Removed keys become GPU tombstones,
  held in memory only (the CPU copy has already dropped them), and filtered out of a search
  that fetches k + tombstones. Once the tombstones reach half the k limit the GPU copy is
  uploaded again from the CPU copy, which clears them; a search that still needs more than
  the limit, or a filtered search, runs on the CPU copy.
- A GPU that fails (say, out of memory) costs only speed: the CPU copy has every change, the
  GPU copy is dropped, searches run on the CPU, and `restore_gpu` uploads it again later.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

import faiss
import numpy as np

from rankstream_server.config import IndexConfig

log = logging.getLogger(__name__)

IVF_MIN_POINTS_PER_LIST = 39  # faiss's own floor for k-means training
GPU_MAX_K = 2048  # faiss-gpu's largest k per search


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class SearchResult:
    scores: np.ndarray  # float32, best first
    keys: np.ndarray  # int64, same order


class GpuCopy:
    """A faiss-gpu copy of a CPU index: add and search only (no removal, no ID selector), k at
    most `max_k`. Not thread-safe: VectorIndex calls it one call at a time."""

    max_k = GPU_MAX_K

    def __init__(self, cpu_index: faiss.Index, device: int, config: IndexConfig, built_type: str):
        self._resources = faiss.StandardGpuResources()  # must outlive the index
        options = faiss.GpuClonerOptions()
        options.useFloat16 = config.gpu_fp16
        self._index = faiss.index_cpu_to_gpu(self._resources, device, cpu_index, options)
        if built_type == "ivf":
            faiss.GpuParameterSpace().set_index_parameter(self._index, "nprobe", min(config.ivf.nprobe, GPU_MAX_K))

    @property
    def ntotal(self) -> int:
        return self._index.ntotal

    def add_with_ids(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        self._index.add_with_ids(vectors, keys)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._index.search(query, k)


def clone_to_gpu(cpu_index: faiss.Index, device: int, config: IndexConfig, built_type: str) -> GpuCopy:
    """The GPU copy of a CPU index. Tests replace this with a stand-in that keeps faiss-gpu's
    rules on the CPU, so the GPU code path runs without a GPU."""
    return GpuCopy(cpu_index, device, config, built_type)


class VectorIndex:
    """Inner-product search over float32 vectors with int64 keys.

    Searches may run side by side; a change (add, remove, place, restore_gpu) needs the index
    to itself: callers hold a reader-writer lock."""

    def __init__(self, index: faiss.Index, config: IndexConfig, built_type: str, tombstones=()):
        self.config = config
        self.built_type = built_type  # what was built: an IVF over too few points is built flat
        self._cpu = index
        self._tombstones: set[int] = set(int(k) for k in tombstones) if built_type == "hnsw" else set()
        self._gpu: GpuCopy | None = None
        self._gpu_device: int | None = None  # where a GPU copy belongs, placed or not
        self._gpu_tombstones: set[int] = set()  # keys the CPU copy removed and the GPU copy still has
        self._gpu_lock = threading.Lock()  # a faiss-gpu index takes one call at a time

    # -- building and persistence ------------------------------------------------------

    @classmethod
    def build(cls, dimension: int, keys: np.ndarray, vectors: np.ndarray, config: IndexConfig, place: bool = True) -> VectorIndex:
        """Builds on the CPU, then (with `place`) uploads to the configured device."""
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
        if place:
            index.place()
        return index

    @classmethod
    def load(cls, path: str, config: IndexConfig, built_type: str, tombstones: list[int]) -> VectorIndex:
        """Reads a saved CPU index (not placed on a device yet: catch it up first, then `place`).
        `tombstones` count for HNSW only: flat and IVF files hold no removed vectors."""
        return cls.from_stored(faiss.read_index(path), config, built_type, tombstones)

    @classmethod
    def from_bytes(cls, data: np.ndarray, config: IndexConfig, built_type: str, tombstones: list[int]) -> VectorIndex:
        return cls.from_stored(faiss.deserialize_index(data), config, built_type, tombstones)

    @classmethod
    def from_stored(cls, stored: faiss.Index, config: IndexConfig, built_type: str, tombstones: list[int]) -> VectorIndex:
        if built_type == "ivf" and isinstance(stored, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            # Written before the IVF id fix: its ids may already be wrong, so never trust it.
            raise ValueError("IVF saved in the old id-map layout (ids may be shifted)")
        return cls(stored, config, built_type, tombstones)

    def snapshot(self) -> tuple[np.ndarray, list[int]]:
        """The CPU index serialized to bytes, and the tombstones to save beside it. A copy in
        memory: the caller writes it to disk without holding up searches or changes."""
        return faiss.serialize_index(self._cpu), sorted(self._tombstones)

    def save(self, path: str) -> list[int]:
        """Writes the CPU index; returns the tombstones to save beside it."""
        faiss.write_index(self._cpu, path)
        return sorted(self._tombstones)

    def place(self, strict: bool = True) -> None:
        """Uploads a GPU copy when the config asks for one (HNSW has no GPU version). A failed
        upload raises, unless not `strict`: then searches run on the CPU until `restore_gpu`."""
        config = self.config
        want_gpu = config.device.startswith("cuda") or (config.device == "auto" and gpu_available())
        if not want_gpu:
            return
        if self.built_type == "hnsw":
            log.info("index %s: HNSW has no GPU version; searching on the CPU", config.name)
            return
        self._gpu_device = int(config.device.split(":")[1]) if ":" in config.device else 0
        try:
            self._upload()
        except Exception:
            if strict:
                raise
            self._drop_gpu("uploading")

    def _upload(self) -> None:
        """A fresh GPU copy of the CPU copy: it holds no removed vectors, so no tombstones."""
        self._gpu = None  # free the old copy first: two need twice the GPU memory
        self._gpu_tombstones.clear()
        self._gpu = clone_to_gpu(self._cpu, self._gpu_device, self.config, self.built_type)

    def restore_gpu(self) -> bool:
        """Uploads the GPU copy again after a failure dropped it. True when on the GPU."""
        if self._gpu_device is None:
            return False
        if self._gpu is None:
            try:
                self._upload()
            except Exception:  # noqa: BLE001 - stays on the CPU; tried again next time
                log.warning("index %s: uploading to the GPU failed; still searching on the CPU", self.config.name, exc_info=True)
                return False
            log.info("index %s: back on %s", self.config.name, self.device)
        return True

    def _drop_gpu(self, what: str) -> None:
        log.warning("index %s: %s failed on the GPU; searching on the CPU until it is uploaded again",
                    self.config.name, what, exc_info=True)
        self._gpu = None
        self._gpu_tombstones.clear()

    @property
    def device(self) -> str:
        return f"cuda:{self._gpu_device}" if self._gpu is not None else "cpu"

    @property
    def gpu_lost(self) -> bool:
        """A GPU copy belongs here but a failure dropped it: `restore_gpu` uploads it again."""
        return self._gpu_device is not None and self._gpu is None

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
        """Removed keys whose vectors are still held somewhere: in HNSW, or in the GPU copy."""
        return len(self._tombstones) + len(self._gpu_tombstones)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """The CPU copy first: it is the exact one. A GPU failure only drops the GPU copy."""
        if len(keys) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        self._cpu.add_with_ids(vectors, keys)
        if self._gpu is not None:
            try:
                self._gpu.add_with_ids(vectors, keys)
            except Exception:  # noqa: BLE001 - e.g. CUDA out of memory: the CPU copy has it
                self._drop_gpu("adding vectors")

    def remove(self, keys: np.ndarray) -> None:
        """Removes keys; keys the index does not hold are ignored."""
        if len(keys) == 0:
            return
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        if self.built_type == "hnsw":
            self._tombstones.update(int(k) for k in keys if self._holds(int(k)))
            return
        self._cpu.remove_ids(keys)
        if self._gpu is not None:
            self._gpu_tombstones.update(int(k) for k in keys)
            if len(self._gpu_tombstones) >= self._gpu.max_k // 2:
                try:
                    self._upload()
                except Exception:  # noqa: BLE001
                    self._drop_gpu("uploading again to clear removed vectors")

    def _holds(self, key: int) -> bool:
        """Whether an IndexIDMap2 (flat, HNSW) holds a live vector for `key`."""
        if key in self._tombstones:
            return False
        try:
            self._cpu.reconstruct(key)
        except RuntimeError:  # faiss: key not found
            return False
        return True

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live (key, vector) the CPU copy holds, tombstones excluded: for checks."""
        if self.built_type == "ivf":
            ivf = faiss.downcast_index(self._cpu)
            lists = ivf.invlists
            keys, vectors = [], []
            for number in range(ivf.nlist):
                size = lists.list_size(number)
                if size:
                    keys.append(faiss.rev_swig_ptr(lists.get_ids(number), size).copy())
                    codes = faiss.rev_swig_ptr(lists.get_codes(number), size * ivf.code_size).copy()
                    vectors.append(codes.view(np.float32).reshape(size, ivf.d))
            dimension = ivf.d
        else:
            inner = faiss.downcast_index(self._cpu.index)
            storage = faiss.downcast_index(inner.storage) if self.built_type == "hnsw" else inner
            keys = [faiss.vector_to_array(self._cpu.id_map)]
            vectors = [faiss.vector_to_array(storage.codes).view(np.float32).reshape(-1, storage.d)]
            dimension = storage.d
        all_keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        all_vectors = np.concatenate(vectors) if vectors else np.zeros((0, dimension), np.float32)
        if self._tombstones:
            live = ~np.isin(all_keys, np.fromiter(self._tombstones, np.int64, len(self._tombstones)))
            all_keys, all_vectors = all_keys[live], all_vectors[live]
        return all_keys.astype(np.int64), all_vectors

    # -- search ----------------------------------------------------------------------

    def _params(self, selector: faiss.IDSelector | None) -> faiss.SearchParameters:
        if self.built_type == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.config.hnsw.ef_search, 1))
        if self.built_type == "ivf":
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.config.ivf.nprobe)
        return faiss.SearchParameters(sel=selector)

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> SearchResult:
        """Top-k keys by inner product, removed keys excluded; with `allowed`, only those keys."""
        query = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        total = self._cpu.ntotal
        if total == 0 or k <= 0:
            return SearchResult(np.zeros(0, np.float32), np.zeros(0, np.int64))
        gpu = self._gpu
        if gpu is not None and allowed is None:
            fetch = min(k + len(self._gpu_tombstones), gpu.ntotal)
            if fetch <= gpu.max_k:
                with self._gpu_lock:
                    scores, keys = gpu.search(query, fetch)
                return _cut(scores[0], keys[0], k, self._gpu_tombstones)
            # Past faiss-gpu's k limit: the CPU copy below holds no removed vectors.
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
        keep &= ~np.isin(keys, np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
    return SearchResult(scores[keep][:k].astype(np.float32), keys[keep][:k].astype(np.int64))


def exact_search(query: np.ndarray, keys: np.ndarray, vectors: np.ndarray, k: int) -> SearchResult:
    """Brute force over given vectors: the exact answer for filtered searches."""
    if len(keys) == 0:
        return SearchResult(np.zeros(0, np.float32), np.zeros(0, np.int64))
    scores = vectors @ query.reshape(-1).astype(np.float32)
    order = np.argsort(-scores, kind="stable")[:k]
    return SearchResult(scores[order].astype(np.float32), keys[order])
