"""Dynamic batching: one bounded queue and one inference thread per model.

Requests from many clients are merged into shared forward passes. A request's tokens stay one
set of arrays (tokenization.Tokens); the queue holds requests, not pairs, so nothing on the hot
path costs Python per pair. A pass is cut by a padded-token budget and a row cap, in the shapes
the backend's ShapePolicy allows; it waits at most `max_wait_ms` for more work once it has
some. The oldest few passes' worth of queued rows, from all requests, are sorted by length
before they are cut, so rows of a pass have similar lengths and padding stays small.

Two lanes: interactive work (queries, reranks) goes before bulk work (upserts, index builds),
so a query never waits behind a big upsert; bulk work that has waited `bulk_max_wait_ms` is
taken first, so it is never starved.

Admission is by expected wait, not only by size: the batcher measures how fast its queue drains
(tokens per second of busy wall time, estimates.DrainRate), and a request whose deadline cannot
be met behind the work already queued or running, or that would make the queue longer than
`max_queue_seconds`, is refused at once (ResourceExhausted, with the seconds until the queue
will have room as its retry_after), so no work is spent on requests that would expire anyway. Within a lane work is served first come,
first served, so the wait admission promised holds (earliest-deadline-first would let later
short-deadline work push admitted work past its deadline); queued work whose deadline has
become unreachable anyway is dropped before it runs.

A pass that fails (a CUDA out-of-memory, say) is split in halves and retried, down to single
rows; only rows that fail alone get an error. After repeated failed passes, or if the thread
dies, `healthy` turns false (the server reports NOT_SERVING). An unexpected error in the loop
fails the passes it held, so no request hangs and no capacity leaks.

Work of cancelled or expired requests is dropped before it runs; cancelling is O(1). A request
that would overflow the queue is refused at once (ResourceExhausted). Model code runs only on
the batcher's thread, never on the event loop; results go back with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rankstream_server.config import BatchingConfig
from rankstream_server.errors import DeadlineExceeded, InferenceFailed, ResourceExhausted, Unavailable
from rankstream_server.inference.batches import Batch, ShapePolicy, cut_batches
from rankstream_server.inference.estimates import DrainRate
from rankstream_server.inference.tokenization import Tokens

log = logging.getLogger(__name__)

WINDOW = 4  # passes' worth of the oldest work sorted together
FAILED_PASSES_UNHEALTHY = 3  # consecutive passes failing even alone: the model is not serving
CPU_BATCH_TOKENS = 2048  # defaults for BatchingConfig.max_batch_tokens
GPU_BATCH_TOKENS = 16384
INTERACTIVE, BULK = 0, 1
# A call is admitted only if its deadline leaves this much more than the estimated wait: a call
# admitted at the edge of its deadline misses it about half the time, and every pass spent on it
# is then lost, while refusing it costs nothing when the queue is full anyway.
DEADLINE_SAFETY = 1.15


class PendingResult(Protocol):
    def result(self) -> np.ndarray: ...


class Backend(Protocol):
    asynchronous: bool  # launch returns before the pass has ended
    shapes: ShapePolicy  # set by the batcher from its config when the backend has none of its own
    # optional: passes_in_flight, how many passes may be launched and not yet collected (default 2
    # if asynchronous, else 1); parallel_passes, how many of them run at once (default 1); a
    # PendingResult may have add_done_callback

    def launch(self, batch: Batch) -> PendingResult: ...


@dataclass
class JobStats:
    """What happened to one request inside the batcher (written by the batcher thread)."""

    enqueued_at: float = 0.0
    first_batch_at: float | None = None
    batches: int = 0
    max_batch_size: int = 0
    shared_batches: int = 0
    tokens: int = 0
    passes: dict[float, float] = field(default_factory=dict)  # start time -> seconds, of each pass it rode


@dataclass(eq=False)
class Job:
    """One request's inputs in a batcher, and the channel their results come back on."""

    size: int
    deadline: float | None = None  # time.monotonic() value; None = no deadline
    lane: int = INTERACTIVE
    group: object | None = None  # the request this job belongs to (a request may queue several jobs)
    stats: JobStats = field(default_factory=JobStats)
    cancelled: bool = False

    def __post_init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._chunks: asyncio.Queue[tuple[np.ndarray, np.ndarray] | BaseException] = asyncio.Queue()
        self._received = 0
        self.queued = 0  # rows still in the queue (batcher lock)
        self.work: _Work | None = None

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
        """Yields (request indices, outputs) per pass until every input is done."""
        while not self.done:
            chunk = await self._chunks.get()
            if isinstance(chunk, BaseException):
                raise chunk
            self._received += len(chunk[0])
            yield chunk


