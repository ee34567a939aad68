"""Part g of `make bench`: goodput under overload (issue 20), over gRPC and over HTTP (Cohere
`POST /v2/rerank`).

One server process, pinned to its own core where the machine has two or more (clients on the
others): with a single core for both, the clients' CPU would be counted against the server.
Per transport, in rounds (this VM's speed drifts by 20-40% within minutes, so a peak and a storm
far apart in time cannot be compared): a short peak, then each storm, and a last peak, so every
storm lies between two peaks; the ratio is of the sums over all rounds, and each round's storm
against the mean of the two peaks around it is printed too:
- peak: a few clients (4) reranking 5-300 passages a request with 30 s deadlines, no retries
  needed: pairs/s of correct answers;
- storm: 48 clients, the same requests, deadlines drawn from 50 ms to 30 s (HTTP: the client
  sends its deadline in `grpc-timeout`, and gives up and disconnects at it; then once more
  with clients that send no deadline, so the server learns only from the disconnect), 5% cancelled at a random moment, and every refusal
  (RESOURCE_EXHAUSTED / 429) retried at once, as naive clients do: goodput (pairs/s of correct
  answers within their deadline), refusals per second, and the server's event-loop CPU per
  refusal (an upper bound: the loop's work for the admitted calls is in it too);
- gRPC only: a refusal-only burst (300-passage requests with a 0.3 s deadline against an idle
  queue, refused by the load gate before decoding; held 0.25 s, which costs no CPU): the whole
  server's CPU per refusal;
- the server's RSS after warm-up and after each storm, pairs run for callers that had gone
  (pairs the model scored minus pairs answered), and whether every answer was its request's.
Targets (reported, not asserted): goodput >= 0.9x peak; RSS after the storms within 10% of RSS
after warm-up. Bounded in count and time, 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import common

SIZES = (5, 10, 20, 50, 100, 300)
PEAK_CLIENTS, STORM_CLIENTS = 4, 48
CANCELLED = 0.05
DEADLINES = (0.05, 30.0)
NO_HEADER = "HTTP, no deadline header"


@dataclass
class Phase:
    """What one phase of load measured (client side)."""

    seconds: float = 0.0
    good_pairs: int = 0
    ok: int = 0
    refused: int = 0
    deadline: int = 0  # DEADLINE_EXCEEDED, or an HTTP client that gave up at its deadline
    cancelled: int = 0
    other: collections.Counter = field(default_factory=collections.Counter)  # other codes, by name
    wrong: list[str] = field(default_factory=list)

    @property
    def goodput(self) -> float:
        return self.good_pairs / self.seconds if self.seconds else 0.0

    def answered(self, size: int, complete: bool, what: str) -> None:
        """An answer came: all `size` of its request's own passages (`complete`), or not."""
        if complete:
            self.ok += 1
            self.good_pairs += size
        else:
            self.wrong.append(f"a {size}-{what} request got an answer that is not all its own")

    def outcomes(self) -> str:
        extra = "".join(f", {name} {count}" for name, count in self.other.items())
        return (f"OK {self.ok}, refused {self.refused}, deadline {self.deadline}, cancelled {self.cancelled}{extra}, "
                f"wrong {len(self.wrong)}")


@dataclass(frozen=True)
class Workload:
    """Pre-built requests of every size (ids name the request, so a mixed-up answer is seen)."""

    grpc: dict[int, list[bytes]]
    http: dict[int, list[bytes]]
    ids: dict[tuple[int, int], set[str]]


def workload(text: common.Text, variants: int = 6) -> Workload:
    import orjson

    from rankstream.v1 import rankstream_pb2 as pb

    rng = random.Random(20)
    grpc_bodies: dict[int, list[bytes]] = {}
    http_bodies: dict[int, list[bytes]] = {}
    ids: dict[tuple[int, int], set[str]] = {}
    for size in SIZES:
        grpc_bodies[size], http_bodies[size] = [], []
        for variant in range(variants):
            query = rng.choice(text.queries)
            texts = [rng.choice(text.passages) for _ in range(size)]
            names = [f"s{size}v{variant}:{i}" for i in range(size)]
            ids[size, variant] = set(names)
            grpc_bodies[size].append(pb.RerankRequest(query=query, passages=[
                pb.Passage(id=name, text=t) for name, t in zip(names, texts)]).SerializeToString())
            http_bodies[size].append(orjson.dumps({"query": query, "documents": texts}))
    return Workload(grpc_bodies, http_bodies, ids)


