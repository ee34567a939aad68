"""The Milvus backend keeps the local backend's contract: one server holds the same corpus in a
local index and in a Milvus collection (on a milvus-lite server), and every call must answer the
same through both: ids, scores, ranks, text, metadata, filters, exact top_k, thresholds,
RetrieveAndRerank, and upsert/replace/delete counts."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import pytest_asyncio

from milvus_helpers import milvus_lite_server
from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc
from rankstream_server.config import IndexConfig
from rankstream_server.index.build import build_index
from rankstream_server.index.milvus import filter_expression

import corpus_factory
from conftest import make_settings, running

DOCS = corpus_factory.make_documents(150)
TOLERANCE = 1e-5
# float32 pinned: scores are compared with the local index's to 1e-5, and bfloat16 (dtype auto on
# an AMX CPU, issue 19) embeds the same text ~1e-3 differently in different batch layouts.
MODELS = [{"name": "minilm", "kind": "bi", "weights": "embedded:all-MiniLM-L6-v2", "dtype": "float32"}]


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory):
    with milvus_lite_server(tmp_path_factory.mktemp("milvus") / "data") as uri:
        yield uri


def _passages(docs) -> list[pb.Passage]:
    return [pb.Passage(id=d["_id"], text=d["text"], title=d["title"],
                       metadata={"topic": d["topic"], "lang": d["lang"], "year": str(d["year"])}) for d in docs]


@pytest_asyncio.fixture(scope="module")
async def both(tmp_path_factory, milvus_uri, models):
    root = tmp_path_factory.mktemp("milvus-contract")
    corpus = corpus_factory.write_beir(root / "corpus", DOCS)
    build_index(make_settings(MODELS), corpus, root / "docs", model="minilm", progress=False)
    milvus = {"uri": milvus_uri, "collection": "contract_docs"}
    indexes = [
        {"name": "local", "path": str(root / "docs"), "model": "minilm"},
        {"name": "milvus", "backend": "milvus", "milvus": milvus, "model": "minilm"},
        {"name": "local-live", "path": str(root / "live"), "model": "minilm", "create": True},
        {"name": "milvus-live", "backend": "milvus", "milvus": {**milvus, "collection": "contract_live"}, "model": "minilm"},
    ]
    settings = make_settings([*MODELS, {"name": "tiny-bert", "weights": str(models.bert)}], indexes=indexes,
                             default_model="tiny-bert")
    async with running(settings) as harness:
        harness.retriever = pb_grpc.RetrieverStub(harness.channel)
        for start in range(0, len(DOCS), 50):
            await harness.retriever.UpsertPassages(
                pb.UpsertPassagesRequest(index="milvus", passages=_passages(DOCS[start:start + 50])), timeout=120)
        yield harness


async def _retrieve(harness, index: str, **fields) -> list[pb.ScoredPassage]:
    call = harness.retriever.Retrieve(pb.RetrieveRequest(index=index, **fields), timeout=60)
    return [p async for message in call for p in message.passages]


def _same(local: list[pb.ScoredPassage], milvus: list[pb.ScoredPassage]) -> None:
    assert [p.id for p in milvus] == [p.id for p in local]
    np.testing.assert_allclose([p.score for p in milvus], [p.score for p in local], rtol=0, atol=TOLERANCE)
    assert [p.rank for p in milvus] == [p.rank for p in local]
    assert [(p.text, p.title, dict(p.metadata)) for p in milvus] == [(p.text, p.title, dict(p.metadata)) for p in local]


@pytest.mark.parametrize("query", ["how do comets orbit a planet", "mooring a boat at low tide", "saffron"])
async def test_retrieve_answers_as_the_local_index(both, query):
    for top_k in (1, 10, 150):
        fields = {"query": query, "top_k": top_k, "return_text": True, "return_metadata": True}
        _same(await _retrieve(both, "local", **fields), await _retrieve(both, "milvus", **fields))


@pytest.mark.parametrize("wanted", [{"topic": "sailing"}, {"topic": "sailing", "lang": "de"}, {"topic": "nothing"},
                                    {"topic": 'a"b\\c or 1 == 1'}])
async def test_filters_give_exactly_top_k_matching_as_the_local_index(both, wanted):
    for top_k in (5, 500):
        fields = {"query": "mooring a boat at low tide", "top_k": top_k, "filter": wanted, "return_metadata": True}
        local, milvus = await _retrieve(both, "local", **fields), await _retrieve(both, "milvus", **fields)
        _same(local, milvus)
        matching = [d for d in DOCS if all(str(d.get(k)) == v for k, v in wanted.items())]
        assert len(milvus) == min(top_k, len(matching))


def test_filter_values_are_quoted_never_spliced():
    assert filter_expression({"k": 'x" or id != "'}) == 'metadata["k"] == "x\\" or id != \\""'
    assert filter_expression(None) == "" and filter_expression({}) == ""


async def test_threshold_and_retrieve_and_rerank_as_the_local_index(both):
    everything = await _retrieve(both, "local", query="saffron", top_k=20)
    cut = everything[5].score
    _same(await _retrieve(both, "local", query="saffron", top_k=20, score_threshold=cut),
          await _retrieve(both, "milvus", query="saffron", top_k=20, score_threshold=cut))
    for index in ("local", "milvus"):
        call = both.retriever.RetrieveAndRerank(pb.RetrieveAndRerankRequest(
            index=index, query="spice blend for a slow braise", top_k=12, top_n=4, reranker="tiny-bert"), timeout=60)
        ranked = [p async for message in call for p in message.passages]
        if index == "local":
            expected = ranked
    assert [(p.id, p.rank) for p in ranked] == [(p.id, p.rank) for p in expected]
    np.testing.assert_allclose([p.score for p in ranked], [p.score for p in expected], atol=1e-6)


async def test_upsert_replace_and_delete_answer_as_the_local_index(both):
    retriever = both.retriever
    new = [pb.Passage(id=f"n{i}", text=f"fresh passage number {i} about kites", metadata={"batch": "1"}) for i in range(5)]
    answers = {}
    for index in ("local-live", "milvus-live"):
        first = await retriever.UpsertPassages(pb.UpsertPassagesRequest(index=index, passages=new), timeout=60)
        replaced = await retriever.UpsertPassages(pb.UpsertPassagesRequest(
            index=index, passages=[pb.Passage(id="n0", text="a replaced passage about submarines")]), timeout=60)
        assert replaced.version > first.version
        deleted = await retriever.DeletePassages(pb.DeletePassagesRequest(index=index, ids=["n1", "n2", "ghost"]), timeout=60)
        again = await retriever.DeletePassages(pb.DeletePassagesRequest(index=index, ids=["n1"]), timeout=60)
        hits = await _retrieve(both, index, query="kites", top_k=10, return_text=True, return_metadata=True)
        answers[index] = ((first.upserted, first.count), replaced.count, (deleted.deleted, deleted.not_found, deleted.count),
                          (again.deleted, again.not_found), sorted((p.id, p.text, tuple(p.metadata.items())) for p in hits))
    assert answers["milvus-live"] == answers["local-live"]
    assert answers["milvus-live"][2] == (2, 1, 3)


async def test_list_models_describes_the_milvus_index(both):
    info = await pb_grpc.InfoStub(both.channel).ListModels(pb.ListModelsRequest(), timeout=30)
    milvus = next(i for i in info.indexes if i.name == "milvus")
    assert (milvus.count, milvus.dimension, milvus.index_type, milvus.device) == (len(DOCS), 384, "milvus:FLAT", "milvus")


async def test_an_unreachable_milvus_fails_start_up_with_one_line(models):
    from rankstream_server.errors import ModelLoadError
    from rankstream_server.index.milvus import MilvusIndex

    config = IndexConfig(name="gone", backend="milvus", model="minilm",
                         milvus={"uri": "http://127.0.0.1:1", "collection": "x", "timeout_seconds": 2})
    with pytest.raises(ModelLoadError, match="index 'gone'.*Milvus"):
        MilvusIndex.open(config, {"similarity": "cosine"}, 384)


async def test_keyword_modes_on_milvus_say_why_not(both):
    for mode in (pb.SPARSE, pb.HYBRID):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _retrieve(both, "milvus", query="saffron", top_k=3, mode=mode)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "has none" in caught.value.details()
    with pytest.raises(ValueError, match="backend milvus serves mode dense only"):
        IndexConfig(name="a", backend="milvus", model="m", mode="hybrid", milvus={"uri": "x", "collection": "c"})


def test_config_needs_the_backend_settings():
    with pytest.raises(ValueError, match="backend milvus needs a milvus section"):
        IndexConfig(name="a", backend="milvus", model="m")
    with pytest.raises(ValueError, match="path is required"):
        IndexConfig(name="a", model="m")


async def test_bad_requests_get_the_same_statuses(both):
    for index in ("local", "milvus"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _retrieve(both, index, query="q", top_k=3, filter={"": "x"})
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_index_build_fills_a_milvus_collection(milvus_uri, tmp_path):
    """`rankstream index build --index NAME` with a backend: milvus index upserts the corpus."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    corpus = corpus_factory.write_beir(tmp_path / "corpus", DOCS[:40])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": MODELS, "indexes": [
        {"name": "built", "backend": "milvus", "model": "minilm", "milvus": {"uri": milvus_uri, "collection": "built_by_cli"}}]}))
    done = subprocess.run([str(Path(sys.executable).with_name("rankstream")), "index", "build", "--config", str(config),
                           "--corpus", str(corpus), "--index", "built"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "40 passages there now" in done.stdout
