"""The rerank load over the HTTP front (Cohere's `POST /v2/rerank`), measured like common.drive
measures it over gRPC: `clients` concurrent clients, each on its own keep-alive connection
(aiohttp, one connection per client), sending the same requests; pairs/s, latencies and the CPU
both sides used go into a common.Load."""

from __future__ import annotations

import asyncio
import itertools
import resource
import time
from collections.abc import Sequence

import common
import orjson


def bodies(requests: Sequence) -> list[bytes]:
    """Each RerankRequest as the Cohere v2 JSON body (the same query, documents and model)."""
    return [orjson.dumps({"model": r.model, "query": r.query, "documents": [p.text for p in r.passages]})
            for r in requests]


async def _clients(base: str, payloads: list[bytes], sizes: list[int], clients: int, calls: int,
                   max_seconds: float) -> tuple[common.Load, float, float]:
    import aiohttp

    load = common.Load("Rerank over HTTP", clients)
    next_call = itertools.count()
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), headers={"content-type": "application/json"})
                for _ in range(clients)]
    url = base + "/v2/rerank"
    try:
        started = time.perf_counter()
        deadline = started + max_seconds

        async def client(session) -> None:
            while time.perf_counter() < deadline:
                i = next(next_call)
                if i >= calls:
                    return
                sent = time.perf_counter()
                for attempt in itertools.count():
                    async with session.post(url, data=payloads[i % len(payloads)], timeout=aiohttp.ClientTimeout(600)) as answer:
                        body = await answer.read()
                        if answer.status == 429 and time.perf_counter() - sent < 600:
                            load.rejected += 1
                            await asyncio.sleep(min(1.0, 0.02 * 2**attempt))
                            continue
                        if answer.status != 200:
                            load.errors.append(f"{answer.status}: {body[:200]!r}")
                            break
                        load.latencies_ms.append((time.perf_counter() - sent) * 1000)
                        load.calls += 1
                        load.items += sizes[i % len(sizes)]
                        load.returned += len(orjson.loads(body)["results"])
                        break

        await asyncio.gather(*(client(session) for session in sessions))
        return load, started, time.perf_counter()
    finally:
        for session in sessions:
            await session.close()


def drive_http(server: common.Server, requests: Sequence, clients: int, calls: int, max_seconds: float = 60) -> common.Load:
    """`calls` Cohere v2 rerank calls from `clients` keep-alive clients; CPU and timing as in common.drive."""
    payloads, sizes = bodies(requests), [len(r.passages) for r in requests]
    server_before = server.cpu_seconds()
    threads_before = common.thread_cpu_seconds(server.pid)
    watch = common.Watch(server.pid).__enter__()
    before = resource.getrusage(resource.RUSAGE_SELF)
    load, started, ended = asyncio.run(_clients(server.http_base, payloads, sizes, clients, calls, max_seconds))
    after = resource.getrusage(resource.RUSAGE_SELF)
    watch.__exit__()
    load.client_cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    load.other_pct = watch.other_pct
    load.seconds = ended - started
    load.clients = clients
    load.server_cpu_s = server.cpu_seconds() - server_before
    load.server_threads_s = {tid: cpu - threads_before.get(tid, 0.0)
                             for tid, cpu in common.thread_cpu_seconds(server.pid).items()}
    return load
