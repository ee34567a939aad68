"""`make demo`: start a real server on the embedded default model, call it over gRPC, print
what streams back, stop the server. Works with no network."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc

from .embedded import SCHEME, UNTRAINED_CROSS_ENCODER
from .service import STATS_TRAILER

QUERY = "How do I keep a retrieval-augmented chatbot from citing irrelevant passages?"
PASSAGES = [
    ("faq-12", "Rerank the retrieved candidates with a cross-encoder and keep only the top few."),
    ("faq-03", "Our office is closed on public holidays; support answers on the next working day."),
    ("blog-7", "A bi-encoder retrieves quickly, but a cross-encoder reads query and passage together."),
    ("doc-44", "Set a relevance score threshold so weak passages never reach the prompt."),
    ("doc-02", "The billing page lists invoices for the last twelve months."),
    ("blog-9", "Chunk long documents so that each passage fits the model's maximum length."),
]

CONFIG = f"""
server: {{host: 127.0.0.1, port: 0}}
batching: {{max_batch_size: 2}}   # small batches, so AS_SCORED visibly streams in pieces
models:
  - name: {UNTRAINED_CROSS_ENCODER}
    weights: {SCHEME}{UNTRAINED_CROSS_ENCODER}
"""


def _wait_until_serving(channel: grpc.Channel, timeout: float = 300) -> None:
    grpc.channel_ready_future(channel).result(timeout=timeout)
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="rankstream.v1.Reranker")
    deadline = time.monotonic() + timeout
    while health.Check(request, timeout=10).status != health_pb2.HealthCheckResponse.SERVING:
        if time.monotonic() > deadline:
            raise TimeoutError("server never reported SERVING")
        time.sleep(0.2)


def _show_stats(call: grpc.Call) -> None:
    stats = pb.RerankStats.FromString(dict(call.trailing_metadata())[STATS_TRAILER])
    print(
        f"  stats: {stats.scored}/{stats.passages} scored in {stats.batches} batches, "
        f"tokenize {stats.tokenize_ms:.1f} ms, queue {stats.queue_ms:.1f} ms, "
        f"inference {stats.inference_ms:.1f} ms, total {stats.total_ms:.1f} ms"
    )


def run_requests(channel: grpc.Channel) -> None:
    models = pb_grpc.InfoStub(channel).ListModels(pb.ListModelsRequest())
    for model in models.models:
        print(f"model {model.name}: {pb.ModelKind.Name(model.kind)}, max_length {model.max_length}, "
              f"{model.dtype} on {model.device}, activation {model.activation}")
    print("NOTE: this embedded cross-encoder is all-MiniLM-L6-v2's body with an UNTRAINED head:")
    print("      real size and speed, meaningless relevance. deploy/config/production.yaml has real rerankers.\n")

    reranker = pb_grpc.RerankerStub(channel)
    passages = [pb.Passage(id=pid, text=text) for pid, text in PASSAGES]
    print(f"Rerank (RANKED, top_n=4)  query: {QUERY!r}")
    call = reranker.Rerank(pb.RerankRequest(query=QUERY, passages=passages, top_n=4, return_text=True), timeout=60)
    for result in call:
        print(f"  #{result.rank}  {result.score:.4f}  {result.id:7s} {result.text}")
    _show_stats(call)

    print("\nRerank (AS_SCORED): each micro-batch streams as soon as it is scored")
    started = time.perf_counter()
    call = reranker.Rerank(pb.RerankRequest(query=QUERY, passages=passages, order=pb.AS_SCORED), timeout=60)
    for result in call:
        print(f"  +{(time.perf_counter() - started) * 1000:6.1f} ms  passage[{result.index}] {result.id:7s} {result.score:.4f}")
    _show_stats(call)

    print("\nA bad request gets a clear status:")
    try:
        list(reranker.Rerank(pb.RerankRequest(query=QUERY, passages=passages, top_n=-1), timeout=10))
    except grpc.RpcError as error:
        print(f"  {error.code().name}: {error.details()}")


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "demo.yaml"
        config.write_text(CONFIG)
        server = subprocess.Popen(
            [sys.executable, "-m", "rankstream_server.cli", "--log-level", "WARNING", "serve", "--config", str(config)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        try:
            line = server.stdout.readline().strip()
            if not line.startswith("rankstream listening on"):
                print(f"server did not start: {line!r}", file=sys.stderr)
                return 1
            address = line.rsplit(" ", 1)[1]
            print(f"started: {line} (loading the embedded model...)")
            with grpc.insecure_channel(address) as channel:
                _wait_until_serving(channel)
                run_requests(channel)
        finally:
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=60)
            print(f"\nserver stopped (exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
