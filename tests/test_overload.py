"""Issue 20: goodput under overload. The decision logic, not timing: the drain-rate estimate
against simulated drains (fake clock), refusals decided before decoding with a pushback from
that estimate on both transports, clients that honour it, and refusals summarised in the log."""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
import httpx
import pytest

from rankstream import AsyncRankstreamClient, RankstreamClient
from rankstream.errors import RankstreamError
from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc
from rankstream_server.errors import ResourceExhausted
from rankstream_server.inference.estimates import DrainRate, TokenSizes
from rankstream_server.serving.admission import CallRecord, RefusalSummary
from rankstream_server.serving.grpc.access import PUSHBACK

from conftest import QUERY, ThreadedServer, make_settings, passages

# -- the estimate against a simulated drain -----------------------------------------------------


def simulate(drain: DrainRate, queue: int, pass_tokens: int, workers: int, pass_seconds, start: float = 0.0,
             probe_after: int | None = None, full: bool = True) -> tuple[float, float | None]:
    """Drains `queue` tokens in passes of `pass_tokens`, `workers` passes side by side, each pass
    taking pass_seconds(t) at its launch time t; every pass is reported to `drain`, in time order.
    Returns when the last pass ended, and the estimate made after `probe_after` passes had ended
    for the tokens still left then (queued or running): what admission would have promised."""
    free = [start] * workers  # when each worker is next free
    events: list[tuple[float, int, str]] = []  # (time, tokens, what)
    left = queue
    while left > 0:
        worker = min(range(workers), key=free.__getitem__)
        began = free[worker]
        tokens = min(pass_tokens, left)
        left -= tokens
        free[worker] = began + pass_seconds(began)
        events += [(began, tokens, "launched"), (free[worker], tokens, "finished")]
    events.sort(key=lambda event: (event[0], event[2] == "launched"))
    ended, estimate, done = max(free), None, 0
    for when, tokens, what in events:
        if what == "launched":
            drain.launched(when)
            continue
        drain.finished(when, tokens, full=full and tokens == pass_tokens)
        done += 1
        if done == probe_after:
            left_then = queue - done * pass_tokens
            estimate = drain.seconds_for(left_then)
            probe_time = when
    if probe_after is not None and estimate is not None:
        return ended - probe_time, estimate
    return ended, estimate


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_steady_drain_is_estimated_within_ten_percent_whatever_the_passes_side_by_side(workers):
    drain = DrainRate()
    actual, estimate = simulate(drain, queue=400 * 2048, pass_tokens=2048, workers=workers,
                                pass_seconds=lambda t: 0.1, probe_after=40)
    assert estimate is not None
    assert 0.9 * actual <= estimate <= 1.1 * actual


def test_the_estimate_follows_a_machine_that_slows_down_then_speeds_up():
    """The rate changes mid-way (other work on the machine); a few windows later the estimate made
    for the rest of the queue matches the drain that follows, so admission neither promises
    a wait it cannot keep nor refuses work it would finish in time."""
    drain = DrainRate()
    simulate(drain, queue=200 * 2048, pass_tokens=2048, workers=2, pass_seconds=lambda t: 0.05)
    start = 10.0
    slow = lambda t: 0.15  # noqa: E731 - three times slower from here
    actual, estimate = simulate(drain, queue=300 * 2048, pass_tokens=2048, workers=2, pass_seconds=slow,
                                start=start, probe_after=60)
    assert 0.85 * actual <= estimate <= 1.15 * actual
    actual, estimate = simulate(drain, queue=300 * 2048, pass_tokens=2048, workers=2,
                                pass_seconds=lambda t: 0.05, start=100.0, probe_after=60)
    assert 0.85 * actual <= estimate <= 1.15 * actual, "after speeding up, no refusal for work it would finish"


