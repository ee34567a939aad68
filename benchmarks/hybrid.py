"""Hybrid Retrieve latency against dense Retrieve (issue 11), over gRPC, one client at a time.

    .venv/bin/python benchmarks/hybrid.py                     # 100k passages, about 4-6 minutes on 2 cores
    .venv/bin/python benchmarks/hybrid.py --passages 5000     # quicker

The corpus is synthetic: ~60-word passages whose words follow a Zipf law over a 50,000-word
vocabulary, so keyword statistics look like real text (a few very common words, a long tail).
Passage vectors are random unit vectors (a flat index scans all of them whatever they hold, so
search cost is that of real embeddings; encoding 100k passages would take an hour on 2 cores);
queries are encoded by the real embedded all-MiniLM-L6-v2, as in service. Queries are 3-6 words
from the vocabulary's middle ranks. The index is written through the index's own code
(CorpusIndex.upsert: the store, FAISS and the BM25 side together).

Printed: p50/p90 latency per mode and the ratios hybrid/dense and sparse/dense (target: hybrid
<= 1.5x dense at p50), modes alternated query by query so drift hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VOCABULARY = 50_000


def _words(rng: np.random.Generator, count: int) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, size=int(rng.integers(4, 10)))) for _ in range(count)]


def corpus(passages: int, seed: int = 5) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    vocabulary = np.array(_words(rng, VOCABULARY))
    ranks = np.minimum(rng.zipf(1.15, size=passages * 60), VOCABULARY) - 1
    texts = [" ".join(vocabulary[ranks[i * 60:(i + 1) * 60]]) for i in range(passages)]
    middle = vocabulary[200:20_000]
    queries = [" ".join(rng.choice(middle, size=int(rng.integers(3, 7)))) for _ in range(400)]
    return texts, queries


def build(folder: Path, texts: list[str], identity: dict, dimension: int) -> float:
    from rankstream_server.config import IndexConfig
    from rankstream_server.index.local import CorpusIndex
    from rankstream_server.index.store import Document

    config = IndexConfig(name="bench", path=str(folder), model="bi", create=True)
    started = time.perf_counter()
    index = CorpusIndex.open(config, identity, dimension)
    rng = np.random.default_rng(11)
    try:
        for start in range(0, len(texts), 5000):
            part = texts[start:start + 5000]
            vectors = rng.standard_normal((len(part), dimension)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            index.upsert([Document(id=f"p{start + i}", text=t) for i, t in enumerate(part)], vectors)
    finally:
        index.close()
    return time.perf_counter() - started


async def measure(address: str, queries: list[str], rounds: int) -> dict[str, list[float]]:
    import grpc

    from rankstream.v1 import rankstream_pb2 as pb
    from rankstream.v1 import rankstream_pb2_grpc as pb_grpc

    modes = {"dense": pb.DENSE, "sparse": pb.SPARSE, "hybrid": pb.HYBRID}
    seen: dict[str, list[float]] = {name: [] for name in modes}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RetrieverStub(channel)
        for query in queries[:20]:  # warm-up
            for mode in modes.values():
                [m async for m in stub.Retrieve(pb.RetrieveRequest(query=query, top_k=10, mode=mode), timeout=60)]
        for query in queries[20:20 + rounds]:
            for name, mode in modes.items():
                started = time.perf_counter()
                results = [p async for m in stub.Retrieve(pb.RetrieveRequest(query=query, top_k=10, mode=mode), timeout=60)
                           for p in m.passages]
                seen[name].append(time.perf_counter() - started)
                assert len(results) == 10 or name == "sparse", (name, len(results))
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=200, help="queries measured per mode")
    parser.add_argument("--keep", metavar="DIR", help="keep the index and logs in DIR")
    args = parser.parse_args()
    common.quiet_libraries()
    common.print_machine()
    from rankstream_server.config import ModelConfig
    from rankstream_server.inference.model_loading import load_model
    from rankstream_server.inference.offline import dimension_of

    encoder = load_model(ModelConfig(name="bi", kind="bi", weights="embedded:all-MiniLM-L6-v2"))
    identity, dimension = encoder.identity(), dimension_of(encoder)
    texts, queries = corpus(args.passages)
    with common.scratch_dir(args.keep) as scratch:
        seconds = build(scratch / "index", texts, identity, dimension)
        print(f"corpus: {len(texts):,} synthetic passages of 60 Zipf-distributed words (vocabulary {VOCABULARY:,}), "
              f"random unit vectors; written through CorpusIndex.upsert in {seconds:.0f} s")
        config = {"models": [{"name": "bi", "kind": "bi", "weights": "embedded:all-MiniLM-L6-v2"}],
                  "indexes": [{"name": "bench", "path": str(scratch / "index"), "model": "bi"}]}
        with common.Server(config, scratch) as server:
            seen = asyncio.run(measure(server.address, queries, args.rounds))
    p50 = {name: statistics.median(values) * 1000 for name, values in seen.items()}
    p90 = {name: float(np.percentile(values, 90)) * 1000 for name, values in seen.items()}
    common.table(["mode", "queries", "p50 ms", "p90 ms", "p50 vs dense"],
                 [[name, len(seen[name]), p50[name], p90[name], p50[name] / p50["dense"]] for name in seen])
    ratio = p50["hybrid"] / p50["dense"]
    print(f"hybrid / dense at p50: {ratio:.2f} (target <= 1.5: {'PASS' if ratio <= 1.5 else 'MISS'}); "
          "Retrieve top_k 10, 1 client, modes alternated query by query")


if __name__ == "__main__":
    main()
