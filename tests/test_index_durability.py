"""The corpus survives what servers go through: kill -9 right after an acknowledged write, a
damaged FAISS file, a change of index type. And approximate indexes keep their recall."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc
from rankstream_server.config import IndexConfig, ModelConfig
from rankstream_server.index.corpus import passage_text
from rankstream_server.index.local import CorpusIndex
from rankstream_server.index.store import Document
from rankstream_server.index.vectors import VectorIndex, exact_search
from rankstream_server.inference.model_loading import load_model
from rankstream_server.inference.offline import encode_texts

import corpus_factory
import model_factory


@pytest.fixture(scope="module")
def tasb(tmp_path_factory) -> Path:
    return model_factory.tiny_distilbert_cls_bi_encoder(tmp_path_factory.mktemp("tasb") / "tasb")


def start_server(config: Path, log: Path) -> tuple[subprocess.Popen, grpc.Channel]:
    script = Path(sys.executable).with_name("rankstream")
    process = subprocess.Popen(
        [str(script), "serve", "--config", str(config)], stdout=subprocess.PIPE, stderr=log.open("a"), text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    port = int(process.stdout.readline().rsplit(":", 1)[1])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    info = pb_grpc.InfoStub(channel)
    for _ in range(600):
        try:
            info.ListModels(pb.ListModelsRequest(), timeout=5)
            return process, channel
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, log.read_text()
            time.sleep(0.1)
    raise AssertionError("server never became ready")


def all_ids(retriever: pb_grpc.RetrieverStub) -> dict[str, str]:
    messages = retriever.Retrieve(pb.RetrieveRequest(query="anything", top_k=1000, return_text=True), timeout=30)
    return {r.id: r.text for message in messages for r in message.passages}


def test_acknowledged_writes_survive_kill_9(tmp_path, tasb):
    config = tmp_path / "server.yaml"
    config.write_text(json.dumps({
        "server": {"host": "127.0.0.1", "port": 0},
        "models": [{"name": "tasb", "kind": "bi", "weights": str(tasb)}],
        # A long save interval: after kill -9 only the document store has the changes.
        "indexes": [{"name": "live", "path": str(tmp_path / "live"), "model": "tasb", "create": True,
                     "save_interval_seconds": 3600}],
    }))
    log = tmp_path / "server.log"
    process, channel = start_server(config, log)
    try:
        retriever = pb_grpc.RetrieverStub(channel)
        passages = [pb.Passage(id=f"doc{i}", text=f"passage {i} about topic {i % 4}", metadata={"n": str(i)}) for i in range(20)]
        retriever.UpsertPassages(pb.UpsertPassagesRequest(passages=passages), timeout=30)
        retriever.DeletePassages(pb.DeletePassagesRequest(ids=["doc3", "doc4", "doc5"]), timeout=30)
        retriever.UpsertPassages(pb.UpsertPassagesRequest(passages=[pb.Passage(id="doc7", text="doc seven, rewritten")]), timeout=30)
        acknowledged = retriever.UpsertPassages(pb.UpsertPassagesRequest(passages=[pb.Passage(id="last", text="written just before the crash")]), timeout=30)
        process.kill()  # SIGKILL right after the acknowledgement: no shutdown, no save
        process.wait()
    finally:
        channel.close()
        process.kill()
    assert acknowledged.count == 18
    expected = {f"doc{i}": f"passage {i} about topic {i % 4}" for i in range(20) if i not in (3, 4, 5)}
    expected.update({"doc7": "doc seven, rewritten", "last": "written just before the crash"})

    process, channel = start_server(config, log)
    try:
        assert all_ids(pb_grpc.RetrieverStub(channel)) == expected
        info = pb_grpc.InfoStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
        assert info.indexes[0].count == len(expected) and info.indexes[0].version == acknowledged.version
        assert "caught up" in log.read_text()
        process.terminate()
        assert process.wait(timeout=60) == 0
    finally:
        channel.close()
        process.kill()


def _open(folder: Path, tasb: Path, **overrides) -> CorpusIndex:
    loaded = load_model(ModelConfig(name="tasb", kind="bi", weights=str(tasb)))
    config = IndexConfig(name="t", path=str(folder), model="tasb", create=True, **overrides)
    return CorpusIndex.open(config, loaded.identity(), 32)


def _fill(index: CorpusIndex, tasb: Path, count: int) -> list[Document]:
    loaded = load_model(ModelConfig(name="tasb", kind="bi", weights=str(tasb)))
    documents = [Document(id=d["_id"], text=d["text"], title=d["title"]) for d in corpus_factory.make_documents(count)]
    index.upsert(documents, encode_texts(loaded, [passage_text(d.text, d.title) for d in documents], "passage"))
    return documents


def test_a_damaged_vector_file_is_rebuilt_from_the_store(tmp_path, tasb, caplog):
    index = _open(tmp_path / "idx", tasb)
    documents = _fill(index, tasb, 40)
    index.close()  # saves vectors.faiss
    vectors = tmp_path / "idx" / "vectors.faiss"
    vectors.write_bytes(vectors.read_bytes()[:-64] + b"\0" * 64)
    reopened = _open(tmp_path / "idx", tasb)
    assert reopened.count == 40
    query = np.ones(32, dtype=np.float32)
    assert len(reopened.search(query, 5)) == 5
    assert "checksum mismatch" in caplog.text
    reopened.close()
    assert documents


def test_changing_the_index_type_rebuilds_and_keeps_every_passage(tmp_path, tasb):
    index = _open(tmp_path / "idx", tasb)
    _fill(index, tasb, 60)
    index.close()
    hnsw = _open(tmp_path / "idx", tasb, type="hnsw")
    assert (hnsw.index_type, hnsw.count) == ("hnsw", 60)
    removed, _ = hnsw.delete(["d1", "d2"])
    assert removed == 2 and hnsw.count == 58
    hnsw.close()
    again = _open(tmp_path / "idx", tasb, type="hnsw")  # the tombstones were saved with it
    assert again.count == 58
    ids = {hit.document.id for hit in again.search(np.ones(32, dtype=np.float32), 100)}
    assert len(ids) == 58 and not ids & {"d1", "d2"}
    again.close()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_keep_recall_at_default_parameters(kind):
    """recall@10 against exact search, on real embeddings (the packaged all-MiniLM-L6-v2)."""
    loaded = load_model(ModelConfig(name="minilm", kind="bi", weights="embedded:all-MiniLM-L6-v2"))
    documents = corpus_factory.make_documents(1200, seed=5)
    vectors = encode_texts(loaded, [passage_text(d["text"], d["title"]) for d in documents], "passage")
    queries = encode_texts(loaded, [f"{d['topic']} notes on {d['text'][:40]}" for d in documents[::20]], "query")
    keys = np.arange(len(documents), dtype=np.int64)
    approximate = VectorIndex.build(vectors.shape[1], keys, vectors, IndexConfig(name=kind, path="-", model="m", type=kind))
    assert approximate.built_type == kind
    recalls = []
    for query in queries:
        exact = set(exact_search(query, keys, vectors, 10).keys.tolist())
        found = set(approximate.search(query, 10).keys.tolist())
        recalls.append(len(exact & found) / 10)
    recall = float(np.mean(recalls))
    print(f"{kind} recall@10 vs exact over {len(queries)} queries, {len(documents)} passages: {recall:.3f}")
    assert recall >= 0.95


def _assert_hits_are_their_documents(retriever, loaded, texts: dict[str, str], probes: list[str]) -> None:
    """Each probe is a live passage's own text: it must come back first, as itself, and every
    hit's score must be the query's similarity to the document the hit names."""
    query_vectors = encode_texts(loaded, [texts[i] for i in probes], "query")
    for probe, query_vector in zip(probes, query_vectors):
        messages = retriever.Retrieve(pb.RetrieveRequest(query=texts[probe], top_k=5, return_text=True), timeout=30)
        results = [r for message in messages for r in message.passages]
        hit_ids = [r.id for r in results]
        assert hit_ids[0] == probe, (probe, hit_ids)
        assert set(hit_ids) <= set(texts)
        assert [r.text for r in results] == [texts[i] for i in hit_ids]
        doc_vectors = encode_texts(loaded, [texts[i] for i in hit_ids], "passage")
        np.testing.assert_allclose([r.score for r in results], doc_vectors @ query_vector, atol=1e-4)


def test_ivf_deletes_and_replacements_through_a_real_server(tmp_path):
    """Issue 8, defect 1, as a client saw it. An IVF index trained at start-up, then deletes
    and a replacement: every later vector answered with its neighbour's document, and once
    the index had been saved and reopened, one DeletePassages aborted the server (SIGABRT)."""
    config = tmp_path / "server.yaml"
    config.write_text(json.dumps({
        "server": {"host": "127.0.0.1", "port": 0},
        # float32 pinned: hits' scores are checked against float32 embeddings to 1e-4 (issue 19).
        "models": [{"name": "minilm", "kind": "bi", "weights": "embedded:all-MiniLM-L6-v2", "dtype": "float32"}],
        "indexes": [{"name": "live", "path": str(tmp_path / "live"), "model": "minilm", "create": True, "type": "ivf"}],
    }))
    log = tmp_path / "server.log"
    documents = corpus_factory.make_documents(400, seed=21)
    texts = {d["_id"]: d["text"] for d in documents}
    loaded = load_model(ModelConfig(name="minilm", kind="bi", weights="embedded:all-MiniLM-L6-v2"))
    probes = [f"d{i}" for i in range(1, 400, 23)]

    def restart_and_check(changes) -> None:
        process, channel = start_server(config, log)
        try:
            retriever = pb_grpc.RetrieverStub(channel)
            info = pb_grpc.InfoStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
            assert info.indexes[0].index_type == "ivf"
            changes(retriever)
            assert process.poll() is None, log.read_text()[-3000:]
            _assert_hits_are_their_documents(retriever, loaded, texts, probes)
            process.terminate()
            assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
        finally:
            channel.close()
            process.kill()

    process, channel = start_server(config, log)  # created empty: too few vectors to train IVF yet
    try:
        retriever = pb_grpc.RetrieverStub(channel)
        for start in range(0, 400, 100):
            batch = [pb.Passage(id=d["_id"], text=d["text"]) for d in documents[start:start + 100]]
            retriever.UpsertPassages(pb.UpsertPassagesRequest(passages=batch), timeout=120)
        process.terminate()
        assert process.wait(timeout=60) == 0
    finally:
        channel.close()
        process.kill()

    def delete_and_replace(retriever) -> None:
        deleted = retriever.DeletePassages(pb.DeletePassagesRequest(ids=["d0", "d150"]), timeout=30)
        assert (deleted.deleted, deleted.count) == (2, 398)
        replaced = "a replaced note on the keel, the mainsail and a tide table"
        retriever.UpsertPassages(pb.UpsertPassagesRequest(passages=[pb.Passage(id="d24", text=replaced)]), timeout=30)
        del texts["d0"], texts["d150"]
        texts["d24"] = replaced
        probes.append("d24")

    def delete_more(retriever) -> None:
        deleted = retriever.DeletePassages(pb.DeletePassagesRequest(ids=["d2", "d3", "d399"]), timeout=30)
        assert (deleted.deleted, deleted.count) == (3, 395)
        for gone in ("d2", "d3", "d399"):
            del texts[gone]

    restart_and_check(delete_and_replace)  # the IVF is trained from the store at this start
    restart_and_check(delete_more)  # and loaded from vectors.faiss at this one
