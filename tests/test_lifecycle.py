"""Start-up and shutdown: health per service, reflection, the console script, clear start failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc

from conftest import QUERY, make_settings, passages, running

SERVICES = ["", "rankstream.v1.Reranker", "rankstream.v1.Info"]


async def health_of(channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_not_serving_until_models_are_loaded_then_serving(models):
    settings = make_settings([{"name": "tiny-bert", "weights": str(models.bert)}])
    async with running(settings, load=False) as harness:
        for service in SERVICES:
            assert await health_of(harness.channel, service) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await harness.rerank(query=QUERY, passages=passages(["x"]))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in caught.value.details()
        await harness.server.load_models()
        for service in SERVICES:
            assert await health_of(harness.channel, service) == health_pb2.HealthCheckResponse.SERVING
        results, _ = await harness.rerank(query=QUERY, passages=passages(["x"]))
        assert len(results) == 1


async def test_reflection_lists_the_services(served):
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name async for r in responses for s in r.list_services_response.service}
    assert {"rankstream.v1.Reranker", "rankstream.v1.Info", "grpc.health.v1.Health"} <= names


def _rankstream(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The installed console script; its log (stderr) goes to a file so a full pipe never blocks it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    script = Path(sys.executable).with_name("rankstream")
    return subprocess.Popen([str(script), *args], stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)


def _wait_until_serving(channel: grpc.Channel):
    """Polls the Reranker's health until SERVING; returns the stub and request for later checks."""
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="rankstream.v1.Reranker")
    for _ in range(300):
        if health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
            return health, request
        time.sleep(0.1)
    pytest.fail("never SERVING")


