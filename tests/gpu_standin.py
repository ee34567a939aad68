"""A GPU stand-in: faiss-gpu's rules, kept on the CPU, so VectorIndex's GPU code path runs here.

faiss-gpu indexes (GpuIndexFlat, GpuIndexIVFFlat) can add vectors but not remove them, take no
search parameters (so no ID selector), and answer at most k = 2048 per search. The stand-in
refuses exactly those calls, as faiss-gpu raises for them, and can fail an add the way CUDA
runs out of memory.

    stand_ins = install(monkeypatch)  # every GPU copy VectorIndex makes from now on
    open_index(folder, device="cuda:0")
"""

from __future__ import annotations

import faiss
import numpy as np

from rankstream_server.config import IndexConfig
from rankstream_server.index import vectors as vector_index


class GpuRuleBroken(AssertionError):
    """The code under test asked the GPU for something faiss-gpu cannot do."""


class GpuStandIn:
    def __init__(self, cpu_index: faiss.Index, config: IndexConfig, built_type: str, max_k: int):
        self.max_k = max_k
        self._index = faiss.clone_index(cpu_index)  # its own memory, as an upload makes
        if built_type == "ivf":
            faiss.extract_index_ivf(self._index).nprobe = min(config.ivf.nprobe, max_k)
        self.searches: list[int] = []  # the k of every search
        self.failing_adds = 0  # the next this many adds fail like CUDA out of memory

    @property
    def ntotal(self) -> int:
        return self._index.ntotal

    def add_with_ids(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        if self.failing_adds:
            self.failing_adds -= 1
            raise RuntimeError("CUDA error: out of memory (GPU stand-in)")
        self._index.add_with_ids(vectors, keys)

    def remove_ids(self, keys) -> int:
        raise GpuRuleBroken("faiss-gpu indexes cannot remove vectors")

    def search(self, query: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        if params is not None:
            raise GpuRuleBroken("faiss-gpu takes no search parameters (no ID selector)")
        if not 0 < k <= self.max_k:
            raise GpuRuleBroken(f"faiss-gpu answers 1 <= k <= {self.max_k}, asked for {k}")
        self.searches.append(k)
        return self._index.search(query, k)


def install(monkeypatch, max_k: int = vector_index.GPU_MAX_K) -> list[GpuStandIn]:
    """From now on every GPU copy is a stand-in with this k limit; returns them as made."""
    made: list[GpuStandIn] = []

    def clone_to_gpu(cpu_index, device, config, built_type):
        made.append(GpuStandIn(cpu_index, config, built_type, max_k))
        return made[-1]

    monkeypatch.setattr(vector_index, "clone_to_gpu", clone_to_gpu)
    return made
