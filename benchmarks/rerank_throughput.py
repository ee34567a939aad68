"""Rerank throughput: the rankstream server over gRPC vs sentence-transformers in-process.

Same model (full-size MiniLM-L6-H384 cross-encoder built from the packaged all-MiniLM-L6-v2
body), same pairs, same torch thread count, measured one after the other in one run.

    .venv/bin/python benchmarks/rerank_throughput.py --pairs 1024 --threads 2

Prints a table: pairs/s for each path and the ratio to sentence-transformers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc
from rankstream_server.embedded import UNTRAINED_CROSS_ENCODER, build_minilm_cross_encoder, cache_dir

WORDS = (
    "the of and to in is for on that with as was by are be this from or at an it which have has not "
    "retrieval passage query model score rank search index document answer question dense sparse vector "
    "embedding neural network training data language learning transformer attention token layer batch "
    "server latency throughput cluster memory device kernel compute result relevance evaluation metric"
).split()


def make_pairs(count: int, passage_words: int, seed: int = 7) -> list[tuple[str, str]]:
    """Deterministic MS MARCO-shaped pairs: ~8-word queries, passages of about `passage_words` words."""
    rng = random.Random(seed)
    queries = [" ".join(rng.choices(WORDS, k=rng.randint(5, 10))) for _ in range(max(1, count // 32))]
    return [
        (queries[i % len(queries)], " ".join(rng.choices(WORDS, k=rng.randint(passage_words // 2, passage_words * 3 // 2))))
        for i in range(count)
    ]


def bench_sentence_transformers(model_dir: Path, pairs, batch_size: int, repeats: int) -> list[float]:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(model_dir), device="cpu")
    model.predict(pairs[:batch_size], batch_size=batch_size)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(pairs, batch_size=batch_size)
        times.append(time.perf_counter() - started)
    return times


def start_server(model_dir: Path, threads: int, batch_tokens: int, scratch: Path) -> tuple[subprocess.Popen, str]:
    config = scratch / "bench.yaml"
    config.write_text(
        f"server: {{host: 127.0.0.1, port: 0, torch_threads: {threads}}}\n"
        f"limits: {{max_passages: 1000}}\n"
        f"batching: {{max_batch_tokens: {batch_tokens or 'null'}, max_batch_size: 256, max_wait_ms: 2}}\n"
        f"models:\n  - {{name: minilm, weights: {model_dir}}}\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "rankstream_server.cli", "--log-level", "WARNING", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    address = process.stdout.readline().strip().rsplit(" ", 1)[1]
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        grpc.channel_ready_future(channel).result(timeout=120)
        request = health_pb2.HealthCheckRequest(service="rankstream.v1.Reranker")
        while health.Check(request).status != health_pb2.HealthCheckResponse.SERVING:
            time.sleep(0.2)
    return process, address


async def bench_server(address: str, pairs, per_request: int, concurrency: int, repeats: int) -> list[float]:
    requests = []
    for start in range(0, len(pairs), per_request):
        chunk = pairs[start : start + per_request]
        requests.append(pb.RerankRequest(query=chunk[0][0], passages=[pb.Passage(text=p) for _, p in chunk]))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RerankerStub(channel)

        async def worker(queue: asyncio.Queue) -> int:
            scored = 0
            while not queue.empty():
                request = queue.get_nowait()
                scored += len([r async for r in stub.Rerank(request, timeout=600)])
            return scored

        async def one_pass() -> float:
            queue: asyncio.Queue = asyncio.Queue()
            for request in requests:
                queue.put_nowait(request)
            started = time.perf_counter()
            scored = sum(await asyncio.gather(*(worker(queue) for _ in range(concurrency))))
            assert scored == len(pairs), (scored, len(pairs))
            return time.perf_counter() - started

        await one_pass()  # warm-up
        return [await one_pass() for _ in range(repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--passage-words", type=int, default=60, help="mean passage length in words")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-size", type=int, default=32, help="sentence-transformers predict batch size")
    parser.add_argument("--batch-tokens", type=int, default=0, help="server max_batch_tokens (0 = its default)")
    parser.add_argument("--per-request", type=int, default=100, help="passages per Rerank request")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent gRPC clients")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model_dir = build_minilm_cross_encoder(cache_dir() / UNTRAINED_CROSS_ENCODER)
    pairs = make_pairs(args.pairs, args.passage_words)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} torch threads; model: MiniLM-L6-H384 cross-encoder (fp32, CPU)")
    print(f"workload: {len(pairs)} pairs, ~{args.passage_words}-word passages, {args.repeats} timed runs each (median)\n")

    reference = bench_sentence_transformers(model_dir, pairs, args.batch_size, args.repeats)
    with tempfile.TemporaryDirectory() as scratch:
        process, address = start_server(model_dir, args.threads, args.batch_tokens, Path(scratch))
        try:
            served = asyncio.run(bench_server(address, pairs, args.per_request, args.concurrency, args.repeats))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)

    base = len(pairs) / statistics.median(reference)
    rows = [
        (f"sentence-transformers CrossEncoder.predict (in-process, batch_size={args.batch_size})", reference),
        (f"rankstream Rerank over gRPC ({args.concurrency} clients x {args.per_request} passages)", served),
    ]
    print(f"{'path':80s} {'median s':>9s} {'pairs/s':>9s} {'ratio':>6s}")
    for name, times in rows:
        rate = len(pairs) / statistics.median(times)
        print(f"{name:80s} {statistics.median(times):9.3f} {rate:9.1f} {rate / base:6.2f}")


if __name__ == "__main__":
    main()
