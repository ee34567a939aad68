"""`make demo`: index a small corpus shipped with the package, start a real server on the
embedded default models, call Retrieve, Rerank and RetrieveAndRerank over gRPC, print what
streams back (each stream message is a ScoredPassages batch), then the same server over HTTP (Cohere rerank, OpenAI embeddings,
on 8080 unless RANKSTREAM_DEMO_HTTP_PORT says otherwise), stop the server. Works with no
network."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rankstream import STATS_TRAILER
from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc
from rankstream_server.inference.embedded import SCHEME, UNTRAINED_CROSS_ENCODER

DEMO_CORPUS = Path(__file__).resolve().parent.parent / "data" / "demo_corpus.jsonl"  # written for this demo
QUERY = "How do I keep a retrieval-augmented chatbot from citing irrelevant passages?"
BI, CROSS = "all-MiniLM-L6-v2", UNTRAINED_CROSS_ENCODER

CONFIG = f"""
server: {{host: 127.0.0.1, port: 0, http_port: HTTP_PORT}}
batching: {{max_batch_size: 2}}   # small batches, so AS_SCORED visibly streams in pieces
default_model: {CROSS}
models:
  - name: {BI}
    kind: bi
    weights: {SCHEME}{BI}
  - name: {CROSS}
    kind: cross
    weights: {SCHEME}{CROSS}
indexes:
  - name: demo
    path: INDEX_PATH
    model: {BI}
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
    retrieval = f"{stats.candidates} candidates in {stats.retrieve_ms:.1f} ms, " if stats.retrieve_ms else ""
    print(
        f"  stats: {retrieval}{stats.scored}/{stats.passages} scored in {stats.batches} batches, "
        f"tokenize {stats.tokenize_ms:.1f} ms, queue {stats.queue_ms:.1f} ms, "
        f"inference {stats.inference_ms:.1f} ms, total {stats.total_ms:.1f} ms; "
        f"{stats.returned} passages in {stats.messages} message{'s' if stats.messages != 1 else ''}"
    )


def _passages(messages) -> list[pb.ScoredPassage]:
    """Every passage of a stream of ScoredPassages messages, in order."""
    return [passage for message in messages for passage in message.passages]


def _print(results, show_text: bool = True) -> None:
    for r in results:
        rank = f"#{r.rank}" if r.rank else f"[{r.index}]"
        stage = pb.Stage.Name(r.stage).removeprefix("STAGE_").lower() if r.stage else "rerank"
        line = f"  {rank:>4s} {r.score:8.4f} ({stage}) {r.id:10s}"
        print(line + (f" {r.title}: {r.text[:70]}" if show_text and r.text else ""))


