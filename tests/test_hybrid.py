"""Hybrid retrieval: the BM25 side of a local index (scores as bm25s computes them), kept up to
date by every write (at once and after kill -9), filters on both sides, reciprocal rank fusion,
and the three modes through Retrieve and RetrieveAndRerank."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import bm25s
import grpc
import numpy as np
import pytest
import pytest_asyncio

from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc
from rankstream_server.config import IndexConfig
from rankstream_server.index.build import build_index
from rankstream_server.index.check import check_index
from rankstream_server.index.corpus import passage_text
from rankstream_server.index.local import CorpusIndex
from rankstream_server.index.sparse import BM25Tokenizer, reciprocal_rank_fusion
from rankstream_server.inference.model_loading import load_model
from rankstream_server.inference.offline import encode_texts

import corpus_factory
from conftest import make_settings, running

DOCS = corpus_factory.make_documents(150)
MODELS = [{"name": "minilm", "kind": "bi", "weights": "embedded:all-MiniLM-L6-v2"}]
QUERIES = ["mooring a boat at low tide", "spice blend for a slow braise", "comets orbit planet", "saffron"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    corpus = corpus_factory.write_beir(root / "corpus", DOCS)
    build_index(make_settings(MODELS), corpus, root / "docs", model="minilm", progress=False)
    shutil.copytree(root / "docs", root / "docs-hybrid")
    return root


@pytest_asyncio.fixture(scope="module")
async def served(built, models):
    indexes = [
        {"name": "docs", "path": str(built / "docs"), "model": "minilm"},
        {"name": "docs-hybrid", "path": str(built / "docs-hybrid"), "model": "minilm", "mode": "hybrid"},
        {"name": "live", "path": str(built / "live"), "model": "minilm", "create": True},
    ]
    settings = make_settings([*MODELS, {"name": "tiny-bert", "weights": str(models.bert)}], indexes=indexes,
                             default_model="tiny-bert")
    async with running(settings) as harness:
        harness.retriever = pb_grpc.RetrieverStub(harness.channel)
        yield harness


async def _retrieve(harness, **fields) -> list[pb.ScoredPassage]:
    call = harness.retriever.Retrieve(pb.RetrieveRequest(**fields), timeout=60)
    return [p async for message in call for p in message.passages]


def test_bm25_scores_equal_bm25s_for_the_same_tokens(built):
    keywords = BM25Tokenizer()
    texts = [passage_text(d["text"], d["title"]) for d in DOCS]
    reference = bm25s.BM25(method="robertson", k1=1.2, b=0.75)
    reference.index(keywords.tokenize(texts), show_progress=False)
    config = IndexConfig(name="docs", path=str(built / "docs"), model="minilm")
    index = CorpusIndex.open(config, load_model(make_settings(MODELS).model("minilm")).identity(), 384)
    try:
        for query in QUERIES:
            hits = index.sparse_search(query, 20)
            assert hits, query
            expected = reference.get_scores(keywords.tokenize([query])[0])
            by_id = {d["_id"]: i for i, d in enumerate(DOCS)}
            ours = np.array([hit.score for hit in hits])
            theirs = expected[[by_id[hit.document.id] for hit in hits]]
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
            assert list(ours) == sorted(ours, reverse=True)
            best = np.sort(expected)[::-1][: len(hits)]
            np.testing.assert_allclose(ours, best, rtol=1e-5, atol=1e-5)  # the same top scores: nothing missed
    finally:
        index.close()


def test_reciprocal_rank_fusion():
    fused = reciprocal_rank_fusion([(1, 0.9), (2, 0.8), (3, 0.7)], [(3, 12.0), (4, 11.0)], rrf_k=60, top_k=3)
    assert fused.keys.tolist() == [3, 1, 2]
    np.testing.assert_allclose(fused.scores, [1 / 63 + 1 / 61, 1 / 61, 1 / 62])
    assert fused.dense_ranks.tolist() == [3, 1, 2] and fused.sparse_ranks.tolist() == [1, 0, 0]
    assert fused.sparse_scores[0] == 12.0 and np.isnan(fused.sparse_scores[1])


@pytest.mark.parametrize("mode", [pb.DENSE, pb.SPARSE, pb.HYBRID])
async def test_each_mode_through_retrieve_with_both_sides_reported(served, mode):
    results = await _retrieve(served, index="docs", query="mooring a boat at low tide", top_k=10, mode=mode,
                              return_metadata=True)
    assert len(results) == 10 and [r.rank for r in results] == list(range(1, 11))
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    if mode == pb.DENSE:
        assert all(r.dense_rank == r.rank and r.HasField("dense_score") and not r.HasField("sparse_score") for r in results)
    elif mode == pb.SPARSE:
        assert all(r.sparse_rank == r.rank and r.sparse_score == r.score and not r.HasField("dense_score") for r in results)
    else:
        for r in results:
            expected = sum(1 / (60 + rank) for rank in (r.dense_rank, r.sparse_rank) if rank)
            assert r.score == pytest.approx(expected, rel=1e-5) and (r.dense_rank or r.sparse_rank)
        assert any(r.dense_rank and r.sparse_rank for r in results)


async def test_hybrid_fuses_what_each_mode_returns(served):
    query = "spice blend for a slow braise"
    dense = await _retrieve(served, index="docs", query=query, top_k=150, mode=pb.DENSE)
    sparse = await _retrieve(served, index="docs", query=query, top_k=150, mode=pb.SPARSE)
    hybrid = await _retrieve(served, index="docs", query=query, top_k=10, mode=pb.HYBRID)
    expected = reciprocal_rank_fusion([(i, r.score) for i, r in enumerate(dense)],
                                      [(next(i for i, d in enumerate(dense) if d.id == r.id), r.score) for r in sparse],
                                      rrf_k=60, top_k=10)
    assert [r.id for r in hybrid] == [dense[i].id for i in expected.keys.tolist()]


async def test_the_index_default_mode_and_list_models(served):
    default = await _retrieve(served, index="docs-hybrid", query="saffron", top_k=5)
    hybrid = await _retrieve(served, index="docs", query="saffron", top_k=5, mode=pb.HYBRID)
    assert [r.id for r in default] == [r.id for r in hybrid]
    info = await pb_grpc.InfoStub(served.channel).ListModels(pb.ListModelsRequest(), timeout=30)
    modes = {i.name: (i.sparse, i.default_mode) for i in info.indexes}
    assert modes["docs"] == (True, pb.DENSE) and modes["docs-hybrid"] == (True, pb.HYBRID)


@pytest.mark.parametrize("mode", [pb.SPARSE, pb.HYBRID])
async def test_filters_apply_to_both_sides_with_exact_top_k(served, mode):
    wanted = {"topic": "sailing", "lang": "de"}
    matching = {d["_id"] for d in DOCS if d["topic"] == "sailing" and d["lang"] == "de"}
    results = await _retrieve(served, index="docs", query="mooring a boat sailing tide", top_k=5, mode=mode, filter=wanted)
    assert len(results) == 5 and {r.id for r in results} <= matching
    everything = await _retrieve(served, index="docs", query="mooring a boat sailing tide", top_k=500, mode=mode, filter=wanted)
    assert {r.id for r in everything} <= matching
    if mode == pb.HYBRID:
        assert len(everything) == len(matching), "the dense side finds every matching passage"
        assert all(r.sparse_rank == 0 or r.sparse_rank <= len(matching) for r in everything)


async def test_retrieve_and_rerank_takes_the_mode(served):
    for mode in (pb.SPARSE, pb.HYBRID):
        candidates = await _retrieve(served, index="docs", query="saffron rice", top_k=8, mode=mode, return_text=True)
        call = served.retriever.RetrieveAndRerank(pb.RetrieveAndRerankRequest(
            index="docs", query="saffron rice", top_k=8, reranker="tiny-bert", mode=mode), timeout=60)
        reranked = [p async for message in call for p in message.passages]
        assert {r.id for r in reranked} == {r.id for r in candidates}
        first = {r.id: r.score for r in candidates}
        assert all(r.retrieval_score == pytest.approx(first[r.id]) for r in reranked)


async def test_upserts_and_deletes_reach_the_keyword_side_at_once(served):
    retriever = served.retriever
    passage = pb.Passage(id="kw-1", text="the quokka xylophonist rehearsed at dawn", metadata={"kind": "odd"})
    await retriever.UpsertPassages(pb.UpsertPassagesRequest(index="live", passages=[passage]), timeout=60)
    found = await _retrieve(served, index="live", query="xylophonist", top_k=3, mode=pb.SPARSE)
    assert [r.id for r in found] == ["kw-1"]
    await retriever.UpsertPassages(pb.UpsertPassagesRequest(index="live", passages=[
        pb.Passage(id="kw-1", text="now about a marimba player instead")]), timeout=60)
    assert await _retrieve(served, index="live", query="xylophonist", top_k=3, mode=pb.SPARSE) == []
    assert [r.id for r in await _retrieve(served, index="live", query="marimba", top_k=3, mode=pb.SPARSE)] == ["kw-1"]
    await retriever.DeletePassages(pb.DeletePassagesRequest(index="live", ids=["kw-1"]), timeout=60)
    assert await _retrieve(served, index="live", query="marimba", top_k=3, mode=pb.HYBRID) == []


async def test_bad_modes_are_refused(served):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _retrieve(served, index="docs", query="q", top_k=3, mode=7)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mode" in caught.value.details()


def test_the_keyword_side_is_rebuilt_when_missing_or_made_differently(built, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(built / "docs", folder)
    identity = load_model(make_settings(MODELS).model("minilm")).identity()
    config = IndexConfig(name="copy", path=str(folder), model="minilm")
    index = CorpusIndex.open(config, identity, 384)
    index.store.drop_sparse()  # as in a folder from before the keyword side existed
    index.close()
    index = CorpusIndex.open(config, identity, 384)
    assert index.store.sparse_count() == len(DOCS) and index.sparse_search("saffron", 3)
    index.close()
    unstemmed = config.model_copy(update={"sparse": config.sparse.model_copy(update={"stemmer": None})})
    index = CorpusIndex.open(unstemmed, identity, 384)
    assert index.store.sparse_settings()["stemmer"] is None
    index.close()
    assert check_index(folder).healthy


def test_keyword_writes_survive_kill_9(built, tmp_path):
    folder = tmp_path / "crash"
    shutil.copytree(built / "docs", folder)
    encoder = load_model(make_settings(MODELS).model("minilm"))
    vector = encode_texts(encoder, ["a tapir named quillon"], "passage", progress=False)
    np.save(tmp_path / "vector.npy", vector)
    script = f"""
