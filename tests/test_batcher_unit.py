"""The dynamic batcher on its own, with a recording backend: no model, no server."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from rankstream_server.config import BatchingConfig
from rankstream_server.errors import InferenceFailed, ResourceExhausted
from rankstream_server.inference.batcher import DynamicBatcher, Job
from rankstream_server.inference.tokenization import Tokens


class RecordingBackend:
    """Scores a pair as its length; records batch shapes; can be held to pile work up."""

    asynchronous = False

    def __init__(self, fail: bool = False):
        self.batches: list[list[tuple[int, int]]] = []  # per batch, in slot order: (index, length)
        self.owners: list[list[object]] = []  # per batch: the jobs it carried
        self.gate = threading.Event()
        self.gate.set()
        self.fail = fail

    def launch(self, batch):
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("device fell over")
        rows = [None] * batch.real
        for piece in batch.pieces:
            for row, slot in zip(piece.rows.tolist(), piece.slots.tolist()):
                rows[slot] = (row, int(piece.tokens.lengths[row]))
        self.batches.append(rows)
        self.owners.append([piece.owner for piece in batch.pieces])
        scores = np.array([length for _, length in rows], dtype=np.float32)
        return type("Done", (), {"result": lambda self: scores})()


def pairs_of(lengths: list[int]) -> Tokens:
    lengths = np.array(lengths, dtype=np.int32)
    ids = np.zeros((len(lengths), int(lengths.max())), dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = 1
    return Tokens(ids, None, lengths, 0)


async def collect(job: Job) -> dict[int, float]:
    return {int(i): float(s) async for indices, scores in job.results() for i, s in zip(indices, scores)}


def batcher(backend, **overrides) -> DynamicBatcher:
    return DynamicBatcher("unit", backend, BatchingConfig(**{"max_wait_ms": 0, **overrides}))


async def test_batches_respect_the_padded_token_budget_and_sort_by_length():
    backend = RecordingBackend()
    subject = batcher(backend, max_batch_tokens=100, max_batch_size=8)
    lengths = [10, 50, 20, 40, 30, 5, 45]
    job = Job(size=len(lengths))
    subject.submit(job, pairs_of(lengths))
    scores = await collect(job)
    subject.close()
    assert scores == {i: float(n) for i, n in enumerate(lengths)}
    for batch in backend.batches:
        widths = [n for _, n in batch]
        assert max(widths) * len(widths) <= 100
        assert widths == sorted(widths, reverse=True), "longest first, so padding stays small"
    assert sum(len(b) for b in backend.batches) == len(lengths)


async def test_a_pair_over_the_budget_still_runs_alone():
    backend = RecordingBackend()
    subject = batcher(backend, max_batch_tokens=16)
    job = Job(size=2)
    subject.submit(job, pairs_of([40, 3]))
    assert await collect(job) == {0: 40.0, 1: 3.0}
    subject.close()
    assert [len(b) for b in backend.batches] == [1, 1]


async def test_requests_waiting_together_share_a_batch_and_full_queue_is_refused():
    backend = RecordingBackend()
    backend.gate.clear()  # hold the thread so work piles up
    subject = batcher(backend, queue_capacity=10, max_batch_size=16)
    first, second = Job(size=4), Job(size=4)
    subject.submit(Job(size=1), pairs_of([7]))  # taken by the held thread
    await asyncio.sleep(0.05)
    subject.submit(first, pairs_of([3, 3, 3, 3]))
    subject.submit(second, pairs_of([2, 2, 2, 2]))
    with pytest.raises(ResourceExhausted, match="9 of 10 pairs in flight, request adds 2"):
        subject.submit(Job(size=2), pairs_of([1, 1]))
    backend.gate.set()
    assert len(await collect(first)) == 4 and len(await collect(second)) == 4
    subject.close()
    assert [len(b) for b in backend.batches] == [1, 8]
    assert first.stats.shared_batches == 1 and second.stats.shared_batches == 1
    assert subject.counters.max_requests_per_batch == 2 and subject.counters.rejected == 1


async def test_cancelled_work_is_dropped_and_frees_the_queue():
    backend = RecordingBackend()
    backend.gate.clear()
    subject = batcher(backend, queue_capacity=8)
    subject.submit(Job(size=1), pairs_of([5]))
    await asyncio.sleep(0.05)
    doomed = Job(size=6)
    subject.submit(doomed, pairs_of([4] * 6))
    assert subject.in_flight == 7
    subject.cancel(doomed)
    assert subject.in_flight == 1 and subject.counters.dropped == 6
    survivor = Job(size=6)
    subject.submit(survivor, pairs_of([4] * 6))
    backend.gate.set()
    assert len(await collect(survivor)) == 6
    subject.close()
    assert sum(len(b) for b in backend.batches) == 7


async def test_expired_work_is_dropped_and_reported():
    import time

    backend = RecordingBackend()
    backend.gate.clear()
    subject = batcher(backend)
    subject.submit(Job(size=1), pairs_of([5]))
    await asyncio.sleep(0.05)
    late = Job(size=3, deadline=time.monotonic() + 0.01)
    subject.submit(late, pairs_of([4, 4, 4]))
    await asyncio.sleep(0.05)
    backend.gate.set()
    with pytest.raises(Exception, match="deadline passed"):
        await collect(late)
    subject.close()
    assert subject.counters.dropped == 3 and subject.in_flight == 0


async def test_passes_cut_and_not_yet_launched_count_in_the_expected_wait():
    """The batcher cuts a few passes at once; while they wait behind the running one, admission
    must still count them (else it promises waits the queue cannot keep)."""
    backend = RecordingBackend()
    backend.gate.clear()
    subject = batcher(backend, max_batch_tokens=40, max_batch_size=4)
    subject._drain.tokens_per_second = 100.0  # tokens a second, as if measured
    job = Job(size=16)
    subject.submit(job, pairs_of([10] * 16))  # four passes of 4 x 10: one runs (held), three wait cut
    await asyncio.sleep(0.05)
    assert subject._ready_tokens == 120 and subject._running_tokens == 40
    assert subject.expected_wait() == pytest.approx(160 / 100.0)
    backend.gate.set()
    assert len(await collect(job)) == 16
    subject.close()
    assert subject._ready_tokens == 0 and subject._running_tokens == 0


async def test_work_that_cannot_finish_by_its_deadline_is_dropped_before_it_runs():
    """Admitted while the model was fast, a request reaches the head of the queue after it has
    slowed down: its whole remaining work can no longer be done before its deadline (its first
    pass alone would be), so it is dropped unrun, while one that can finish runs."""
    import time

    backend = RecordingBackend()
    backend.gate.clear()
    subject = batcher(backend, max_batch_tokens=40, max_batch_size=4)
    subject._drain.tokens_per_second = 1000.0
    subject.submit(Job(size=1), pairs_of([5]))  # held at the gate
    await asyncio.sleep(0.05)
    doomed = Job(size=12, deadline=time.monotonic() + 0.8)  # 120 tokens: 0.12 s of work at admission
    subject.submit(doomed, pairs_of([10] * 12))
    fine = Job(size=2, deadline=time.monotonic() + 60)
    subject.submit(fine, pairs_of([10] * 2))
    subject._drain.tokens_per_second = 100.0  # now 1.2 s of work; one pass of 40 tokens would fit
    backend.gate.set()
    with pytest.raises(Exception, match="dropped"):
        await collect(doomed)
    assert len(await collect(fine)) == 2
    subject.close()
    assert doomed not in {owner for owners in backend.owners for owner in owners}, "none of it ran"
    assert subject.counters.dropped == 12 and subject.in_flight == 0


async def test_a_deadline_is_promised_at_the_slowest_recent_speed():
    """The queue's limit follows the current drain rate; a caller's deadline is checked at the
    lowest rate of the last half minute, so a machine that slowed down a moment ago does not get
    work it may not finish in time."""
    import time

    subject = batcher(RecordingBackend(), max_queue_seconds=100)
    drain = subject._drain
    now = time.perf_counter()
    for rate in (100.0, 25.0, 100.0):  # fast, a slow spell, fast again: five windows of four passes each
        for _ in range(20):
            drain.launched(now)
            now += 1.0
            drain.finished(now, int(rate), full=True)
    assert drain.tokens_per_second > 80 and drain.cautious_tokens_per_second < 35
    subject.precheck(1, 200, deadline=None)  # ~2-4 s at the current rate: under the queue limit
    with pytest.raises(ResourceExhausted, match="before its deadline"):
        subject.precheck(1, 200, deadline=time.monotonic() + 6.0)  # fits at today's rate, not at the slow one
    subject.precheck(1, 200, deadline=time.monotonic() + 12.0)
    subject.close()


async def test_a_failing_model_reports_an_error_and_the_thread_survives():
    backend = RecordingBackend(fail=True)
    subject = batcher(backend)
    job = Job(size=2)
    subject.submit(job, pairs_of([3, 3]))
    with pytest.raises(InferenceFailed, match="see the server log"):
        await collect(job)
    backend.fail = False
    healthy = Job(size=1)
    subject.submit(healthy, pairs_of([3]))
    assert await collect(healthy) == {0: 3.0}
    subject.close()
    assert subject.in_flight == 0