def test_the_cautious_rate_remembers_a_slow_spell_for_its_memory_then_forgets_it():
    drain = DrainRate(memory_seconds=30.0)
    simulate(drain, queue=100 * 2048, pass_tokens=2048, workers=1, pass_seconds=lambda t: 0.05)
    fast = drain.tokens_per_second
    simulate(drain, queue=100 * 2048, pass_tokens=2048, workers=1, pass_seconds=lambda t: 0.15, start=10.0)
    simulate(drain, queue=100 * 2048, pass_tokens=2048, workers=1, pass_seconds=lambda t: 0.05, start=30.0)
    assert drain.tokens_per_second == pytest.approx(fast, rel=0.1), "the average is back to the fast figure"
    assert drain.cautious_tokens_per_second == pytest.approx(fast / 3, rel=0.15), "the slow spell is remembered"
    simulate(drain, queue=800 * 2048, pass_tokens=2048, workers=1, pass_seconds=lambda t: 0.05, start=40.0)
    assert drain.cautious_tokens_per_second == pytest.approx(fast, rel=0.1), "and forgotten 30 s later"
    assert drain.seconds_for(2048, cautious=True) == pytest.approx(2048 / drain.cautious_tokens_per_second)


def test_windows_of_small_passes_do_not_drag_the_rate_down():
    drain = DrainRate()
    simulate(drain, queue=100 * 2048, pass_tokens=2048, workers=1, pass_seconds=lambda t: 0.05)
    rate = drain.tokens_per_second
    # light load: passes of 20 tokens, mostly fixed cost, would say 400 tokens/s
    simulate(drain, queue=100 * 20, pass_tokens=20, workers=1, pass_seconds=lambda t: 0.05, start=50.0, full=False)
    assert drain.tokens_per_second == pytest.approx(rate)


def test_token_sizes_learn_characters_per_token():
    sizes = TokenSizes()
    for _ in range(60):
        sizes.learn(chars=6000, tokens=1000)
    assert sizes.chars_per_token == pytest.approx(6.0, rel=0.01)
    assert sizes.tokens(60_000) == pytest.approx(10_000, rel=0.01)


def test_refusals_are_jittered_and_a_deadline_refusal_says_do_not_retry():
    afters = {ResourceExhausted("busy", retry_after=1.0).retry_after for _ in range(50)}
    assert len(afters) > 10 and all(0.5 <= after <= 1.5 for after in afters)
    assert ResourceExhausted("late", retry_after=-1.0).retry_after == -1.0


def test_refusals_are_summarised_not_logged_one_line_each(caplog):
    summary = RefusalSummary(interval=3600)
    with caplog.at_level(logging.INFO, logger="rankstream.access"):
        for i in range(500):
            summary.add(CallRecord("Rerank", f"r{i}"))
    lines = [r for r in caplog.records if r.name == "rankstream.access"]
    assert len(lines) == 1, "the first refusal after a quiet spell is logged, the rest are counted"
    summary._last_line -= 3600  # an interval later
    with caplog.at_level(logging.INFO, logger="rankstream.access"):
        summary.add(CallRecord("Embed", "e1"))
    last = [r for r in caplog.records if r.name == "rankstream.access"][-1]
    assert last.refused == 500 and last.refused_by_rpc == {"Rerank": 499, "Embed": 1}


@pytest.mark.parametrize(("pushback", "time_remaining", "held", "left"), [
    (2.0, None, 1.0, 1.0),  # held up to the limit; the client is told to wait the rest
    (2.0, 0.3, 0.25, 1.75),  # ... answered before the caller's deadline
    (2.0, 0.08, 0.08, 1.92),  # ... unless too little is left to use it: then held to the deadline
    (0.3, None, 0.3, 0.0),  # held for all of a short pushback
    (-1.0, 0.5, 0.45, -1.0),  # no retry can succeed: held until just before the deadline
    (-1.0, None, None, -1.0),  # ... and with no deadline, answered at once
    (None, 5.0, None, None),  # no estimate: answered at once
])
async def test_a_refusal_is_held_within_its_pushback_or_deadline(monkeypatch, pushback, time_remaining, held, left):
    from rankstream_server.serving import admission as module

    slept = []

    async def sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(module.asyncio, "sleep", sleep)
    refused = ResourceExhausted("busy")
    refused.retry_after = pushback
    await module.Admission(8, hold_seconds=1.0).hold(refused, time_remaining)
    assert slept == ([] if held is None else [pytest.approx(held)])
    assert refused.retry_after == (None if left is None else pytest.approx(left))


