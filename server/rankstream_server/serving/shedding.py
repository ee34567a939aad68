"""Load shedding before a request is decoded: the cheap first admission check of both transports.

Under overload most calls are refused, so a refusal must cost next to nothing: it is decided
from the request's size in bytes (gRPC: the serialized message, HTTP: Content-Length) and the
caller's deadline, before the message is parsed, validated or tokenized. The size gives a token
estimate at the models' measured characters per token; as the query is counted once (not once
per pair) the estimate is low, so this gate only refuses what the exact check after decoding
would refuse too. That check (ModelCall's precheck, before tokenizing) still runs on what passes.

Which model a request will use is not known before decoding, so the gate asks every model of
the kind the operation runs (cross-encoders for Rerank, bi-encoders for Embed and Retrieve) and
refuses only when none of them could take the request.

A refusal's pushback counts the refused calls being held right now (Admission.hold) as well as
the queue: they will come back too, so under a storm "room for this request in 0.3 s" is not
when this caller can expect a place. Held calls never count against admission itself (a crowd
that is only being held must not keep the queue from filling).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping

from rankstream_server.errors import ResourceExhausted
from rankstream_server.serving.operations import Readiness

# Operation -> (kind of model it queues on, whether its request's size is its passages' size).
GATED = {
    "Rerank": ("cross", True),
    "RetrieveAndRerank": ("cross", False),  # its passages come from the index: only the queue counts
    "Embed": ("bi", True),
    "Retrieve": ("bi", False),
    "UpsertPassages": ("bi", True),
}


class LoadGate:
    """Refuses, from size and deadline alone, calls the models' queues cannot take."""

    def __init__(self, readiness: Readiness):
        self._readiness = readiness

    def check(self, rpc: str, size_bytes: int, time_remaining: float | None,
              held_bytes: Mapping[str, int] | None = None) -> None:
        """Raises ResourceExhausted (with the soonest retry_after of the models asked) when no
        model of the operation's kind could take a request of `size_bytes`. `held_bytes`: the
        sizes of the refused calls being held now, by operation (they lengthen the pushback)."""
        gated = GATED.get(rpc)
        registry = self._readiness.registry
        if gated is None or registry is None:
            return
        kind, sized = gated
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        held = sum(size for other, size in (held_bytes or {}).items() if GATED.get(other, ("",))[0] == kind)
        refusals: list[ResourceExhausted] = []
        for model in registry.models:
            if model.kind != kind:
                continue
            tokens = model.sizes.tokens(size_bytes) if sized else 0
            try:
                model.batcher.precheck(1, tokens, deadline)
            except ResourceExhausted as refused:
                if held and refused.retry_after is not None and refused.retry_after >= 0:
                    behind = model.batcher.seconds_for(model.sizes.tokens(held))
                    if behind:
                        refused.retry_after += behind * random.uniform(0.5, 1.5)
                refusals.append(refused)
                continue
            return
        if refusals:
            raise min(refusals, key=_retry_order)


def _retry_order(refused: ResourceExhausted) -> float:
    after = refused.retry_after
    return float("inf") if after is None or after < 0 else after

