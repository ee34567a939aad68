"""`make bench`: the CPU benchmarks of issues 7 and 20, one run, printed as tables.

    .venv/bin/python benchmarks/bench.py            # about 8-10 minutes on 2 cores (part g: 4.5)
    .venv/bin/python benchmarks/bench.py --quick    # smaller workloads, about 4 minutes
    .venv/bin/python benchmarks/bench.py --parts overload   # part g alone

a. Host-path ceiling. BERT with 1 layer and hidden size 32 (seeded random weights, BERT uncased
   vocabulary), 32 concurrent clients x 100 passages per Rerank, ~60-word passages. On the same
   pairs: the `tokenizers` batch API alone on all cores, sentence-transformers
   `CrossEncoder.predict`, and the server over gRPC. Targets: server >= 0.6x tokenizer and
   >= 1.5x CrossEncoder.predict.
b. MiniLM-L6-H384 cross-encoder, dtype auto (issue 19: chosen by measurement at start-up), 8 clients
   x 100 passages, vs `CrossEncoder.predict` fp32 and bf16 on the same pairs and threads, in the same
   run. Targets on CPUs with avx512_bf16 or AMX: >= 3x CE.predict fp32 and >= 1.3x CE.predict bf16;
   elsewhere >= 1.0x CE.predict fp32.
c. Index build: `rankstream index build` with the embedded all-MiniLM-L6-v2 bi-encoder, dtype
   float32 (as before issue 19) and auto. Target on bf16 CPUs: auto >= 2.5x the float32 build.
d. Retrieve and RetrieveAndRerank (top_k 100, host-path reranker) over that flat index at 1 and
   more clients, and UpsertPassages.
e. An LLM reranker of Qwen3-Reranker-0.6B's shape (benchmarks/decoder_reranker.py) vs
   `CrossEncoder.predict` on the same pairs, and their largest score difference.
f. HTTP front vs gRPC: part a's rerank load (host-path model, 32 clients x 100 passages) over
   Cohere's `POST /v2/rerank` (keep-alive aiohttp clients) and over gRPC, alternated, in one run
   against the same server. Target: HTTP >= 0.9x gRPC pairs/s (reported, not asserted).
g. Goodput under overload (benchmarks/overload.py, `--parts overload`): MiniLM-L6 on a server
   pinned to its own core, peak pairs/s at 4 clients and 48 clients that retry refusals at
   once, in alternated rounds (the machine's speed drifts), over gRPC and HTTP: goodput,
   refusals/s, CPU per refusal, RSS before and after.
   Target: goodput >= 0.9x peak (reported, not asserted).

The server runs as `rankstream serve --config ...` in a child process (its own GIL) on 127.0.0.1;
clients are grpc.aio calls through the generated stubs. A miss is printed, never an error exit.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import overload  # noqa: E402

import decoder_reranker  # noqa: E402

SIZES = {
    # name: (full, --quick, --smoke)
    "host_requests": (64, 32, 4),  # distinct 100-passage requests (pairs = x100)
    "host_calls": (192, 96, 8),  # timed calls from 32 clients
    "minilm_pairs": (1600, 800, 100),
    "index_passages": (1024, 256, 64),
    "retrieve_calls": (200, 80, 4),
    "rr_calls": (120, 48, 4),
    "upsert_passages": (512, 128, 64),
    "http_calls": (192, 96, 8),  # part e: calls per front and round, 100 passages each
}


SHARED_SERVER_PARTS = {"host", "minilm", "retrieval", "http"}  # parts e and g start servers of their own


def size(args: argparse.Namespace, name: str) -> int:
    full, quick, smoke = SIZES[name]
    return smoke if args.smoke else quick if args.quick else full


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """--set section.key=value (YAML value) into the server config."""
    import yaml

    for item in overrides:
        dotted, _, value = item.partition("=")
        section, _, key = dotted.partition(".")
        config.setdefault(section, {})[key] = yaml.safe_load(value)
    return config


def rounds_line(name: str, rates: list) -> str:
    return f"{name}: " + ", ".join(f"{r.per_second:,.1f} (others {r.other_pct:.0f}%)" for r in rates)


def host_path(args, server: common.Server, model_dir: Path, text: common.Text, summary: list) -> None:
    from rankstream.v1 import rankstream_pb2 as pb

    common.heading("a. Host-path ceiling: BERT 1 layer, hidden 32 (the model costs almost nothing)")
    requests = common.rerank_requests(text, size(args, "host_requests"), 100, model="host")
    pairs = common.pairs_of(requests)
    reference_model = common.load_crossencoder(model_dir)
    warm = [pb.RerankRequest(query=r.query, passages=r.passages, model="host") for r in requests[:32]]
    common.drive(server, "Rerank", warm, clients=32, calls=32)
    tokenizers, references, loads = [], [], []
    for _ in range(args.rounds):  # alternated, so a burst of other work hits one round of one path, not all
        tokenizer, tokens = common.tokenizer_rate(model_dir, pairs, min_seconds=0.2 if args.smoke else 2.0,
                                                  watch=[server.pid])
        tokenizers.append(tokenizer)
        references.append(common.crossencoder_rate(reference_model, pairs, batch_size=32, watch=[server.pid]))
        load = common.drive(server, "Rerank", requests, clients=32, calls=size(args, "host_calls"), max_seconds=120,
                            procs=args.client_procs, model="host")
        common.check(load, 100)
        loads.append(load)
    del reference_model
    tokenizer, reference = common.best(tokenizers), common.best(references)
    load = common.best(loads)
    served = load.rate
    print(f"workload: {len(requests)} distinct requests of 100 passages = {len(pairs):,} pairs, "
          f"{tokens:.1f} tokens a pair (max_length {common.max_length_of(model_dir)}); {common.cores_note(args.threads)}; "
          f"best of {args.rounds} alternated rounds (among those with others < {common.CONTENDED_PCT}%)")
    common.table(
        ["path", "pairs/s", "vs tokenizer", "vs CrossEncoder.predict", "others CPU %"],
        [
            [f"`tokenizers` encode_batch alone ({tokenizer.note})", tokenizer.per_second, 1.0,
             tokenizer.per_second / reference.per_second, tokenizer.other_pct],
            [f"sentence-transformers CrossEncoder.predict ({reference.note})", reference.per_second,
             reference.per_second / tokenizer.per_second, 1.0, reference.other_pct],
            [f"rankstream Rerank over gRPC, 32 clients x 100 passages ({load.calls} calls)", served,
             served / tokenizer.per_second, served / reference.per_second, load.other_pct],
        ],
    )
    if args.rounds > 1:
        print("every round, pairs/s: " + "; ".join([
            rounds_line("tokenizer", tokenizers), rounds_line("CrossEncoder.predict", references),
            "server: " + ", ".join(f"{x.rate:,.1f} (others {x.other_pct:.0f}%)" for x in loads)]))
    common.warn_others([tokenizer.other_pct, reference.other_pct, load.other_pct])
    print()
    common.load_table("pairs", [common.load_row("rankstream Rerank, host-path model", load)])
    print(common.stats_line(load))
    if not args.profile:
        print("\nCPU by server thread (--profile names the Python ones):")
        common.print_threads(load)
    summary += [
        ["CPU host path: server / tokenizer", served / tokenizer.per_second, ">= 0.6",
         common.verdict(served / tokenizer.per_second, 0.6, others=[tokenizer.other_pct, load.other_pct])],
        ["CPU host path: server / CrossEncoder.predict", served / reference.per_second, ">= 1.5",
         common.verdict(served / reference.per_second, 1.5, others=[reference.other_pct, load.other_pct])],
    ]
    if args.profile:
        # A separate, profiled run of the same load: py-spy takes CPU, so the figures above come from runs without it.
        spy_out = Path(args.profile) / "host-path.txt"
        seconds = min(60.0, load.seconds * 1.5 + 2)
        with common.py_spy(server.pid, spy_out, seconds, native=args.profile_native):
            profiled = common.drive(server, "Rerank", requests, clients=32, calls=size(args, "host_calls"),
                                    max_seconds=seconds - 1, procs=args.client_procs)
        print(f"\npy-spy on the server during another run of the same load ({profiled.rate:,.0f} pairs/s with py-spy "
              f"sampling at {common.PY_SPY_RATE} Hz, {profiled.seconds:.1f} s; stacks in {spy_out}):")
        common.print_profile(spy_out, profiled.seconds, top=25)
        print("\nCPU by server thread in the measured (unprofiled) run; Python names from the profile, native "
              "threads named by the library in their gdb backtrace:")
        common.print_threads(load, {**common.native_thread_kinds(server.pid), **common.profile_thread_names(spy_out)})


def bf16_native(flags) -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def minilm(args, server: common.Server, model_dir: Path, text: common.Text, summary: list) -> None:
    from rankstream.v1 import rankstream_pb2 as pb

    info = common.model_info(server.address)["minilm"]
    common.heading(f"b. MiniLM-L6-H384 cross-encoder, dtype auto (chose {info.dtype}), 8 clients "
                   "vs CrossEncoder.predict fp32 and bf16")
    print(f"server's start-up choice: {info.dtype}: {info.dtype_reason}; measured rows/s: "
          + ", ".join(f"{m.dtype} {m.rows_per_second:.1f}" for m in info.dtype_measurements)
          + f"; CPU flags it saw: {' '.join(info.cpu_flags) or 'none'}")
    pairs_wanted = size(args, "minilm_pairs")
    requests = common.rerank_requests(text, pairs_wanted // 100, 100, model="minilm")
    pairs = common.pairs_of(requests)
    references_by_dtype = {dtype: common.load_crossencoder(model_dir, dtype=dtype) for dtype in ("float32", "bfloat16")}
    warm = [pb.RerankRequest(query=r.query, passages=r.passages[:16], model="minilm") for r in requests[:8]]
    common.drive(server, "Rerank", warm, clients=8, calls=8)
    rounds = min(args.rounds, 2)
    references: dict[str, list] = {dtype: [] for dtype in references_by_dtype}
    loads = []
    for _ in range(rounds):  # alternated: CrossEncoder fp32, bf16, then the server
        for dtype, reference_model in references_by_dtype.items():
            references[dtype].append(common.crossencoder_rate(reference_model, pairs, batch_size=32, watch=[server.pid]))
        load = common.drive(server, "Rerank", requests, clients=8, calls=len(requests), max_seconds=300,
                            procs=args.client_procs, model="minilm")
        common.check(load, 100)
        loads.append(load)
    del references_by_dtype
    fp32, bf16 = common.best(references["float32"]), common.best(references["bfloat16"])
    load = common.best(loads)
    print(f"workload: {len(pairs):,} pairs (the first {len(pairs):,} of part a's), {common.cores_note(args.threads)}; "
          f"best of {rounds} alternated rounds (among those with others < {common.CONTENDED_PCT}%)")
    common.table(
        ["path", "pairs/s", "vs CE.predict fp32", "vs CE.predict bf16", "others CPU %"],
        [
            [f"sentence-transformers CrossEncoder.predict ({fp32.note})", fp32.per_second, 1.0,
             fp32.per_second / bf16.per_second, fp32.other_pct],
            [f"sentence-transformers CrossEncoder.predict ({bf16.note})", bf16.per_second,
             bf16.per_second / fp32.per_second, 1.0, bf16.other_pct],
            [f"rankstream Rerank over gRPC in {info.dtype}, 8 clients x 100 passages ({load.calls} calls)", load.rate,
             load.rate / fp32.per_second, load.rate / bf16.per_second, load.other_pct],
        ],
    )
    if rounds > 1:
        print("every round, pairs/s: " + "; ".join([
            rounds_line("CrossEncoder.predict fp32", references["float32"]),
            rounds_line("CrossEncoder.predict bf16", references["bfloat16"]),
            "server: " + ", ".join(f"{x.rate:,.1f} (others {x.other_pct:.0f}%)" for x in loads)]))
    others = [fp32.other_pct, bf16.other_pct, load.other_pct]
    common.warn_others(others)
    print()
    common.load_table("pairs", [common.load_row(f"rankstream Rerank, MiniLM-L6 {info.dtype}", load)])
    print(common.stats_line(load))
    over_fp32, over_bf16 = load.rate / fp32.per_second, load.rate / bf16.per_second
    if bf16_native(info.cpu_flags):  # issue 19's targets on CPUs with avx512_bf16 or AMX
        summary.append([f"CPU MiniLM-L6 auto ({info.dtype}), 8 clients: server / CE.predict fp32", over_fp32, ">= 3",
                        common.verdict(over_fp32, 3.0, others=others)])
        summary.append([f"CPU MiniLM-L6 auto ({info.dtype}), 8 clients: server / CE.predict bf16", over_bf16, ">= 1.3",
                        common.verdict(over_bf16, 1.3, others=others)])
    else:  # avx2-only and the like: no regression
        summary.append([f"CPU MiniLM-L6 auto ({info.dtype}), no native bf16: server / CE.predict fp32", over_fp32,
                        ">= 1.0", common.verdict(over_fp32, 1.0, others=others)])
        summary.append([f"CPU MiniLM-L6 auto ({info.dtype}): server / CE.predict bf16 (no target)", over_bf16, "-", "-"])


def http_front(args, server: common.Server, text: common.Text, summary: list) -> None:
    import http_load

    common.heading("f. The same rerank load over HTTP (Cohere /v2/rerank) and gRPC, one server")
    requests = common.rerank_requests(text, size(args, "host_requests"), 100, model="host")
    calls = size(args, "http_calls")
    http_load.drive_http(server, requests[:32], clients=32, calls=32)  # warm: connections, JSON paths
    common.drive(server, "Rerank", requests[:32], clients=32, calls=32)
    grpc_loads, http_loads = [], []
    for _ in range(args.rounds):  # alternated: a burst of other work hits one round of one front, not all
        load = common.drive(server, "Rerank", requests, clients=32, calls=calls, max_seconds=120)
        common.check(load, 100)
        grpc_loads.append(load)
        load = http_load.drive_http(server, requests, clients=32, calls=calls, max_seconds=120)
        if load.errors:
            print(f"HTTP errors: {len(load.errors)}, first: {load.errors[0]}")
        http_loads.append(load)
    over_grpc, over_http = common.best(grpc_loads), common.best(http_loads)
    ratio = over_http.rate / over_grpc.rate
    print(f"workload: {len(requests)} distinct requests of 100 passages, {calls} calls per front and round, "
          f"32 concurrent clients (HTTP: one keep-alive connection each); best of {args.rounds} alternated rounds")
    common.load_table("pairs", [common.load_row("gRPC Reranker.Rerank", over_grpc),
                                common.load_row("HTTP POST /v2/rerank (Cohere)", over_http)])
    print(f"HTTP / gRPC pairs/s: {ratio:.2f}")
    if args.rounds > 1:
        print("every round, pairs/s: gRPC " + ", ".join(f"{x.rate:,.1f}" for x in grpc_loads)
              + "; HTTP " + ", ".join(f"{x.rate:,.1f}" for x in http_loads))
    summary.append(["HTTP front: Cohere /v2/rerank / gRPC Rerank pairs/s", ratio, ">= 0.9",
                    common.verdict(ratio, 0.9, others=[over_grpc.other_pct, over_http.other_pct])])


def index_part(args, config: dict, text: common.Text, scratch: Path, summary: list) -> Path:
    common.heading("c. Index build: `rankstream index build`, embedded all-MiniLM-L6-v2, flat: dtype float32 "
                   "(before issue 19) vs auto")
    corpus = common.write_corpus(text.passages[: size(args, "index_passages")], scratch / "corpus.jsonl")
    fp32_config = {**config, "models": [{**m, "dtype": "float32"} if m["name"] == "bi" else m for m in config["models"]]}
    builds: dict[str, list] = {"float32": [], "auto": []}
    others: dict[str, list] = {"float32": [], "auto": []}
    for round_number in range(min(args.rounds, 2)):  # alternated, the faster of each kept
        for label, build_config, out in (("float32", fp32_config, scratch / "index-fp32"), ("auto", config, scratch / "index")):
            if round_number:
                shutil.rmtree(out)
            with common.Watch() as watched:
                builds[label].append(common.index_build(build_config, corpus, out, scratch))
            others[label].append(watched.other_pct)
    best = {label: max(range(len(runs)), key=lambda i: runs[i].encode_rate) for label, runs in builds.items()}
    fp32, auto = builds["float32"][best["float32"]], builds["auto"][best["auto"]]
    others = [others["float32"][best["float32"]], others["auto"][best["auto"]]]
    chosen = auto.output.split(" passages/s in ")[-1].split(",")[0] if " passages/s in " in auto.output else "?"
    common.table(
        ["what", "passages", "passages/s", "vs float32 build"],
        [
            ["dtype float32: encoding, as the command reports it", fp32.passages, fp32.encode_rate, 1.0],
            [f"dtype auto (chose {chosen}): encoding, as the command reports it", auto.passages, auto.encode_rate,
             auto.encode_rate / fp32.encode_rate],
            [f"dtype auto, whole command, wall ({auto.wall_seconds:.1f} s: start-up, model load, dtype measurement, "
             "encode, write)", auto.passages, auto.passages / auto.wall_seconds, "-"],
        ],
    )
    print(f"best of {len(builds['auto'])} alternated builds each; every build, encode passages/s: "
          + "; ".join(f"{label}: " + ", ".join(f"{b.encode_rate:.1f}" for b in runs) for label, runs in builds.items()))
    print(f"command output (auto): {auto.output}")
    common.warn_others(others)
    ratio = auto.encode_rate / fp32.encode_rate
    flags = common.cpu_flags()
    summary.append([f"CPU index build, auto ({chosen}): encode passages/s", auto.encode_rate, "-", "-"])
    summary.append([f"CPU index build: auto ({chosen}) / float32 build", ratio,
                    ">= 2.5" if bf16_native(flags) else ">= 1.0",
                    common.verdict(ratio, 2.5 if bf16_native(flags) else 1.0, others=others)])
    return scratch / "index"


def retrieval(args, server: common.Server, text: common.Text, summary: list) -> None:
    from rankstream.v1 import rankstream_pb2 as pb

    common.heading("d. Retrieve, RetrieveAndRerank and UpsertPassages over gRPC (flat index)")
    info = common.model_info(server.address)
    print(f"index: {size(args, 'index_passages')} passages; bi-encoder {info['bi'].weights} "
          f"({info['bi'].dtype}, {info['bi'].device}); reranker: the host-path model (part a)")
    queries = text.queries
    retrieve = [pb.RetrieveRequest(query=q, top_k=10, index="bench") for q in queries]
    rr = [pb.RetrieveAndRerankRequest(query=q, top_k=100, top_n=10, reranker="host", index="bench") for q in queries]
    common.drive(server, "Retrieve", retrieve[:8], clients=4, calls=8)
    common.drive(server, "RetrieveAndRerank", rr[:8], clients=4, calls=8)
    rows, loads = [], []
    calls = size(args, "retrieve_calls")
    for clients in (1, 4, 16):
        load = common.drive(server, "Retrieve", retrieve, clients=clients, calls=calls * (1 + (clients > 1)),
                            max_seconds=60, procs=args.client_procs)
        common.check(load, 10)
        rows.append(common.load_row("Retrieve top_k 10", load))
        loads.append(load)
    for clients in (1, 8):
        load = common.drive(server, "RetrieveAndRerank", rr, clients=clients, calls=size(args, "rr_calls"),
                            max_seconds=60, procs=args.client_procs)
        common.check(load, 10)
        rows.append(common.load_row("RetrieveAndRerank top_k 100 -> top_n 10", load))
        loads.append(load)
    common.load_table("queries", rows)
    print("Retrieve, 1 client: " + common.stats_line(loads[0]))
    print("RetrieveAndRerank, 1 client: " + common.stats_line(loads[3]))

    count = size(args, "upsert_passages")
    upserts = [pb.UpsertPassagesRequest(index="upsert", passages=[
        pb.Passage(id=f"u{i}", text=t) for i, t in enumerate(text.passages[start : start + 64], start)])
        for start in range(0, count, 64)]
    load = common.drive(server, "UpsertPassages", upserts, clients=4, calls=len(upserts), max_seconds=120)
    common.check(load)
    print()
    common.load_table("passages", [common.load_row("UpsertPassages, 64 passages a call", load)])
    summary += [
        ["CPU Retrieve p50 at 1 client, ms (no target on CPU)", loads[0].percentile(50), "-", "-"],
        ["CPU Retrieve queries/s at 16 clients (no target on CPU)", loads[2].rate, "-", "-"],
        ["CPU RetrieveAndRerank top_k 100 queries/s at 8 clients, host-path reranker", loads[4].rate, "-", "-"],
        ["CPU UpsertPassages passages/s", load.rate, "-", "-"],
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller workloads (about half the time)")
    parser.add_argument("--smoke", action="store_true", help="tiny workloads: checks that it runs (make test), measures nothing")
    parser.add_argument("--parts", default="host,minilm,index,retrieval,decoder,http,overload",
                        help="comma-separated subset of host,minilm,index,retrieval,decoder,http,overload "
                             "(retrieval needs index)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="cores for the model: sentence-transformers gets this many torch threads, the server "
                             "this many one-thread passes side by side, its default (default: all cores)")
    parser.add_argument("--rounds", type=int, help="alternated rounds of part a, best kept (default 3; --quick 1); "
                                                   "part b runs at most 2")
    parser.add_argument("--client-procs", type=int, default=1, help="client processes sharing the concurrent calls")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="server config override, e.g. --set batching.max_wait_ms=1 (repeatable)")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the server during part a; collapsed stacks to DIR")
    parser.add_argument("--profile-native", action="store_true", help="with --profile: native frames too")
    parser.add_argument("--data", help="folder holding cranfield/ and scifact/ in BEIR layout (default: ../shared/data)")
    parser.add_argument("--keep", metavar="DIR", help="keep configs, logs and the index in DIR")
    parser.add_argument("--code", metavar="REV", help="measure the server and client of this git revision (exported "
                                                       "to .cache/bench-code/) instead of the working tree")
    args = parser.parse_args()
    common.run_code_from(args.code)
    parts = set(args.parts.split(","))
    args.rounds = args.rounds or (1 if args.quick or args.smoke else 3)
    if "retrieval" in parts:
        parts.add("index")

    import torch

    torch.set_num_threads(args.threads)
    clock = common.Budget()
    common.quiet_libraries()
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    if args.smoke:
        print("SMOKE MODE: tiny workloads that check the benchmark runs; the figures below mean nothing.")
    common.print_machine()
    print(f"load average at start: {common.load_average()} (other work on the machine lowers every figure)")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)

    # Rerank pairs: Cranfield queries and 60-word Cranfield passages (cycled), as in issue 7; the
    # index: as many real passages as asked for (Cranfield, then SciFact), then synthetic text.
    pairs_text = common.load_text(passages=size(args, "host_requests") * 100, queries=size(args, "host_requests"),
                                  corpora=("cranfield",), fill=False, data_root=args.data)
    corpus_text = common.load_text(passages=max(size(args, "index_passages"), size(args, "upsert_passages")),
                                   queries=300, data_root=args.data)
    common.heading("Workload")
    print(f"Rerank pairs: {pairs_text.source}, cycled; index and Retrieve: {corpus_text.source}; "
          "passages of ~60 words, queries as given")
    host_dir = common.host_path_model()
    minilm_dir = common.minilm_cross() if "minilm" in parts else None
    print(f"models: host-path {host_dir.name} (BERT L1 H32, seeded); "
          f"{'MiniLM ' + minilm_dir.name + ' (all-MiniLM-L6-v2 body, seeded head)' if minilm_dir else ''}")

    summary: list[list[object]] = []
    with common.scratch_dir(args.keep) as scratch:
        models = [{"name": "host", "weights": str(host_dir)}]
        if minilm_dir:
            models.append({"name": "minilm", "weights": str(minilm_dir)})
        # batching.compile as in deploy/config/production.yaml (`--set batching.compile=false`: eager).
        config: dict = {"server": {"torch_threads": 1, "http_port": 0}, "batching": {"cpu_passes": args.threads, "compile": True},
                        "models": models, "default_model": "host"}
        if "index" in parts:
            models.append({"name": "bi", "kind": "bi", "weights": "embedded:all-MiniLM-L6-v2"})
            config["indexes"] = [{"name": "bench", "path": str(scratch / "index"), "model": "bi"}]
            index_part(args, config, corpus_text, scratch, summary)
            config["indexes"].append({"name": "upsert", "path": str(scratch / "upsert"), "model": "bi", "create": True})
        apply_overrides(config, args.set)
        if parts & SHARED_SERVER_PARTS:
            print(f"\nserver config: {config}")
            with common.Server(config, scratch) as server:
                print(f"server up in {server.startup_seconds:.1f} s (start-up, load, warm-up), pid {server.pid}, {server.address}")
                for name, info in common.model_info(server.address).items():
                    print(f"  {name}: {info.device}, {info.dtype}, {info.parallel_passes} passes side by side of "
                          f"{info.max_batch_tokens} padded tokens, torch.compile {'on' if info.compiled else 'off'}")
                if "host" in parts:
                    host_path(args, server, host_dir, pairs_text, summary)
                if "minilm" in parts:
                    minilm(args, server, minilm_dir, pairs_text, summary)
                if "retrieval" in parts:
                    retrieval(args, server, corpus_text, summary)
                if "http" in parts:
                    http_front(args, server, pairs_text, summary)
        if "decoder" in parts:
            decoder_reranker.run(args, scratch, pairs_text, summary, smoke=args.smoke)  # part e
        if "overload" in parts:
            overload.run(args, scratch, pairs_text, summary, smoke=args.smoke)  # part g, its own pinned server

    common.heading("Summary against the CPU targets (issues 7, 19 and 20)" + (" (SMOKE: verdicts mean nothing)" if args.smoke else ""))
    common.table(["measure", "value", "target", "verdict"], summary)
    print(f"\ntotal {clock.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
