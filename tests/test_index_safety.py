"""An index under concurrent load (issue 8, defects 3 and 5): a filtered search racing a delete
never fails or returns a deleted passage, searches run side by side, and a save stalls neither
searches nor writes."""

from __future__ import annotations

import threading

import numpy as np

from rankstream_server.index import local as corpus_index_module
from rankstream_server.index.vectors import VectorIndex

from index_helpers import documents, fill, open_index, vector_of

WAIT = 10.0  # seconds a thread gets to finish what must not be blocked; only ever reached on failure


def _in_thread(function, *args) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_filtered_search_racing_a_delete_neither_fails_nor_returns_it(tmp_path, monkeypatch):
    """Defect 3: the matching keys were read, then a delete landed, then the search read the
    vectors of keys that were gone: KeyError, and the client got INTERNAL."""
    index = open_index(tmp_path / "idx")
    vectors = fill(index, 30)
    red = [doc_id for doc_id in vectors if int(doc_id[1:]) % 3 == 0]
    victim = red[0]
    store = index.store
    original = store.keys_matching
    deleters: list[threading.Thread] = []

    def keys_then_delete(metadata_filter):
        keys = original(metadata_filter)
        if not deleters:  # the first time: a delete lands right after the keys were read
            thread, _ = _in_thread(index.delete, [victim])
            deleters.append(thread)
            thread.join(0.5)  # done by now, unless the search rightly holds it off
        return keys

    monkeypatch.setattr(store, "keys_matching", keys_then_delete)
    hits = index.search(vectors[victim], 10, {"color": "red"})
    deleters[0].join(WAIT)
    found = [hit.document.id for hit in hits]
    # The search came first (it holds the delete off), so it sees every red passage, the victim too.
    assert sorted(found) == sorted(red) and all(hit.document.metadata == {"color": "red"} for hit in hits)
    after = [hit.document.id for hit in index.search(vectors[victim], 10, {"color": "red"})]
    assert victim not in after and len(after) == len(red) - 1
    index.close()


def test_searches_run_side_by_side(tmp_path, monkeypatch):
    """Defect 5: one lock serialized every search."""
    index = open_index(tmp_path / "idx")
    vectors = fill(index, 20)
    inside = threading.Event()
    release = threading.Event()
    original = VectorIndex.search
    calls = []

    def slow_first_search(self, query, k, allowed=None):
        calls.append(k)
        if len(calls) == 1:
            inside.set()
            release.wait(6 * WAIT)  # the test releases it; the timeout only ends a hung test
        return original(self, query, k, allowed)

    monkeypatch.setattr(VectorIndex, "search", slow_first_search)
    first, first_outcome = _in_thread(index.search, vectors["d1"], 3)
    assert inside.wait(WAIT)
    second, second_outcome = _in_thread(index.search, vectors["d2"], 3)
    second.join(WAIT)
    finished_alongside = not second.is_alive()
    release.set()
    first.join(WAIT)
    second.join(WAIT)
    assert finished_alongside, "a search waited for another search to finish"
    assert [h.document.id for h in second_outcome["value"]][0] == "d2"
    assert [h.document.id for h in first_outcome["value"]][0] == "d1"
    index.close()


def test_a_save_stalls_neither_searches_nor_writes(tmp_path, monkeypatch):
    """Defect 5: save() held every lock through writing the vectors file and hashing it."""
    index = open_index(tmp_path / "idx")
    vectors = fill(index, 20)
    writing = threading.Event()
    release = threading.Event()
    original = corpus_index_module.save_vectors

    def slow_save_vectors(*args, **kwargs):
        writing.set()
        release.wait(6 * WAIT)  # the test releases it; the timeout only ends a hung test
        return original(*args, **kwargs)

    monkeypatch.setattr(corpus_index_module, "save_vectors", slow_save_vectors)
    saver, save_outcome = _in_thread(index.save)
    assert writing.wait(WAIT)
    searcher, search_outcome = _in_thread(index.search, vectors["d4"], 3)
    searcher.join(WAIT)
    searched_during_save = not searcher.is_alive()
    new = vector_of(1234)
    writer, write_outcome = _in_thread(index.upsert, documents(["new"]), new[None, :])
    writer.join(WAIT)
    wrote_during_save = not writer.is_alive()
    release.set()
    for thread in (saver, searcher, writer):
        thread.join(WAIT)
    assert searched_during_save, "a search waited for a save"
    assert wrote_during_save, "a write waited for a save to write its file"
    assert save_outcome == {"value": True} and "error" not in write_outcome
    assert [h.document.id for h in search_outcome["value"]][0] == "d4"
    # The save wrote the state it snapshotted; the write that came during it is caught up later.
    assert index.search(new, 1)[0].document.id == "new"
    index.close(save=False)
    reopened = open_index(tmp_path / "idx")
    assert reopened.count == 21 and reopened.search(new, 1)[0].document.id == "new"
    assert np.isclose(reopened.search(vectors["d4"], 1)[0].score, 1.0, atol=1e-5)
    reopened.close()
