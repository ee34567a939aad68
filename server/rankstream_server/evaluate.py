"""`rankstream eval`: retrieval quality on a BEIR-layout folder, measured with ir-measures
(nDCG@10, RR@10, R@100), through the same models, tokenization and index code the server uses."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ir_measures
from ir_measures import RR, R, nDCG

from .config import IndexConfig, Settings
from .corpus import read_qrels, read_queries
from .corpus_index import CorpusIndex
from .index_build import build_index, pick_model
from .model_loading import load_model
from .offline import dimension_of, encode_texts, score_pairs
from .tokenization import passage_text

MEASURES = [nDCG @ 10, RR @ 10, R @ 100]


@dataclass
class EvalReport:
    dataset: str
    pipeline: str
    retriever: str
    reranker: str | None
    queries: int
    documents: int
    metrics: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        head = f"{'dataset':12s} {'pipeline':16s} {'model(s)':44s} " + " ".join(f"{m:>8s}" for m in self.metrics)
        models = self.retriever + (f" -> {self.reranker}" if self.reranker else "")
        row = f"{self.dataset:12s} {self.pipeline:16s} {models:44s} " + " ".join(f"{v:8.4f}" for v in self.metrics.values())
        timing = ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items())
        return f"{head}\n{row}\n({self.queries} queries, {self.documents} documents; {timing})"


def evaluate(
    settings: Settings,
    data: str | Path,
    pipeline: str,
    index: IndexConfig | None = None,
    model: str | None = None,
    reranker: str | None = None,
    top_k: int = 100,
    rerank_k: int = 100,
    split: str = "test",
    progress: bool = True,
) -> EvalReport:
    data = Path(data)
    qrels = read_qrels(data, split)
    queries = {qid: text for qid, text in read_queries(data).items() if qid in qrels}
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="rankstream-eval-") as scratch:
        if index is None:
            model_name = pick_model(settings, model)
            index = IndexConfig(name=data.name, path=str(Path(scratch) / "index"), model=model_name)
        if not (Path(index.path) / "manifest.json").exists():
            report = build_index(settings, data, index.path, index=index, progress=progress)
            timings["build passages/s"] = report.passages_per_second
        encoder = load_model(settings.model(index.model))
        corpus = CorpusIndex.open(index, encoder.identity(), dimension_of(encoder))
        try:
            started = time.perf_counter()
            ids = list(queries)
            vectors = encode_texts(encoder, [queries[q] for q in ids], "query")
            hits = {qid: corpus.search(vectors[i], top_k) for i, qid in enumerate(ids)}
            timings["retrieve queries/s"] = len(ids) / (time.perf_counter() - started)
            run = {qid: {h.document.id: h.score for h in found} for qid, found in hits.items()}
            reranker_name = None
            if pipeline == "retrieve+rerank":
                reranker_name = reranker or settings.default_model
                cross = load_model(settings.model(reranker_name))
                pairs, owners = [], []
                for qid, found in hits.items():
                    for hit in found[:rerank_k]:
                        pairs.append((queries[qid], passage_text(hit.document.text, hit.document.title)))
                        owners.append((qid, hit.document.id))
                started = time.perf_counter()
                scores = score_pairs(cross, pairs, progress=progress)
                timings["rerank pairs/s"] = len(pairs) / (time.perf_counter() - started)
                reranked: dict[str, dict[str, float]] = {qid: {} for qid in hits}
                for (qid, doc_id), score in zip(owners, scores):
                    reranked[qid][doc_id] = float(score)
                # Candidates past rerank_k keep their retrieval order, below every reranked one.
                for qid, found in hits.items():
                    floor = min(reranked[qid].values(), default=0.0)
                    for position, hit in enumerate(found[rerank_k:], start=1):
                        reranked[qid][hit.document.id] = floor - position
                run = reranked
            documents = corpus.count
        finally:
            corpus.close()
    metrics = ir_measures.calc_aggregate(MEASURES, qrels_for_measures(qrels, queries), run)
    return EvalReport(
        dataset=data.name,
        pipeline=pipeline,
        retriever=index.model,
        reranker=reranker_name,
        queries=len(queries),
        documents=documents,
        metrics={str(m): float(metrics[m]) for m in MEASURES},
        timings=timings,
    )


def qrels_for_measures(qrels: dict[str, dict[str, int]], queries: dict[str, str]) -> dict[str, dict[str, int]]:
    return {qid: judged for qid, judged in qrels.items() if qid in queries}


def to_json(report: EvalReport) -> str:
    return json.dumps(report.__dict__, indent=2)