def pin(pid: int, cores: set[int]) -> None:
    """Every thread of a process onto `cores` (threads made later inherit their maker's)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cores)


async def grpc_phase(address: str, work: Workload, clients: int, seconds: float, storm: bool, seed: int) -> Phase:
    import grpc

    from rankstream.v1 import rankstream_pb2 as pb

    phase = Phase()
    rng = random.Random(seed)
    # Naive clients: gRPC's own retries off, every refusal retried at once by the loop below.
    channel = grpc.aio.insecure_channel(address, options=[("grpc.enable_retries", 0),
                                                          ("grpc.max_receive_message_length", 64 << 20)])
    rerank = channel.unary_stream("/rankstream.v1.Reranker/Rerank", response_deserializer=pb.ScoredPassages.FromString)
    stop = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < stop:
            size, variant = rng.choice(SIZES), rng.randrange(len(work.grpc[SIZES[0]]))
            deadline = rng.uniform(*DEADLINES) if storm else 30.0
            cancel_after = rng.uniform(0, deadline) if storm and rng.random() < CANCELLED else None
            started = time.perf_counter()
            while True:  # retried at once while refused
                call = rerank(work.grpc[size][variant], timeout=max(0.001, deadline - (time.perf_counter() - started)))
                timer = (asyncio.get_running_loop().call_later(cancel_after, call.cancel)
                         if cancel_after is not None else None)
                try:
                    returned = [p.id async for message in call for p in message.passages]
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        phase.refused += 1
                        if time.perf_counter() - started < deadline and time.perf_counter() < stop:
                            continue
                    elif error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        phase.deadline += 1
                    else:
                        phase.other[error.code().name] += 1
                    break
                except asyncio.CancelledError:
                    phase.cancelled += 1
                    break
                finally:
                    if timer is not None:
                        timer.cancel()
                if call.cancelled():
                    phase.cancelled += 1
                    break
                phase.answered(size, set(returned) == work.ids[size, variant] and len(returned) == size, "passage")
                break

    started = time.perf_counter()
    try:
        await asyncio.gather(*(client() for _ in range(clients)))
    finally:
        phase.seconds = time.perf_counter() - started
        await channel.close()
    return phase


async def http_phase(base: str, work: Workload, clients: int, seconds: float, storm: bool, seed: int,
                     send_deadline: bool = True) -> Phase:
    """`send_deadline`: each request says how long its client will wait (`grpc-timeout`, as
    gRPC-gateway clients do; Envoy and Istio send x-envoy-expected-rq-timeout-ms), so the server
    can refuse what it cannot finish in time; without it the server learns only from the
    disconnect."""
    import aiohttp
    import orjson

    phase = Phase()
    rng = random.Random(seed)
    stop = time.perf_counter() + seconds
    url = base + "/v2/rerank"
    headers = {"content-type": "application/json"}

    async def client() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), headers=headers) as session:
            while time.perf_counter() < stop:
                size, variant = rng.choice(SIZES), rng.randrange(len(work.http[SIZES[0]]))
                deadline = rng.uniform(*DEADLINES) if storm else 30.0
                cancel = storm and rng.random() < CANCELLED
                started = time.perf_counter()
                while True:
                    left = deadline - (time.perf_counter() - started)
                    if left <= 0:
                        phase.deadline += 1
                        break
                    limit = rng.uniform(0, left) if cancel else left
                    timeout = {"grpc-timeout": f"{max(1, int(left * 1000))}m"} if send_deadline else None
                    try:
                        async with asyncio.timeout(limit):
                            async with session.post(url, data=work.http[size][variant], headers=timeout) as answer:
                                body = await answer.read()
                    except TimeoutError:
                        if cancel:
                            phase.cancelled += 1
                        else:
                            phase.deadline += 1
                        break
                    except aiohttp.ClientError as error:
                        phase.other[type(error).__name__] += 1
                        break
                    if answer.status == 429:
                        phase.refused += 1
                        if time.perf_counter() < stop:
                            continue
                        break
                    if answer.status != 200:
                        phase.other[f"HTTP {answer.status}"] += 1
                        break
                    indices = [r["index"] for r in orjson.loads(body)["results"]]
                    phase.answered(size, sorted(indices) == list(range(size)), "document")
                    break

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    phase.seconds = time.perf_counter() - started
    return phase


async def refusal_burst(address: str, work: Workload, clients: int, calls: int) -> int:
    """gRPC calls that the load gate refuses by their deadline alone (300 passages, 0.3 s: held
    for 0.25 s first, which costs no CPU)."""
    import grpc

    from rankstream.v1 import rankstream_pb2 as pb

    channel = grpc.aio.insecure_channel(address, options=[("grpc.enable_retries", 0)])
    rerank = channel.unary_stream("/rankstream.v1.Reranker/Rerank", response_deserializer=pb.ScoredPassages.FromString)
    refused = 0
    left = iter(range(calls))

    async def client() -> None:
        nonlocal refused
        for _ in left:
            try:
                async for _message in rerank(work.grpc[300][0], timeout=0.3):
                    pass
            except grpc.aio.AioRpcError as error:
                refused += error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    try:
        await asyncio.gather(*(client() for _ in range(clients)))
    finally:
        await channel.close()
    return refused


async def warm_up(server: common.Server, work: Workload) -> None:
    """Every request size once over each transport, one at a time: the model's pass shapes and
    the allocator reach their working set before RSS is first read."""
    import aiohttp
    import grpc

    async with grpc.aio.insecure_channel(server.address) as channel:
        rerank = channel.unary_stream("/rankstream.v1.Reranker/Rerank")
        for size in SIZES:
            async for _message in rerank(work.grpc[size][0], timeout=120):
                pass
    async with aiohttp.ClientSession(headers={"content-type": "application/json"}) as session:
        for size in SIZES:
            async with session.post(server.http_base + "/v2/rerank", data=work.http[size][0]) as answer:
                await answer.read()


def counters(server: common.Server, metrics_url: str) -> dict[str, float]:
    batcher = common.model_info(server.address)["scorer"].batcher
    threads = common.thread_cpu_seconds(server.pid)
    loop = threads.get(server.pid, 0.0)
    return {"items": batcher.items, "dropped": batcher.dropped, "rejected": batcher.rejected,
            "batches": batcher.batches, "tokens": batcher.tokens, "padded": batcher.padded_tokens,
            "loop_s": loop, "others_s": sum(threads.values()) - loop, "at": time.perf_counter(),
            **refusals_by_stage(metrics_url)}


def refusals_by_stage(metrics_url: str) -> dict[str, float]:
    """Refused calls so far (the server's /metrics), by where they were refused: before the request
    was decoded (the concurrency cap, the load gate) or after it (the exact check on the decoded
    request, reason "model")."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as answer:
        text = answer.read().decode()
    stages = {"refused_before": 0.0, "refused_after": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "rankstream_refused":
            for sample in family.samples:
                if sample.name == "rankstream_refused_total":
                    stages["refused_after" if sample.labels["reason"] == "model" else "refused_before"] += sample.value
    return stages


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def inside(d: dict[str, float]) -> str:
    """Where phases' capacity went, server side (`d`: their counter changes, summed): pairs scored
    a second, pass shapes, and the server's CPU split between the event loop (main thread) and
    the rest (model, tokenizers)."""
    seconds = d["at"] or float("nan")
    return (f"scored {d['items'] / seconds:,.1f} pairs/s in {d['batches']:.0f} passes of {d['items'] / max(d['batches'], 1):.1f} "
            f"rows, padding efficiency {d['tokens'] / max(d['padded'], 1):.2f}; server CPU: event loop "
            f"{100 * d['loop_s'] / seconds:.1f}%, other threads {100 * d['others_s'] / seconds:.1f}% of a core; "
            f"refused {d['refused_before']:.0f} calls before decoding, {d['refused_after']:.0f} after")


def merged(phases: list[Phase]) -> Phase:
    """Several rounds of one kind of phase as one."""
    total = Phase()
    for phase in phases:
        total.seconds += phase.seconds
        total.good_pairs += phase.good_pairs
        total.ok += phase.ok
        total.refused += phase.refused
        total.deadline += phase.deadline
        total.cancelled += phase.cancelled
        total.other.update(phase.other)
        total.wrong.extend(phase.wrong)
    return total


def added(into: dict[str, float], before: dict[str, float], after: dict[str, float]) -> None:
    """Adds one phase's server-side counter changes to a running sum (`at`: its seconds)."""
    for key in before:
        into[key] = into.get(key, 0.0) + after[key] - before[key]


def run(args, scratch: Path, text: common.Text, summary: list, smoke: bool) -> None:
    # The VM's speed drifts by 20-40% within minutes, so one peak phase then one storm cannot judge
    # a 0.9x ratio: short peak and storm phases alternate, every storm between two peaks, and the
    # ratio is of their sums (goodput over all storm rounds / over all peak rounds).
    rounds, peak_s, storm_s, burst_calls = ((1, 2.0, 3.0, 40) if smoke else (3, 5.0, 12.0, 400) if args.quick
                                            else (6, 8.0, 20.0, 1000))
    model_dir = common.host_path_model() if smoke else common.minilm_cross()
    cores = sorted(os.sched_getaffinity(0))
    pinned = len(cores) >= 2
    server_cores, client_cores = ({cores[0]}, set(cores[1:])) if pinned else (set(cores), set(cores))
    common.heading(f"g. Goodput under overload: {'host-path model' if smoke else 'MiniLM-L6 cross-encoder fp32'}, "
                   f"{STORM_CLIENTS} immediate-retry clients, gRPC and HTTP (Cohere /v2/rerank)")
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    config = {"server": {"torch_threads": 1, "http_port": 0, "metrics_port": metrics_port}, "limits": {"max_passages": 300},
              "batching": {"cpu_passes": len(server_cores)},
              "models": [{"name": "scorer", "weights": str(model_dir)}], "default_model": "scorer"}
    work = workload(text)
    own_before = os.sched_getaffinity(0)
    with common.Server(config, scratch, name="overload") as server:
        if pinned:
            pin(server.pid, server_cores)
            pin(os.getpid(), client_cores)
        print(f"server pid {server.pid} on core(s) {sorted(server_cores)}, clients on {sorted(client_cores)}"
              + ("" if pinned else " (one core: server and clients share it)"))
        print(f"requests: {', '.join(map(str, SIZES))} passages (~60 words) each; peak: {PEAK_CLIENTS} clients, 30 s "
              f"deadlines; storm: {STORM_CLIENTS} clients, deadlines {DEADLINES[0] * 1000:.0f} ms-"
              f"{DEADLINES[1]:g} s, {CANCELLED:.0%} cancelled, refusals retried at once; per transport "
              f"{rounds} rounds of a {peak_s:g} s peak then each storm ({storm_s:g} s), and a last peak")
        try:
            asyncio.run(warm_up(server, work))
            rss_warm = rss_mib(server.pid)
            rows, ratios, rss_after = [], [], []
            # Each transport: its phase function, target, and the storms its peaks bracket (the
            # HTTP peaks serve both HTTP storms: no deadline is near at peak).
            transports = [("gRPC", grpc_phase, server.address, ["gRPC"]),
                          ("HTTP", http_phase, server.http_base, ["HTTP", NO_HEADER])]
            storms_of = {"gRPC": grpc_phase, "HTTP": http_phase,
                         NO_HEADER: functools.partial(http_phase, send_deadline=False)}
            for transport, peak_of, target, storms in transports:
                peaks: list[Phase] = []
                storm_rounds: dict[str, list[Phase]] = {name: [] for name in storms}
                inside_sums: dict[str, dict[str, float]] = {name: {} for name in [transport + " peak", *storms]}
                others = dict.fromkeys(storms, 0.0)
                for number in range(rounds + 1):
                    before = counters(server, metrics_url)
                    peaks.append(asyncio.run(peak_of(target, work, PEAK_CLIENTS, peak_s, False, 3 + 10 * number)))
                    added(inside_sums[transport + " peak"], before, counters(server, metrics_url))
                    if number == rounds:
                        break
                    for name in storms:
                        before = counters(server, metrics_url)
                        with common.Watch(server.pid) as watched:
                            storm_rounds[name].append(asyncio.run(
                                storms_of[name](target, work, STORM_CLIENTS, storm_s, True, 4 + 10 * number)))
                        added(inside_sums[name], before, counters(server, metrics_url))
                        others[name] = max(others[name], watched.other_pct)
                    print(f"{transport} round {number + 1}: peak {peaks[-1].goodput:.1f} pairs/s, "
                          + ", ".join(f"{name} storm {storm_rounds[name][-1].goodput:.1f}" for name in storms))
                print(f"{transport} last peak: {peaks[-1].goodput:.1f} pairs/s")
                rss_after.append(rss_mib(server.pid))
                peak = merged(peaks)
                print(f"{transport} peak ({len(peaks)} phases): {peak.outcomes()}")
                print(f"{transport} peak, server side: {inside(inside_sums[transport + ' peak'])}")
                for name in storms:
                    storm = merged(storm_rounds[name])
                    sums = inside_sums[name]
                    ratio = storm.goodput / peak.goodput if peak.goodput else float("nan")
                    # Each storm against the two peaks around it: how much the ratio moves by round.
                    by_round = [s.goodput / ((a.goodput + b.goodput) / 2) if a.goodput + b.goodput else float("nan")
                                for s, a, b in zip(storm_rounds[name], peaks, peaks[1:])]
                    ratios.append((name, ratio, others[name]))
                    loop_us = sums["loop_s"] / storm.refused * 1e6 if storm.refused else float("nan")
                    # Of what the model scored in the storms, the share answered in time: overload's
                    # own waste, whatever the machine's speed did meanwhile.
                    kept = storm.good_pairs / sums["items"] if sums["items"] else float("nan")
                    rows.append([name, peak.goodput, storm.goodput, ratio, " / ".join(f"{r:.2f}" for r in by_round), kept,
                                 storm.refused / storm.seconds, loop_us, sums["items"] - storm.good_pairs,
                                 sums["dropped"], len(storm.wrong) + (len(peak.wrong) if name == storms[0] else 0)])
                    print(f"{name} storm ({len(storm_rounds[name])} phases): {storm.outcomes()}; others took up to "
                          f"{others[name]:.0f}% of the cores")
                    print(f"{name} storm, server side: {inside(sums)}")
            cpu_before = server.cpu_seconds()
            refused = asyncio.run(refusal_burst(server.address, work, 64, burst_calls))
            burst_us = (server.cpu_seconds() - cpu_before) / refused * 1e6 if refused else float("nan")
            alive = server.process.poll() is None
        finally:
            os.sched_setaffinity(0, own_before)
    print()
    common.table(["transport", f"peak pairs/s ({PEAK_CLIENTS} clients)", f"goodput pairs/s ({STORM_CLIENTS} clients)",
                  "goodput / peak (sums)", "by round, vs the peaks around it", "goodput / pairs scored in the storms",
                  "refusals/s",
                  "loop CPU us per refusal (upper bound)", "pairs scored not answered in time", "pairs dropped unrun",
                  "wrong answers"], rows)
    print(f"refusal-only burst over gRPC ({refused} of {burst_calls} calls refused before decoding, 300 passages, "
          f"0.3 s deadline, 64 clients): {burst_us:,.0f} us of server CPU per refusal, all threads")
    growth = max(rss_after) / rss_warm - 1 if rss_warm == rss_warm else float("nan")
    print(f"server RSS: {rss_warm:.0f} MiB after warm-up, {' / '.join(f'{r:.0f}' for r in rss_after)} MiB after the "
          f"{' / '.join(t for t, *_ in transports)} rounds ({growth:+.1%}); server alive: {alive}")
    for transport, ratio, others_pct in ratios:
        if transport == NO_HEADER:  # the server cannot know these callers' deadlines: reported, no target
            summary.append([f"overload: {transport}: goodput / peak", ratio, "-", "-"])
            continue
        summary.append([f"overload: {transport} goodput at {STORM_CLIENTS} clients / peak", ratio, ">= 0.9",
                        common.verdict(ratio, 0.9, others=[others_pct])])
    summary.append(["overload: server RSS growth over the storms", growth, "<= 0.10",
                    common.verdict(growth, 0.10, higher_is_better=False)])
    summary.append(["overload: server CPU per refusal before decoding, us (gRPC burst)", burst_us, "-", "-"])


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB (/proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
