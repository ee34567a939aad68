"""A vector-index failure after the store commit (issue 8, defect 4), say CUDA running out of
memory: the client is told clearly, and the committed row is never lost or left unsearchable:
not after the next save, not after a restart, not through a real server."""

from __future__ import annotations

import json
import sqlite3

import grpc
import numpy as np
import pytest

from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc
from rankstream_server.index.local import VectorsBehind
from rankstream_server.index.store import DocStore
from rankstream_server.index.vectors import VectorIndex

import gpu_standin
import model_factory
from conftest import make_settings, running
from index_helpers import DIMENSION, documents, fill, open_index, vector_of


def _fail_next(monkeypatch, method: str, times: int = 1) -> list[int]:
    """VectorIndex.<method> raises like a CUDA out-of-memory error the next `times` calls."""
    original = getattr(VectorIndex, method)
    left = [times]

    def failing(self, *args, **kwargs):
        if left[0]:
            left[0] -= 1
            raise RuntimeError("CUDA error: out of memory (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VectorIndex, method, failing)
    return left


def _ids_found(index, query: np.ndarray, k: int = 100) -> list[str]:
    return [hit.document.id for hit in index.search(query, k)]


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_a_failed_add_is_reported_and_searchable_after_the_next_save(tmp_path, monkeypatch, device):
    if device != "cpu":
        gpu_standin.install(monkeypatch)
    index = open_index(tmp_path / "idx", device=device)
    fill(index, 20)
    _fail_next(monkeypatch, "add")
    new = vector_of(500)
    with pytest.raises(VectorsBehind, match=r"stored \(version 2\) but not yet searchable") as caught:
        index.upsert(documents(["new"]), new[None, :])
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert index.store.count() == 21 and index.count == 21  # durable, and counted
    later = vector_of(501)
    index.upsert(documents(["later"]), later[None, :])  # later writes still apply
    assert _ids_found(index, later, 1) == ["later"]

    assert index.save()  # rebuilds from the store before it saves
    assert _ids_found(index, new, 1) == ["new"] and index.device == device
    assert json.loads((tmp_path / "idx" / "vectors.json").read_text())["version"] == index.version == 3
    index.close()
    reopened = open_index(tmp_path / "idx", device=device)
    assert reopened.count == 22 and _ids_found(reopened, new, 1) == ["new"]
    reopened.close()


def test_a_failed_delete_never_returns_the_deleted_passage(tmp_path, monkeypatch):
    index = open_index(tmp_path / "idx")
    vectors = fill(index, 20)
    _fail_next(monkeypatch, "remove")
    with pytest.raises(VectorsBehind):
        index.delete(["d3"])
    assert "d3" not in _ids_found(index, vectors["d3"])  # FAISS still has it; the store does not
    assert index.count == 19
    index.save()
    index.close()
    reopened = open_index(tmp_path / "idx")
    assert reopened.count == 19 and "d3" not in _ids_found(reopened, vectors["d3"])
    reopened.close()


def test_saves_never_record_a_version_the_vectors_do_not_have(tmp_path, monkeypatch):
    """While the rebuild fails too, no save writes vectors: a restart replays the store from
    the last version the saved vectors really have."""
    index = open_index(tmp_path / "idx")
    fill(index, 20)
    saved = json.loads((tmp_path / "idx" / "vectors.json").read_text())["version"]
    _fail_next(monkeypatch, "add", times=2)  # the write, then the rebuild at the save
    new = vector_of(600)
    with pytest.raises(VectorsBehind):
        index.upsert(documents(["new"]), new[None, :])
    with pytest.raises(RuntimeError, match="out of memory"):
        index.save()
    assert json.loads((tmp_path / "idx" / "vectors.json").read_text())["version"] == saved
    index.close(save=False)  # what a crash leaves behind
    reopened = open_index(tmp_path / "idx")
    assert reopened.count == 21 and _ids_found(reopened, new, 1) == ["new"]
    reopened.close()


def test_vectors_saved_behind_the_store_are_rebuilt_at_open(tmp_path):
    """Folders saved before the fix may record the store's version on vectors that lack rows:
    the open finds the disagreement and rebuilds instead of trusting them."""
    index = open_index(tmp_path / "idx")
    fill(index, 20)
    index.close()
    store = DocStore(tmp_path / "idx" / "docs.sqlite", DIMENSION)
    new = vector_of(700)
    _, _, version = store.upsert(documents(["lost"]), new[None, :])
    store.close()
    state_path = tmp_path / "idx" / "vectors.json"
    state_path.write_text(json.dumps({**json.loads(state_path.read_text()), "version": version}))
    reopened = open_index(tmp_path / "idx")
    assert reopened.count == 21 and _ids_found(reopened, new, 1) == ["lost"]
    reopened.close()


@pytest.fixture(scope="module")
def tasb(tmp_path_factory):
    return model_factory.tiny_distilbert_cls_bi_encoder(tmp_path_factory.mktemp("tasb") / "tasb")


async def test_a_client_gets_a_clear_status_and_the_write_is_not_lost(tmp_path, tasb, monkeypatch):
    settings = make_settings(
        [{"name": "tasb", "kind": "bi", "weights": str(tasb)}],
        indexes=[{"name": "live", "path": str(tmp_path / "live"), "model": "tasb", "create": True, "device": "cpu"}],
    )
    async with running(settings) as harness:
        retriever = pb_grpc.RetrieverStub(harness.channel)
        passages = [pb.Passage(id=f"p{i}", text=f"passage number {i} about sailing and tides") for i in range(5)]
        await retriever.UpsertPassages(pb.UpsertPassagesRequest(passages=passages), timeout=30)
        _fail_next(monkeypatch, "add")
        text = "the mooring line parted in the storm"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await retriever.UpsertPassages(pb.UpsertPassagesRequest(passages=[pb.Passage(id="storm", text=text)]), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        message = caught.value.details()
        assert "stored (version 2) but not yet searchable" in message and "retrying the request is safe" in message
        assert "Traceback" not in message and "File " not in message
        harness.server._readiness.registry.save_indexes()  # what the periodic save does
        results = [p async for m in retriever.Retrieve(pb.RetrieveRequest(query=text, top_k=6), timeout=30) for p in m.passages]
        assert results[0].id == "storm" and len(results) == 6


class _CommitFails:
    """A connection whose COMMIT fails the way a full disk does: SQLite rolls the transaction
    back itself, so a ROLLBACK after it fails too ("no transaction is active")."""

    def __init__(self, db):
        self._db = db

    def execute(self, sql, *args):
        if sql == "COMMIT":
            self._db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


@pytest.mark.parametrize("write", ["upsert", "delete"])
def test_a_failed_commit_is_reported_as_itself_and_writes_nothing(tmp_path, write):
    """Issue 8, item 8: the ROLLBACK after a failed COMMIT raised its own error and hid the real one."""
    store = DocStore(tmp_path / "docs.sqlite", DIMENSION)
    store.upsert(documents(["a", "b"]), np.stack([vector_of(1), vector_of(2)]))
    real = store._db
    store._db = _CommitFails(real)
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        if write == "upsert":
            store.upsert(documents(["c"]), vector_of(3)[None, :])
        else:
            store.delete(["a"])
    store._db = real
    assert store.version == 1 and store.count() == 2
    store.upsert(documents(["c"]), vector_of(3)[None, :])  # the connection is still usable
    assert store.version == 2 and store.count() == 3
    store.close()
