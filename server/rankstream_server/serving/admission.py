"""What every call goes through on either transport, before and after its operation: a request
id, a place under the concurrency cap, one access-log line and its request metrics.

- The request id is the client's `x-request-id` when it sends a usable one, else a new one.
- Past `server.max_concurrent_rpcs` calls in progress (gRPC and HTTP together), a new one is
  refused at once (ResourceExhausted: gRPC RESOURCE_EXHAUSTED, HTTP 429). Health checks are
  neither capped nor logged at INFO: probes must get through a busy server.
- The access-log line (logger `rankstream.access`, INFO) names the call, its status code,
  duration, passages in and out and the request id (and, as fields, the client's address and
  the transport), and never any query or document text. Its fields are also log-record
  attributes, so `--log-format json` writes them as JSON keys.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from rankstream_server.errors import ResourceExhausted
from rankstream_server.serving.metrics import Metrics

access_log = logging.getLogger("rankstream.access")

REQUEST_ID = "x-request-id"
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
                 "admitted")

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


class Admission:
    """The concurrency cap over both transports, and the access log and request metrics."""

    def __init__(self, max_concurrent: int, metrics: Metrics | None = None):
        self.max_concurrent = max_concurrent
        self._metrics = metrics
        self.active = 0

    def enter(self, call: CallRecord) -> None:
        """Takes a place for the call, or refuses it (logged and counted as RESOURCE_EXHAUSTED)."""
        if call.quiet:
            return
        if self.active >= self.max_concurrent:
            call.code = "RESOURCE_EXHAUSTED"
            self.finish(call)
            raise ResourceExhausted(f"server busy: {self.active} calls in progress, limit is "
                                    f"server.max_concurrent_rpcs={self.max_concurrent}; retry with backoff")
        self.active += 1
        call.admitted = True

    def leave(self, call: CallRecord) -> None:
        """Gives the call's place back and writes its log line and metrics."""
        if call.admitted:
            self.active -= 1
            call.admitted = False
        self.finish(call)

    def finish(self, call: CallRecord) -> None:
        seconds = time.perf_counter() - call.started
        if self._metrics is not None:
            self._metrics.observe_request(call.rpc, call.code, seconds)
        access_log.log(
            logging.DEBUG if call.quiet else logging.INFO,
            "%s %s %.1f ms passages %d in, %d out request_id=%s",
            call.rpc, call.code, seconds * 1000, call.passages_in, call.passages_out, call.request_id,
            extra={"rpc": call.rpc, "code": call.code, "duration_ms": round(seconds * 1000, 3),
                   "passages_in": call.passages_in, "passages_out": call.passages_out, "request_id": call.request_id,
                   "peer": call.peer, "route": call.route},
        )
