"""A model-based property test of CorpusIndex (hypothesis stateful), for every index type and
for GPU stand-ins that keep faiss-gpu's rules: random sequences of upserts, replacements,
deletes, filtered and unfiltered searches, saves, reopens, crashes (reopening what the disk
held, unsaved), and backups, checked against a brute-force numpy model.

- Exact types (flat, and flat on the GPU) answer exactly as the model does: the same scores,
  and ids that differ only among equal scores.
- Approximate types (HNSW, IVF, IVF on the GPU) return only live passages with their current
  text and metadata, each with its own vector's score, and as many as the model has.
- Every passage searched with its own vector is in its own top 10.
- After every step the count is the model's; after each reopen the folder passes `index check`.

The GPU stand-ins answer at most k = 16, so their tombstones, uploads and the CPU fallback
past the k limit all happen within a few steps.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from rankstream_server.index.backup import backup_index
from rankstream_server.index.check import check_index
from rankstream_server.index.local import DOCS, MANIFEST, VECTORS, VECTORS_STATE
from rankstream_server.index.store import Document

import gpu_standin
from index_helpers import COLORS, DIMENSION, open_index

IDS = 100  # passage ids p0..p99: upserts of existing ids are replacements
FIRST = 80  # passages written at the start, so IVF is trained (2 lists) at the next open
GPU_K = 16
TOLERANCE = 1e-5
KINDS = {  # name: (index type, device, exact)
    "flat": ("flat", "cpu", True),
    "hnsw": ("hnsw", "cpu", False),
    "ivf": ("ivf", "cpu", False),
    "gpu-flat": ("flat", "cuda:0", True),
    "gpu-ivf": ("ivf", "cuda:0", False),
}
SETTINGS = settings(
    max_examples=40, stateful_step_count=40, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def vector(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIMENSION).astype(np.float32)
    return v / np.linalg.norm(v)


passage_ids = st.integers(0, IDS - 1).map(lambda i: f"p{i}")
writes = st.lists(st.tuples(passage_ids, st.integers(0, 10**6), st.sampled_from(COLORS)), min_size=1, max_size=4,
                  unique_by=lambda w: w[0])


class IndexMachine(RuleBasedStateMachine):
    kind = "flat"

    def __init__(self) -> None:
        super().__init__()
        self.index_type, self.device, self.exact = KINDS[self.kind]
        self.root = Path(tempfile.mkdtemp(prefix="rankstream-props-"))
        self.generation = 0
        self.model: dict[str, tuple[int, str]] = {}  # id -> (vector seed, color)
        self.index = None

    # -- the index and the model -----------------------------------------------------

    @property
    def folder(self) -> Path:
        return self.root / f"idx{self.generation}"

    def _open(self) -> None:
        self.index = open_index(self.folder, type=self.index_type, device=self.device)

    def _upsert(self, entries: list[tuple[str, int, str]]) -> None:
        docs = [Document(id=i, text=f"{i} written from seed {seed}", metadata={"color": color}) for i, seed, color in entries]
        self.index.upsert(docs, np.stack([vector(seed) for _, seed, _ in entries]))
        for doc_id, seed, color in entries:
            self.model[doc_id] = (seed, color)

    def teardown(self) -> None:
        if self.index is not None:
            self.index.close(save=False)
        shutil.rmtree(self.root, ignore_errors=True)

    @initialize(seed=st.integers(0, 10**6))
    def start(self, seed: int) -> None:
        self._open()
        rng = np.random.default_rng(seed)
        self._upsert([(f"p{i}", int(rng.integers(10**6)), COLORS[int(rng.integers(3))]) for i in range(FIRST)])
        self.reopen()  # IVF trains here, over enough passages

    # -- steps -----------------------------------------------------------------------

    @rule(entries=writes)
    def upsert(self, entries) -> None:
        self._upsert(entries)

    @rule(ids=st.lists(passage_ids, min_size=1, max_size=4, unique=True))
    def delete(self, ids) -> None:
        removed, _ = self.index.delete(ids)
        assert removed == sum(1 for i in ids if i in self.model)
        for doc_id in ids:
            self.model.pop(doc_id, None)

    @rule(seed=st.integers(0, 10**6), k=st.sampled_from([1, 5, 10, 40, 200]), color=st.none() | st.sampled_from(COLORS))
    def search(self, seed: int, k: int, color: str | None) -> None:
        self._check_search(vector(seed), k, color)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), color=st.booleans())
    def search_for_a_passage(self, data, color: bool) -> None:
        doc_id = data.draw(st.sampled_from(sorted(self.model)))
        seed, own_color = self.model[doc_id]
        hits = self._check_search(vector(seed), 10, own_color if color else None)
        assert doc_id in [hit.document.id for hit in hits], f"{doc_id} not in its own top 10"

    @rule()
    def save(self) -> None:
        self.index.save()

    @rule()
    def reopen(self) -> None:
        self.index.close()
        self.index = None
        report = check_index(self.folder)
        assert report.healthy, report.verdict()
        self._open()

    @rule()
    def crash_and_reopen(self) -> None:
        """What kill -9 leaves: the files as they are now (the store's WAL included), unsaved."""
        crashed = self.folder
        self.generation += 1
        self.folder.mkdir()
        for name in (DOCS, DOCS + "-wal", VECTORS, VECTORS_STATE, MANIFEST):
            if (crashed / name).exists():
                shutil.copyfile(crashed / name, self.folder / name)
        self.index.close(save=False)
        self._open()

    @rule()
    def back_up_and_switch(self) -> None:
        """Carry on with a backup of the live index: it must hold everything the model has."""
        source = self.folder
        self.generation += 1
        report = backup_index(source, self.folder)
        assert report.check.healthy and report.left_behind is None, report.summary()
        self.index.close(save=False)
        self._open()

    @invariant()
    def counts_agree(self) -> None:
        if self.index is not None:
            assert self.index.count == len(self.model)

    # -- the oracle ------------------------------------------------------------------

    def _check_search(self, query: np.ndarray, k: int, color: str | None):
        hits = self.index.search(query, k, {"color": color} if color else None)
        candidates = {i: (seed, c) for i, (seed, c) in self.model.items() if color is None or c == color}
        scores = {i: float(vector(seed) @ query) for i, (seed, _) in candidates.items()}
        expected = sorted(scores.values(), reverse=True)[:k]
        found = [hit.document.id for hit in hits]
        assert len(found) == len(expected), (found, len(expected))
        assert len(set(found)) == len(found), f"an id twice: {found}"
        for hit in hits:
            doc_id = hit.document.id
            assert doc_id in candidates, f"{doc_id} is deleted or does not match {color}"
            seed, own_color = candidates[doc_id]
            assert hit.document.text == f"{doc_id} written from seed {seed}", "a stale version"
            assert hit.document.metadata == {"color": own_color}
            assert abs(hit.score - scores[doc_id]) <= TOLERANCE, f"{doc_id} answered with another vector's score"
        if self.exact:
            np.testing.assert_allclose([hit.score for hit in hits], expected, rtol=0, atol=TOLERANCE)
        return hits


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_index_behaves_like_a_brute_force_model(kind, monkeypatch):
    if KINDS[kind][1].startswith("cuda"):
        stand_ins = gpu_standin.install(monkeypatch, max_k=GPU_K)
    machine = type(f"IndexMachine_{kind.replace('-', '_')}", (IndexMachine,), {"kind": kind})
    run_state_machine_as_test(machine, settings=SETTINGS)
    if KINDS[kind][1].startswith("cuda"):
        assert len(stand_ins) > 1 and all(k <= GPU_K for s in stand_ins for k in s.searches)
