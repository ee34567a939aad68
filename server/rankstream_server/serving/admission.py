"""What every call goes through on either transport, before and after its operation: a request
id, a place under the concurrency cap, one access-log line and its request metrics.

- The request id is the client's `x-request-id` when it sends a usable one, else a new one.
- Past `server.max_concurrent_rpcs` calls in progress (gRPC and HTTP together), a new one is
  refused at once (ResourceExhausted: gRPC RESOURCE_EXHAUSTED, HTTP 429). Health checks are
  neither capped nor logged at INFO: probes must get through a busy server.
- Then the load gate (serving/shedding.py) refuses, from the request's size and deadline alone,
  a call the models' queues cannot take: before the request is decoded.
- Refusals are counted in the metrics (by reason), but logged as one summary line a second
  (RefusalSummary), not one line each: under overload they are most calls.
- A refusal is answered late, up to `server.refusal_hold_ms` (`Admission.hold`): within the
  time it tells the client to wait anyway (its pushback, shortened by the hold), or until just
  before the caller's deadline when no retry can succeed. A waiting coroutine costs no CPU, so
  clients that retry at once (no backoff) can no longer spend the server's CPU on refusals.
- The access-log line (logger `rankstream.access`, INFO) names the call, its status code,
  duration, passages in and out and the request id (and, as fields, the client's address and
  the transport), and never any query or document text. Its fields are also log-record
  attributes, so `--log-format json` writes them as JSON keys.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
import uuid

from rankstream_server.errors import ResourceExhausted
from rankstream_server.serving.metrics import Metrics
from rankstream_server.serving.shedding import LoadGate

access_log = logging.getLogger("rankstream.access")

REQUEST_ID = "x-request-id"
REFUSED = "RESOURCE_EXHAUSTED"
BUSY_RETRY_AFTER = 0.25  # seconds, before jitter: the pushback of a call refused by the concurrency cap
DEADLINE_MARGIN = 0.05  # seconds: a refusal held for a deadline is answered this long before it
_USABLE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def usable_request_id(value: object) -> str:
    """The client's id when usable, else a new one."""
    if isinstance(value, str) and _USABLE_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


class CallRecord:
    """What one call's log line and metrics need. `rpc` is the operation (Rerank, Embed, ...),
    the same name on both transports; `route` says which front and dialect carried it."""

    __slots__ = ("rpc", "request_id", "started", "passages_in", "passages_out", "code", "peer", "quiet", "route",
                 "admitted", "reason", "finished", "size_bytes")

    def __init__(self, rpc: str, request_id: str, peer: str = "", quiet: bool = False, route: str = "grpc"):
        self.peer = peer
        self.rpc = rpc
        self.request_id = request_id
        self.started = time.perf_counter()
        self.passages_in = 0
        self.passages_out = 0
        self.code = "OK"
        self.quiet = quiet
        self.route = route
        self.admitted = False
        self.reason = ""  # why a refused call was refused (ResourceExhausted.reason)
        self.finished = False  # its log line and metrics are written (once, however it ends)
        self.size_bytes: int | None = None  # the request's size, when admission knew it

    def refused(self, error: ResourceExhausted) -> None:
        self.code = REFUSED
        self.reason = error.reason


class RefusalSummary:
    """Refused calls, logged as one line per `interval` seconds with their count by operation
    (the first refusal after a quiet spell is logged at once). Event loop only."""

    def __init__(self, interval: float = 1.0):
        self._interval = interval
        self._counts: collections.Counter[str] = collections.Counter()
        self._first = 0.0  # when the first refusal of the coming line came
        self._last_line = float("-inf")
        self._latest = ""

    def add(self, call: CallRecord) -> None:
        if not self._counts:
            self._first = time.monotonic()
        self._counts[call.rpc] += 1
        self._latest = call.request_id
        self.flush()

    def flush(self) -> None:
        """Writes the summary line if one is due."""
        now = time.monotonic()
        if not self._counts or now - self._last_line < self._interval:
            return
        total = sum(self._counts.values())
        by_rpc = ", ".join(f"{rpc} {count}" for rpc, count in self._counts.most_common())
        access_log.info("%d calls refused (RESOURCE_EXHAUSTED) in %.1f s: %s; latest request_id=%s", total,
                        now - self._first, by_rpc, self._latest,
                        extra={"code": REFUSED, "refused": total, "refused_by_rpc": dict(self._counts),
                               "request_id": self._latest})
        self._counts.clear()
        self._last_line = now


