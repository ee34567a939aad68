"""Dynamic batching: one bounded queue and one inference thread per model.

Requests from many clients are merged into shared forward passes. A batch is
cut by a padded-token budget (rows x longest row) and a row cap; it waits at
most `max_wait_ms` for more work once it has some. The oldest few batches' worth
of queued pairs, from all requests, are sorted by length before they are cut,
so rows of a batch have similar lengths and padding stays small. Work of
cancelled or expired requests is dropped before it runs. A request that would overflow the queue is refused at once
(ResourceExhausted). Model code runs only on the batcher's thread, never on the
event loop; results go back to the loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .config import BatchingConfig
from .errors import DeadlineExceeded, InferenceFailed, ResourceExhausted, Unavailable
from .tokenization import TokenizedInput

log = logging.getLogger(__name__)

WINDOW = 4  # batches' worth of the oldest work sorted together
CPU_BATCH_TOKENS = 2048  # defaults for BatchingConfig.max_batch_tokens
GPU_BATCH_TOKENS = 16384


class PendingResult(Protocol):
    def result(self) -> np.ndarray: ...


class Backend(Protocol):
    asynchronous: bool

    def launch(self, pairs: Sequence[TokenizedInput]) -> PendingResult: ...


@dataclass
class JobStats:
    """What happened to one request inside the batcher (written by the batcher thread)."""

    enqueued_at: float = 0.0
    first_batch_at: float | None = None
    inference_s: float = 0.0
    batches: int = 0
    max_batch_size: int = 0
    shared_batches: int = 0


@dataclass(eq=False)
class Job:
    """One request's pairs in a batcher, and the channel their scores come back on."""

    size: int
    deadline: float | None = None  # time.monotonic() value; None = no deadline
    stats: JobStats = field(default_factory=JobStats)
    cancelled: bool = False

    def __post_init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._chunks: asyncio.Queue[tuple[np.ndarray, np.ndarray] | BaseException] = asyncio.Queue()
        self._received = 0

    @property
    def done(self) -> bool:
        return self._received >= self.size

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def _deliver(self, chunk: tuple[np.ndarray, np.ndarray] | BaseException) -> None:
        """Called from the batcher thread."""
        try:
            self._loop.call_soon_threadsafe(self._chunks.put_nowait, chunk)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is waiting
            pass

    async def results(self) -> AsyncIterator[tuple[np.ndarray, np.ndarray]]:
        """Yields (request indices, logits) per micro-batch until every pair is scored."""
        while not self.done:
            chunk = await self._chunks.get()
            if isinstance(chunk, BaseException):
                raise chunk
            self._received += len(chunk[0])
            yield chunk


@dataclass
class _Item:
    job: Job
    pair: TokenizedInput

    @property
    def length(self) -> int:
        return len(self.pair.input_ids)


@dataclass
class BatcherCounters:
    batches: int = 0
    items: int = 0
    dropped: int = 0
    rejected: int = 0
    max_requests_per_batch: int = 0
    max_batch_size: int = 0
    tokens: int = 0
    padded_tokens: int = 0


