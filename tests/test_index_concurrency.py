"""Writers, filtered and unfiltered readers and saves against one CorpusIndex, in threads: no
exception, and no reader ever gets a deleted passage, a stale version of one, or a passage
under another's vector.

Each write gets a sequence number when it starts and when it is acknowledged; so does each
search. A hit for passage X at version v is right when v is the version of the last write to
X acknowledged before the search started, or of a write to X that overlapped the search, and
is not a deletion. Each writer owns its own passages, so writes to one passage never overlap.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import numpy as np
import pytest

from rankstream_server.index.store import Document

import gpu_standin
from index_helpers import COLORS, DIMENSION, open_index

PASSAGES = 120
WRITERS = 2
READERS = 3
WRITES_PER_WRITER = 150


@dataclass(frozen=True)
class Write:
    start: int
    ack: int
    version: int | None  # None: deleted
    color: str | None


def vector(doc_id: str, version: int) -> np.ndarray:
    v = np.random.default_rng([int(doc_id[1:]), version]).standard_normal(DIMENSION).astype(np.float32)
    return v / np.linalg.norm(v)


def document(doc_id: str, version: int, color: str) -> Document:
    return Document(id=doc_id, text=f"{doc_id} version {version}", metadata={"color": color, "version": str(version)})


@pytest.mark.parametrize("kind", ["flat", "hnsw", "gpu-flat"])
def test_readers_never_see_deleted_or_stale_passages_while_writers_write(tmp_path, kind, monkeypatch):
    if kind == "gpu-flat":
        gpu_standin.install(monkeypatch, max_k=16)  # small: tombstones, uploads and CPU fallbacks all happen
    index = open_index(tmp_path / "idx", type=kind.removeprefix("gpu-"), device="cuda:0" if kind.startswith("gpu") else "cpu")
    ids = [f"p{i}" for i in range(PASSAGES)]
    colors = {doc_id: COLORS[i % 3] for i, doc_id in enumerate(ids)}
    index.upsert([document(i, 0, colors[i]) for i in ids], np.stack([vector(i, 0) for i in ids]))
    history = {doc_id: [Write(-1, -1, 0, colors[doc_id])] for doc_id in ids}
    sequence = itertools.count()
    sequence_lock = threading.Lock()

    def tick() -> int:
        with sequence_lock:
            return next(sequence)

    searches: list[tuple[int, int, str | None, np.ndarray, list]] = []
    errors: list[BaseException] = []
    writing = threading.Event()
    writing.set()

    def writer(number: int) -> None:
        rng = np.random.default_rng(number)
        mine = ids[number::WRITERS]
        versions = dict.fromkeys(mine, 0)
        try:
            for _ in range(WRITES_PER_WRITER):
                doc_id = mine[int(rng.integers(len(mine)))]
                start = tick()
                if rng.random() < 0.3 and history[doc_id][-1].version is not None:
                    index.delete([doc_id])
                    history[doc_id].append(Write(start, tick(), None, None))
                else:
                    versions[doc_id] += 1
                    version, color = versions[doc_id], COLORS[int(rng.integers(3))]
                    index.upsert([document(doc_id, version, color)], vector(doc_id, version)[None, :])
                    history[doc_id].append(Write(start, tick(), version, color))
        except BaseException as error:  # noqa: BLE001 - handed to the test
            errors.append(error)

    def reader(number: int) -> None:
        rng = np.random.default_rng(100 + number)
        try:
            while writing.is_set():
                query = rng.standard_normal(DIMENSION).astype(np.float32)
                color = None if rng.random() < 0.3 else COLORS[int(rng.integers(3))]
                k = int(rng.choice([1, 10, 50]))
                start = tick()
                hits = index.search(query, k, {"color": color} if color else None)
                searches.append((start, tick(), color, query, hits))
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    def saver() -> None:
        try:
            while writing.is_set():
                index.save()
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    others = [threading.Thread(target=reader, args=(n,)) for n in range(READERS)] + [threading.Thread(target=saver)]
    for thread in writers + others:
        thread.start()
    for thread in writers:
        thread.join()
    writing.clear()
    for thread in others:
        thread.join()
    assert not errors, errors

    checked = 0
    for start, end, color, query, hits in searches:
        found = [hit.document.id for hit in hits]
        assert len(set(found)) == len(found)
        for hit in hits:
            doc_id = hit.document.id
            version = int(hit.document.metadata["version"])
            writes = history[doc_id]
            last_before = max((w for w in writes if w.ack < start), key=lambda w: w.ack)
            overlapping = [w for w in writes if w.start < end and w.ack > start]
            allowed = {w.version for w in [last_before, *overlapping] if w.version is not None}
            assert version in allowed, f"{doc_id} v{version} returned; allowed then: {sorted(allowed)} (deleted or stale)"
            written = next(w for w in writes if w.version == version)
            assert hit.document.metadata["color"] == written.color and hit.document.text == f"{doc_id} version {version}"
            assert color is None or written.color == color
            assert abs(hit.score - float(vector(doc_id, version) @ query)) < 1e-4, "a passage under another's vector"
            checked += 1
    assert len(searches) > 50 and checked > 500, (len(searches), checked)
    live = {doc_id for doc_id, writes in history.items() if writes[-1].version is not None}
    assert index.count == len(live)
    index.close()
    reopened = open_index(tmp_path / "idx", type=kind.removeprefix("gpu-"))
    assert reopened.count == len(live)
    reopened.close()
