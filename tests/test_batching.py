"""Dynamic batching through a real server: shared batches across clients, cancelled and expired
work dropped before it runs, and a full queue refused at once."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import pytest_asyncio

from rankstream.v1 import rankstream_pb2 as pb

from conftest import QUERY, TEXTS, make_settings, passages, running, stats_of

LONG = " ".join(["Reranking long passages keeps the model busy for a while."] * 40)  # ~400 tokens


@pytest_asyncio.fixture(scope="module")
async def merging(models):
    """A wide batching window, so concurrent requests land in the same forward pass."""
    settings = make_settings([{"name": "tiny-bert", "weights": str(models.bert)}], batching={"max_wait_ms": 150})
    async with running(settings) as harness:
        yield harness


@pytest_asyncio.fixture(scope="module")
async def slow(models):
    """Full-size MiniLM, two long pairs per forward pass, a 64-pair queue: work stays queued for seconds."""
    settings = make_settings(
        [{"name": "minilm", "weights": str(models.minilm)}],
        batching={"max_batch_size": 2, "queue_capacity": 64, "max_wait_ms": 0},
        limits={"max_passages": 64},
    )
    async with running(settings) as harness:
        yield harness


async def settled(harness, name: str) -> pb.BatcherStats:
    """Waits for the model's queue to empty, then returns its counters."""
    for _ in range(600):
        info = await harness.model_info(name)
        if info.batcher.in_flight == 0:
            return info.batcher
        await asyncio.sleep(0.05)
    raise AssertionError("queue never drained")


async def test_concurrent_clients_share_forward_passes(merging):
    requests = [merging.rerank(query=f"{QUERY} {i}", passages=passages(TEXTS[:3])) for i in range(8)]
    outcomes = await asyncio.gather(*requests)
    assert all(len(results) == 3 for results, _ in outcomes)
    shared = [stats.shared_batches for _, stats in outcomes]
    assert sum(shared) > 0, f"no request shared a batch: {shared}"
    assert max(stats.max_batch_size for _, stats in outcomes) > 3
    counters = await settled(merging, "tiny-bert")
    assert counters.max_requests_per_batch > 1
    assert counters.batches < 8, "eight requests took fewer forward passes than requests"


async def test_cancelled_request_work_is_dropped_before_it_runs(slow):
    before = await settled(slow, "minilm")
    call = slow.reranker.Rerank(
        pb.RerankRequest(query=QUERY, passages=passages([LONG] * 64), order=pb.AS_SCORED), timeout=120
    )
    first = await call.read()
    assert 0 < len(first.passages) < 64 and first.passages[0].rank == 0
    call.cancel()
    after = await settled(slow, "minilm")
    scored = after.items - before.items
    dropped = after.dropped - before.dropped
    assert scored + dropped == 64
    assert dropped >= 32, f"only {dropped} of 64 pairs were dropped after cancelling at the first result"


async def test_full_queue_is_refused_at_once_and_the_server_recovers(slow):
    before = await settled(slow, "minilm")
    big = slow.reranker.Rerank(
        pb.RerankRequest(query=QUERY, passages=passages([LONG] * 64), order=pb.AS_SCORED), timeout=120
    )
    received = list((await big.read()).passages)  # admitted and running: the queue now holds the rest
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await slow.rerank(query=QUERY, passages=passages(["one more"] * 16))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = caught.value.details()
    # Refused by the load gate before decoding (the queue holds more than max_queue_seconds of
    # work at the measured drain), or by the pair capacity once decoded, whichever is measured first.
    assert ("queue is full" in details and "of 64 pairs" in details and "adds 16" in details) or (
        "max_queue_seconds=10" in details), details
    assert int(dict(caught.value.trailing_metadata())["grpc-retry-pushback-ms"]) >= 0  # less the time it was held
    busy = await slow.model_info("minilm")
    assert busy.batcher.in_flight > 0, "the event loop answers while the model works"
    while (message := await big.read()) is not grpc.aio.EOF:
        received.extend(message.passages)
    assert len(received) == 64 and stats_of(await big.trailing_metadata()).scored == 64
    results, _ = await slow.rerank(query=QUERY, passages=passages(["one more"] * 16))
    assert len(results) == 16
    after = await settled(slow, "minilm")
    assert after.rejected - before.rejected == 1


async def test_a_request_that_cannot_meet_its_deadline_costs_no_work(slow):
    """Once the batcher has measured its passes, a request whose deadline cannot be met is refused
    at admission (RESOURCE_EXHAUSTED, naming the deadline); before that, it expires in the queue
    (DEADLINE_EXCEEDED) and its remaining work is dropped. Either way most of it never runs."""
    before = await settled(slow, "minilm")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await slow.rerank(query=QUERY, passages=passages([LONG] * 64), timeout=0.5)
    after = await settled(slow, "minilm")
    if caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert "before its deadline" in caught.value.details()
        assert after.items == before.items and after.rejected == before.rejected + 1
    else:
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert after.dropped - before.dropped > 0
        assert after.items - before.items < 64


async def test_measured_admission_refuses_at_once_what_would_expire(slow):
    await slow.rerank(query=QUERY, passages=passages([LONG] * 8))  # the batcher measures its passes
    before = await settled(slow, "minilm")
    started = asyncio.get_running_loop().time()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await slow.rerank(query=QUERY, passages=passages([LONG] * 64), timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    assert "before its deadline" in caught.value.details()
    assert asyncio.get_running_loop().time() - started < 0.3, "refused at once, not after waiting"
    after = await settled(slow, "minilm")
    assert after.items == before.items, "no pass was spent on it"
