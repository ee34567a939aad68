"""Rerank throughput: the rankstream server over gRPC vs sentence-transformers in-process.

Same model (full-size MiniLM-L6-H384 cross-encoder built from the packaged all-MiniLM-L6-v2
body, or --model FOLDER), same pairs, same torch thread count, measured one after the other in
one run. `make bench` (benchmarks/bench.py) runs this comparison too, at 8 clients.

    .venv/bin/python benchmarks/rerank_throughput.py --pairs 1024 --threads 2

Prints a table: pairs/s for each path and the ratio to sentence-transformers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="cross-encoder folder (default: the MiniLM-L6 cross-encoder)")
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--passage-words", type=int, default=60, help="passage length in words")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batch-size", type=int, default=32, help="sentence-transformers predict batch size")
    parser.add_argument("--batch-tokens", type=int, default=0, help="server max_batch_tokens (0 = its default)")
    parser.add_argument("--per-request", type=int, default=100, help="passages per Rerank request")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent gRPC clients")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    common.quiet_libraries()
    model_dir = Path(args.model) if args.model else common.minilm_cross()
    text = common.load_text(args.pairs, max(1, args.pairs // args.per_request) + 1, words=args.passage_words)
    requests = common.rerank_requests(text, -(-args.pairs // args.per_request), args.per_request)
    pairs = common.pairs_of(requests)
    common.print_machine()
    print(f"model: {model_dir} (fp32, CPU), {args.threads} torch threads")
    print(f"workload: {len(pairs)} pairs of {text.source}, ~{args.passage_words}-word passages, "
          f"{args.repeats} timed runs each (median)\n")

    reference = common.crossencoder_rate(model_dir, pairs, args.batch_size, repeats=args.repeats)
    batching = {"max_batch_tokens": args.batch_tokens} if args.batch_tokens else {}
    config = {"server": {"torch_threads": args.threads}, "batching": batching,
              "models": [{"name": "model", "weights": str(model_dir)}]}
    with common.scratch_dir() as scratch, common.Server(config, scratch) as server:
        common.drive(server, "Rerank", requests[: args.concurrency], args.concurrency, args.concurrency)  # warm-up
        loads = [common.drive(server, "Rerank", requests, args.concurrency, len(requests), max_seconds=3600)
                 for _ in range(args.repeats)]
    for load in loads:
        common.check(load, args.per_request)
    served = len(pairs) / statistics.median(load.seconds for load in loads)
    common.table(
        ["path", "pairs/s", "ratio"],
        [
            [f"sentence-transformers CrossEncoder.predict (in-process, batch_size={args.batch_size})",
             reference.per_second, 1.0],
            [f"rankstream Rerank over gRPC ({args.concurrency} clients x {args.per_request} passages)", served,
             served / reference.per_second],
        ],
    )


if __name__ == "__main__":
    main()
