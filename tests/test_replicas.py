"""More than one replica on loopback: three `rankstream serve` processes share one Milvus (a
milvus-lite server process reached over TCP, as pods reach a Milvus cluster), and one client
balances over all three with round_robin, as over a headless Service's addresses."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from milvus_helpers import free_port, milvus_lite_server
from rankstream import RankstreamClient
from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc

REPLICAS = 3
QUERY = "how do rerankers order passages"
PASSAGES = [f"passage {i} about rerankers, retrieval and ranking" for i in range(20)]


def _serve(config: Path, log: Path) -> subprocess.Popen:
    script = Path(sys.executable).with_name("rankstream")
    return subprocess.Popen([str(script), "serve", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _wait_serving(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="rankstream.v1.Retriever")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    pytest.fail(f"replica on port {port} never SERVING")


def _scored_by(port: int, model: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        info = pb_grpc.InfoStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    return next(m for m in info.models if m.name == model).batcher.items


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("replicas")
    with milvus_lite_server(root / "milvus") as uri:
        ports = [free_port() for _ in range(REPLICAS)]
        processes = []
        try:
            for i, port in enumerate(ports):
                config = root / f"replica{i}.yaml"
                config.write_text(yaml.safe_dump({
                    "server": {"host": "127.0.0.1", "port": port, "drain_seconds": 1, "grace_seconds": 10},
                    "models": [{"name": "bi", "kind": "bi", "weights": str(models.distilbert)},
                               {"name": "tiny", "weights": str(models.bert)}],
                    "default_model": "tiny",
                    "indexes": [{"name": "shared", "backend": "milvus", "model": "bi",
                                 "milvus": {"uri": uri, "collection": "replicated"}}],
                }))
                processes.append(_serve(config, root / f"replica{i}.log"))
            for port in ports:
                _wait_serving(port)
            yield ports, processes
        finally:
            for process in processes:
                process.kill()
                process.wait()


def test_reranks_spread_over_every_replica_and_writes_are_seen_by_all(replicas):
    ports, _ = replicas
    before = [_scored_by(port, "tiny") for port in ports]
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)  # a headless Service's addresses
    with RankstreamClient(target, timeout=30) as client:
        for _ in range(12):
            assert len(client.rerank(QUERY, PASSAGES)) == len(PASSAGES)
    scored = [_scored_by(port, "tiny") - was for port, was in zip(ports, before)]
    assert all(count > 0 for count in scored), f"pairs scored per replica: {scored}"

    with RankstreamClient(f"127.0.0.1:{ports[0]}", timeout=30) as first:
        first.upsert([{"id": "shared-1", "text": "a passage written through the first replica about lighthouses",
                       "metadata": {"via": "replica-0"}}], index="shared")
    for port in ports[1:]:
        with RankstreamClient(f"127.0.0.1:{port}", timeout=30) as other:
            hits = other.retrieve("lighthouses", top_k=5, index="shared", filter={"via": "replica-0"})
            assert [hit.id for hit in hits] == ["shared-1"], f"replica on {port} does not see the write"
    with RankstreamClient(f"127.0.0.1:{ports[2]}", timeout=30) as last:
        assert last.delete(["shared-1"], index="shared").changed == 1
    with RankstreamClient(f"127.0.0.1:{ports[1]}", timeout=30) as other:
        assert len(other.retrieve("lighthouses", top_k=5, index="shared", filter={"via": "replica-0"})) == 0


def test_stopping_a_replica_mid_run_loses_no_retried_request(replicas):
    ports, processes = replicas
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    with RankstreamClient(target, timeout=30, max_attempts=5) as client:
        def call(_: int) -> int:
            return len(client.rerank(QUERY, PASSAGES))

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(call, i) for i in range(60)]
            while sum(f.done() for f in pending) < 10:
                time.sleep(0.02)
            processes[1].send_signal(signal.SIGTERM)  # drains 1 s, then closes; the client moves on
            results = [f.result() for f in pending]
    assert results == [len(PASSAGES)] * 60
    assert processes[1].wait(timeout=60) == 0


async def test_connections_are_recycled_so_clients_rebalance(models, caplog):
    """With max_connection_age_seconds the server sends GOAWAY; the channel reconnects by itself
    (round_robin then re-resolves and picks up new replicas) and calls keep working. Each new
    connection shows as a new client address in the access log."""
    import logging

    from conftest import make_settings, running

    settings = make_settings([{"name": "tiny", "weights": str(models.bert)}],
                             server={"max_connection_age_seconds": 0.5, "grace_seconds": 1})
    async with running(settings) as harness:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{harness.server.port}")
        try:
            stub = pb_grpc.RerankerStub(channel)
            with caplog.at_level(logging.INFO, logger="rankstream.access"):
                for _ in range(12):
                    call = stub.Rerank(pb.RerankRequest(query=QUERY, passages=[pb.Passage(text=p) for p in PASSAGES[:2]]),
                                       timeout=10, wait_for_ready=True)
                    assert len([p async for m in call for p in m.passages]) == 2
                    await asyncio.sleep(0.2)
        finally:
            await channel.close()
    peers = {r.peer for r in caplog.records if r.name == "rankstream.access" and r.rpc == "Rerank"}
    assert len(peers) >= 2, f"one connection for 2.4 s despite a 0.5 s connection age: {peers}"