class Admission:
    """The concurrency cap and the load gate over both transports, and the access log and
    request metrics."""

    def __init__(self, max_concurrent: int, metrics: Metrics | None = None, gate: LoadGate | None = None,
                 hold_seconds: float = 0.0):
        self.max_concurrent = max_concurrent
        self._metrics = metrics
        self._gate = gate
        self._hold_seconds = hold_seconds
        self._refusals = RefusalSummary()
        self.active = 0
        self.held = 0  # refusals being held
        self.held_bytes: collections.Counter[str] = collections.Counter()  # their request sizes, by operation

    async def hold(self, refused: ResourceExhausted, time_remaining: float | None = None,
                   call: CallRecord | None = None) -> None:
        """Waits before a refusal is answered: up to the hold limit, within the refusal's own
        pushback (which is shortened by the wait, so a client that honours it waits no longer in
        all), and answering just before the caller's deadline at the latest (so a call no
        retry can help, pushback -1, is held until then). Answers at once past
        max_concurrent_rpcs refusals held. While held, the call's size counts in the pushback of
        later refusals (LoadGate)."""
        after = refused.retry_after
        if after is None or (after < 0 and time_remaining is None):
            return
        seconds = self._hold_seconds if after < 0 else min(self._hold_seconds, after)
        if time_remaining is not None:
            # The caller hears of the refusal before its deadline; with less than two margins
            # left, no answer is of use to it, and an early one only invites a retry at once:
            # held until the deadline.
            seconds = min(seconds, time_remaining - DEADLINE_MARGIN) if time_remaining > 2 * DEADLINE_MARGIN \
                else time_remaining
        if seconds <= 0 or self.held >= self.max_concurrent:
            return
        size = (call.size_bytes or 0) if call is not None else 0
        self.held += 1
        if size:
            self.held_bytes[call.rpc] += size
        try:
            await asyncio.sleep(seconds)
        finally:
            self.held -= 1
            if size:
                self.held_bytes[call.rpc] -= size
        if after >= 0:
            refused.retry_after = max(0.0, after - seconds)

    def enter(self, call: CallRecord, size_bytes: int | None = None, time_remaining: float | None = None) -> None:
        """Takes a place for the call, or refuses it (counted, and summarised in the access log):
        past the concurrency cap, or when the load gate finds no queue that can take a request of
        `size_bytes` (None: not known yet) within `time_remaining`."""
        if call.quiet:
            return
        if self.active >= self.max_concurrent:
            refused = ResourceExhausted(f"server busy: {self.active} calls in progress, limit is "
                                        f"server.max_concurrent_rpcs={self.max_concurrent}; retry with backoff",
                                        retry_after=BUSY_RETRY_AFTER, reason="concurrency")
            call.refused(refused)
            self.finish(call)
            raise refused
        if self._gate is not None and size_bytes is not None:
            call.size_bytes = size_bytes
            try:
                self._gate.check(call.rpc, size_bytes, time_remaining, self.held_bytes)
            except ResourceExhausted as refused:
                call.refused(refused)
                self.finish(call)
                raise
        self.active += 1
        call.admitted = True

    def leave(self, call: CallRecord) -> None:
        """Gives the call's place back and writes its log line and metrics."""
        if call.admitted:
            self.active -= 1
            call.admitted = False
        self.finish(call)

    def finish(self, call: CallRecord) -> None:
        if call.finished:  # a call refused at admission is finished there; the transport's leave() may follow
            return
        call.finished = True
        seconds = time.perf_counter() - call.started
        if self._metrics is not None:
            self._metrics.observe_request(call.rpc, call.code, seconds)
            if call.code == REFUSED:
                self._metrics.observe_refusal(call.rpc, call.reason or "model")
        if call.code == REFUSED and not call.quiet:
            self._refusals.add(call)
            return
        self._refusals.flush()
        access_log.log(
            logging.DEBUG if call.quiet else logging.INFO,
            "%s %s %.1f ms passages %d in, %d out request_id=%s",
            call.rpc, call.code, seconds * 1000, call.passages_in, call.passages_out, call.request_id,
            extra={"rpc": call.rpc, "code": call.code, "duration_ms": round(seconds * 1000, 3),
                   "passages_in": call.passages_in, "passages_out": call.passages_out, "request_id": call.request_id,
                   "peer": call.peer, "route": call.route},
        )
