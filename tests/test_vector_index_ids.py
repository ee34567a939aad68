"""Every index type maps each vector to its own key through deletes, replacements, saves and
reopens (issue 8, defect 1: IVF inside an IndexIDMap2 returned its neighbour's key after a
remove, and a reopened one aborted the process in IndexIDMap::remove_ids)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rankstream_server.config import IndexConfig
from rankstream_server.index.vectors import VectorIndex

DIMENSION = 16


def _vectors(count: int, seed: int = 3) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIMENSION)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _build(kind: str, keys: np.ndarray, vectors: np.ndarray) -> VectorIndex:
    config = IndexConfig(name=kind, path="-", model="m", type=kind)
    config.ivf.nprobe = 1 << 16  # search every list: any miss is a wrong id, not approximation
    index = VectorIndex.build(DIMENSION, keys, vectors, config)
    assert index.built_type == kind
    return index


def _assert_each_finds_itself(index: VectorIndex, live: dict[int, np.ndarray]) -> None:
    wrong = {}
    for key, vector in live.items():
        found = index.search(vector, 1).keys.tolist()
        if found != [key]:
            wrong[key] = found
    assert not wrong, f"{len(wrong)} of {len(live)} vectors map to another key, e.g. {list(wrong.items())[:5]}"
    assert index.count == len(live)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_delete_and_replace_keep_every_key_on_its_vector(kind):
    vectors = _vectors(400)
    keys = np.arange(1000, 1400, dtype=np.int64)
    index = _build(kind, keys, vectors)
    live = dict(zip(keys.tolist(), vectors))

    index.remove(np.array([1000], dtype=np.int64))  # one delete
    del live[1000]
    _assert_each_finds_itself(index, live)

    # A replacement: the old key goes, the new key comes with a new vector.
    replacement = _vectors(1, seed=99)
    index.remove(np.array([1200], dtype=np.int64))
    index.add(np.array([5000], dtype=np.int64), replacement)
    del live[1200]
    live[5000] = replacement[0]
    _assert_each_finds_itself(index, live)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_a_reopened_index_deletes_without_shifting_ids(tmp_path, kind):
    vectors = _vectors(400, seed=5)
    keys = np.arange(400, dtype=np.int64)
    index = _build(kind, keys, vectors)
    index.remove(np.array([7, 8], dtype=np.int64))
    path = str(tmp_path / "vectors.faiss")
    tombstones = index.save(path)

    reopened = VectorIndex.load(path, index.config, kind, tombstones)
    reopened.remove(np.array([10, 11, 12], dtype=np.int64))
    live = {int(k): v for k, v in zip(keys, vectors) if k not in (7, 8, 10, 11, 12)}
    _assert_each_finds_itself(reopened, live)


def test_delete_on_a_reopened_ivf_does_not_abort_the_process(tmp_path):
    """faiss asserts (SIGABRT) inside IndexIDMap::remove_ids on the old layout: run it in a child."""
    script = textwrap.dedent(
        f"""
        import numpy as np
        from rankstream_server.config import IndexConfig
        from rankstream_server.index.vectors import VectorIndex
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((400, 16)).astype(np.float32)
        config = IndexConfig(name="ivf", path="-", model="m", type="ivf")
        index = VectorIndex.build(16, np.arange(400, dtype=np.int64), vectors, config)
        index.remove(np.array([3], dtype=np.int64))
        path = {str(tmp_path / "v.faiss")!r}
        index.save(path)
        reopened = VectorIndex.load(path, config, "ivf", [])
        for key in range(0, 400, 7):
            reopened.remove(np.array([key], dtype=np.int64))
        reopened.add(np.array([9999], dtype=np.int64), vectors[:1])
        print("count", reopened.count)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    expected = 400 - len({3} | set(range(0, 400, 7))) + 1
    assert done.stdout.split() == ["count", str(expected)]


def test_an_ivf_saved_in_the_old_id_map_layout_is_rebuilt(tmp_path):
    """Files written before the fix hold an IVF inside IndexIDMap2, possibly already wrong:
    loading one must refuse it, so the caller rebuilds from the document store."""
    import faiss

    vectors = _vectors(400)
    quantizer = faiss.IndexFlatIP(DIMENSION)
    ivf = faiss.IndexIVFFlat(quantizer, DIMENSION, 4, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors)
    old = faiss.IndexIDMap2(ivf)
    old.add_with_ids(vectors, np.arange(400, dtype=np.int64))
    path = str(tmp_path / "old.faiss")
    faiss.write_index(old, path)
    config = IndexConfig(name="ivf", path="-", model="m", type="ivf")
    with pytest.raises(ValueError, match="layout"):
        VectorIndex.load(path, config, "ivf", [])
