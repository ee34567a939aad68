"""The batcher under faults and overload, without a model: failed passes split and retried,
errors only for rows that fail alone, health, no hang after an internal error, and admission by
measured time (issue 8, items 7 and 9)."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rankstream_server.config import BatchingConfig
from rankstream_server.errors import InferenceFailed, ResourceExhausted
from rankstream_server.inference.batcher import DynamicBatcher, Job
from rankstream_server.inference.tokenization import Tokens

from conftest import QUERY, make_settings, passages, running


def tokens_of(lengths: list[int]) -> Tokens:
    lengths_array = np.array(lengths, dtype=np.int32)
    return Tokens(np.ones((len(lengths), max(lengths)), dtype=np.int64), None, lengths_array, 0)


class FaultyBackend:
    """Scores a row as its length. Fails passes of more than `max_rows` rows (like a CUDA OOM),
    any pass holding a row of length `poison`, or every pass while `broken`; can be slow."""

    asynchronous = False

    def __init__(self, max_rows: int = 1 << 30, poison: int | None = None, seconds_per_pass: float = 0.0):
        self.max_rows = max_rows
        self.poison = poison
        self.broken = False
        self.seconds_per_pass = seconds_per_pass
        self.passes: list[int] = []  # rows of each attempted pass

    def launch(self, batch):
        self.passes.append(batch.real)
        time.sleep(self.seconds_per_pass)
        lengths = np.zeros(batch.real, dtype=np.float32)
        for piece in batch.pieces:
            lengths[piece.slots] = piece.tokens.lengths[piece.rows]
        if self.broken or batch.real > self.max_rows or (self.poison is not None and self.poison in lengths):
            raise RuntimeError("CUDA out of memory (simulated)")
        return type("Done", (), {"result": lambda self: lengths})()


async def collect(job: Job) -> dict[int, float]:
    return {int(i): float(s) async for indices, scores in job.results() for i, s in zip(indices, scores)}


def make(backend, **config) -> DynamicBatcher:
    return DynamicBatcher("faulty", backend, BatchingConfig(**{"max_wait_ms": 0, "max_batch_size": 16, **config}))


async def test_a_failed_pass_is_split_and_retried_until_it_fits():
    backend = FaultyBackend(max_rows=3)
    subject = make(backend)
    lengths = [5, 9, 4, 7, 6, 8, 3, 2, 11, 10]
    job = Job(size=len(lengths))
    subject.submit(job, tokens_of(lengths))
    assert await collect(job) == {i: float(n) for i, n in enumerate(lengths)}
    assert subject.healthy and subject.in_flight == 0
    subject.close()
    assert max(backend.passes) == 10 and any(rows <= 3 for rows in backend.passes)
    assert not subject.healthy, "a stopped batcher is not healthy"


async def test_only_the_request_with_the_row_that_fails_alone_gets_an_error():
    backend = FaultyBackend(poison=13)
    subject = make(backend, max_wait_ms=50)  # both requests land in one pass
    bad, good = Job(size=3), Job(size=3)
    subject.submit(bad, tokens_of([4, 13, 5]))
    subject.submit(good, tokens_of([6, 7, 8]))
    assert await collect(good) == {0: 6.0, 1: 7.0, 2: 8.0}
    with pytest.raises(InferenceFailed, match="see the server log"):
        await collect(bad)
    assert subject.in_flight == 0 and subject.healthy, "one bad row does not make the model unhealthy"
    subject.close()


async def test_health_turns_false_while_every_pass_fails_and_back_when_they_run():
    backend = FaultyBackend()
    backend.broken = True
    subject = make(backend)
    for _ in range(3):
        job = Job(size=1)
        subject.submit(job, tokens_of([4]))
        with pytest.raises(InferenceFailed):
            await collect(job)
    assert not subject.healthy
    backend.broken = False
    job = Job(size=1)
    subject.submit(job, tokens_of([4]))
    assert await collect(job) == {0: 4.0}
    assert subject.healthy
    subject.close()


async def test_an_internal_error_fails_the_held_pass_instead_of_hanging_it():
    backend = FaultyBackend()
    subject = make(backend)
    real_live = subject._live
    calls = {"n": 0}

    def breaks_once(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("a bug in the batcher")
        return real_live(batch)

    subject._live = breaks_once
    victim = Job(size=2)
    subject.submit(victim, tokens_of([3, 4]))
    with pytest.raises(InferenceFailed):
        await asyncio.wait_for(collect(victim), 10)
    survivor = Job(size=2)
    subject.submit(survivor, tokens_of([3, 4]))
    assert await asyncio.wait_for(collect(survivor), 10) == {0: 3.0, 1: 4.0}
    subject.close()
    assert subject.in_flight == 0, "no capacity leaked"


async def test_measured_time_refuses_what_cannot_meet_its_deadline_or_would_queue_too_long():
    backend = FaultyBackend(seconds_per_pass=0.02)
    subject = make(backend, max_batch_size=4, max_batch_tokens=80, max_queue_seconds=0.5)
    warm = Job(size=8)
    subject.submit(warm, tokens_of([10] * 8))
    await collect(warm)
    assert subject.expected_wait(40) == pytest.approx(0.02, rel=0.5)  # 40 tokens: one pass's worth at the measured drain
    with pytest.raises(ResourceExhausted, match="before its deadline"):
        subject.submit(Job(size=40, deadline=time.monotonic() + 0.01), tokens_of([10] * 40))
    backend.seconds_per_pass = 0.2  # slow the model: a long queue builds up
    first = Job(size=40)
    subject.submit(first, tokens_of([10] * 40))
    await asyncio.sleep(0.5)  # a slow pass is measured
    with pytest.raises(ResourceExhausted, match="max_queue_seconds"):
        subject.submit(Job(size=40), tokens_of([10] * 40))
    subject.cancel(first)
    subject.close()


async def test_health_goes_not_serving_when_a_model_keeps_failing(models):
    settings = make_settings([{"name": "tiny-bert", "weights": str(models.bert)}], batching={"max_wait_ms": 0})
    async with running(settings) as harness:
        health = health_pb2_grpc.HealthStub(harness.channel)
        check = health_pb2.HealthCheckRequest(service="rankstream.v1.Reranker")
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
        backend = harness.server._readiness.registry.get("tiny-bert").batcher._backend
        working = backend.launch

        def broken(batch):
            raise RuntimeError("CUDA error: device-side assert (simulated)")

        backend.launch = broken
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError):
                await harness.rerank(query=QUERY, passages=passages(["a"]))
        for _ in range(30):
            if (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("health stayed SERVING while every pass failed")
        backend.launch = working
        results, _ = await harness.rerank(query=QUERY, passages=passages(["a", "b"]))
        assert len(results) == 2
        for _ in range(30):
            if (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("health never came back")