import os, signal, numpy as np
from rankstream_server.config import IndexConfig
from rankstream_server.index.local import CorpusIndex
from rankstream_server.index.store import Document
index = CorpusIndex.open(IndexConfig(name="crash", path={str(folder)!r}, model="minilm"), {encoder.identity()!r}, 384)
index.upsert([Document(id="tapir", text="a tapir named quillon")], np.load({str(tmp_path / "vector.npy")!r}))
index.delete(["{DOCS[0]['_id']}"])
print("acknowledged", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "acknowledged" in done.stdout and done.returncode == -signal.SIGKILL, done.stderr
    index = CorpusIndex.open(IndexConfig(name="crash", path=str(folder), model="minilm"), encoder.identity(), 384)
    try:
        assert [hit.document.id for hit in index.sparse_search("quillon tapir", 3)] == ["tapir"]
        first = passage_text(DOCS[0]["text"], DOCS[0]["title"])
        assert DOCS[0]["_id"] not in [hit.document.id for hit in index.sparse_search(first, 150)]
        assert index.store.sparse_count() == len(DOCS)
    finally:
        index.close()
    assert check_index(folder).healthy



async def test_python_client_takes_the_mode(served):
    from rankstream import AsyncRankstreamClient

    async with AsyncRankstreamClient(f"127.0.0.1:{served.server.port}") as client:
        sparse = await client.retrieve("saffron rice", top_k=4, index="docs", mode="sparse")
        assert all(p.sparse_rank == p.rank and p.dense_score is None for p in sparse)
        hybrid = await client.retrieve_and_rerank("saffron rice", top_k=6, top_n=3, index="docs", reranker="tiny-bert",
                                                  mode="hybrid")
        assert len(hybrid) == 3 and all(p.dense_rank or p.sparse_rank for p in hybrid)
        with pytest.raises(ValueError, match="mode must be one of"):
            await client.retrieve("q", mode="fuzzy")