class DynamicBatcher:
    """Merges pairs of concurrent requests into forward passes on one thread."""

    def __init__(self, name: str, backend: Backend, config: BatchingConfig):
        self.name = name
        self.capacity = config.queue_capacity
        self._backend = backend
        self._max_tokens = config.max_batch_tokens or (
            GPU_BATCH_TOKENS if backend.asynchronous else CPU_BATCH_TOKENS
        )
        self._max_rows = config.max_batch_size
        self._max_wait = config.max_wait_ms / 1000.0
        self._cond = threading.Condition()
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_tokens = 0
        self._in_flight = 0  # admitted pairs not yet scored or dropped
        self._closed = False
        self.counters = BatcherCounters()
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- event-loop side -------------------------------------------------------------

    def submit(self, job: Job, pairs: Sequence[TokenizedInput]) -> None:
        """Queue a request's pairs, or refuse at once when they do not fit."""
        ordered = sorted(pairs, key=lambda p: len(p.input_ids), reverse=True)
        with self._cond:
            if self._closed:
                raise Unavailable(f"model {self.name!r} is shutting down")
            if self._in_flight + len(ordered) > self.capacity:
                self.counters.rejected += 1
                raise ResourceExhausted(
                    f"model {self.name!r} queue is full: {self._in_flight} of {self.capacity} pairs in flight, "
                    f"request adds {len(ordered)}; retry later"
                )
            job.stats.enqueued_at = time.perf_counter()
            self._in_flight += len(ordered)
            for pair in ordered:
                self._queue.append(_Item(job, pair))
                self._queued_tokens += len(pair.input_ids)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop a request's queued pairs (its running batch, if any, completes and is discarded)."""
        job.cancelled = True
        with self._cond:
            kept = collections.deque(item for item in self._queue if item.job is not job)
            self._in_flight -= len(self._queue) - len(kept)
            self.counters.dropped += len(self._queue) - len(kept)
            self._queued_tokens = sum(item.length for item in kept)
            self._queue = kept

    def close(self, timeout: float | None = None) -> None:
        """Stop taking work; the thread finishes what is queued, then exits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- batcher thread ------------------------------------------------------------------

    def _enough_for_a_batch(self) -> bool:
        return len(self._queue) >= self._max_rows or self._queued_tokens >= self._max_tokens

    def _is_dead(self, item: _Item, now: float) -> bool:
        """Cancelled or expired; an expired request is told once. Call with the lock held."""
        job = item.job
        if not job.cancelled and job.expired(now):
            job.cancelled = True
            job._deliver(DeadlineExceeded("deadline passed while the request was queued"))
        return job.cancelled

    def _next_window(self, wait: bool) -> list[list[_Item]]:
        """Takes the oldest live work, up to WINDOW batches' worth, sorted by length and cut into
        batches. Sorting across requests, not just within one, is what keeps padding low when
        many requests are queued; taking the oldest first keeps it fair."""
        with self._cond:
            if wait:
                while not self._queue and not self._closed:
                    self._cond.wait()
                deadline = time.monotonic() + self._max_wait
                while self._queue and not self._enough_for_a_batch() and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            window: list[_Item] = []
            tokens = 0
            now = time.monotonic()
            while self._queue and len(window) < WINDOW * self._max_rows and tokens < WINDOW * self._max_tokens:
                item = self._queue.popleft()
                self._queued_tokens -= item.length
                if self._is_dead(item, now):
                    self._in_flight -= 1
                    self.counters.dropped += 1
                    continue
                window.append(item)
                tokens += item.length
        window.sort(key=lambda item: item.length, reverse=True)
        batches: list[list[_Item]] = []
        for item in window:
            batch = batches[-1] if batches else None
            # Sorted longest first, so the batch's first row sets its padded width.
            if batch is None or len(batch) >= self._max_rows or batch[0].length * (len(batch) + 1) > self._max_tokens:
                batches.append([item])
            else:
                batch.append(item)
        return batches

    def _live(self, batch: list[_Item]) -> list[_Item]:
        """Drops rows whose request was cancelled or expired since the window was taken."""
        with self._cond:
            now = time.monotonic()
            kept = [item for item in batch if not self._is_dead(item, now)]
            self._in_flight -= len(batch) - len(kept)
            self.counters.dropped += len(batch) - len(kept)
        return kept

    def _run(self) -> None:
        while True:
            try:
                self._serve()
                return
            except Exception:  # noqa: BLE001 - the thread must outlive any one bad batch
                log.exception("batcher %s: unexpected error; continuing", self.name)

    def _serve(self) -> None:
        running: tuple[list[_Item], PendingResult | None, float] | None = None
        ready: collections.deque[list[_Item]] = collections.deque()
        while True:
            if not ready:
                ready.extend(self._next_window(wait=running is None))
            batch = self._live(ready.popleft()) if ready else []
            if not batch:
                if running is not None:
                    self._complete(*running)
                    running = None
                elif not ready:
                    with self._cond:
                        if self._closed and not self._queue:
                            return
                continue
            launched = self._launch(batch)
            if running is not None:
                self._complete(*running)
            running = launched
            if not self._backend.asynchronous:
                self._complete(*running)
                running = None

    def _launch(self, batch: list[_Item]) -> tuple[list[_Item], PendingResult | None, float]:
        started = time.perf_counter()
        for item in batch:
            if item.job.stats.first_batch_at is None:
                item.job.stats.first_batch_at = started
        try:
            return batch, self._backend.launch([item.pair for item in batch]), started
        except Exception:  # noqa: BLE001 - reported to the requests, logged here
            log.exception("model %s failed to launch a batch of %d", self.name, len(batch))
            return batch, None, started

    def _complete(self, batch: list[_Item], pending: PendingResult | None, started: float) -> None:
        logits: np.ndarray | None = None
        if pending is not None:
            try:
                logits = pending.result()
            except Exception:  # noqa: BLE001
                log.exception("model %s failed on a batch of %d", self.name, len(batch))
        elapsed = time.perf_counter() - started
        by_job: dict[Job, list[int]] = {}
        for row, item in enumerate(batch):
            by_job.setdefault(item.job, []).append(row)
        for job, rows in by_job.items():
            stats = job.stats
            stats.batches += 1
            stats.inference_s += elapsed
            stats.max_batch_size = max(stats.max_batch_size, len(batch))
            stats.shared_batches += len(by_job) > 1
            if logits is None:
                job._deliver(InferenceFailed(f"model {self.name!r} failed on a batch; see the server log"))
                continue
            indices = np.fromiter((batch[r].pair.index for r in rows), dtype=np.int64, count=len(rows))
            job._deliver((indices, logits[rows]))
        with self._cond:
            self._in_flight -= len(batch)
            counters = self.counters
            counters.batches += 1
            counters.items += len(batch)
            counters.max_batch_size = max(counters.max_batch_size, len(batch))
            counters.max_requests_per_batch = max(counters.max_requests_per_batch, len(by_job))
            lengths = [item.length for item in batch]
            counters.tokens += sum(lengths)
            counters.padded_tokens += max(lengths) * len(lengths)
