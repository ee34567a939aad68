"""The Python client, sync and asyncio, and the LangChain classes, against a real server on
127.0.0.1 (run on its own thread and event loop, so blocking calls can be made from tests)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

import rankstream
from rankstream import AsyncRankstreamClient, Passage, RankstreamClient, ScoredPassage, Stats
from rankstream.types import from_scored
from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc
from rankstream_server.cli.demo import DEMO_CORPUS
from rankstream_server.index.build import build_index

from conftest import ThreadedServer, demo_settings, make_settings

ROOT = Path(__file__).resolve().parents[1]
QUERY = "How do I keep a retrieval-augmented chatbot from citing irrelevant passages?"
PASSAGES = [
    "Drop retrieved passages whose relevance score falls below a threshold before building the prompt.",
    "Simmer roasted bones with onion, carrot and celery for several hours.",
    "Planets shift against the background stars because they orbit the Sun.",
]


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


@pytest.fixture
def client(server):
    with RankstreamClient(server.target) as connected:
        yield connected


SMALL_MESSAGE_BYTES = 2048


@pytest.fixture(scope="module")
def small(models, tmp_path_factory):
    """The demo server with micro-batches of 2 passages and ScoredPassages messages of at most
    SMALL_MESSAGE_BYTES: AS_SCORED and big results arrive over several messages."""
    index_path = tmp_path_factory.mktemp("small") / "demo-index"
    settings = demo_settings(
        models, index_path, batching={"max_batch_size": 2}, server={"max_message_bytes": SMALL_MESSAGE_BYTES}
    )
    build_index(settings, DEMO_CORPUS, index_path, model="minilm", progress=False)
    running = ThreadedServer(settings).start()
    yield running
    running.stop()


# -- sync ---------------------------------------------------------------------------


def test_rerank_returns_a_typed_ranking(client):
    ranking = client.rerank(QUERY, PASSAGES, top_n=2, model="minilm", return_text=True)
    assert [p.rank for p in ranking] == [1, 2] and len(ranking) == 2
    assert ranking.passages[0].text == PASSAGES[0] and ranking.passages[0].id == "0"
    assert ranking.passages[0].stage == "rerank" and ranking.stats.scored == 3 and ranking.stats.model == "minilm"


def test_rerank_accepts_strings_passages_and_mappings(client):
    ranking = client.rerank(
        QUERY,
        [PASSAGES[1], Passage(PASSAGES[0], id="keep", metadata={"k": "v"}), {"id": "m", "text": PASSAGES[2]}],
        model="minilm", return_metadata=True,
    )
    assert ranking.passages[0].id == "keep" and dict(ranking.passages[0].metadata) == {"k": "v"}
    assert {p.id for p in ranking} == {"0", "keep", "m"}


def test_rerank_stream_yields_as_scored_then_reports_stats(client):
    stream = client.rerank_stream(QUERY, PASSAGES * 4, model="tiny-bert")
    received = list(stream)
    assert sorted(p.index for p in received) == list(range(12)) and all(p.rank == 0 for p in received)
    assert stream.stats is not None and stream.stats.returned == 12


def test_ranked_calls_arrive_in_one_message(client):
    stream = client.rerank_stream(QUERY, PASSAGES * 4, model="minilm", order="ranked", return_text=True)
    batches = list(stream.batches())
    assert len(batches) == 1 and [p.rank for p in batches[0]] == list(range(1, 13))
    assert sorted(p.index for p in batches[0]) == list(range(12)) and stream.stats.messages == 1
    assert client.rerank(QUERY, PASSAGES, top_n=2).stats.messages == 1
    assert client.retrieve(QUERY, top_k=10).stats.messages == 1
    assert client.retrieve_and_rerank(QUERY, top_k=10, top_n=4, reranker="minilm").stats.messages == 1


def test_a_threshold_that_keeps_nothing_gives_an_empty_ranking(client):
    ranking = client.rerank(QUERY, PASSAGES, model="minilm", score_threshold=2.0)  # sigmoid scores are < 1
    assert len(ranking) == 0 and ranking.stats.scored == 3 and ranking.stats.returned == 0


def test_as_scored_arrives_in_a_message_per_micro_batch(small):
    with RankstreamClient(small.target) as client:
        stream = client.rerank_stream(QUERY, PASSAGES * 4, model="tiny-bert", order="as_scored")
        batches = list(stream.batches())
        assert len(batches) > 1 and all(1 <= len(batch) <= 2 for batch in batches)
        assert sorted(p.index for batch in batches for p in batch) == list(range(12))
        assert all(p.rank == 0 for batch in batches for p in batch)
        assert len(batches) == stream.stats.messages == stream.stats.batches and stream.stats.returned == 12

        both = client.retrieve_and_rerank_stream(QUERY, top_k=7, reranker="tiny-bert", order="as_scored")
        batches = list(both.batches())
        assert len(batches) == both.stats.messages > 1
        assert sorted(p.index for batch in batches for p in batch) == list(range(7))


def test_a_big_ranking_is_split_under_the_message_limit(small):
    long_passages = [f"{i}: " + " ".join([PASSAGES[i % 3]] * 4) for i in range(12)]  # ~400 characters each
    with RankstreamClient(small.target) as client:
        stream = client.rerank_stream(QUERY, long_passages, model="tiny-bert", order="ranked", return_text=True)
        batches = list(stream.batches())
        ranking = [p for batch in batches for p in batch]
        assert len(batches) == stream.stats.messages > 1
        assert [p.rank for p in ranking] == list(range(1, 13)), "each message continues where the last stopped"
        assert [p.score for p in ranking] == sorted((p.score for p in ranking), reverse=True)
        assert all(p.text == long_passages[p.index] for p in ranking)
        typed = client.rerank(QUERY, long_passages, model="tiny-bert", return_text=True)
        assert [p.index for p in typed] == [p.index for p in ranking] and typed.stats.messages == len(batches)

        retrieved = client.retrieve(QUERY, top_k=30)  # texts, titles and metadata of the whole corpus
        assert len(retrieved) == 30 and retrieved.stats.messages > 1
        assert [p.rank for p in retrieved] == list(range(1, 31))
    with grpc.insecure_channel(small.target) as channel:  # the size of each message on the wire
        request = pb.RerankRequest(query=QUERY, model="tiny-bert", return_text=True,
                                   passages=[pb.Passage(id=str(i), text=t) for i, t in enumerate(long_passages)])
        sizes = [message.ByteSize() for message in pb_grpc.RerankerStub(channel).Rerank(request, timeout=30)]
    assert len(sizes) > 1 and max(sizes) <= SMALL_MESSAGE_BYTES


def test_retrieve_and_retrieve_stream(client):
    ranking = client.retrieve(QUERY, top_k=3)
    assert ranking.passages[0].id == "rag-04" and ranking.passages[0].stage == "retrieve"
    assert ranking.passages[0].title == "Keeping weak context out" and ranking.passages[0].metadata["topic"] == "rag"
    assert [p.id for p in client.retrieve_stream(QUERY, top_k=3)] == [p.id for p in ranking]
    filtered = client.retrieve("leftover bones", top_k=2, filter={"topic": "food"})
    assert filtered.passages[0].id == "food-02" and all(p.metadata["topic"] == "food" for p in filtered)


def test_retrieve_and_rerank_both_forms(client):
    ranking = client.retrieve_and_rerank(QUERY, top_k=6, top_n=2, reranker="minilm")
    assert [p.rank for p in ranking] == [1, 2] and all(p.stage == "rerank" for p in ranking)
    assert ranking.stats.candidates == 6
    streamed = list(client.retrieve_and_rerank_stream(QUERY, top_k=6, reranker="tiny-bert"))
    assert len(streamed) == 6


def test_stats_has_every_field_of_rerank_stats(client):
    assert {f.name for f in dataclasses.fields(Stats)} == {f.name for f in pb.RerankStats.DESCRIPTOR.fields}
    stats = client.rerank(QUERY, PASSAGES, model="minilm").stats
    assert (stats.passages, stats.scored, stats.returned, stats.messages) == (3, 3, 3, 1)
    assert stats.batches >= 1 and stats.max_batch_size >= 1 and stats.tokens > 0


def test_conversion_gives_the_same_frozen_dataclasses_as_the_constructor():
    message = pb.ScoredPassages(passages=[
        pb.ScoredPassage(id="a", index=2, score=0.5, rank=1, stage=pb.STAGE_RERANK, retrieval_score=0.25, text="t",
                         title="T", metadata={"k": "v"}),
        pb.ScoredPassage(id="b", index=0, score=0.125, stage=pb.STAGE_RETRIEVE, title=""),
        pb.ScoredPassage(id="c", index=1),
    ])
    assert from_scored(message) == [
        ScoredPassage("a", 2, 0.5, 1, "rerank", 0.25, "t", "T", {"k": "v"}),
        ScoredPassage("b", 0, 0.125, 0, "retrieve", title=""),
        ScoredPassage("c", 1, 0.0, 0, "rerank"),
    ]
    converted = from_scored(message)
    with pytest.raises(dataclasses.FrozenInstanceError):
        converted[0].score = 1.0
    assert converted[1].metadata == {} and converted[1].metadata is not converted[2].metadata
    assert dataclasses.replace(converted[2], rank=3).rank == 3 and repr(converted[2]).startswith("ScoredPassage(id='c'")
    assert from_scored(pb.ScoredPassages()) == []


def test_upsert_delete_and_models(client):
    written = client.upsert([Passage("Kites fly best in a steady breeze.", id="kite-1", metadata={"topic": "outdoors"})])
    assert (written.changed, written.count) == (1, 31)
    assert client.retrieve("flying a kite", top_k=1).passages[0].id == "kite-1"
    removed = client.delete(["kite-1", "ghost"])
    assert (removed.changed, removed.not_found, removed.count) == (1, 1, written.count - 1)
    info = client.models()
    assert {m.name: m.kind for m in info.models} == {"minilm": "bi", "minilm-cross": "cross", "tiny-bert": "cross"}
    assert info.indexes[0].name == "demo" and info.indexes[0].count == 30 and info.default_model == "tiny-bert"


def test_errors_keep_the_status_and_message(client):
    with pytest.raises(rankstream.InvalidArgument) as caught:
        client.rerank(QUERY, PASSAGES, top_n=-1)
    assert caught.value.code.name == "INVALID_ARGUMENT" and "top_n" in caught.value.details
    with pytest.raises(rankstream.NotFound, match="nope"):
        client.retrieve(QUERY, index="nope")
    with pytest.raises(rankstream.InvalidArgument):
        list(client.rerank_stream("", PASSAGES))
    assert issubclass(rankstream.NotFound, rankstream.RankstreamError)


# A deadline too short for the work ends the call either way: DEADLINE_EXCEEDED, or, once the
# server has measured the model, RESOURCE_EXHAUSTED at admission ("cannot finish ... before its
# deadline"). Without the deadline the same call succeeds, so either error shows it was sent.
TOO_LATE = (rankstream.DeadlineExceeded, rankstream.ResourceExhausted)


def test_deadline_per_call_and_default(server):
    long_passages = [" ".join(["words that keep the model busy"] * 60)] * 64
    with RankstreamClient(server.target) as client, pytest.raises(TOO_LATE):
        client.rerank(QUERY, long_passages, model="minilm-cross", timeout=0.2)
    with RankstreamClient(server.target, timeout=0.2) as client, pytest.raises(TOO_LATE):
        client.rerank(QUERY, long_passages, model="minilm-cross")


def test_dns_target_with_round_robin(server):
    with RankstreamClient(f"dns:///localhost:{server.port}") as client:
        assert len(client.rerank(QUERY, PASSAGES)) == 3


def test_retries_unavailable_until_the_server_is_ready(models, tmp_path):
    settings = make_settings([{"name": "tiny-bert", "weights": str(models.bert)}])
    loading = ThreadedServer(settings, load=False).start()
    try:
        with RankstreamClient(loading.target, max_attempts=1) as impatient, pytest.raises(rankstream.Unavailable):
            impatient.rerank(QUERY, PASSAGES)
        threading.Timer(0.2, loading.load).start()
        started = time.monotonic()
        with RankstreamClient(loading.target, max_attempts=5, initial_backoff=1.0) as patient:
            assert len(patient.rerank(QUERY, PASSAGES)) == 3
        assert time.monotonic() - started >= 0.2, "it waited for the server, retrying"
    finally:
        loading.stop()


def test_bearer_token_is_sent(server):
    from rankstream._channel import ChannelSettings

    assert ChannelSettings(token="s3cret").metadata() == (("authorization", "Bearer s3cret"),)
    with RankstreamClient(server.target, token="s3cret") as client:  # accepted by a server that ignores it
        assert len(client.rerank(QUERY, PASSAGES)) == 3


# -- asyncio ------------------------------------------------------------------------------


async def test_async_client_covers_every_call(server):
    async with AsyncRankstreamClient(server.target) as client:
        ranking = await client.rerank(QUERY, PASSAGES, top_n=1, model="minilm")
        assert ranking.passages[0].index == 0 and ranking.stats.returned == 1
        stream = client.rerank_stream(QUERY, PASSAGES, model="tiny-bert")
        assert sorted([p.index async for p in stream]) == [0, 1, 2] and stream.stats.scored == 3
        ranked = client.rerank_stream(QUERY, PASSAGES, model="minilm", order="ranked")
        batches = [batch async for batch in ranked.batches()]
        assert [[p.rank for p in batch] for batch in batches] == [[1, 2, 3]] and ranked.stats.messages == 1
        retrieved = await client.retrieve(QUERY, top_k=2)
        assert retrieved.passages[0].id == "rag-04"
        assert [p.id async for p in client.retrieve_stream(QUERY, top_k=2)] == [p.id for p in retrieved]
        both = await client.retrieve_and_rerank(QUERY, top_k=5, top_n=3, reranker="minilm")
        assert len(both) == 3 and both.passages[0].id == "rag-04"
        assert len([p async for p in client.retrieve_and_rerank_stream(QUERY, top_k=5, reranker="tiny-bert")]) == 5
        written = await client.upsert(["An async passage about lighthouses."], index="demo")
        assert written.changed == 1
        assert (await client.retrieve("lighthouses", top_k=1)).passages[0].id == "0"
        assert (await client.delete(["0"])).changed == 1
        assert (await client.models()).indexes[0].count == 30
        with pytest.raises(rankstream.InvalidArgument, match="top_k"):
            await client.retrieve(QUERY, top_k=0)


async def test_async_batches_as_scored_and_split(small):
    async with AsyncRankstreamClient(small.target) as client:
        stream = client.rerank_stream(QUERY, PASSAGES * 3, model="tiny-bert")
        batches = [batch async for batch in stream.batches()]
        assert len(batches) == stream.stats.messages > 1
        assert sorted(p.index for batch in batches for p in batch) == list(range(9))
        retrieved = client.retrieve_stream(QUERY, top_k=30)
        passages = [p async for p in retrieved]
        assert [p.rank for p in passages] == list(range(1, 31)) and retrieved.stats.messages > 1


async def test_async_deadline(server):
    async with AsyncRankstreamClient(server.target, timeout=0.2) as client:
        with pytest.raises(TOO_LATE):
            await client.rerank(QUERY, [" ".join(["busy words"] * 200)] * 64, model="minilm-cross")


# -- packaging -------------------------------------------------------------------------------


def test_client_imports_without_torch_transformers_or_faiss():
    """The base install is the client: importing and using it must not touch the server stack."""
    script = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers", "faiss", "numpy", "langchain_core", "rankstream_server"}:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import rankstream
client = rankstream.RankstreamClient("127.0.0.1:1", timeout=0.1, max_attempts=1)
try:
    client.rerank("q", ["p"])
except rankstream.Unavailable:
    print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
    pyproject = (ROOT / "pyproject.toml").read_text()
    base = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "torch" not in base and "faiss" not in base and "transformers" not in base


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.pem")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
            "-extfile", "san.cnf", "-out", f"{name}.pem")
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
def test_tls_and_mutual_tls(models, tmp_path):
    files = _certificates(tmp_path)
    tls = {"cert_file": str(files["server.pem"]), "key_file": str(files["server.key"]), "client_ca_file": str(files["ca.pem"])}
    settings = make_settings([{"name": "tiny-bert", "weights": str(models.bert)}], server={"tls": tls})
    secured = ThreadedServer(settings).start()
    try:
        ca = files["ca.pem"].read_bytes()
        mutual = {"tls": True, "root_certificates": ca, "certificate_chain": files["client.pem"].read_bytes(),
                  "private_key": files["client.key"].read_bytes()}
        with RankstreamClient(secured.target, **mutual) as client:
            assert len(client.rerank(QUERY, PASSAGES)) == 3
        with RankstreamClient(secured.target, tls=True, root_certificates=ca, max_attempts=1, timeout=5) as anonymous:
            with pytest.raises(rankstream.RankstreamError):
                anonymous.rerank(QUERY, PASSAGES)  # no client certificate: refused
        with RankstreamClient(secured.target, max_attempts=1, timeout=5) as plaintext, pytest.raises(rankstream.Unavailable):
            plaintext.rerank(QUERY, PASSAGES)
    finally:
        secured.stop()