def test_console_script_serves_on_a_printed_port_and_drains_on_sigterm(models, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(f"server: {{host: 127.0.0.1, port: 50999}}\nmodels:\n  - {{name: tiny, weights: {models.bert}}}\n")
    process = _rankstream("serve", "--config", str(config), "--port", "0", log=tmp_path / "serve.log")
    try:
        line = process.stdout.readline()
        assert line.startswith("rankstream listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        assert port != 50999, "--port overrides the file"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            health, request = _wait_until_serving(channel)
            results = [r for message in pb_grpc.RerankerStub(channel).Rerank(
                pb.RerankRequest(query=QUERY, passages=passages(["a", "b"])), timeout=30
            ) for r in message.passages]
            assert [r.rank for r in results] == [1, 2]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.wait()


def test_sigterm_during_model_loading_exits_without_waiting_for_the_rest(models, tmp_path):
    """Issue 8, item 8: SIGTERM while models load ends the process then; it used to wait for
    every model to load first (the loading thread was joined at exit)."""
    config = tmp_path / "serve.yaml"
    entries = "".join(f"  - {{name: m{i}, weights: {models.minilm}}}\n" for i in range(6))
    config.write_text(f"server: {{host: 127.0.0.1, port: 0}}\nmodels:\n{entries}")
    log = tmp_path / "serve.log"
    process = _rankstream("serve", "--config", str(config), log=log)
    try:
        assert process.stdout.readline().startswith("rankstream listening on")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.wait()
    loaded = log.read_text().count("loaded cross-encoder")
    assert loaded < 6, f"all {loaded} models loaded before the process exited"


def test_missing_model_fails_at_start_naming_the_model_and_the_fix(tmp_path):
    config = tmp_path / "missing.yaml"
    config.write_text("server: {host: 127.0.0.1, port: 0}\nmodels:\n  - {name: ghost, weights: no-such-org/no-such-model}\n")
    process = _rankstream("serve", "--config", str(config), log=tmp_path / "serve.log")
    try:
        assert process.wait(timeout=120) == 2
        error = (tmp_path / "serve.log").read_text()
        assert "model 'ghost'" in error and "no-such-org/no-such-model" in error
        assert "hf download" in error and "HF_HUB_OFFLINE=1" in error
        assert "Traceback" not in error
    finally:
        process.kill()
        process.wait()


def test_hub_id_serves_offline_from_the_local_hub_cache(models, tmp_path):
    """A hub id resolves through transformers' cache with HF_HUB_OFFLINE=1 (the air-gapped setup)."""
    snapshot = tmp_path / "hf" / "hub" / "models--rankstream-test--tiny-bert" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for file in models.bert.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("0123abcd")
    config = tmp_path / "hub.yaml"
    config.write_text("server: {host: 127.0.0.1, port: 0}\nmodels:\n  - {name: hubbed, weights: rankstream-test/tiny-bert}\n")
    process = _rankstream("serve", "--config", str(config), log=tmp_path / "serve.log", env={"HF_HOME": str(tmp_path / "hf")})
    try:
        port = int(process.stdout.readline().rsplit(":", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = pb_grpc.InfoStub(channel)
            for _ in range(300):
                try:
                    models_response = info.ListModels(pb.ListModelsRequest(), timeout=5)
                    break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, (tmp_path / "serve.log").read_text()
                    time.sleep(0.1)
            else:
                pytest.fail("never loaded")
            assert models_response.models[0].weights == "rankstream-test/tiny-bert"
            results = [r for message in pb_grpc.RerankerStub(channel).Rerank(
                pb.RerankRequest(query=QUERY, passages=passages(["a", "b", "c"])), timeout=30
            ) for r in message.passages]
            assert len(results) == 3
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize(("content", "says"), [
    ("server: {port: abc}\nmodels: []\n", "server.port: Input should be a valid integer"),
    ("models: [\n", "not valid YAML at line 2"),
    (None, "cannot read the config"),
])
def test_a_bad_config_is_one_line_naming_the_file_and_exit_2(tmp_path, content, says):
    config = tmp_path / "server.yaml"
    if content is not None:
        config.write_text(content)
    log = tmp_path / "serve.log"
    process = _rankstream("serve", "--config", str(config), log=log)
    assert process.wait(timeout=60) == 2
    lines = log.read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rankstream: {config}:") and says in lines[0], lines


def test_a_damaged_document_store_is_one_line_and_exit_2(models, tmp_path):
    from rankstream_server.cli.demo import DEMO_CORPUS
    from rankstream_server.index.build import build_index

    from conftest import demo_settings

    folder = tmp_path / "index"
    build_index(demo_settings(models, folder), DEMO_CORPUS, folder, model="minilm", progress=False)
    docs = folder / "docs.sqlite"
    docs.write_bytes(b"this is not a database" * 100)
    config = tmp_path / "server.yaml"
    config.write_text(
        "server: {host: 127.0.0.1, port: 0}\n"
        "models: [{name: minilm, kind: bi, weights: 'embedded:all-MiniLM-L6-v2'}]\n"
        f"indexes: [{{name: demo, path: '{folder}', model: minilm}}]\n"
    )
    log = tmp_path / "serve.log"
    process = _rankstream("serve", "--config", str(config), log=log)
    try:
        assert process.stdout.readline().startswith("rankstream listening on")
        assert process.wait(timeout=120) == 2
    finally:
        process.kill()
        process.wait()
    text = log.read_text()
    assert "Traceback" not in text, text[-2000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("rankstream: index 'demo'") and str(docs) in last and "damaged" in last, last


def test_sigterm_drains_then_refuses_then_saves_and_exits_zero(models, tmp_path):
    """Issue 9: on SIGTERM health turns NOT_SERVING at once while calls are still served for
    drain_seconds; then the port closes (new calls: UNAVAILABLE), the index is saved, exit 0.
    The log is JSON (--log-format json) with an access-log record per RPC."""
    import json

    tokens = tmp_path / "tokens"
    tokens.write_text("write drain-test-token\n")
    index = tmp_path / "index"
    config = tmp_path / "serve.yaml"
    config.write_text(
        "server: {host: 127.0.0.1, port: 0, drain_seconds: 3, grace_seconds: 5}\n"
        f"auth: {{tokens_file: {tokens}}}\n"
        f"models:\n  - {{name: tiny, weights: {models.bert}}}\n  - {{name: bi, kind: bi, weights: {models.distilbert}}}\n"
        f"indexes:\n  - {{name: docs, path: {index}, model: bi, create: true}}\n"
    )
    log = tmp_path / "serve.log"
    process = _rankstream("--log-format", "json", "serve", "--config", str(config), log=log)
    auth = (("authorization", "Bearer drain-test-token"),)
    try:
        port = int(process.stdout.readline().rsplit(":", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health, request = _wait_until_serving(channel)
            retriever = pb_grpc.RetrieverStub(channel)
            retriever.UpsertPassages(pb.UpsertPassagesRequest(index="docs", passages=[pb.Passage(id="kept", text="kept text")]),
                                     metadata=auth, timeout=30)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            for _ in range(100):
                if health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("health stayed SERVING after SIGTERM")
            assert time.monotonic() - signalled < 1.5
            during = [r for m in pb_grpc.RerankerStub(channel).Rerank(
                pb.RerankRequest(query=QUERY, passages=passages(["a", "b"])), metadata=auth, timeout=30) for r in m.passages]
            assert len(during) == 2, "a call during the drain is still served"
            assert time.monotonic() - signalled < 3
        time.sleep(max(0.0, signalled + 3.5 - time.monotonic()))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as late:
            with pytest.raises(grpc.RpcError) as caught:
                list(pb_grpc.RerankerStub(late).Rerank(pb.RerankRequest(query=QUERY, passages=passages(["a"])),
                                                       metadata=auth, timeout=5))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.wait()
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    access = [r for r in records if r.get("logger") == "rankstream.access"]
    assert {"rpc", "code", "duration_ms", "request_id", "passages_in"} <= set(access[0])
    assert any(r["rpc"] == "Rerank" and r["code"] == "OK" for r in access)
    messages = [r["message"] for r in records]
    closing = next(i for i, m in enumerate(messages) if m.startswith("closing the port"))
    assert any(m.startswith("draining") for m in messages[:closing])
    check = subprocess.run([str(Path(sys.executable).with_name("rankstream")), "index", "check", str(index)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "1 passages" in check.stdout, check.stdout + check.stderr