@dataclass(eq=False)
class _Work:
    """A request's rows still queued, longest first; `start` moves as passes take them.
    Ordered in its lane by `key` (arrival)."""

    job: Job
    tokens: Tokens
    rows: np.ndarray
    key: tuple[float, int]
    start: int = 0

    def __lt__(self, other: _Work) -> bool:
        return self.key < other.key

    @property
    def left(self) -> int:
        return len(self.rows) - self.start


@dataclass(eq=False)
class _Running:
    """A launched pass; `ended` is set by the backend's callback where it has one."""

    batch: Batch
    pending: PendingResult | None  # None: the launch itself failed
    started: float
    calls_back: bool = False
    ended: threading.Event = field(default_factory=threading.Event)


@dataclass
class BatcherCounters:
    batches: int = 0
    items: int = 0
    dropped: int = 0
    rejected: int = 0  # refusals, all reasons; by reason:
    refused_capacity: int = 0  # the queue's pair capacity
    refused_queue: int = 0  # max_queue_seconds
    refused_deadline: int = 0  # the caller's deadline
    max_requests_per_batch: int = 0
    max_batch_size: int = 0
    tokens: int = 0
    padded_tokens: int = 0


class DynamicBatcher:
    """Merges inputs of concurrent requests into forward passes on one thread."""

    def __init__(self, name: str, backend: Backend, config: BatchingConfig):
        self.name = name
        self.capacity = config.queue_capacity
        self._backend = backend
        shapes = getattr(backend, "shapes", None)
        if shapes is None:
            max_tokens = config.max_batch_tokens or (GPU_BATCH_TOKENS if backend.asynchronous else CPU_BATCH_TOKENS)
            shapes = ShapePolicy(max_length=1 << 30, max_rows=config.max_batch_size, max_tokens=max_tokens)
        self._shapes = shapes
        self._max_wait = config.max_wait_ms / 1000.0
        self._bulk_max_wait = config.bulk_max_wait_ms / 1000.0
        self._cond = threading.Condition()
        self._lanes: tuple[list[_Work], list[_Work]] = ([], [])  # heaps: interactive, bulk
        self._arrivals = itertools.count()
        self._max_queue_seconds = config.max_queue_seconds
        self._drain = DrainRate()
        self._running_tokens = 0  # tokens of passes launched and not yet back
        self._ready_tokens = 0  # tokens of passes cut from the queue and not yet launched
        self._failed_passes = 0  # consecutive passes that failed even when split
        self._held: list[Batch] = []  # passes cut or running: failed, not lost, if the loop breaks
        self._queued_rows = 0
        self._queued_tokens = 0
        self._in_flight = 0  # admitted rows not yet done or dropped
        self._closed = False
        self.counters = BatcherCounters()
        self.on_pass: Callable[[int, int], None] | None = None  # (rows, padded tokens) of each pass run: metrics
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- event-loop side -------------------------------------------------------------

    def submit(self, job: Job, tokens: Tokens) -> None:
        """Queue a request's inputs, or refuse at once when they do not fit: the queue's pair
        capacity, its expected wait, or the request's own deadline."""
        rows = np.argsort(-tokens.lengths, kind="stable").astype(np.int64)
        count = len(rows)
        with self._cond:
            self._admit(count, tokens.token_count, job.deadline)
            job.stats.enqueued_at = time.perf_counter()
            job.queued = count
            self._in_flight += count
            self._queued_rows += count
            self._queued_tokens += tokens.token_count
            arrival = next(self._arrivals)
            key = (0.0, arrival)  # first come, first served: the wait admission promised holds
            job.work = _Work(job, tokens, rows, key)
            heapq.heappush(self._lanes[job.lane], job.work)
            self._cond.notify()

    def _refuse(self, message: str, reason: str, retry_after: float | None) -> None:
        counters = self.counters
        counters.rejected += 1
        setattr(counters, f"refused_{reason}", getattr(counters, f"refused_{reason}") + 1)
        raise ResourceExhausted(message, retry_after=retry_after, reason=reason)

    def expected_wait(self, tokens: int = 0, cautious: bool = False) -> float | None:
        """Seconds until `tokens` more tokens would be done behind everything queued, cut or
        running, at the measured drain rate, or with `cautious` at the lowest recent one (None
        until measured)."""
        return self._drain.seconds_for(self._queued_tokens + self._ready_tokens + self._running_tokens + tokens,
                                       cautious)

    def seconds_for(self, tokens: int) -> float | None:
        """Seconds the queue takes to drain `tokens` at the measured rate (None until measured)."""
        return self._drain.seconds_for(tokens)

    @property
    def drain_rate(self) -> float | None:
        """Tokens per second the queue drains at, as measured (None until measured)."""
        return self._drain.tokens_per_second

    def precheck(self, rows: int, tokens: int, deadline: float | None) -> None:
        """The admission checks on an estimate, before any tokenizing: a request that will be
        refused costs the server next to nothing (under overload most requests are refused)."""
        with self._cond:
            self._admit(rows, tokens, deadline)

    def _admit(self, rows: int, tokens: int, deadline: float | None) -> None:
        """Refuses work the queue cannot take: shutting down, over capacity, or unable to finish
        in time (lock held)."""
        if self._closed:
            raise Unavailable(f"model {self.name!r} is shutting down")
        if self._in_flight + rows > self.capacity:
            excess = self._in_flight + rows - self.capacity
            per_row = (self._queued_tokens + self._running_tokens) / max(self._in_flight, 1)
            self._refuse(
                f"model {self.name!r} queue is full: {self._in_flight} of {self.capacity} pairs in flight, "
                f"request adds {rows}; retry later",
                "capacity", self._drain.seconds_for(excess * per_row),
            )
        self._check_time(tokens, deadline)

    def _check_time(self, tokens: int, deadline: float | None) -> None:
        """Interactive work waits only for the interactive work ahead of it, but counting all
        queued work keeps the estimate safe (lock held)."""
        wait = self.expected_wait(tokens)
        if wait is None:
            return
        if self._max_queue_seconds and self._queued_rows and wait > self._max_queue_seconds:
            self._refuse(
                f"model {self.name!r} is saturated: about {wait:.1f} s of queued work with this request, limit is "
                f"batching.max_queue_seconds={self._max_queue_seconds:g}; retry later",
                "queue", wait - self._max_queue_seconds,
            )
        if deadline is None:
            return
        # A deadline is promised at the slowest speed seen lately: work admitted at a faster figure
        # that then misses its deadline has spent the model's time for nothing.
        wait = self.expected_wait(tokens, cautious=True)
        if time.monotonic() + wait * DEADLINE_SAFETY > deadline:
            # The queue ahead drains no faster than the deadline nears: a retry within it cannot succeed.
            self._refuse(
                f"model {self.name!r} cannot finish this request before its deadline: about {wait:.2f} s of work "
                f"queued with it, {max(deadline - time.monotonic(), 0):.2f} s left; retry later or with a longer deadline",
                "deadline", -1.0,
            )

    def cancel(self, job: Job) -> None:
        """Drop a request's queued inputs (a pass already running completes and is discarded).
        O(1): the queue entry is skipped when the batcher reaches it."""
        with self._cond:
            if job.cancelled:
                return
            job.cancelled = True
            self._forget(job)

    def _forget(self, job: Job) -> None:
        """A dead job's queued rows stop counting (lock held)."""
        work = job.work
        if work is not None and work.left:
            self._queued_tokens -= int(work.tokens.lengths[work.rows[work.start:]].sum())
            work.start = len(work.rows)
        self._in_flight -= job.queued
        self._queued_rows -= job.queued
        self.counters.dropped += job.queued
        job.queued = 0

    def close(self, timeout: float | None = None) -> None:
        """Stop taking work; the thread finishes what is queued, then exits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- batcher thread ------------------------------------------------------------------

    def _enough_for_a_batch(self) -> bool:
        return self._queued_rows >= self._shapes.max_rows or self._queued_tokens >= self._shapes.max_tokens

    def _is_dead(self, job: Job, now: float) -> bool:
        """Cancelled or expired; an expired request is told once. Call with the lock held."""
        if not job.cancelled and job.expired(now):
            job.cancelled = True
            self._forget(job)
            job._deliver(DeadlineExceeded("deadline passed while the request was queued"))
        return job.cancelled

    def _lane_order(self, now: float) -> list[list[_Work]]:
        interactive, bulk = self._lanes
        if bulk and now - bulk[0].job.stats.enqueued_at >= self._bulk_max_wait:
            return [bulk, interactive]
        return [interactive, bulk]

    def _unreachable(self, job: Job, now: float, tokens_to_finish: int) -> bool:
        """At the head of the queue, `tokens_to_finish` (its rows left and the rows cut ahead of
        them) cannot be done before its deadline at the measured rate. Drop it now, with none or
        only part of it run, rather than spend passes on an answer its caller will not take
        (lock held)."""
        if job.deadline is None or job.cancelled:
            return False
        finish = self._drain.seconds_for(tokens_to_finish)
        if finish is None or now + finish < job.deadline:
            return False
        job.cancelled = True
        self._forget(job)
        job._deliver(DeadlineExceeded("deadline would pass before the request's last pass; dropped"))
        return True

    def _take_window(self, wait: bool) -> list[tuple[Job, Tokens, np.ndarray]]:
        """The oldest live work, interactive first, up to WINDOW passes' worth: (job, tokens, rows)."""
        with self._cond:
            if wait:
                while not self._queued_rows and not self._closed:
                    self._cond.wait()
                deadline = time.monotonic() + self._max_wait
                while self._queued_rows and not self._enough_for_a_batch() and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            parts: list[tuple[Job, Tokens, np.ndarray]] = []
            room_rows = WINDOW * self._shapes.max_rows
            room_tokens = WINDOW * self._shapes.max_tokens
            now = time.monotonic()
            for lane in self._lane_order(time.perf_counter()):
                while lane and room_rows > 0 and room_tokens > 0:
                    work = lane[0]
                    job = work.job
                    lengths = work.tokens.lengths[work.rows[work.start:]]
                    ahead = WINDOW * self._shapes.max_tokens - room_tokens
                    if self._is_dead(job, now) or self._unreachable(job, now, ahead + int(lengths.sum())):
                        heapq.heappop(lane)
                        continue
                    # Rows by tokens: as many as fit in both budgets, at least one.
                    fits = int(np.searchsorted(np.cumsum(lengths), room_tokens, side="right"))
                    take = max(1, min(work.left, room_rows, fits))
                    rows = work.rows[work.start:work.start + take]
                    work.start += take
                    taken_tokens = int(work.tokens.lengths[rows].sum())
                    job.queued -= take
                    self._queued_rows -= take
                    self._queued_tokens -= taken_tokens
                    self._ready_tokens += taken_tokens
                    room_rows -= take
                    room_tokens -= taken_tokens
                    parts.append((job, work.tokens, rows))
                    if work.left == 0:
                        heapq.heappop(lane)
                if parts:  # one lane per window: length sorting must not put bulk rows ahead of a query
                    break
        return parts

    def _live(self, batch: Batch) -> Batch | None:
        """The batch without rows whose request was cancelled or expired since it was cut."""
        with self._cond:
            self._ready_tokens -= batch.tokens  # it leaves the cut passes: launched (running) or dropped
            now = time.monotonic()
            dead = [piece for piece in batch.pieces if self._is_dead(piece.owner, now)]
            if not dead:
                return batch
            gone = sum(len(piece.rows) for piece in dead)
            self._in_flight -= gone
            self.counters.dropped += gone
        live = [piece for piece in batch.pieces if piece not in dead]
        if not live:
            return None
        return cut_batches([(piece.owner, piece.tokens, piece.rows) for piece in live], self._shapes)[0]

    @property
    def healthy(self) -> bool:
        """False once the thread has died or passes keep failing even when split."""
        return self._thread.is_alive() and self._failed_passes < FAILED_PASSES_UNHEALTHY

    def _run(self) -> None:
        while True:
            try:
                self._serve()
                return
            except Exception:  # noqa: BLE001 - the thread must outlive any one bad batch
                log.exception("batcher %s: unexpected error; failing the passes it held and continuing", self.name)
                with self._cond:
                    self._drain.forget_running()
                    self._running_tokens = 0
                    self._ready_tokens = 0
                held, self._held = self._held, []
                for batch in held:
                    self._finish(batch, None, 0.0, 0.0)

    def _serve(self) -> None:
        limit = getattr(self._backend, "passes_in_flight", None) or (2 if self._backend.asynchronous else 1)
        running: list[_Running] = []
        ready: collections.deque[Batch] = collections.deque()
        while True:
            if not ready:
                ready.extend(cut_batches(self._take_window(wait=not running), self._shapes))
            # What is cut or running is held, so an unexpected error can fail it rather than lose it.
            self._held = [*ready, *(launched.batch for launched in running)]
            batch = self._live(ready.popleft()) if ready else None
            if batch is None:
                if running:
                    ended = self._a_pass_ended(running, or_work=len(running) < limit)
                    if ended is None:
                        continue  # new work came while the others run: launch it beside them
                    self._complete(running.pop(ended))
                elif not ready:
                    with self._cond:
                        if self._closed and not self._queued_rows:
                            return
                continue
            self._held.append(batch)
            running.append(self._launch(batch))
            while len(running) >= limit:
                self._complete(running.pop(self._a_pass_ended(running, or_work=False)))

    def _a_pass_ended(self, running: list[_Running], or_work: bool) -> int | None:
        """Waits until some running pass has ended and returns its index (passes side by side on
        CPU workers end in any order: whichever ends first frees its worker for the next). With
        `or_work`, returns None instead as soon as new work is queued. A backend whose passes cannot
        call back (CUDA, where passes end in launch order) is waited on oldest first."""
        with self._cond:
            while True:
                for index, launched in enumerate(running):
                    if launched.ended.is_set():
                        return index
                if not running[0].calls_back or self._closed:
                    return 0
                if or_work and self._queued_rows:
                    return None
                self._cond.wait()

    def _launch(self, batch: Batch) -> _Running:
        started = time.perf_counter()
        with self._cond:
            self._drain.launched(started)
            self._running_tokens += batch.tokens
        for piece in batch.pieces:
            if piece.owner.stats.first_batch_at is None:
                piece.owner.stats.first_batch_at = started
        try:
            pending = self._backend.launch(batch)
        except Exception:  # noqa: BLE001 - retried smaller in _complete
            log.exception("model %s failed to launch a pass of %d", self.name, batch.real)
            failed = _Running(batch, None, started)
            failed.ended.set()
            return failed
        launched = _Running(batch, pending, started)
        if hasattr(pending, "add_done_callback"):
            launched.calls_back = True

            def ended() -> None:
                with self._cond:
                    launched.ended.set()
                    self._cond.notify_all()

            pending.add_done_callback(ended)
        return launched

    def _complete(self, launched: _Running) -> None:
        batch, pending = launched.batch, launched.pending
        outputs: np.ndarray | None = None
        if pending is not None:
            try:
                outputs = pending.result()
            except Exception:  # noqa: BLE001
                log.exception("model %s failed on a pass of %d", self.name, batch.real)
        with self._cond:
            self._running_tokens -= batch.tokens
            self._drain.finished(time.perf_counter(), batch.tokens if outputs is not None else 0, self._is_full(batch))
        # The pass's own run where the backend times it (a CPU pass may wait for a free worker).
        started = getattr(pending, "started_at", None) or launched.started
        elapsed = (getattr(pending, "ended_at", None) or time.perf_counter()) - started
        if outputs is None:
            with self._cond:
                if batch in self._held:
                    self._held.remove(batch)  # its rows are settled by the retries
            self._retry_split(batch)
            return
        self._failed_passes = 0
        self._finish(batch, outputs, started, elapsed)

    def _retry_split(self, batch: Batch) -> None:
        """A failed pass, run again in halves (synchronously), down to single rows: rows that can
        run get their results; only a row that fails alone gets an error."""
        if batch.real == 1:
            self._failed_passes += 1
            self._finish(batch, None, 0.0, 0.0)
            return
        half = dataclasses.replace(self._shapes, max_rows=max(1, batch.real // 2), row_buckets=())
        parts = [(piece.owner, piece.tokens, piece.rows) for piece in batch.pieces]
        for smaller in cut_batches(parts, half):
            started = time.perf_counter()
            try:
                outputs = self._backend.launch(smaller).result()
            except Exception:  # noqa: BLE001
                log.warning("model %s: a pass of %d failed again; splitting", self.name, smaller.real)
                self._retry_split(smaller)
                continue
            self._failed_passes = 0
            self._finish(smaller, outputs, started, time.perf_counter() - started)

    def _finish(self, batch: Batch, outputs: np.ndarray | None, started: float, elapsed: float) -> None:
        """Hands a pass's results (or an error, when outputs is None) to its requests. The books
        are settled first, so a request that has its results never sees them still counted."""
        with self._cond:
            self._in_flight -= batch.real
            if batch in self._held:
                self._held.remove(batch)
            counters = self.counters
            counters.batches += 1
            counters.items += batch.real
            counters.max_batch_size = max(counters.max_batch_size, batch.real)
            counters.max_requests_per_batch = max(counters.max_requests_per_batch, len(batch.pieces))
            counters.tokens += batch.tokens
            counters.padded_tokens += batch.rows * batch.width
        if outputs is not None and self.on_pass is not None:
            self.on_pass(batch.real, batch.rows * batch.width)
        shared = len({piece.owner.group or piece.owner for piece in batch.pieces}) > 1
        for piece in batch.pieces:
            job = piece.owner
            stats = job.stats
            stats.batches += 1
            stats.passes[started] = elapsed
            stats.max_batch_size = max(stats.max_batch_size, batch.real)
            stats.shared_batches += shared
            stats.tokens += int(piece.tokens.lengths[piece.rows].sum())
            if outputs is None:
                job._deliver(InferenceFailed(f"model {self.name!r} failed on a batch; see the server log"))
            else:
                job._deliver((piece.rows, outputs[piece.slots]))

    def _is_full(self, batch: Batch) -> bool:
        """Well filled: a pass's worth of rows, or a quarter of its token budget or more."""
        return batch.rows * batch.width >= self._shapes.max_tokens // 4 or batch.real >= self._shapes.max_rows
