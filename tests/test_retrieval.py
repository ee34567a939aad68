"""Retrieve over a real server: bi-encoder parity, exact search, filters, RetrieveAndRerank,
online upserts and deletes, index manifests, and the eval command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from sentence_transformers import SentenceTransformer

from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc
from rankstream_server.config import IndexConfig, ModelConfig, load_settings
from rankstream_server.errors import ModelLoadError
from rankstream_server.index.build import build_index
from rankstream_server.index.corpus import passage_text
from rankstream_server.index.local import CorpusIndex, IndexMismatch
from rankstream_server.index.store import DocStore
from rankstream_server.inference.embedded import embedded_model_path
from rankstream_server.inference.model_loading import load_model
from rankstream_server.inference.offline import encode_texts

import corpus_factory
import model_factory
from conftest import make_settings, running

DOCS = corpus_factory.make_documents(150)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def bi_models(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("bi")
    # float32 pinned: embeddings and scores are compared with float32 references to 1e-5.
    return {
        "minilm": {"name": "minilm", "kind": "bi", "weights": "embedded:all-MiniLM-L6-v2", "dtype": "float32"},
        "tiny-tasb": {"name": "tiny-tasb", "kind": "bi", "weights": str(model_factory.tiny_distilbert_cls_bi_encoder(root / "tasb")),
                      "dtype": "float32"},
        "tiny-bert": {"name": "tiny-bert", "weights": str(models.bert), "dtype": "float32"},
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory, bi_models):
    """An index folder built by `build_index` from a BEIR corpus the test wrote."""
    root = tmp_path_factory.mktemp("indexes")
    corpus = corpus_factory.write_beir(root / "corpus", DOCS)
    settings = make_settings(list(bi_models.values()))
    report = build_index(settings, corpus, root / "docs", model="minilm", progress=False)
    assert report.count == len(DOCS)
    shutil.copytree(root / "docs", root / "docs-hnsw")  # one writer per folder: each index has its own
    return root


@pytest_asyncio.fixture(scope="module")
async def retrieval(built, bi_models):
    indexes = [
        {"name": "docs", "path": str(built / "docs"), "model": "minilm"},
        {"name": "docs-hnsw", "path": str(built / "docs-hnsw"), "model": "minilm", "type": "hnsw"},
        {"name": "live", "path": str(built / "live"), "model": "tiny-tasb", "create": True},
    ]
    settings = make_settings(list(bi_models.values()), indexes=indexes, default_model="tiny-bert")
    async with running(settings) as harness:
        harness.retriever = pb_grpc.RetrieverStub(harness.channel)
        yield harness


async def stream(call) -> tuple[list[pb.ScoredPassage], pb.RerankStats]:
    from conftest import stats_of

    passages = [p async for message in call for p in message.passages]
    return passages, stats_of(await call.trailing_metadata())


def query_vector(weights: str, text: str) -> np.ndarray:
    loaded = load_model(ModelConfig(name="q", kind="bi", weights=weights))
    return encode_texts(loaded, [text], "query")[0]


# -- bi-encoders ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["minilm", "tiny-tasb"])
def test_embeddings_equal_sentence_transformers(bi_models, name):
    cfg = ModelConfig(**bi_models[name])
    loaded = load_model(cfg)
    texts = [passage_text(d["text"], d["title"]) for d in DOCS[:20]] + ["x", "word " * 400]
    reference = SentenceTransformer(loaded.config.weights, device="cpu").encode(texts, batch_size=8)
    np.testing.assert_allclose(encode_texts(loaded, texts, "passage"), reference, rtol=0, atol=TOLERANCE)


async def test_bi_encoders_describe_their_pooling_and_similarity(retrieval):
    response = await retrieval.info.ListModels(pb.ListModelsRequest())
    by_name = {m.name: m for m in response.models}
    assert (by_name["minilm"].kind, by_name["minilm"].pooling, by_name["minilm"].similarity, by_name["minilm"].max_length) == (
        pb.MODEL_KIND_BI, "mean", "cosine", 256,
    )
    assert (by_name["tiny-tasb"].pooling, by_name["tiny-tasb"].similarity) == ("cls", "dot")
    indexes = {i.name: i for i in response.indexes}
    assert response.default_index == "docs"
    assert (indexes["docs"].count, indexes["docs"].dimension, indexes["docs"].similarity, indexes["docs"].index_type,
            indexes["docs"].device) == (len(DOCS), 384, "cosine", "flat", "cpu")
    assert indexes["docs-hnsw"].index_type == "hnsw"


async def test_a_bi_encoder_reranks_by_embedding_similarity(retrieval):
    texts = [passage_text(d["text"], d["title"]) for d in DOCS[:6]]
    results, _ = await retrieval.rerank(
        query="telescope orbit", passages=[pb.Passage(id=f"p{i}", text=t) for i, t in enumerate(texts)], model="minilm"
    )
    model = SentenceTransformer(str(embedded_model_path()), device="cpu")
    expected = model.encode(texts) @ model.encode("telescope orbit")
    for result in results:
        assert abs(result.score - expected[result.index]) <= TOLERANCE
    assert [r.rank for r in results] == list(range(1, 7))


# -- Retrieve ---------------------------------------------------------------------------


async def test_exact_retrieve_equals_brute_force(retrieval, built):
    query = "how do comets orbit a planet"
    results, stats = await stream(retrieval.retriever.Retrieve(pb.RetrieveRequest(query=query, top_k=10), timeout=60))
    store = DocStore(built / "docs" / "docs.sqlite", 384, read_only=True)  # the server has the folder open
    store_keys, vectors = store.all_vectors()
    store.close()
    ids = [d["_id"] for d in DOCS]  # built in corpus order: key i is DOCS[i]
    scores = vectors @ query_vector("embedded:all-MiniLM-L6-v2", query)
    best = np.argsort(-scores, kind="stable")[:10]
    assert [r.id for r in results] == [ids[store_keys[i]] for i in best]
    np.testing.assert_allclose([r.score for r in results], scores[best], rtol=0, atol=TOLERANCE)
    assert all(r.stage == pb.STAGE_RETRIEVE and r.retrieval_score == r.score for r in results)
    assert [r.rank for r in results] == list(range(1, 11))
    assert stats.candidates == 10 and stats.retrieve_ms > 0


@pytest.mark.parametrize("index", ["docs", "docs-hnsw"])
async def test_filter_returns_exactly_top_k_matching(retrieval, index):
    wanted = {"topic": "sailing", "lang": "de"}
    matching = [d for d in DOCS if d["topic"] == "sailing" and d["lang"] == "de"]
    results, _ = await stream(retrieval.retriever.Retrieve(
        pb.RetrieveRequest(query="mooring a boat at low tide", top_k=5, filter=wanted, index=index, return_metadata=True),
        timeout=60,
    ))
    assert len(results) == 5 <= len(matching)
    assert all(r.metadata["topic"] == "sailing" and r.metadata["lang"] == "de" for r in results)
    everything, _ = await stream(retrieval.retriever.Retrieve(
        pb.RetrieveRequest(query="mooring a boat at low tide", top_k=len(DOCS), index="docs", return_metadata=True),
        timeout=60,
    ))
    expected = [r.id for r in everything if r.metadata["topic"] == "sailing" and r.metadata["lang"] == "de"][:5]
    assert [r.id for r in results] == expected
    few, _ = await stream(retrieval.retriever.Retrieve(
        pb.RetrieveRequest(query="boats", top_k=500, filter=wanted, index=index), timeout=60
    ))
    assert len(few) == len(matching), "all matches, when fewer than top_k"
    none, _ = await stream(retrieval.retriever.Retrieve(
        pb.RetrieveRequest(query="boats", top_k=5, filter={"topic": "nothing"}, index=index), timeout=60
    ))
    assert none == []


async def test_text_title_and_extra_fields_as_metadata(retrieval):
    results, _ = await stream(retrieval.retriever.Retrieve(
        pb.RetrieveRequest(query=DOCS[7]["text"], top_k=1, return_text=True, return_metadata=True), timeout=60
    ))
    (hit,) = results
    assert (hit.id, hit.text, hit.title) == ("d7", DOCS[7]["text"], DOCS[7]["title"])
    assert dict(hit.metadata) == {"topic": DOCS[7]["topic"], "lang": DOCS[7]["lang"], "year": str(DOCS[7]["year"])}


async def test_threshold_cuts_retrieve_results(retrieval):
    everything, _ = await stream(retrieval.retriever.Retrieve(pb.RetrieveRequest(query="saffron", top_k=20), timeout=60))
    cut = everything[5].score
    kept, _ = await stream(retrieval.retriever.Retrieve(
        pb.RetrieveRequest(query="saffron", top_k=20, score_threshold=cut), timeout=60
    ))
    assert [r.id for r in kept] == [r.id for r in everything if r.score >= cut]


# -- RetrieveAndRerank -----------------------------------------------------------------------


@pytest.mark.parametrize("order", [pb.RANKED, pb.AS_SCORED])
async def test_retrieve_and_rerank_in_one_call(retrieval, order):
    query = "spice blend for a slow braise"
    retrieved, _ = await stream(retrieval.retriever.Retrieve(
        pb.RetrieveRequest(query=query, top_k=12, return_text=True), timeout=60
    ))
    reranked, stats = await stream(retrieval.retriever.RetrieveAndRerank(
        pb.RetrieveAndRerankRequest(query=query, top_k=12, top_n=4, reranker="tiny-bert", order=order), timeout=60
    ))
    direct, _ = await retrieval.rerank(
        query=query,
        passages=[pb.Passage(id=r.id, text=r.text, title=r.title) for r in retrieved],
        model="tiny-bert",
        top_n=4,
    )
    first_stage = {r.id: r.score for r in retrieved}
    assert all(r.stage == pb.STAGE_RERANK for r in reranked)
    assert all(abs(r.retrieval_score - first_stage[r.id]) <= TOLERANCE for r in reranked)
    assert stats.candidates == 12 and stats.model == "tiny-bert"
    if order == pb.RANKED:
        assert [(r.id, r.rank) for r in reranked] == [(r.id, r.rank) for r in direct]
        assert all(abs(a.score - b.score) <= 1e-6 for a, b in zip(reranked, direct))
    else:
        assert len(reranked) == 12 and all(r.rank == 0 for r in reranked)


@pytest.mark.parametrize(
    ("method", "request_", "code", "needles"),
    [
        ("Retrieve", pb.RetrieveRequest(query="q", top_k=0), grpc.StatusCode.INVALID_ARGUMENT, ["top_k", "max_top_k=1000"]),
        ("Retrieve", pb.RetrieveRequest(query="q", top_k=1001), grpc.StatusCode.INVALID_ARGUMENT, ["top_k", "1001"]),
        ("Retrieve", pb.RetrieveRequest(query=" ", top_k=3), grpc.StatusCode.INVALID_ARGUMENT, ["query"]),
        ("Retrieve", pb.RetrieveRequest(query="q", top_k=3, index="nope"), grpc.StatusCode.NOT_FOUND, ["index", "nope", "docs"]),
        ("Retrieve", pb.RetrieveRequest(query="q", top_k=3, filter={"": "x"}), grpc.StatusCode.INVALID_ARGUMENT, ["filter"]),
        ("RetrieveAndRerank", pb.RetrieveAndRerankRequest(query="q", top_k=3, reranker="nope"), grpc.StatusCode.NOT_FOUND, ["model", "nope"]),
        ("RetrieveAndRerank", pb.RetrieveAndRerankRequest(query="q", top_k=3, top_n=-2), grpc.StatusCode.INVALID_ARGUMENT, ["top_n"]),
    ],
)
async def test_bad_retrieve_requests(retrieval, method, request_, code, needles):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream(getattr(retrieval.retriever, method)(request_, timeout=30))
    assert caught.value.code() == code
    assert all(n in caught.value.details() for n in needles), caught.value.details()


# -- online changes ---------------------------------------------------------------------


async def test_upsert_replace_and_delete_online(retrieval):
    retriever = retrieval.retriever
    new = [pb.Passage(id=f"n{i}", text=f"fresh passage number {i} about kites", metadata={"batch": "1"}) for i in range(5)]
    response = await retriever.UpsertPassages(pb.UpsertPassagesRequest(index="live", passages=new), timeout=60)
    assert (response.upserted, response.count) == (5, 5)
    found, _ = await stream(retriever.Retrieve(pb.RetrieveRequest(index="live", query="kites", top_k=10), timeout=60))
    assert {r.id for r in found} == {f"n{i}" for i in range(5)}

    replaced = await retriever.UpsertPassages(pb.UpsertPassagesRequest(
        index="live", passages=[pb.Passage(id="n0", text="a replaced passage about submarines")]
    ), timeout=60)
    assert replaced.count == 5 and replaced.version > response.version
    hit, _ = await stream(retriever.Retrieve(pb.RetrieveRequest(
        index="live", query="a replaced passage about submarines", top_k=1, return_text=True, return_metadata=True
    ), timeout=60))
    assert (hit[0].id, hit[0].text, dict(hit[0].metadata)) == ("n0", "a replaced passage about submarines", {})

    deleted = await retriever.DeletePassages(pb.DeletePassagesRequest(index="live", ids=["n1", "n2", "ghost"]), timeout=60)
    assert (deleted.deleted, deleted.not_found, deleted.count) == (2, 1, 3)
    left, _ = await stream(retriever.Retrieve(pb.RetrieveRequest(index="live", query="kites", top_k=10), timeout=60))
    assert {r.id for r in left} == {"n0", "n3", "n4"}


@pytest.mark.parametrize(
    ("passages", "needle"),
    [
        ([pb.Passage(id="", text="x")], "passages[0].id"),
        ([pb.Passage(id="a", text="x"), pb.Passage(id="a", text="y")], "appears twice"),
        ([pb.Passage(id="a", text=" ")], "passages[0].text"),
        ([], "at least one"),
    ],
)
async def test_bad_upserts_are_refused(retrieval, passages, needle):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await retrieval.retriever.UpsertPassages(pb.UpsertPassagesRequest(index="live", passages=passages), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in caught.value.details()


# -- index folders -------------------------------------------------------------------------


def test_manifest_records_model_settings_and_checksums(built):
    from rankstream_server.index.local import sha256_of

    manifest = json.loads((built / "docs" / "manifest.json").read_text())
    assert manifest["model"] == {
        "weights": "embedded:all-MiniLM-L6-v2", "pooling": "mean", "similarity": "cosine", "max_length": 256,
        "query_prefix": "", "passage_prefix": "",
    }
    assert (manifest["dimension"], manifest["count"], manifest["index_type"]) == (384, len(DOCS), "flat")
    assert manifest["checksums"]["vectors.faiss"] == sha256_of(built / "docs" / "vectors.faiss")


def test_an_index_built_with_another_model_is_refused(built, bi_models):
    tasb = load_model(ModelConfig(**bi_models["tiny-tasb"]))
    with pytest.raises(IndexMismatch, match="built with another model") as caught:
        CorpusIndex.open(IndexConfig(name="wrong", path=str(built / "docs"), model="tiny-tasb"), tasb.identity(), 32)
    assert "weights: index built with 'embedded:all-MiniLM-L6-v2'" in str(caught.value)


def test_a_missing_index_says_how_to_build_it(tmp_path):
    with pytest.raises(ModelLoadError, match="rankstream index build"):
        CorpusIndex.open(IndexConfig(name="none", path=str(tmp_path / "absent"), model="m"), {}, 4)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("rankstream")
    return subprocess.run([str(script), "--log-level", "WARNING", *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_build_cli_writes_an_index_and_a_failed_build_leaves_nothing(tmp_path, bi_models):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"models": [bi_models["tiny-tasb"]]}))
    corpus = tmp_path / "plain.jsonl"
    corpus.write_text("".join(json.dumps({"id": d["_id"], "text": d["text"], "metadata": {"topic": d["topic"]}}) + "\n" for d in DOCS[:30]))
    done = run_cli("index", "build", "--config", str(config), "--corpus", str(corpus), "--out", str(tmp_path / "idx"), "--type", "hnsw")
    assert done.returncode == 0, done.stderr
    assert "30 passages" in done.stdout and "hnsw index" in done.stdout and "passages/s" in done.stdout
    assert {p.name for p in (tmp_path / "idx").iterdir()} >= {"manifest.json", "docs.sqlite", "vectors.faiss", "vectors.json"}
    again = run_cli("index", "build", "--config", str(config), "--corpus", str(corpus), "--out", str(tmp_path / "idx"))
    assert again.returncode != 0 and "exists: pass --force" in again.stderr

    broken = tmp_path / "broken.jsonl"
    broken.write_text(corpus.read_text() + "{not json\n")
    failed = run_cli("index", "build", "--config", str(config), "--corpus", str(broken), "--out", str(tmp_path / "half"))
    assert failed.returncode != 0 and "broken.jsonl:31: not JSON" in failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl", "config.yaml", "idx", "plain.jsonl"]


def test_eval_cli_reports_ir_measures(tmp_path, bi_models):
    documents = corpus_factory.make_documents(40)
    queries = {f"q{i}": documents[i * 3]["text"] for i in range(8)}
    qrels = {f"q{i}": {documents[i * 3]["_id"]: 1} for i in range(8)}
    for document in documents:  # the query text is the document text: BEIR reads title + text
        document["title"] = ""
    data = corpus_factory.write_beir(tmp_path / "tiny-beir", documents, queries, qrels)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"models": [bi_models["minilm"], bi_models["tiny-bert"]], "default_model": "tiny-bert"}))
    done = run_cli("eval", "--config", str(config), "--data", str(data), "--pipeline", "retrieve", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    assert "nDCG@10" in done.stdout and "RR@10" in done.stdout and "R@100" in done.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metrics"] == {"nDCG@10": 1.0, "RR@10": 1.0, "R@100": 1.0}, "each query is its document's own text"
    assert report["queries"] == 8 and report["documents"] == 40
    reranked = run_cli("eval", "--config", str(config), "--data", str(data), "--pipeline", "retrieve+rerank", "--rerank-k", "5")
    assert reranked.returncode == 0, reranked.stderr
    assert "retrieve+rerank" in reranked.stdout and "tiny-bert" in reranked.stdout


def test_shipped_demo_corpus_is_valid():
    from rankstream_server.cli.demo import DEMO_CORPUS
    from rankstream_server.index.corpus import read_corpus

    documents = list(read_corpus(DEMO_CORPUS))
    assert len(documents) >= 20 and len({d.id for d in documents}) == len(documents)


def test_settings_refuse_an_index_on_a_cross_encoder(tmp_path, bi_models):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"models": [bi_models["tiny-bert"]], "indexes": [{"name": "i", "path": "/x", "model": "tiny-bert"}]}))
    with pytest.raises(ValueError, match="must be a bi-encoder"):
        load_settings(config)