def run_requests(channel: grpc.Channel) -> None:
    info = pb_grpc.InfoStub(channel).ListModels(pb.ListModelsRequest())
    for model in info.models:
        print(f"model {model.name}: {pb.ModelKind.Name(model.kind)}, max_length {model.max_length}, "
              f"{model.dtype} on {model.device}" + (f", {model.pooling} pooling, {model.similarity}" if model.pooling else ""))
    for index in info.indexes:
        print(f"index {index.name}: {index.count} passages, {index.dimension}-d {index.similarity}, "
              f"{index.index_type} on {index.device}")
    print(f"NOTE: {CROSS} is all-MiniLM-L6-v2's body with an UNTRAINED head: real size and speed,")
    print("      meaningless relevance. The bi-encoder is the genuine all-MiniLM-L6-v2.\n")

    retriever = pb_grpc.RetrieverStub(channel)
    reranker = pb_grpc.RerankerStub(channel)
    print(f"Retrieve top 4 for: {QUERY!r}")
    call = retriever.Retrieve(pb.RetrieveRequest(query=QUERY, top_k=4, return_text=True), timeout=60)
    retrieved = _passages(call)
    _print(retrieved)
    _show_stats(call)

    print("\nRetrieve with a metadata filter {topic: food}: 'what should I do with leftover bones'")
    _print(_passages(retriever.Retrieve(pb.RetrieveRequest(
        query="what should I do with leftover bones", top_k=2, filter={"topic": "food"}, return_text=True), timeout=60)))

    print("\nRetrieve in HYBRID mode (BM25 and dense, fused): 'leftover bones stock'")
    for r in _passages(retriever.Retrieve(pb.RetrieveRequest(query="leftover bones stock", top_k=3, mode=pb.HYBRID),
                                          timeout=60)):
        dense = f"#{r.dense_rank}" if r.dense_rank else "-"
        sparse = f"#{r.sparse_rank}" if r.sparse_rank else "-"
        print(f"  fused {r.score:.4f}  dense {dense:>3}  BM25 {sparse:>3}  {r.id}")

    passages = [pb.Passage(id=r.id, text=r.text, title=r.title) for r in retrieved]
    print(f"\nRerank those 4 with the bi-encoder ({BI}), best first:")
    _print(_passages(reranker.Rerank(pb.RerankRequest(query=QUERY, passages=passages, model=BI), timeout=60)),
           show_text=False)

    print(f"\nRerank with the cross-encoder ({CROSS}), AS_SCORED: one message per micro-batch, as it finishes")
    started = time.perf_counter()
    call = reranker.Rerank(pb.RerankRequest(query=QUERY, passages=passages, order=pb.AS_SCORED), timeout=60)
    for message in call:
        scored = ", ".join(f"passage[{r.index}] {r.id} {r.score:.4f}" for r in message.passages)
        print(f"  +{(time.perf_counter() - started) * 1000:6.1f} ms  {scored}")
    _show_stats(call)

    print(f"\nRetrieveAndRerank in one call: top 8 by {BI}, reranked by {CROSS}, best 3:")
    call = retriever.RetrieveAndRerank(pb.RetrieveAndRerankRequest(query=QUERY, top_k=8, top_n=3), timeout=60)
    for r in _passages(call):
        print(f"  #{r.rank} rerank {r.score:.4f}  retrieve {r.retrieval_score:.4f}  {r.id}")
    _show_stats(call)

    print("\nUpsertPassages, then Retrieve finds the new passage at once:")
    written = retriever.UpsertPassages(pb.UpsertPassagesRequest(passages=[pb.Passage(
        id="new-01", title="Citations", text="Show the source of every passage the chatbot quotes so readers can check it.",
        metadata={"topic": "rag"})]), timeout=60)
    print(f"  upserted {written.upserted}; the index now holds {written.count} passages (version {written.version})")
    _print(_passages(retriever.Retrieve(pb.RetrieveRequest(
        query="how can readers verify what the bot quotes", top_k=2, return_text=True), timeout=60)))
    removed = retriever.DeletePassages(pb.DeletePassagesRequest(ids=["new-01"]), timeout=60)
    print(f"  DeletePassages: removed {removed.deleted}, {removed.count} passages left")

    print("\nA bad request gets a clear status:")
    try:
        list(reranker.Rerank(pb.RerankRequest(query=QUERY, passages=passages, top_n=-1), timeout=10))
    except grpc.RpcError as error:
        print(f"  {error.code().name}: {error.details()}")


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def run_http(base: str, channel: grpc.Channel) -> None:
    """The same server over HTTP, as the RAG tools call it: Cohere's rerank, OpenAI's embeddings."""
    documents = ["Rerank the retrieved passages and drop those below a relevance threshold.",
                 "Bone broth simmers for hours.", "Cite only passages the reranker scored highly."]
    print(f"\nHTTP front at {base} (Cohere, Jina, TEI, OpenAI and JSON dialects; API docs at {base}/docs)")
    status, answer = _post(f"{base}/v2/rerank", {"query": QUERY, "documents": documents, "top_n": 2})
    print(f"  POST /v2/rerank (Cohere) -> {status}: " + ", ".join(
        f"documents[{r['index']}] {r['relevance_score']:.4f}" for r in answer["results"]))
    grpc_scores = {p.index: p.score for p in _passages(pb_grpc.RerankerStub(channel).Rerank(pb.RerankRequest(
        query=QUERY, passages=[pb.Passage(text=d) for d in documents]), timeout=60))}
    same = all(abs(grpc_scores[r["index"]] - r["relevance_score"]) < 1e-6 for r in answer["results"])
    print(f"  the same scores as gRPC Rerank: {same}")
    status, answer = _post(f"{base}/v1/embeddings", {"model": BI, "input": ["a query about chatbots"]})
    print(f"  POST /v1/embeddings (OpenAI) -> {status}: {len(answer['data'][0]['embedding'])}-d vector, "
          f"{answer['usage']['prompt_tokens']} tokens")
    status, answer = _post(f"{base}/v2/rerank", {"query": QUERY, "documents": documents, "model": "no-such-model"})
    print(f"  an unknown model -> {status}: {answer['message']}")


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "demo.yaml"
        http_port = os.environ.get("RANKSTREAM_DEMO_HTTP_PORT", "8080")  # 0: any free port
        config.write_text(CONFIG.replace("INDEX_PATH", str(Path(scratch) / "demo-index")).replace("HTTP_PORT", http_port))
        print(f"building an index of {DEMO_CORPUS.name} with {BI} ...")
        built = subprocess.run(
            [sys.executable, "-m", "rankstream_server.cli.main", "--log-level", "WARNING", "index", "build",
             "--config", str(config), "--corpus", str(DEMO_CORPUS), "--out", str(Path(scratch) / "demo-index")],
            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, text=True, check=True,
        )
        print(built.stdout.strip())
        server = subprocess.Popen(
            [sys.executable, "-m", "rankstream_server.cli.main", "--log-level", "WARNING", "serve", "--config", str(config)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        try:
            line = server.stdout.readline().strip()
            if not line.startswith("rankstream listening on"):
                print(f"server did not start: {line!r}", file=sys.stderr)
                return 1
            address = line.rsplit(" ", 1)[1]
            http_line = server.stdout.readline().strip()
            http_address = http_line.rsplit(" ", 1)[1]
            print(f"started: {line}; {http_line} (loading the embedded models...)")
            with grpc.insecure_channel(address) as channel:
                _wait_until_serving(channel)
                run_requests(channel)
                run_http(f"http://{http_address}", channel)
        finally:
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=60)
            print(f"\nserver stopped (exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
