"""Load test: goodput under overload (issue 8).

Many concurrent clients mix small and large Rerank requests, Retrieve queries and upserts, with
random deadlines and cancellations, against a `rankstream serve` process on 127.0.0.1, first
below saturation (the peak), then far past it. It checks and prints:
- the server survives; every result belongs to its request (each passage id names its request,
  and each score equals the reference score of that passage);
- goodput (pairs of requests completed within their deadline, per second) at saturation
  against the peak: the target is >= 0.9x;
- how requests ended: OK, RESOURCE_EXHAUSTED (refused at once), DEADLINE_EXCEEDED, CANCELLED;
- the server's RSS after warm-up and at the end.

    .venv/bin/python benchmarks/load.py [--seconds 30] [--clients 48] [--model embedded:all-MiniLM-L6-v2]

Bounded in time and count, loopback only. `tests/test_load.py` runs a 20-second version.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc

WORDS = ("retrieval model passage query ranking neural dense sparse index vector token batch latency "
         "throughput scientific claim evidence protein cell gene study results ocean climate engine "
         "river mountain history music theory market policy energy battery").split()
QUERIES = ["how do dense retrievers rank passages", "protein evidence in cell studies", "river and ocean climate policy"]


def passage_pool(count: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 70))) for _ in range(count)]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def backoff(error: grpc.aio.AioRpcError, refusals: list[int]) -> None:
    """What a well-behaved client does when told to retry later: back off exponentially with
    jitter (0.1 s doubling to 2 s, like gRPC's retry policy), and reset once a call goes through."""
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        refusals[0] += 1
        await asyncio.sleep(random.uniform(0.5, 1.0) * min(2.0, 0.1 * 2 ** (refusals[0] - 1)))


@dataclass
class Outcomes:
    codes: collections.Counter = field(default_factory=collections.Counter)
    good_pairs: int = 0
    wrong: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


class Load:
    """Drives one phase of load and checks every result against the reference scores."""

    def __init__(self, channel: grpc.aio.Channel, pool: list[str], reference: dict[tuple[int, int], float], seed: int):
        self.reranker = pb_grpc.RerankerStub(channel)
        self.retriever = pb_grpc.RetrieverStub(channel)
        self.pool = pool
        self.reference = reference  # (query index, pool index) -> score
        self.rng = random.Random(seed)
        self.serial = 0

    async def _rerank(self, out: Outcomes, deadline: float, cancel: bool, refusals: list[int]) -> None:
        self.serial += 1
        request_id = self.serial
        query = self.rng.randrange(len(QUERIES))
        size = self.rng.choice([5, 10, 20, 50, 100, 300])
        picked = [self.rng.randrange(len(self.pool)) for _ in range(size)]
        passages = [pb.Passage(id=f"r{request_id}:{i}:{p}", text=self.pool[p]) for i, p in enumerate(picked)]
        call = self.reranker.Rerank(pb.RerankRequest(query=QUERIES[query], passages=passages, raw_scores=True), timeout=deadline)
        started = time.perf_counter()
        if cancel:
            asyncio.get_running_loop().call_later(self.rng.uniform(0, deadline), call.cancel)
        try:
            results = [p async for message in call for p in message.passages]
        except grpc.aio.AioRpcError as error:
            out.codes[error.code().name] += 1
            await backoff(error, refusals)
            return
        except asyncio.CancelledError:
            out.codes["CANCELLED"] += 1
            return
        if call.cancelled():
            out.codes["CANCELLED"] += 1
            return
        out.codes["OK"] += 1
        refusals[0] = 0
        out.latencies.append(time.perf_counter() - started)
        if len(results) != size:
            out.wrong.append(f"request {request_id}: {len(results)} results for {size} passages")
        for result in results:
            owner, index, pool_index = result.id[1:].split(":")
            expected = self.reference.get((query, int(pool_index)))
            if int(owner) != request_id or picked[int(index)] != int(pool_index):
                out.wrong.append(f"request {request_id} got {result.id}")
            elif expected is not None and abs(result.score - expected) > 1e-3:
                out.wrong.append(f"request {request_id}: {result.id} scored {result.score}, reference {expected}")
        out.good_pairs += size

    async def _retrieve(self, out: Outcomes, deadline: float, refusals: list[int]) -> None:
        try:
            async for _ in self.retriever.Retrieve(pb.RetrieveRequest(query=self.rng.choice(QUERIES), top_k=10), timeout=deadline):
                pass
            out.codes["OK"] += 1
        except grpc.aio.AioRpcError as error:
            out.codes[error.code().name] += 1
            await backoff(error, refusals)

    async def _upsert(self, out: Outcomes, deadline: float, refusals: list[int]) -> None:
        self.serial += 1
        texts = [self.pool[self.rng.randrange(len(self.pool))] for _ in range(self.rng.randint(5, 50))]
        passages = [pb.Passage(id=f"u{self.serial}-{i}", text=t) for i, t in enumerate(texts)]
        try:
            await self.retriever.UpsertPassages(pb.UpsertPassagesRequest(passages=passages), timeout=deadline)
            out.codes["OK"] += 1
        except grpc.aio.AioRpcError as error:
            out.codes[error.code().name] += 1
            await backoff(error, refusals)

    async def run(self, clients: int, seconds: float, deadlines: tuple[float, float], cancel_rate: float) -> tuple[Outcomes, float]:
        out = Outcomes()
        stop = time.perf_counter() + seconds

        async def client() -> None:
            refusals = [0]  # consecutive RESOURCE_EXHAUSTED answers
            while time.perf_counter() < stop:
                deadline = min(self.rng.uniform(*deadlines), max(stop - time.perf_counter(), 0.05) + 5)
                kind = self.rng.random()
                if kind < 0.8:
                    await self._rerank(out, deadline, self.rng.random() < cancel_rate, refusals)
                elif kind < 0.95:
                    await self._retrieve(out, deadline, refusals)
                else:
                    await self._upsert(out, deadline, refusals)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return out, time.perf_counter() - started


def reference_scores(model: str, pool: list[str]) -> dict[tuple[int, int], float]:
    """Raw scores of every (query, passage) pair computed in-process, without the server."""
    from rankstream_server.config import ModelConfig
    from rankstream_server.inference.model_loading import load_model
    from rankstream_server.inference.offline import score_pairs

    loaded = load_model(ModelConfig(name="reference", weights=model, kind="cross" if not model.startswith("embedded:all") else "bi"))
    pairs = [(query, passage) for query in QUERIES for passage in pool]
    scores = score_pairs(loaded, pairs)
    return {(q, p): float(scores[q * len(pool) + p]) for q in range(len(QUERIES)) for p in range(len(pool))}


def start_server(model: str, folder: Path) -> tuple[subprocess.Popen, int]:
    kind = "bi" if model.startswith("embedded:all") else "cross"
    config = folder / "load.yaml"
    models = [{"name": "scorer", "kind": kind, "weights": model}]
    if kind == "cross":
        models.append({"name": "encoder", "kind": "bi", "weights": "embedded:all-MiniLM-L6-v2"})
    config.write_text(json.dumps({
        "server": {"host": "127.0.0.1", "port": 0},
        "models": models, "default_model": "scorer",
        "limits": {"max_passages": 300},
        "indexes": [{"name": "load", "path": str(folder / "index"), "model": models[-1]["name"], "create": True}],
    }))
    script = Path(sys.executable).with_name("rankstream")
    process = subprocess.Popen([str(script), "serve", "--config", str(config)], stdout=subprocess.PIPE,
                               stderr=(folder / "server.log").open("w"), text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    port = int(process.stdout.readline().rsplit(":", 1)[1])
    return process, port


async def wait_ready(channel: grpc.aio.Channel) -> None:
    info = pb_grpc.InfoStub(channel)
    for _ in range(600):
        try:
            await info.ListModels(pb.ListModelsRequest(), timeout=5)
            return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.2)
    raise RuntimeError("server never became ready")


async def measure(model: str, seconds: float, clients: int, folder: Path, pool_size: int = 400) -> dict:
    pool = passage_pool(pool_size)
    reference = reference_scores(model, pool)
    process, port = start_server(model, folder)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await wait_ready(channel)
        load = Load(channel, pool, reference, seed=1)
        await load.run(4, min(3.0, seconds / 4), (30, 30), 0.0)  # warm-up
        rss_start = rss_mib(process.pid)
        peak, peak_s = await load.run(4, seconds, (30, 30), 0.0)
        overload, overload_s = await load.run(clients, seconds, (0.05, 30), 0.05)
        alive = process.poll() is None
        rss_end = rss_mib(process.pid) if alive else float("nan")
    finally:
        await channel.close()
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    log = (folder / "server.log").read_text()
    return {
        "peak_pairs_per_s": peak.good_pairs / peak_s,
        "saturated_pairs_per_s": overload.good_pairs / overload_s,
        "peak_codes": dict(peak.codes), "saturated_codes": dict(overload.codes),
        "wrong": peak.wrong + overload.wrong,
        "alive": alive, "exit_code": process.returncode,
        "rss_mib_after_warmup": rss_start, "rss_mib_end": rss_end,
        "p50_ms_saturated": float(np.median(overload.latencies) * 1000) if overload.latencies else float("nan"),
        "task_exceptions_in_log": log.count("Task exception was never retrieved"),
        "tracebacks_in_log": log.count("Traceback"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="each phase's length")
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--model", default="embedded:all-MiniLM-L6-v2",
                        help="the Rerank scorer: a cross-encoder folder, or embedded:all-MiniLM-L6-v2 (bi-encoder)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}")
    print(f"model {args.model}; peak: 4 clients, 30 s deadlines; saturated: {args.clients} clients, "
          f"deadlines 50 ms-30 s, 5% cancelled; {args.seconds:g} s each; Rerank 80% (5-300 passages), Retrieve 15%, upserts 5%")
    with tempfile.TemporaryDirectory() as folder:
        result = asyncio.run(measure(args.model, args.seconds, args.clients, Path(folder)))
    ratio = result["saturated_pairs_per_s"] / result["peak_pairs_per_s"] if result["peak_pairs_per_s"] else 0.0
    print("\n| phase | goodput pairs/s | outcomes |\n|---|---:|---|")
    print(f"| peak (4 clients) | {result['peak_pairs_per_s']:.1f} | {result['peak_codes']} |")
    print(f"| saturated ({args.clients} clients) | {result['saturated_pairs_per_s']:.1f} | {result['saturated_codes']} |")
    print(f"\ngoodput at saturation / peak: {ratio:.2f} (target >= 0.9: {'PASS' if ratio >= 0.9 else 'MISS'})")
    print(f"p50 latency of completed Reranks at saturation: {result['p50_ms_saturated']:.0f} ms")
    print(f"server alive: {result['alive']}; wrong results: {len(result['wrong'])}; "
          f"RSS {result['rss_mib_after_warmup']:.0f} -> {result['rss_mib_end']:.0f} MiB; "
          f"'Task exception was never retrieved' in log: {result['task_exceptions_in_log']}")


if __name__ == "__main__":
    main()
