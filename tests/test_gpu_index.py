"""GPU flat and IVF indexes under deletes (issue 8, defect 2), run on a stand-in that keeps
faiss-gpu's rules (no remove_ids, no ID selector, k <= 2048): deletes counted once, removed
vectors never reloaded as tombstones, and searches that stay within the k limit after
thousands of deletes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rankstream_server.config import IndexConfig
from rankstream_server.index.vectors import VectorIndex, exact_search

import gpu_standin
from index_helpers import documents, fill, open_index, unit_vectors

DIMENSION = 16


def _gpu_config(kind: str) -> IndexConfig:
    config = IndexConfig(name=kind, path="-", model="m", type=kind, device="cuda:0")
    config.ivf.nprobe = 1 << 16  # every list: the IVF answers exactly, so any difference is a bug
    return config


def _build(kind: str, count: int, seed: int = 3) -> tuple[VectorIndex, dict[int, np.ndarray]]:
    vectors = np.random.default_rng(seed).standard_normal((count, DIMENSION)).astype(np.float32)
    keys = np.arange(count, dtype=np.int64)
    index = VectorIndex.build(DIMENSION, keys, vectors, _gpu_config(kind))
    assert (index.built_type, index.device) == (kind, "cuda:0")
    return index, dict(zip(keys.tolist(), vectors))


def _assert_exact(index: VectorIndex, live: dict[int, np.ndarray], query: np.ndarray, k: int) -> None:
    keys = np.fromiter(live, dtype=np.int64, count=len(live))
    expected = exact_search(query, keys, np.stack([live[int(key)] for key in keys]), k)
    found = index.search(query, k)
    np.testing.assert_allclose(found.scores, expected.scores, rtol=0, atol=1e-4)
    assert set(found.keys.tolist()) <= set(live)
    for key, score in zip(found.keys.tolist(), found.scores.tolist()):  # each key's own vector
        assert abs(float(live[key] @ query) - score) < 1e-4


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_gpu_delete_is_counted_once(kind, monkeypatch):
    gpu_standin.install(monkeypatch)
    index, live = _build(kind, 400)
    index.remove(np.array([5, 6, 7], dtype=np.int64))
    assert index.count == 397
    for key in (5, 6, 7):
        del live[key]
    _assert_exact(index, live, live[8], 10)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_thousands_of_gpu_deletes_stay_within_the_k_limit(kind, monkeypatch):
    """k + tombstones passed 2048 after about 2,000 deletes, and every search failed."""
    stand_ins = gpu_standin.install(monkeypatch)
    index, live = _build(kind, 4500)
    doomed = np.random.default_rng(8).permutation(4500)[:2300]
    query = np.random.default_rng(9).standard_normal(DIMENSION).astype(np.float32)
    for start in range(0, len(doomed), 50):
        batch = doomed[start : start + 50]
        index.remove(batch)
        for key in batch.tolist():
            del live[key]
        if start % 500 == 0 or start + 50 >= len(doomed):
            for k in (10, 200, 2048, 3000):
                _assert_exact(index, live, query, k)
        assert index.count == len(live)
    assert index.count == 2200 and index.device == "cuda:0"
    assert index.tombstone_count < 2048 // 2, "the GPU copy is uploaded again before its tombstones pile up"
    assert len(stand_ins) > 1 and all(k <= 2048 for s in stand_ins for k in s.searches)
    assert sum(len(s.searches) for s in stand_ins) > 0, "searches with small k still run on the GPU"


def test_a_filtered_search_on_the_gpu_is_exact(monkeypatch):
    gpu_standin.install(monkeypatch)
    index, live = _build("flat", 300)
    index.remove(np.arange(0, 300, 4, dtype=np.int64))
    allowed = np.array([key for key in live if key % 4 and key % 3 == 0], dtype=np.int64)
    query = live[9]
    found = index.search(query, 10, allowed)
    expected = exact_search(query, allowed, np.stack([live[int(key)] for key in allowed]), 10)
    assert found.keys.tolist() == expected.keys.tolist()


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_deletes_are_neither_saved_nor_reloaded_as_tombstones(tmp_path, kind, monkeypatch):
    gpu_standin.install(monkeypatch)
    index = open_index(tmp_path / "idx", type=kind, device="cuda:0")
    vectors = fill(index, 120)
    index.close()
    index = open_index(tmp_path / "idx", type=kind, device="cuda:0")  # trained as IVF at this open
    assert (index.index_type, index.device, index.count) == (kind, "cuda:0", 120)
    deleted = [f"d{i}" for i in range(0, 120, 3)]
    assert index.delete(deleted)[0] == 40 and index.count == 80
    index.close()
    assert json.loads((tmp_path / "idx" / "vectors.json").read_text())["tombstones"] == []
    reopened = open_index(tmp_path / "idx", type=kind, device="cuda:0")
    assert reopened.count == 80
    for doc_id in ("d1", "d2", "d119"):
        assert reopened.search(vectors[doc_id], 1)[0].document.id == doc_id
    found = {hit.document.id for hit in reopened.search(vectors["d0"], 120)}
    assert len(found) == 80 and not found & set(deleted)
    reopened.close()


def test_tombstones_an_older_version_saved_for_a_gpu_flat_index_are_ignored(tmp_path):
    """Files saved by the GPU code before the fix list removed keys as tombstones although the
    CPU copy had already dropped them: reloading them took every delete off the count again."""
    index = open_index(tmp_path / "idx")
    fill(index, 30)
    index.delete(["d0", "d1"])
    index.close()
    state_path = tmp_path / "idx" / "vectors.json"
    state = json.loads(state_path.read_text())
    keys = [0, 1]  # the keys of d0 and d1 (keys are given in upsert order from 0)
    state_path.write_text(json.dumps({**state, "tombstones": keys}))
    reopened = open_index(tmp_path / "idx")
    assert reopened.count == 28
    assert len(reopened.search(unit_vectors(1, 5)[0], 50)) == 28
    reopened.close()


def test_an_out_of_memory_gpu_add_keeps_the_write(tmp_path, monkeypatch):
    """A CUDA error while adding to the GPU copy: the CPU copy has the change, searches move to
    it, the write is acknowledged and searchable, and the GPU copy comes back at the next save."""
    stand_ins = gpu_standin.install(monkeypatch)
    index = open_index(tmp_path / "idx", device="cuda:0")
    fill(index, 20)
    assert index.device == "cuda:0"
    stand_ins[-1].failing_adds = 1
    new = unit_vectors(1, 77)
    index.upsert(documents(["new"]), new)
    assert index.search(new[0], 1)[0].document.id == "new" and index.count == 21
    assert index.device == "cpu"
    index.save()
    assert index.device == "cuda:0"
    assert index.search(new[0], 1)[0].document.id == "new"
    assert stand_ins[-1].searches, "the search ran on the uploaded GPU copy"
    index.close()