async def test_no_more_refusals_are_held_than_calls_are_allowed(monkeypatch):
    from rankstream_server.serving import admission as module

    slept = []

    async def sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(module.asyncio, "sleep", sleep)
    gate = module.Admission(2, hold_seconds=1.0)
    gate.held = 2
    refused = ResourceExhausted("busy", retry_after=2.0)
    before = refused.retry_after
    await gate.hold(refused)
    assert slept == [] and refused.retry_after == before


# -- a server: refusals before decoding, with a pushback -----------------------------------------


@pytest.fixture(scope="module")
def server(models):
    settings = make_settings([{"name": "tiny-bert", "weights": str(models.bert)}],  # refusals answered at once
                             server={"http_port": 0, "metrics_port": 0, "refusal_hold_ms": 0}, batching={"max_wait_ms": 0})
    running = ThreadedServer(settings).start()
    running.batcher = running.server._readiness.registry.get("tiny-bert").batcher
    yield running
    running.stop()


class Loaded:
    """Puts the batcher in a known state: a drain rate, and `queued_tokens` of queued work."""

    def __init__(self, batcher, tokens_per_second: float, queued_tokens: int = 0):
        self.batcher, self.rate, self.tokens = batcher, tokens_per_second, queued_tokens

    def __enter__(self):
        with self.batcher._cond:
            self.saved = (self.batcher._drain.tokens_per_second, self.batcher._queued_rows, self.batcher._queued_tokens)
            self.batcher._drain.tokens_per_second = self.rate
            self.batcher._queued_rows += 1 if self.tokens else 0
            self.batcher._queued_tokens += self.tokens
        return self

    def __exit__(self, *_):
        with self.batcher._cond:
            self.batcher._drain.tokens_per_second = self.saved[0]
            self.batcher._queued_rows -= 1 if self.tokens else 0
            self.batcher._queued_tokens -= self.tokens


def raw_rerank(server, payload: bytes, timeout: float | None):
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_stream("/rankstream.v1.Reranker/Rerank")(payload, timeout=timeout)
        try:
            list(call)
        except grpc.RpcError as error:
            return error.code(), dict(error.trailing_metadata() or ())
    return grpc.StatusCode.OK, {}


def test_a_call_that_cannot_meet_its_deadline_is_refused_before_it_is_decoded(server):
    undecodable = b"\xff" * 20_000  # not a protobuf message: decoding it would answer INVALID_ARGUMENT
    with Loaded(server.batcher, tokens_per_second=100.0):  # 20,000 bytes ~ 5,000 tokens: ~50 s of work
        code, trailers = raw_rerank(server, undecodable, timeout=5)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert trailers[PUSHBACK] == "-1", "a retry within the same deadline cannot succeed"
        code, _ = raw_rerank(server, undecodable, timeout=None)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, "with time to spare it is admitted, then decoded"


def test_a_full_queue_refuses_with_a_pushback_from_its_drain_rate(server):
    request = pb.RerankRequest(query=QUERY, passages=passages(["a short passage"])).SerializeToString()
    refused_before = server.batcher.counters.refused_queue
    with Loaded(server.batcher, tokens_per_second=100.0, queued_tokens=1500):  # 15 s queued, limit 10 s
        code, trailers = raw_rerank(server, request, timeout=None)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    pushback = int(trailers[PUSHBACK])
    assert 0.5 * 5000 <= pushback <= 1.5 * 5200, "about the 5 s of work past the limit, jittered"
    assert server.batcher.counters.refused_queue == refused_before + 1
    code, _ = raw_rerank(server, request, timeout=None)
    assert code == grpc.StatusCode.OK


def test_http_429_carries_retry_after_from_the_same_estimate(server):
    body = {"query": QUERY, "documents": ["a short passage"]}
    with Loaded(server.batcher, tokens_per_second=100.0, queued_tokens=3000):  # 30 s queued: 20 s past the limit
        answer = httpx.post(f"http://127.0.0.1:{server.server.http_port}/v2/rerank", json=body, timeout=30)
    assert answer.status_code == 429
    assert 10 <= int(answer.headers["retry-after"]) <= 31
    assert "max_queue_seconds" in answer.json()["message"]
    metrics = httpx.get(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=30).text
    assert 'rankstream_refused_total{reason="queue",rpc="Rerank"}' in metrics
    assert 'rankstream_model_refused_total{model="tiny-bert",reason="queue"}' in metrics


