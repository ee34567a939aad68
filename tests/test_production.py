"""The production front door: tokens with roles and rotation, secure defaults, bounded requests,
the concurrency cap, Prometheus metrics, access logs with request ids, TLS rotation."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import rankstream
from rankstream import RankstreamClient
from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc
from rankstream_server.cli.demo import DEMO_CORPUS
from rankstream_server.config import ConfigError, LimitsConfig
from rankstream_server.index.build import build_index
from rankstream_server.serving.admission import Admission
from rankstream_server.serving.app import RankstreamServer
from rankstream_server.serving.auth import TokensFileError, TokenStore, parse_tokens
from rankstream_server.serving.grpc.access import CallObserver
from test_client import _certificates

from conftest import QUERY, TEXTS, ThreadedServer, demo_settings, make_settings, passages

READ_TOKEN = "read-token-3f9a"
WRITE_TOKEN = "write-token-b71c"
NODE_DIR = Path(__file__).resolve().parent / "node"


def _write_tokens(path: Path, text: str) -> None:
    """Replaced atomically, as a Kubernetes Secret volume does (a rename)."""
    staged = path.with_suffix(".new")
    staged.write_text(text)
    staged.replace(path)


@pytest.fixture(scope="module")
def secured(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("secured")
    tokens = folder / "tokens"
    _write_tokens(tokens, f"# rankstream tokens\n\nread {READ_TOKEN}\nwrite {WRITE_TOKEN}\n")
    index_path = folder / "demo-index"
    settings = demo_settings(models, index_path, auth={"tokens_file": str(tokens), "reload_seconds": 0.1})
    settings.server.metrics_port = 0
    settings.limits.max_metadata_entries = 4
    settings.limits.max_id_bytes = 32
    settings.limits.max_filter_entries = 2
    build_index(settings, DEMO_CORPUS, index_path, model="minilm", progress=False)
    server = ThreadedServer(settings).start()
    server.tokens_file = tokens
    yield server
    server.stop()


def _client(server, token: str | None) -> RankstreamClient:
    return RankstreamClient(server.target, token=token, max_attempts=1, timeout=30)


def test_tokens_and_roles(secured, monkeypatch):
    monkeypatch.delenv("RANKSTREAM_TOKEN", raising=False)
    with _client(secured, None) as anonymous, pytest.raises(rankstream.RankstreamError) as caught:
        anonymous.rerank(QUERY, TEXTS[:2])
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in str(caught.value)
    with _client(secured, "not-a-token-xyz") as wrong, pytest.raises(rankstream.RankstreamError) as caught:
        wrong.rerank(QUERY, TEXTS[:2])
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED and "not-a-token-xyz" not in str(caught.value)

    with _client(secured, READ_TOKEN) as reader:
        assert len(reader.rerank(QUERY, TEXTS[:2])) == 2
        assert reader.retrieve("leftover bones", top_k=2)
        assert reader.models().models
        with pytest.raises(rankstream.RankstreamError) as caught:
            reader.upsert([{"id": "new-1", "text": "a new passage"}])
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "UpsertPassages needs a write token" in str(caught.value) and READ_TOKEN not in str(caught.value)
        with pytest.raises(rankstream.RankstreamError) as caught:
            reader.delete(["new-1"])
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED

    monkeypatch.setenv("RANKSTREAM_TOKEN", WRITE_TOKEN)  # the client's default token
    with _client(secured, None) as writer:
        writer.upsert([{"id": "new-1", "text": "a new passage about sourdough starters"}])
        assert writer.delete(["new-1"]).changed == 1

    channel = grpc.insecure_channel(secured.target)  # health needs no token: probes carry none
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="rankstream.v1.Reranker"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()


def test_a_rotated_tokens_file_takes_effect_without_a_restart(secured):
    rotated = "read-token-rotated-77"
    try:
        _write_tokens(secured.tokens_file, f"read {rotated}\nwrite {WRITE_TOKEN}\n")
        deadline = time.monotonic() + 10
        while secured.server._tokens.reloads == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        with _client(secured, rotated) as new:
            assert len(new.rerank(QUERY, TEXTS[:2])) == 2
        with _client(secured, READ_TOKEN) as old, pytest.raises(rankstream.RankstreamError) as caught:
            old.rerank(QUERY, TEXTS[:2])
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        reloads = secured.server._tokens.reloads
        _write_tokens(secured.tokens_file, "admin nope\n")  # invalid: the tokens loaded before stay
        time.sleep(0.5)
        assert secured.server._tokens.reloads == reloads
        with _client(secured, rotated) as still:
            assert len(still.rerank(QUERY, TEXTS[:2])) == 2
    finally:
        _write_tokens(secured.tokens_file, f"read {READ_TOKEN}\nwrite {WRITE_TOKEN}\n")
        deadline = time.monotonic() + 10
        while secured.server._tokens.role_of(READ_TOKEN) is None and time.monotonic() < deadline:
            time.sleep(0.05)


def test_tokens_file_errors_name_the_line_never_the_token(tmp_path):
    assert len(parse_tokens("# c\n\n read abc \nwrite def\n", "f")) == 2
    with pytest.raises(TokensFileError) as caught:
        parse_tokens("read ok\nsuperuser s3cret-value\n", "tokens")
    assert "line 2" in str(caught.value) and "s3cret-value" not in str(caught.value)
    with pytest.raises(TokensFileError, match="line 1: expected"):
        parse_tokens("read a b\n", "tokens")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(TokensFileError, match="holds no tokens"):
        TokenStore(empty)
    store = TokenStore(_tokens_at(tmp_path))
    assert store.role_of(READ_TOKEN) == "read" and store.role_of(WRITE_TOKEN) == "write" and store.role_of("x") is None


def _tokens_at(folder: Path) -> Path:
    path = folder / "tokens"
    path.write_text(f"read {READ_TOKEN}\nwrite {WRITE_TOKEN}\n")
    return path


async def test_a_reachable_port_without_auth_refuses_to_start(models, tmp_path):
    entries = [{"name": "tiny-bert", "weights": str(models.bert)}]
    with pytest.raises(ConfigError, match="reachable from other machines and the config has no auth section"):
        RankstreamServer(make_settings(entries, server={"host": "0.0.0.0"}))
    RankstreamServer(make_settings(entries, server={"host": "0.0.0.0"}, auth={"mode": "none"}))  # on purpose: allowed
    RankstreamServer(make_settings(entries, server={"host": "::1"}))  # loopback: allowed
    config = tmp_path / "open.yaml"
    config.write_text(f"server: {{host: 0.0.0.0, port: 0}}\nmodels: [{{name: m, weights: {models.bert}}}]\n")
    done = subprocess.run([str(Path(sys.executable).with_name("rankstream")), "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("rankstream:")]
    assert len(lines) == 1 and "auth" in lines[0] and "Traceback" not in done.stderr


def test_field_limits_name_the_field_and_the_limit(secured):
    stub = grpc.insecure_channel(secured.target)
    auth = (("authorization", f"Bearer {WRITE_TOKEN}"),)
    reranker, retriever = pb_grpc.RerankerStub(stub), pb_grpc.RetrieverStub(stub)

    def refused(call, request) -> str:
        with pytest.raises(grpc.RpcError) as caught:
            result = call(request, metadata=auth, timeout=30)
            list(result) if not isinstance(result, pb.UpsertPassagesResponse) else None
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return caught.value.details()

    try:
        many = pb.Passage(id="a", text="x", metadata={f"k{i}": "v" for i in range(5)})
        assert "max_metadata_entries=4" in refused(reranker.Rerank, pb.RerankRequest(query="q", passages=[many]))
        long_key = pb.Passage(id="a", text="x", metadata={"k" * 200: "v"})
        assert "max_metadata_key_bytes=128" in refused(reranker.Rerank, pb.RerankRequest(query="q", passages=[long_key]))
        big_value = pb.Passage(id="a", text="x", metadata={"k": "é" * 600})  # 1,200 bytes in 600 characters
        assert "max_metadata_value_bytes=1024" in refused(retriever.UpsertPassages,
                                                         pb.UpsertPassagesRequest(passages=[big_value]))
        assert "max_id_bytes=32" in refused(retriever.UpsertPassages,
                                            pb.UpsertPassagesRequest(passages=[pb.Passage(id="i" * 33, text="x")]))
        assert "ids[1]" in refused(retriever.DeletePassages, pb.DeletePassagesRequest(ids=["ok", "i" * 40]))
        wide = pb.RetrieveRequest(query="q", top_k=3, filter={"a": "1", "b": "2", "c": "3"})
        assert "max_filter_entries=2" in refused(retriever.Retrieve, wide)
    finally:
        stub.close()


def test_receive_limit_comes_from_the_limits():
    small = LimitsConfig(max_passages=10, max_passage_chars=100, max_query_chars=50)
    default = LimitsConfig()
    assert small.max_request_bytes() < 1024 * 1024 < 64 * 1024 * 1024 < default.max_request_bytes()
    worst = 10 * (4 * 100 + small.max_id_bytes + small.max_metadata_entries * (small.max_metadata_key_bytes
                                                                             + small.max_metadata_value_bytes))
    assert small.max_request_bytes() > worst, "every request the limits admit must fit"


async def test_a_request_over_the_receive_limit_is_refused_unread(models):
    from conftest import running

    settings = make_settings([{"name": "tiny-bert", "weights": str(models.bert)}],
                             limits={"max_passages": 2, "max_passage_chars": 100, "max_query_chars": 50})
    async with running(settings) as harness:
        huge = pb.RerankRequest(query="q", passages=[pb.Passage(text="x" * 100_000)] * 3)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await harness.rerank(**{"query": huge.query, "passages": huge.passages})
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_rpcs_past_the_concurrency_cap_are_refused_at_once():
    release = asyncio.Event()

    async def hold(request, context):
        await release.wait()
        return b"done"

    handler = grpc.method_handlers_generic_handler("test.Hold", {"Hold": grpc.unary_unary_rpc_method_handler(hold)})
    observer = CallObserver(Admission(max_concurrent=2))
    server = grpc.aio.server(interceptors=[observer])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        call = channel.unary_unary("/test.Hold/Hold")
        held = [asyncio.ensure_future(call(b"", timeout=30)) for _ in range(2)]
        while observer.active < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"", timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_rpcs=2" in caught.value.details()
        release.set()
        assert await asyncio.gather(*held) == [b"done", b"done"]
        assert observer.active == 0
        assert await call(b"", timeout=30) == b"done"
    finally:
        await channel.close()
        await server.stop(None)


def _scrape(server) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_move_with_real_requests(secured):
    before = _scrape(secured)
    with _client(secured, WRITE_TOKEN) as client:
        client.rerank(QUERY, TEXTS, model="tiny-bert")
        client.retrieve("leftover bones", top_k=2)
    channel = grpc.insecure_channel(secured.target)
    try:
        refused = pb_grpc.RerankerStub(channel).Rerank(
            pb.RerankRequest(query="q", passages=[pb.Passage(text="x", metadata={f"k{i}": "v" for i in range(5)})]),
            metadata=(("authorization", f"Bearer {READ_TOKEN}"),), timeout=30)
        with pytest.raises(grpc.RpcError):
            list(refused)
    finally:
        channel.close()
    after = _scrape(secured)
    ok = 'rankstream_requests_total{code="OK",rpc="Rerank"}'
    assert after[ok] - before.get(ok, 0) == 1
    bad = 'rankstream_requests_total{code="INVALID_ARGUMENT",rpc="Rerank"}'
    assert after[bad] - before.get(bad, 0) == 1
    count = 'rankstream_request_duration_seconds_count{rpc="Retrieve"}'
    assert after[count] - before.get(count, 0) == 1
    passes = 'rankstream_batch_size_count{model="tiny-bert"}'
    assert after[passes] > before.get(passes, 0)
    assert after['rankstream_batch_tokens_sum{model="tiny-bert"}'] > before.get('rankstream_batch_tokens_sum{model="tiny-bert"}', 0)
    for stage in ("tokenize", "queue", "inference"):
        key = f'rankstream_stage_seconds_count{{model="tiny-bert",stage="{stage}"}}'
        assert after[key] - before.get(key, 0) == 1
    assert after['rankstream_queue_pairs{model="tiny-bert"}'] == 0
    assert 0 <= after['rankstream_padding_ratio{model="tiny-bert"}'] < 1
    assert after['rankstream_model_ready{model="minilm"}'] == 1
    assert after['rankstream_index_passages{index="demo"}'] == secured.server._readiness.registry.indexes[0].count > 0
    assert any(name.startswith("rankstream_build_info{") for name in after)


def test_access_log_has_a_line_per_rpc_with_the_request_id_and_no_text(secured, caplog):
    secret_query = "zebra-unicorn-query-text"
    channel = grpc.insecure_channel(secured.target)
    try:
        stub = pb_grpc.RerankerStub(channel)
        with caplog.at_level(logging.INFO, logger="rankstream.access"):
            call = stub.Rerank(pb.RerankRequest(query=secret_query, passages=passages(TEXTS[:3])), timeout=30,
                               metadata=(("authorization", f"Bearer {READ_TOKEN}"), ("x-request-id", "req-123")))
            assert sum(len(m.passages) for m in call) == 3
            assert dict(call.trailing_metadata())["x-request-id"] == "req-123"
            unnamed = stub.Rerank(pb.RerankRequest(query=secret_query, passages=passages(TEXTS[:1])), timeout=30,
                                  metadata=(("authorization", f"Bearer {READ_TOKEN}"),))
            list(unnamed)
            generated = dict(unnamed.trailing_metadata())["x-request-id"]
            deadline = time.monotonic() + 5
            while len([r for r in caplog.records if r.name == "rankstream.access"]) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        channel.close()
    lines = [r for r in caplog.records if r.name == "rankstream.access"]
    first = next(r for r in lines if r.request_id == "req-123")
    assert (first.rpc, first.code, first.passages_in, first.passages_out) == ("Rerank", "OK", 3, 3)
    assert first.duration_ms > 0 and "req-123" in first.getMessage()
    assert len(generated) == 32 and any(r.request_id == generated for r in lines)
    assert all(secret_query not in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
def test_rotated_certificates_serve_new_connections_without_a_restart(models, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    old, new = _certificates(first), _certificates(second)  # two different CAs
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(old[name], live / name)
    tls = {"cert_file": str(live / "server.pem"), "key_file": str(live / "server.key")}
    secured = ThreadedServer(make_settings([{"name": "tiny-bert", "weights": str(models.bert)}], server={"tls": tls})).start()
    try:
        with RankstreamClient(secured.target, tls=True, root_certificates=old["ca.pem"].read_bytes(), max_attempts=1) as client:
            assert len(client.rerank(QUERY, TEXTS[:2])) == 2
        for name in ("server.key", "server.pem"):
            staged = live / f"{name}.new"
            shutil.copy(new[name], staged)
            staged.replace(live / name)
        with RankstreamClient(secured.target, tls=True, root_certificates=new["ca.pem"].read_bytes(), max_attempts=1) as client:
            assert len(client.rerank(QUERY, TEXTS[:2])) == 2
        with RankstreamClient(secured.target, tls=True, root_certificates=old["ca.pem"].read_bytes(), max_attempts=1,
                              timeout=5) as stale, pytest.raises(rankstream.RankstreamError):
            stale.rerank(QUERY, TEXTS[:2])  # the old CA no longer vouches for the server
        assert secured.server._certificates.reloads == 1
    finally:
        secured.stop()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed on this machine: the Node.js client cannot run")
def test_node_client_sends_its_token(secured):
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists(), "run `make test` (it runs npm ci in tests/node)"
    done = subprocess.run([shutil.which("node"), str(NODE_DIR / "client.mjs"), secured.target, READ_TOKEN],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert [r["id"] for r in seen["reranked"]["passages"]] == ["rag", "food"]
    assert seen["without_token"]["code"] == "UNAUTHENTICATED"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
def test_a_plaintext_health_port_serves_probes_beside_tls(models, tmp_path):
    """The kubelet's gRPC probes cannot speak TLS: server.health_port answers grpc.health.v1 in
    plaintext, and nothing else."""
    files = _certificates(tmp_path)
    tls = {"cert_file": str(files["server.pem"]), "key_file": str(files["server.key"])}
    settings = make_settings([{"name": "tiny-bert", "weights": str(models.bert)}], server={"tls": tls, "health_port": 0})
    secured = ThreadedServer(settings).start()
    try:
        port = secured.server.health_port
        assert port and port != secured.port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="rankstream.v1.Reranker"), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as caught:
                list(pb_grpc.RerankerStub(channel).Rerank(pb.RerankRequest(query="q", passages=passages(["x"])), timeout=10))
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with RankstreamClient(secured.target, tls=True, root_certificates=files["ca.pem"].read_bytes(), max_attempts=1) as client:
            assert len(client.rerank(QUERY, TEXTS[:2])) == 2
    finally:
        secured.stop()
