"""Retrieval figures on a built index: recall@10 of HNSW and IVF (default parameters) against
exact search on its real embeddings, and Retrieve queries/s through a real server over gRPC.

    rankstream index build --config CONFIG --corpus ../shared/data/scifact --out /tmp/scifact-idx
    .venv/bin/python benchmarks/retrieval.py --config CONFIG --index scifact --data ../shared/data/scifact

CONFIG names the index (path, bi-encoder); --data gives queries.jsonl (BEIR layout).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from rankstream.v1 import rankstream_pb2 as pb
from rankstream_server.config import load_settings
from rankstream_server.index.corpus import read_queries
from rankstream_server.index.store import DocStore
from rankstream_server.index.vectors import VectorIndex, exact_search
from rankstream_server.inference.model_loading import load_model
from rankstream_server.inference.offline import encode_texts

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args()
    common.quiet_libraries()
    settings = load_settings(args.config)
    queries = list(read_queries(args.data).values())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; data: {args.data}\n")
    recall_table(settings, args.index, queries)

    with common.scratch_dir() as scratch, common.Server(settings.model_dump(mode="json"), scratch) as server:
        warm = [pb.RetrieveRequest(query=q, top_k=args.top_k, index=args.index) for q in queries[:50]]
        common.drive(server, "Retrieve", warm, args.concurrency, len(warm))
        requests = [pb.RetrieveRequest(query=q, top_k=args.top_k, index=args.index) for q in queries]
        load = common.drive(server, "Retrieve", requests, args.concurrency, len(requests), max_seconds=3600)
    common.check(load, args.top_k)
    print(f"\nRetrieve over gRPC: {len(queries)} queries, top_k={args.top_k}, {args.concurrency} concurrent clients: "
          f"{load.rate:.1f} queries/s, p50 {load.percentile(50):.1f} ms (query encoding + "
          f"{settings.indexes[0].type} search + store lookup)")


if __name__ == "__main__":
    main()