@pytest.mark.parametrize("headers, seconds", [
    ({"grpc-timeout": "2500m"}, 2.5), ({"grpc-timeout": "3S"}, 3.0), ({"grpc-timeout": "1M"}, 60.0),
    ({"grpc-timeout": "200000u"}, 0.2), ({"x-envoy-expected-rq-timeout-ms": "1500"}, 1.5), ({}, None),
])
def test_an_http_deadline_is_read_from_grpc_timeout_or_envoys_header(headers, seconds):
    from rankstream_server.serving.http.front import deadline_header

    assert deadline_header(headers) == (None if seconds is None else pytest.approx(seconds))


def test_an_http_call_that_cannot_meet_the_deadline_it_sent_is_refused_before_its_body_is_read(server):
    base = f"http://127.0.0.1:{server.server.http_port}"
    body = {"query": QUERY, "documents": ["a short passage " * 200] * 10}  # ~32 KB: ~8,000 tokens, ~80 s at 100/s
    with Loaded(server.batcher, tokens_per_second=100.0):
        refused = httpx.post(f"{base}/v2/rerank", json=body, headers={"grpc-timeout": "5S"}, timeout=30)
        assert refused.status_code == 429 and "deadline" in refused.json()["message"]
        bad = httpx.post(f"{base}/v2/rerank", json=body, headers={"grpc-timeout": "soon"}, timeout=30)
        assert bad.status_code == 400 and "grpc-timeout" in bad.json()["message"]
    ok = httpx.post(f"{base}/v2/rerank", json={"query": QUERY, "documents": ["a", "b"]},
                    headers={"x-envoy-expected-rq-timeout-ms": "20000"}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2


def test_the_pushback_counts_the_refused_calls_being_held(server):
    from rankstream_server.serving.shedding import LoadGate

    gate = LoadGate(server.server._readiness)
    with Loaded(server.batcher, tokens_per_second=100.0, queued_tokens=1100):  # 11 s queued: 1 s past the limit
        pushbacks = {}
        for held in (0, 40_000):  # 40,000 bytes held (~10,000 tokens): about 100 s more
            with pytest.raises(ResourceExhausted) as refused:
                gate.check("Rerank", 400, None, {"Rerank": held, "Embed": 10**9})  # Embed queues on no cross-encoder
            pushbacks[held] = refused.value.retry_after
    assert pushbacks[0] <= 3.5, "about the 2 s past the limit, jittered"
    assert 30 <= pushbacks[40_000] <= 250, "plus the held calls' work, jittered"


# -- clients: they retry refusals with the server's pushback, within their deadline ----------------


class Refusing(pb_grpc.RerankerServicer):
    """Refuses the first `refusals` calls with RESOURCE_EXHAUSTED and `pushback`, then answers."""

    def __init__(self, refusals: int, pushback: str):
        self.refusals, self.pushback, self.calls = refusals, pushback, 0
        self.lock = threading.Lock()

    def Rerank(self, request, context):
        with self.lock:
            self.calls += 1
            refuse = self.calls <= self.refusals
        if refuse:
            context.set_trailing_metadata(((PUSHBACK, self.pushback),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy; retry later")
        yield pb.ScoredPassages(passages=[pb.ScoredPassage(index=i, score=1.0, rank=i + 1)
                                          for i in range(len(request.passages))])


@pytest.fixture()
def refusing():
    servers = []

    def start(refusals: int, pushback: str) -> tuple[str, Refusing]:
        servicer = Refusing(refusals, pushback)
        grpc_server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_RerankerServicer_to_server(servicer, grpc_server)
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        grpc_server.start()
        servers.append(grpc_server)
        return f"127.0.0.1:{port}", servicer

    yield start
    for grpc_server in servers:
        grpc_server.stop(None)


def test_the_sync_client_retries_overload_after_the_pushback(refusing):
    target, servicer = refusing(refusals=2, pushback="20")
    with RankstreamClient(target, timeout=10) as client:
        ranking = client.rerank(QUERY, ["a", "b"])
    assert len(ranking) == 2 and servicer.calls == 3


async def test_the_asyncio_client_retries_overload_after_the_pushback(refusing):
    target, servicer = refusing(refusals=2, pushback="20")
    async with AsyncRankstreamClient(target, timeout=10) as client:
        ranking = await client.rerank(QUERY, ["a", "b"])
    assert len(ranking) == 2 and servicer.calls == 3


def test_langchain_reranks_through_an_overloaded_server(refusing):
    from langchain_core.documents import Document

    from rankstream.langchain import RankstreamRerank

    target, servicer = refusing(refusals=1, pushback="20")
    compressor = RankstreamRerank(target=target, top_n=2, timeout=10)
    assert len(compressor.compress_documents([Document(page_content="a"), Document(page_content="b")], QUERY)) == 2
    assert servicer.calls == 2


def test_a_do_not_retry_pushback_and_the_deadline_stop_retries(refusing):
    target, servicer = refusing(refusals=100, pushback="-1")
    with RankstreamClient(target, timeout=10) as client, pytest.raises(RankstreamError) as refused:
        client.rerank(QUERY, ["a"])
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and servicer.calls == 1
    target, servicer = refusing(refusals=100, pushback="5000")  # 5 s pushback, 0.5 s deadline
    with RankstreamClient(target, timeout=0.5) as client, pytest.raises(RankstreamError):
        client.rerank(QUERY, ["a"])
    assert servicer.calls == 1, "no retry past the caller's deadline"


async def test_a_caller_whose_deadline_has_passed_is_dropped_before_tokenizing(server):
    from concurrent.futures import ThreadPoolExecutor

    from rankstream_server.errors import DeadlineExceeded
    from rankstream_server.inference.scoring import ModelCall

    model = server.server._readiness.registry.get("tiny-bert")
    tokenized = []
    real_encode = model.tokenizer.encode
    model.tokenizer.encode = lambda *args, **kwargs: tokenized.append(args) or real_encode(*args, **kwargs)
    try:
        with ThreadPoolExecutor(1) as pool:
            call = ModelCall(pool, time_remaining=0.0)
            with pytest.raises(DeadlineExceeded, match="before the request was tokenized"):
                async for _ in call.score(model, QUERY, ["a passage"]):
                    pass
            live = ModelCall(pool, time_remaining=30.0)
            assert [len(indices) async for indices, _ in live.score(model, QUERY, ["a passage"])] == [1]
    finally:
        model.tokenizer.encode = real_encode
    assert len(tokenized) == 1, "only the live call was tokenized"


def test_a_refused_call_is_counted_once_when_the_transport_also_leaves():
    from rankstream_server.serving.admission import Admission

    class Metrics:
        def __init__(self):
            self.requests, self.refusals = [], []

        def observe_request(self, rpc, code, seconds):
            self.requests.append(code)

        def observe_refusal(self, rpc, reason):
            self.refusals.append(reason)

    metrics = Metrics()
    admission = Admission(0, metrics)  # every call past the cap
    call = CallRecord("Rerank", "r1")
    with pytest.raises(ResourceExhausted):
        admission.enter(call)
    admission.leave(call)  # what the HTTP front's Guard does however a call ends
    assert metrics.requests == ["RESOURCE_EXHAUSTED"] and metrics.refusals == ["concurrency"]


async def test_a_refusal_made_after_decoding_is_held_before_it_is_answered():
    """The exact check after decoding refuses too (its estimate counts the query once per pair):
    that refusal is held like one before decoding, or immediate retries would bypass the hold."""
    from rankstream_server.serving.grpc.servicers import _abort_for

    held, answered = [], []

    async def hold(refused, time_remaining):
        held.append((refused.retry_after, time_remaining))

    class Context:
        def time_remaining(self):
            return 5.0

        def trailing_metadata(self):
            return ()

        def set_trailing_metadata(self, metadata):
            self.metadata = dict(metadata)

        async def abort(self, code, message):
            answered.append((code, held[:]))
            raise RuntimeError("aborted")

    context = Context()
    with pytest.raises(RuntimeError):
        await _abort_for(ResourceExhausted("queue full", retry_after=2.0), context, hold)
    assert answered == [(grpc.StatusCode.RESOURCE_EXHAUSTED, held)] and len(held) == 1, "held, then answered"
    assert held[0][1] == 5.0 and PUSHBACK in context.metadata
