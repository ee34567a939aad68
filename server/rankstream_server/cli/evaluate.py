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

from rankstream_server.config import IndexConfig, Settings
from rankstream_server.index.build import build_index, pick_model
from rankstream_server.index.corpus import passage_text, read_qrels, read_queries
from rankstream_server.index.local import CorpusIndex
from rankstream_server.inference.model_loading import dtype_name, load_model
from rankstream_server.inference.offline import dimension_of, encode_texts, score_pairs
from rankstream_server.inference.precision import settle_precision

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
    mode: str = "dense"
    dtypes: dict[str, str] = field(default_factory=dict)  # model name -> the dtype it ran in

    def row(self) -> str:
        models = self.retriever + (f" -> {self.reranker}" if self.reranker else "")
        return (f"{self.dataset:12s} {self.pipeline:16s} {self.mode:7s} {models:44s} "
                + " ".join(f"{v:8.4f}" for v in self.metrics.values()))

    def head(self) -> str:
        return f"{'dataset':12s} {'pipeline':16s} {'mode':7s} {'model(s)':44s} " + " ".join(f"{m:>8s}" for m in self.metrics)

    def footer(self) -> str:
        timing = ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items())
        dtypes = ", ".join(f"{name} {dtype}" for name, dtype in self.dtypes.items())
        return f"({self.queries} queries, {self.documents} documents; {timing}; {dtypes})"

    def table(self) -> str:
        return f"{self.head()}\n{self.row()}\n{self.footer()}"


def tables(reports: list[EvalReport]) -> str:
    """One table, a row per mode, then each mode's counts and timings."""
    lines = [reports[0].head(), *(r.row() for r in reports)]
    lines += [f"{r.mode}: {r.footer()}" for r in reports]
    return "\n".join(lines)


MODES = ("dense", "sparse", "hybrid")


def _retrieve(corpus: CorpusIndex, mode: str, queries: dict[str, str], vectors, ids: list[str], top_k: int) -> dict:
    if mode == "dense":
        return {qid: corpus.search(vectors[i], top_k) for i, qid in enumerate(ids)}
    if mode == "sparse":
        return {qid: corpus.sparse_search(queries[qid], top_k) for qid in ids}
    return {qid: corpus.hybrid_search(vectors[i], corpus.keyword_candidates(queries[qid], corpus.hybrid_depth(top_k)), top_k)
            for i, qid in enumerate(ids)}


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
    modes: list[str] | None = None,
) -> list[EvalReport]:
    """One report per retrieval mode (default: the index's configured one), all from one index
    build and one encoding of the queries."""
    data = Path(data)
    qrels = read_qrels(data, split)
    queries = {qid: text for qid, text in read_queries(data).items() if qid in qrels}
    build_timings: dict[str, float] = {}
    reports = []
    with tempfile.TemporaryDirectory(prefix="rankstream-eval-") as scratch:
        if index is None:
            model_name = pick_model(settings, model)
            index = IndexConfig(name=data.name, path=str(Path(scratch) / "index"), model=model_name)
        modes = modes or [index.mode]
        if not (Path(index.path) / "manifest.json").exists():
            report = build_index(settings, data, index.path, index=index, progress=progress)
            build_timings["build passages/s"] = report.passages_per_second
        encoder = settle_precision(load_model(settings.model(index.model)))
        corpus = CorpusIndex.open(index, encoder.identity(), dimension_of(encoder))
        cross = None
        try:
            ids = list(queries)
            started = time.perf_counter()
            vectors = encode_texts(encoder, [queries[q] for q in ids], "query") if modes != ["sparse"] else None
            encode_seconds = time.perf_counter() - started if vectors is not None else 0.0
            for mode in modes:
                timings = dict(build_timings)
                started = time.perf_counter()
                hits = _retrieve(corpus, mode, queries, vectors, ids, top_k)
                spent = time.perf_counter() - started + (encode_seconds if mode != "sparse" else 0.0)
                timings["retrieve queries/s"] = len(ids) / spent if spent else 0.0
                run = {qid: {h.document.id: h.score for h in found} for qid, found in hits.items()}
                reranker_name = None
                if pipeline == "retrieve+rerank":
                    reranker_name = reranker or settings.default_model
                    cross = cross or settle_precision(load_model(settings.model(reranker_name)))
                    run = _rerank(cross, queries, hits, rerank_k, progress, timings)
                metrics = ir_measures.calc_aggregate(MEASURES, qrels_for_measures(qrels, queries), run)
                reports.append(EvalReport(
                    dataset=data.name, pipeline=pipeline, retriever=index.model, reranker=reranker_name,
                    queries=len(queries), documents=corpus.count, metrics={str(m): float(metrics[m]) for m in MEASURES},
                    timings=timings, mode=mode,
                    dtypes={index.model: dtype_name(encoder.dtype), **({reranker_name: dtype_name(cross.dtype)} if cross else {})},
                ))
        finally:
            corpus.close()
    return reports


def _rerank(cross, queries: dict[str, str], hits: dict, rerank_k: int, progress: bool, timings: dict) -> dict:
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
    return reranked


def qrels_for_measures(qrels: dict[str, dict[str, int]], queries: dict[str, str]) -> dict[str, dict[str, int]]:
    return {qid: judged for qid, judged in qrels.items() if qid in queries}


def to_json(reports: EvalReport | list[EvalReport]) -> str:
    """One report as an object; several (one per mode) as a list."""
    if isinstance(reports, list):
        return json.dumps([r.__dict__ for r in reports] if len(reports) > 1 else reports[0].__dict__, indent=2)
    return json.dumps(reports.__dict__, indent=2)
