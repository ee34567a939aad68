"""Retrieval figures on a built index: recall@10 of HNSW and IVF (default parameters) against
exact search on its real embeddings, and Retrieve queries/s through a real server over gRPC.

    rankstream index build --config CONFIG --corpus ../shared/data/scifact --out /tmp/scifact-idx
    .venv/bin/python benchmarks/retrieval.py --config CONFIG --index scifact --data ../shared/data/scifact

CONFIG names the index (path, bi-encoder); --data gives queries.jsonl (BEIR layout).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc
from rankstream_server.config import load_settings
from rankstream_server.corpus import read_queries
from rankstream_server.docstore import DocStore
from rankstream_server.model_loading import load_model
from rankstream_server.offline import encode_texts
from rankstream_server.vector_index import VectorIndex, exact_search


def recall_table(settings, index_name: str, queries: list[str]) -> None:
    index = next(i for i in settings.indexes if i.name == index_name)
    encoder = load_model(settings.model(index.model))
    query_vectors = encode_texts(encoder, queries, "query")
    store = DocStore(f"{index.path}/docs.sqlite", query_vectors.shape[1])
    keys, vectors = store.all_vectors()
    store.close()
    exact = [set(exact_search(q, keys, vectors, 10).keys.tolist()) for q in query_vectors]
    print(f"ANN recall@10 vs exact: {len(keys)} passages, {len(queries)} queries, default parameters")
    print(f"{'type':6s} {'parameters':40s} {'build s':>8s} {'ms/query':>9s} {'recall@10':>10s}")
    for kind in ("flat", "hnsw", "ivf"):
        config = index.model_copy(update={"type": kind})
        started = time.perf_counter()
        built = VectorIndex.build(vectors.shape[1], keys, vectors, config)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        found = [set(built.search(q, 10).keys.tolist()) for q in query_vectors]
        per_query_ms = (time.perf_counter() - started) * 1000 / len(queries)
        recall = statistics.mean(len(e & f) / 10 for e, f in zip(exact, found))
        print(f"{built.built_type:6s} {built.parameters():40s} {build_s:8.2f} {per_query_ms:9.3f} {recall:10.3f}")


async def retrieve_rate(address: str, queries: list[str], concurrency: int, top_k: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RetrieverStub(channel)
        pending = list(queries)

        async def worker() -> None:
            while pending:
                query = pending.pop()
                results = [r async for r in stub.Retrieve(pb.RetrieveRequest(query=query, top_k=top_k), timeout=60)]
                assert len(results) == top_k

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(queries) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args()
    settings = load_settings(args.config)
    queries = list(read_queries(args.data).values())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; data: {args.data}\n")
    recall_table(settings, args.index, queries)

    process = subprocess.Popen(
        [sys.executable, "-m", "rankstream_server.cli", "--log-level", "WARNING", "serve", "--config", args.config,
         "--port", "0", "--host", "127.0.0.1"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        address = process.stdout.readline().strip().rsplit(" ", 1)[1]
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="rankstream.v1.Retriever")
            while health.Check(request).status != health_pb2.HealthCheckResponse.SERVING:
                time.sleep(0.2)
        asyncio.run(retrieve_rate(address, queries[:50], args.concurrency, args.top_k))  # warm-up
        rate = asyncio.run(retrieve_rate(address, queries, args.concurrency, args.top_k))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    print(f"\nRetrieve over gRPC: {len(queries)} queries, top_k={args.top_k}, {args.concurrency} concurrent clients: "
          f"{rate:.1f} queries/s (query encoding + {settings.indexes[0].type} search + store lookup)")


if __name__ == "__main__":
    main()
