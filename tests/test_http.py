"""The HTTP front, called by the real clients of each API it speaks (cohere, openai, LangChain's
CohereRerank, LlamaIndex's TEI reranker, Haystack's CohereRanker) against a live server that also
serves gRPC: the same scores as the gRPC path, and auth, limits, unknown models, overload and
drain in each dialect's shape."""

from __future__ import annotations

import json
import socket
import time

import cohere
import grpc
import httpx
import numpy as np
import openai
import pytest

from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc

from conftest import QUERY, TEXTS, ThreadedServer, make_settings

READ, WRITE = "http-read-token", "http-write-token"
TEXTS8 = TEXTS[:8]
ALIAS = "rerank-english-v3.0"


@pytest.fixture(scope="module")
def front(models, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("http-auth") / "tokens"
    tokens.write_text(f"read {READ}\nwrite {WRITE}\n")
    settings = make_settings(
        [
            # float32 pinned: HTTP and gRPC embeddings of the same texts are compared to 1e-6, and
            # bfloat16 (dtype auto on an AMX CPU, issue 19) differs by ~1e-3 between batch layouts.
            {"name": "tiny-bert", "weights": str(models.bert), "aliases": [ALIAS], "dtype": "float32"},
            {"name": "minilm", "kind": "bi", "weights": "embedded:all-MiniLM-L6-v2", "aliases": ["text-embedding-3-small"],
             "dtype": "float32"},
        ],
        server={"http_port": 0},
        auth={"tokens_file": str(tokens)},
        indexes=[{"name": "docs", "path": str(tokens.parent / "index"), "model": "minilm", "create": True}],
        limits={"max_passages": 8, "max_query_chars": 200, "max_passage_chars": 5000},
    )
    server = ThreadedServer(settings).start()
    server.http = f"http://127.0.0.1:{server.server.http_port}"
    server.bert_folder = str(models.bert)
    yield server
    server.stop()


def _metadata(token: str = READ):
    return (("authorization", f"Bearer {token}"),)


def grpc_scores(front, texts, **fields) -> dict[int, float]:
    with grpc.insecure_channel(front.target) as channel:
        stub = pb_grpc.RerankerStub(channel)
        request = pb.RerankRequest(query=QUERY, passages=[pb.Passage(text=t) for t in texts], **fields)
        return {p.index: p.score for m in stub.Rerank(request, metadata=_metadata(), timeout=60) for p in m.passages}


def grpc_embeddings(front, texts, **fields) -> np.ndarray:
    with grpc.insecure_channel(front.target) as channel:
        response = pb_grpc.EmbedderStub(channel).Embed(pb.EmbedRequest(inputs=texts, **fields), metadata=_metadata(),
                                                       timeout=60)
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


def post(front, path, body, token=READ, **kwargs) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(front.http + path, json=body, headers=headers, timeout=60, **kwargs)


# --- Cohere (and Jina on the same route) -------------------------------------------------------


def test_cohere_v2_client_gets_the_grpc_scores_best_first(front):
    client = cohere.ClientV2(api_key=READ, base_url=front.http)
    response = client.rerank(model="tiny-bert", query=QUERY, documents=TEXTS8, top_n=5)
    expected = grpc_scores(front, TEXTS8)
    assert [r.index for r in response.results] == sorted(expected, key=expected.get, reverse=True)[:5]
    assert all(r.relevance_score == pytest.approx(expected[r.index], abs=1e-6) for r in response.results)
    aliased = client.rerank(model=ALIAS, query=QUERY, documents=TEXTS8)
    assert [(r.index, r.relevance_score) for r in aliased.results][:5] == [(r.index, r.relevance_score) for r in response.results]


def test_cohere_v1_client_echoes_documents_and_objects(front):
    client = cohere.Client(api_key=READ, base_url=front.http)
    documents = [{"text": t} for t in TEXTS8[:4]]
    response = client.rerank(query=QUERY, documents=documents, return_documents=True)
    expected = grpc_scores(front, TEXTS8[:4])
    assert {r.index: r.relevance_score for r in response.results} == pytest.approx(expected, abs=1e-6)
    assert all(r.document.text == TEXTS8[r.index] for r in response.results)
    quiet = client.rerank(query=QUERY, documents=TEXTS8[:4], return_documents=False)
    assert all(r.document is None for r in quiet.results)


def test_cohere_v1_max_chunks_per_doc_scores_long_documents_in_windows(front):
    """Cohere's max_chunks_per_doc is rankstream's long_passages: CHUNK (best window's score)."""
    client = cohere.Client(api_key=READ, base_url=front.http)
    long_text = " ".join(TEXTS8[:7]) * 3  # past tiny-bert's 128 tokens
    documents = [long_text, TEXTS8[0]]
    chunked = client.rerank(query=QUERY, documents=documents, max_chunks_per_doc=4, return_documents=False)
    expected = grpc_scores(front, documents, long_passages=pb.CHUNK, max_chunks_per_passage=4)
    assert {r.index: r.relevance_score for r in chunked.results} == pytest.approx(expected, abs=1e-6)
    assert expected != pytest.approx(grpc_scores(front, documents), abs=1e-6)  # windows changed the long one's score
    with pytest.raises(cohere.core.api_error.ApiError) as error:
        client.rerank(query=QUERY, documents=documents, max_chunks_per_doc=99)
    assert error.value.status_code == 400 and "max_chunks_per_doc" in str(error.value.body)


def test_cohere_v2_max_tokens_per_doc_cuts_each_document(front):
    client = cohere.ClientV2(api_key=READ, base_url=front.http)
    cut = client.rerank(model="tiny-bert", query=QUERY, documents=TEXTS8, max_tokens_per_doc=6)
    expected = grpc_scores(front, TEXTS8, max_passage_tokens=6)
    assert {r.index: r.relevance_score for r in cut.results} == pytest.approx(expected, abs=1e-6)
    assert expected != pytest.approx(grpc_scores(front, TEXTS8), abs=1e-6)
    # The same as the documents' first 6 tokens, scored whole.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(front.bert_folder)
    heads = [tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"][:6]) for t in TEXTS8]
    assert expected == pytest.approx(grpc_scores(front, heads), abs=1e-6)


def test_jina_clients_read_model_usage_and_document_text(front):
    answer = post(front, "/v1/rerank", {"model": ALIAS, "query": QUERY, "documents": TEXTS8[:3], "top_n": 2}).json()
    assert answer["model"] == "tiny-bert" and answer["usage"]["total_tokens"] > 0
    assert len(answer["results"]) == 2
    assert all(r["document"]["text"] == TEXTS8[r["index"]] for r in answer["results"])


def test_langchain_cohere_rerank_works_unchanged(front):
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    reranker = CohereRerank(model="tiny-bert", cohere_api_key=READ, base_url=front.http, top_n=3)
    documents = [Document(page_content=t, metadata={"n": i}) for i, t in enumerate(TEXTS8)]
    kept = reranker.compress_documents(documents, QUERY)
    expected = grpc_scores(front, TEXTS8)
    assert [d.metadata["n"] for d in kept] == sorted(expected, key=expected.get, reverse=True)[:3]
    assert all(d.metadata["relevance_score"] == pytest.approx(expected[d.metadata["n"]], abs=1e-6) for d in kept)


# --- TEI ------------------------------------------------------------------------------------------


def test_llamaindex_tei_reranker_gets_the_grpc_scores(front):
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    reranker = TextEmbeddingInference(base_url=front.http, top_n=3, auth_token=f"Bearer {READ}")
    nodes = [NodeWithScore(node=TextNode(text=t, id_=f"n{i}")) for i, t in enumerate(TEXTS8)]
    kept = reranker.postprocess_nodes(nodes, QueryBundle(QUERY))
    expected = grpc_scores(front, TEXTS8)
    best = sorted(expected, key=expected.get, reverse=True)[:3]
    assert [n.node.node_id for n in kept] == [f"n{i}" for i in best]
    assert [n.score for n in kept] == pytest.approx([expected[i] for i in best], abs=1e-6)


def test_tei_rerank_raw_scores_text_embed_info_and_health(front):
    raw = post(front, "/rerank", {"query": QUERY, "texts": TEXTS8[:3], "raw_scores": True, "return_text": True}).json()
    expected = grpc_scores(front, TEXTS8[:3], raw_scores=True)
    assert [r["index"] for r in raw] == sorted(expected, key=expected.get, reverse=True)
    assert all(r["score"] == pytest.approx(expected[r["index"]], abs=1e-5) and r["text"] == TEXTS8[r["index"]] for r in raw)
    vectors = np.array(post(front, "/embed", {"inputs": TEXTS8[:2]}).json(), dtype=np.float32)
    reference = grpc_embeddings(front, TEXTS8[:2], normalize=True)
    np.testing.assert_allclose(vectors, reference, atol=1e-6)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    info = httpx.get(front.http + "/info", headers={"authorization": f"Bearer {READ}"}).json()
    assert info["model_id"] == "tiny-bert" and "reranker" in info["model_type"] and info["max_client_batch_size"] == 8
    embedder = httpx.get(front.http + "/info?model=minilm", headers={"authorization": f"Bearer {READ}"}).json()
    assert embedder["model_type"] == {"embedding": {"pooling": "mean"}}
    assert httpx.get(front.http + "/health").status_code == 200


# --- OpenAI ---------------------------------------------------------------------------------------


def test_openai_sdk_embeddings_equal_grpc_embed_in_both_encodings(front):
    client = openai.OpenAI(api_key=READ, base_url=front.http + "/v1")
    reference = grpc_embeddings(front, TEXTS8[:3])
    default = client.embeddings.create(model="text-embedding-3-small", input=TEXTS8[:3])  # the SDK asks for base64
    floats = client.embeddings.create(model="minilm", input=TEXTS8[:3], encoding_format="float")
    for response in (default, floats):
        got = np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)
        np.testing.assert_allclose(got, reference, atol=1e-6)
        assert response.model == "minilm" and response.usage.prompt_tokens > 0
    single = post(front, "/v1/embeddings", {"input": TEXTS8[0]}).json()  # no model: the default embedder
    np.testing.assert_allclose(single["data"][0]["embedding"], reference[0], atol=1e-6)
    ids = [m.id for m in client.models.list().data]
    assert {"tiny-bert", ALIAS, "minilm", "text-embedding-3-small"} <= set(ids)


def test_openai_refuses_dimensions_it_cannot_give_and_token_ids(front):
    client = openai.OpenAI(api_key=READ, base_url=front.http + "/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="minilm", input="x", dimensions=64)
    assert caught.value.body["param"] == "dimensions" and "384" in caught.value.body["message"]
    assert client.embeddings.create(model="minilm", input="x", dimensions=384).data[0].embedding
    refused = post(front, "/v1/embeddings", {"model": "minilm", "input": [1, 2, 3]})
    assert refused.status_code == 400 and "token ids" in refused.json()["error"]["message"]
    cross = post(front, "/v1/embeddings", {"model": "tiny-bert", "input": "x"})
    assert cross.status_code == 400 and "bi-encoder" in cross.json()["error"]["message"]


# --- Native JSON ----------------------------------------------------------------------------------


def test_native_rerank_is_the_proto_json_of_the_grpc_answer(front):
    body = {"query": QUERY, "passages": [{"id": f"p{i}", "text": t} for i, t in enumerate(TEXTS8)], "topN": 4,
            "returnText": True}
    answer = post(front, "/rankstream/v1/rerank", body).json()
    expected = grpc_scores(front, TEXTS8)
    assert [p["rank"] for p in answer["passages"]] == [1, 2, 3, 4]
    assert all(p["score"] == pytest.approx(expected[p.get("index", 0)], abs=1e-6) for p in answer["passages"])
    assert all(p["id"] == f"p{p.get('index', 0)}" and p["text"] == TEXTS8[p.get("index", 0)] for p in answer["passages"])
    assert answer["stats"]["scored"] == 8 and answer["stats"]["model"] == "tiny-bert"


def test_native_as_scored_streams_ndjson_lines_then_stats(front):
    body = {"query": QUERY, "passages": [{"text": t} for t in TEXTS8], "order": "AS_SCORED", "raw_scores": True}
    with httpx.stream("POST", front.http + "/rankstream/v1/rerank", json=body,
                      headers={"authorization": f"Bearer {READ}"}, timeout=60) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert "stats" in lines[-1] and all("passages" in line for line in lines[:-1])
    streamed = {p.get("index", 0): p["score"] for line in lines[:-1] for p in line["passages"]}
    assert streamed == pytest.approx(grpc_scores(front, TEXTS8, raw_scores=True), abs=1e-5)


def test_native_embed_models_and_openapi(front):
    answer = post(front, "/rankstream/v1/embed", {"inputs": ["a query"], "inputType": "INPUT_TYPE_QUERY"}).json()
    np.testing.assert_allclose(answer["embeddings"][0]["values"],
                               grpc_embeddings(front, ["a query"], input_type=pb.INPUT_TYPE_QUERY)[0], atol=1e-6)
    models = httpx.get(front.http + "/rankstream/v1/models", headers={"authorization": f"Bearer {READ}"}).json()
    assert {m["name"]: m.get("aliases") for m in models["models"]}["tiny-bert"] == [ALIAS]
    spec = httpx.get(front.http + "/openapi.json").json()
    assert {"/v1/rerank", "/v2/rerank", "/rerank", "/embed", "/v1/embeddings", "/rankstream/v1/rerank"} <= set(spec["paths"])
    schema = spec["paths"]["/rankstream/v1/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"query", "passages", "topN", "order", "instruction"} <= set(schema["properties"])
    # A field added to RerankRequest reaches the shared operation with no HTTP code: its own rule answers.
    refused = post(front, "/rankstream/v1/rerank", {"query": QUERY, "passages": [{"text": "a"}], "instruction": "Judge it"})
    assert refused.status_code == 400 and refused.json()["message"].startswith("instruction: model 'tiny-bert' takes no")
    unknown = post(front, "/rankstream/v1/rerank", {"query": QUERY, "passages": [{"text": "a"}], "no_such_field": 1})
    assert unknown.status_code == 400 and "no_such_field" in unknown.json()["message"]
    assert httpx.get(front.http + "/docs").status_code == 200


def test_native_upsert_retrieve_and_delete_match_grpc(front):
    upsert = {"index": "docs", "passages": [{"id": f"d{i}", "text": t, "metadata": {"n": str(i)}} for i, t in enumerate(TEXTS8)]}
    refused = post(front, "/rankstream/v1/upsert", upsert)
    assert refused.status_code == 403 and "UpsertPassages needs a write token" in refused.json()["message"]
    written = post(front, "/rankstream/v1/upsert", upsert, token=WRITE).json()
    assert written["upserted"] == 8 and written["count"] == "8"  # int64: a string in proto3 JSON
    retrieved = post(front, "/rankstream/v1/retrieve", {"query": QUERY, "topK": 3, "returnMetadata": True}).json()
    with grpc.insecure_channel(front.target) as channel:
        retriever = pb_grpc.RetrieverStub(channel)
        expected = [p for m in retriever.Retrieve(pb.RetrieveRequest(query=QUERY, top_k=3), metadata=_metadata(), timeout=60)
                    for p in m.passages]
        reranked = [p for m in retriever.RetrieveAndRerank(pb.RetrieveAndRerankRequest(query=QUERY, top_k=5, top_n=2),
                                                           metadata=_metadata(), timeout=60) for p in m.passages]
    assert [(p["id"], p["metadata"]["n"]) for p in retrieved["passages"]] == [(p.id, p.id[1:]) for p in expected]
    assert [p["score"] for p in retrieved["passages"]] == pytest.approx([p.score for p in expected], abs=1e-6)
    both = post(front, "/rankstream/v1/retrieve-and-rerank", {"query": QUERY, "top_k": 5, "top_n": 2}).json()
    assert [(p["id"], p["stage"]) for p in both["passages"]] == [(p.id, "STAGE_RERANK") for p in reranked]
    assert [p["score"] for p in both["passages"]] == pytest.approx([p.score for p in reranked], abs=1e-6)
    assert both["stats"]["candidates"] == 5
    deleted = post(front, "/rankstream/v1/delete", {"ids": ["d0", "nope"]}, token=WRITE).json()
    assert (deleted["deleted"], deleted["notFound"], deleted["count"]) == (1, 1, "7")


# --- Errors per dialect ---------------------------------------------------------------------------

RERANKS = {
    "cohere-v1": ("/v1/rerank", lambda docs, **kw: {"query": QUERY, "documents": docs, **kw}),
    "cohere-v2": ("/v2/rerank", lambda docs, **kw: {"query": QUERY, "documents": docs, **kw}),
    "tei": ("/rerank", lambda docs, **kw: {"query": QUERY, "texts": docs, **kw}),
    "openai": ("/v1/embeddings", lambda docs, **kw: {"input": docs, **kw}),
    "native": ("/rankstream/v1/rerank", lambda docs, **kw: {"query": QUERY, "passages": [{"text": d} for d in docs], **kw}),
}


def _message(dialect: str, answer: dict) -> str:
    if dialect == "tei":
        return answer["error"]
    if dialect == "openai":
        return answer["error"]["message"]
    return answer["message"]


@pytest.mark.parametrize("dialect", sorted(RERANKS))
def test_auth_limits_and_unknown_model_in_each_dialect(front, dialect):
    path, body = RERANKS[dialect]
    missing = post(front, path, body(["a"]), token=None)
    assert missing.status_code == 401 and "missing bearer token" in _message(dialect, missing.json())
    assert post(front, path, body(["a"]), token="wrong").status_code == 401
    many = post(front, path, body(["a"] * 9))
    assert many.status_code == 413, many.text
    assert "limit is max_passages=8" in _message(dialect, many.json())
    field = {"tei": "texts", "openai": "input", "native": "passages"}.get(dialect, "documents")
    assert _message(dialect, many.json()).startswith(field)
    unknown = post(front, path, body(["a"], model="no-such-model"))
    assert unknown.status_code == 404 and "no-such-model" in _message(dialect, unknown.json())
    if dialect != "openai":
        long_query = post(front, path, {**body(["a"]), "query": "q" * 201})
        assert long_query.status_code == (422 if dialect == "tei" else 400)
        assert "max_query_chars=200" in _message(dialect, long_query.json())
    malformed = post(front, path, {"nothing": "here"})
    assert malformed.status_code in (400, 422) and "traceback" not in malformed.text.lower()


def test_a_body_past_the_limit_is_refused_before_it_is_read(front):
    from rankstream_server.serving.http.front import max_body_bytes

    limit = max_body_bytes(front.server.settings)
    with socket.create_connection(("127.0.0.1", front.server.http_port), timeout=30) as conn:
        conn.sendall(f"POST /v2/rerank HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {READ}\r\n"
                     f"content-type: application/json\r\ncontent-length: {limit + 1}\r\n\r\n".encode())
        head = conn.recv(65536).decode()  # answered with no body byte sent
    assert head.startswith("HTTP/1.1 413")
    chunked = httpx.post(front.http + "/v2/rerank", headers={"authorization": f"Bearer {READ}"},
                         content=iter([b'{"query": "q", "documents": ["' + b"x" * (limit // 2), b"x" * (limit // 2) + b'"]}']))
    assert chunked.status_code == 413


def test_unknown_path_is_404(front):
    assert httpx.get(front.http + "/v3/rerank").status_code == 404


@pytest.mark.parametrize("dialect", sorted(RERANKS))
def test_overload_and_shutdown_answer_429_and_503_with_retry_after(front, dialect):
    path, body = RERANKS[dialect]
    admission = front.server.admission
    cap = admission.max_concurrent
    # As if every place were taken by calls in progress (0, not `active`: the previous call's place
    # is given back just after its answer is sent, so `active` read here may be one too high).
    admission.max_concurrent = 0
    try:
        busy = post(front, path, body(["a"]))
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert "max_concurrent_rpcs" in _message(dialect, busy.json())
    finally:
        admission.max_concurrent = cap
    readiness = front.server._readiness
    readiness.closing = True
    try:
        closing = post(front, path, body(["a"]))
        assert closing.status_code == 503 and closing.headers["retry-after"] == "1"
        assert httpx.get(front.http + "/health").status_code == 503
    finally:
        readiness.closing = False
    assert post(front, path, body(["a"])).status_code == 200


# --- Embed on gRPC: the Python clients and LangChain ------------------------------------------------


def test_python_clients_and_langchain_embeddings_call_embed(front):
    import asyncio

    from rankstream import AsyncRankstreamClient, RankstreamClient
    from rankstream.langchain import RankstreamEmbeddings

    passages = grpc_embeddings(front, TEXTS8[:3])
    query = grpc_embeddings(front, [QUERY], input_type=pb.INPUT_TYPE_QUERY)[0]
    with RankstreamClient(front.target, token=READ) as client:
        answer = client.embed(TEXTS8[:3], model="text-embedding-3-small")
        assert (answer.model, answer.dimension, len(answer)) == ("minilm", 384, 3) and answer.tokens > 0
        np.testing.assert_allclose(answer.vectors, passages, atol=1e-6)
        unit = client.embed(TEXTS8[:1], normalize=True).vectors[0]
        assert np.linalg.norm(unit) == pytest.approx(1.0, abs=1e-5)
        minilm = next(m for m in client.models().models if m.name == "minilm")
        assert minilm.aliases == ("text-embedding-3-small",) and minilm.dimension == 384

    async def embed_async():
        async with AsyncRankstreamClient(front.target, token=READ) as client:
            return (await client.embed([QUERY], input_type="query")).vectors[0]

    np.testing.assert_allclose(asyncio.run(embed_async()), query, atol=1e-6)
    embeddings = RankstreamEmbeddings(target=front.target, token=READ, batch_size=2)
    np.testing.assert_allclose(embeddings.embed_documents(TEXTS8[:3]), passages, atol=1e-6)
    np.testing.assert_allclose(embeddings.embed_query(QUERY), query, atol=1e-6)
    np.testing.assert_allclose(asyncio.run(embeddings.aembed_documents(TEXTS8[:3])), passages, atol=1e-6)
    np.testing.assert_allclose(asyncio.run(embeddings.aembed_query(QUERY)), query, atol=1e-6)


# --- Disconnects and the drain --------------------------------------------------------------------


async def test_a_client_that_disconnects_cancels_its_work():
    """Calls.run races the operation against the client's disconnect: the operation is cancelled
    (its `finally` runs: ModelCall.close drops its queued batches), and nothing is answered."""
    import asyncio

    from rankstream_server.serving.http.front import Calls, ClientGone

    gone = asyncio.Event()
    cleaned = asyncio.Event()

    class Departing:  # the ASGI receive of a client that has sent its body, then goes away
        scope: dict = {}  # no deadline header

        async def receive(self):
            await gone.wait()
            return {"type": "http.disconnect"}

    async def work(context):
        try:
            await asyncio.Event().wait()  # scoring that would never end
        finally:
            cleaned.set()

    calls = Calls(settings=None, services=None, readiness=None)
    running = asyncio.ensure_future(calls.run(Departing(), work))
    await asyncio.sleep(0)
    assert not running.done()
    gone.set()
    with pytest.raises(ClientGone):
        await running
    assert cleaned.is_set()


async def test_an_http_call_past_the_deadline_it_sent_is_cancelled_and_answered_504():
    import asyncio

    from rankstream_server.errors import DeadlineExceeded
    from rankstream_server.serving.http.front import DEADLINE_KEY, Calls

    cleaned = asyncio.Event()

    class Waiting:  # a client that sent `grpc-timeout: 50m` and stays connected
        scope = {DEADLINE_KEY: time.monotonic() + 0.05}

        async def receive(self):
            await asyncio.Event().wait()

    async def work(context):
        assert 0 < context.time_remaining() <= 0.05, "the operation sees the deadline too"
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    with pytest.raises(DeadlineExceeded):
        await Calls(settings=None, services=None, readiness=None).run(Waiting(), work)
    await asyncio.wait_for(cleaned.wait(), 1)
    assert cleaned.is_set(), "its work was cancelled (queued passes dropped)"
    assert DeadlineExceeded.http_status == 504


def test_sigterm_drains_http_too_then_exits_zero(models, tmp_path):
    """`rankstream serve --http-port 0`: on SIGTERM /health turns 503 at once while rerank calls
    are still answered for drain_seconds; then the process exits 0."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    config = tmp_path / "serve.yaml"
    config.write_text("server: {host: 127.0.0.1, port: 0, drain_seconds: 3, grace_seconds: 2}\n"
                      f"models:\n  - {{name: tiny, weights: {models.bert}}}\n")
    script = Path(sys.executable).with_name("rankstream")
    process = subprocess.Popen([str(script), "serve", "--config", str(config), "--http-port", "0"], stdout=subprocess.PIPE,
                               stderr=(tmp_path / "log").open("w"), text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        assert process.stdout.readline().startswith("rankstream listening on 127.0.0.1:")
        line = process.stdout.readline()
        assert line.startswith("rankstream HTTP on 127.0.0.1:"), line
        base = "http://127.0.0.1:" + line.rsplit(":", 1)[1].strip()
        for _ in range(600):
            if httpx.get(base + "/health").status_code == 200:
                break
            time.sleep(0.1)
        body = {"query": QUERY, "documents": ["a", "b"]}
        assert httpx.post(base + "/v2/rerank", json=body, timeout=30).status_code == 200
        process.send_signal(signal.SIGTERM)
        for _ in range(100):
            if httpx.get(base + "/health").status_code == 503:
                break
            time.sleep(0.02)
        else:
            pytest.fail("/health stayed 200 after SIGTERM")
        during = httpx.post(base + "/v2/rerank", json=body, timeout=30)
        assert during.status_code == 200 and len(during.json()["results"]) == 2, "served during the drain"
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.wait()
    assert "Traceback" not in (tmp_path / "log").read_text()


def test_connections_have_tcp_nodelay(front):
    """Without TCP_NODELAY a response's headers and body wait on the client's delayed ACK (~40 ms a call)."""
    with httpx.Client(base_url=front.http) as client:
        assert client.get("/health").status_code == 200  # the connection stays open (keep-alive)
        connections = list(front.server._http._server.server_state.connections)
        sockets = [c.transport.get_extra_info("socket") for c in connections]
        assert sockets and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)


def test_access_log_and_request_id_are_shared_with_grpc(front, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="rankstream.access"):
        answer = httpx.post(front.http + "/v2/rerank", json={"query": QUERY, "documents": TEXTS8[:3]},
                            headers={"authorization": f"Bearer {READ}", "x-request-id": "from-the-client-1"}, timeout=60)
        assert post(front, "/v2/rerank", {"query": QUERY, "documents": ["a"]}, token=None).status_code == 401
        assert answer.headers["x-request-id"] == "from-the-client-1" and answer.json()["id"] == "from-the-client-1"
        for _ in range(500):  # each line is written once its answer has gone out, on the server's thread
            records = [r for r in caplog.records if r.name == "rankstream.access"]
            if len(records) >= 2:
                break
            time.sleep(0.01)
    ok = next(r for r in records if r.request_id == "from-the-client-1")
    assert (ok.rpc, ok.code, ok.route, ok.passages_in, ok.passages_out) == ("Rerank", "OK", "http:cohere", 3, 3)
    assert any(r.code == "UNAUTHENTICATED" and r.route == "http:cohere" for r in records)
    assert all(QUERY not in r.getMessage() for r in records)


def test_what_cannot_be_honoured_is_refused_not_guessed(front):
    long_text = TEXTS[8]  # past tiny-bert's 128 tokens
    cut = post(front, "/rerank", {"query": QUERY, "texts": ["short", long_text]})
    assert cut.status_code == 200 and len(cut.json()) == 2  # TEI's auto-truncate
    uncut = post(front, "/rerank", {"query": QUERY, "texts": ["short", long_text], "truncate": False})
    assert uncut.status_code == 413 and uncut.json()["error_type"] == "Validation"
    assert "max_length=128" in uncut.json()["error"]
    negative = post(front, "/v2/rerank", {"query": QUERY, "documents": ["a"], "max_tokens_per_doc": -1})
    assert negative.status_code == 400 and negative.json()["message"].startswith("max_tokens_per_doc: -1")
    assert post(front, "/v2/rerank", {"query": QUERY, "documents": ["a"], "max_tokens_per_doc": 4096}).status_code == 200
    image = post(front, "/v1/rerank", {"query": QUERY, "documents": [{"image": "data:..."}]})
    assert image.status_code == 400 and "documents[0]" in image.json()["message"]


def batcher_counters(front) -> dict[str, tuple[int, int, int]]:
    with grpc.insecure_channel(front.target) as channel:
        response = pb_grpc.InfoStub(channel).ListModels(pb.ListModelsRequest(), metadata=_metadata(), timeout=60)
    return {m.name: (m.batcher.batches, m.batcher.items, m.batcher.tokens) for m in response.models}


@pytest.mark.parametrize("path, body, field, model", [
    ("/rerank", {"query": QUERY, "texts": ["short", TEXTS[8]]}, "texts[1]", "tiny-bert"),
    ("/rerank", {"query": QUERY, "texts": ["short", TEXTS[8]], "model": "minilm"}, "texts[1]", "minilm"),  # a bi-encoder
    ("/embed", {"inputs": ["short", TEXTS[8]]}, "inputs[1]", "minilm"),
])
def test_tei_truncate_false_refuses_a_long_text_before_scoring(front, path, body, field, model):
    """truncate: false is long_passages / long_inputs REFUSE: 413 in TEI's shape naming the text,
    its tokens and the limit, with no model work done; short texts answer 200."""
    before = batcher_counters(front)
    refused = post(front, path, {**body, "truncate": False})
    assert refused.status_code == 413 and refused.json()["error_type"] == "Validation"
    message = refused.json()["error"]
    assert message.startswith(f"{field}: ") and f"longer than model {model!r} takes (max_length=" in message
    assert message.endswith("; truncate=false")
    assert batcher_counters(front) == before
    short = {key: value[:1] if isinstance(value, list) else value for key, value in body.items()}
    assert post(front, path, {**short, "truncate": False}).status_code == 200
    assert post(front, path, body).status_code == 200  # truncate unset: cut, as TEI's auto-truncate


def test_embed_long_inputs_over_grpc(front):
    with grpc.insecure_channel(front.target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        cut = stub.Embed(pb.EmbedRequest(inputs=["short", TEXTS[8]]), metadata=_metadata(), timeout=60)
        assert cut.truncated == 1
        for long_inputs, needle in ((pb.REFUSE, "inputs[1]: "), (pb.CHUNK, "long_inputs: 1 is not taken")):
            with pytest.raises(grpc.RpcError) as error:
                stub.Embed(pb.EmbedRequest(inputs=["short", TEXTS[8]], long_inputs=long_inputs), metadata=_metadata(),
                           timeout=60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.value.details().startswith(needle)
        fits = stub.Embed(pb.EmbedRequest(inputs=["short"], long_inputs=pb.REFUSE), metadata=_metadata(), timeout=60)
        np.testing.assert_allclose(fits.embeddings[0].values, cut.embeddings[0].values, atol=1e-6)


def test_warming_up_answers_503_with_retry_after(models):
    settings = make_settings([{"name": "tiny-bert", "weights": str(models.bert)}], server={"http_port": 0})
    warming = ThreadedServer(settings, load=False).start()
    try:
        base = f"http://127.0.0.1:{warming.server.http_port}"
        assert httpx.get(base + "/health").status_code == 503
        for path, body in (("/v2/rerank", {"query": "q", "documents": ["a"]}), ("/rerank", {"query": "q", "texts": ["a"]}),
                           ("/v1/embeddings", {"input": "a"})):
            answer = httpx.post(base + path, json=body, timeout=30)
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1", path
            assert "still loading" in answer.text
    finally:
        warming.stop()


def test_haystack_cohere_ranker_works_unchanged(front):
    from haystack import Document
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.cohere import CohereRanker

    ranker = CohereRanker(model=ALIAS, top_k=3, api_key=Secret.from_token(READ), api_base_url=front.http)
    documents = [Document(content=t, meta={"n": i}) for i, t in enumerate(TEXTS8)]
    ranked = ranker.run(query=QUERY, documents=documents)["documents"]  # it sends max_tokens_per_doc=4096
    expected = grpc_scores(front, TEXTS8)
    best = sorted(expected, key=expected.get, reverse=True)[:3]
    assert [d.meta["n"] for d in ranked] == best
    assert [d.score for d in ranked] == pytest.approx([expected[i] for i in best], abs=1e-6)
