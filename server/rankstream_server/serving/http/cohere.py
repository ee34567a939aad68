"""Cohere's rerank API: `POST /v1/rerank` (which answers Jina's clients too: see jina.py) and
`POST /v2/rerank`. The `cohere` SDK (`ClientV2(base_url=...)`, `Client(base_url=...)`) and
LangChain's `CohereRerank` work unchanged against these."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from rankstream.v1 import rankstream_pb2 as pb
from rankstream_server.serving.http import jina
from rankstream_server.serving.http.front import Calls, Route, json_response

RERANK = "/rankstream.v1.Reranker/Rerank"


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields of theirs we do not need (rank_fields, ...) are ignored


class RerankV1(_Body):
    model: str | None = Field(None, description="Model name or alias; default: the server's default reranker.")
    query: str
    documents: list[str | dict[str, Any]] = Field(description="Strings, or objects with a `text` field.")
    top_n: int | None = Field(None, description="Best documents to return; default: all.")
    return_documents: bool | None = Field(
        None, description="Echo each document in its result. Default: true (Jina's default; Cohere's clients "
        "ignore the extra field).")
    raw_scores: bool = Field(False, description="rankstream extension: the model's logits, not its activation.")
    max_chunks_per_doc: int | None = Field(
        None, description="Score a long document in up to this many windows and keep the best window's score "
        "(rankstream's long_passages: CHUNK); default: documents are truncated to the model's max_length.")


class RerankV2(_Body):
    model: str | None = Field(None, description="Model name or alias; default: the server's default reranker.")
    query: str
    documents: list[str | dict[str, Any]]
    top_n: int | None = None
    max_tokens_per_doc: int | None = Field(
        None, description="Each document is cut to at most this many tokens (rankstream's max_passage_tokens); "
        "every (query, document) pair is also cut to the model's max_length.")
    return_documents: bool = False
    raw_scores: bool = False


def _request(body: RerankV1 | RerankV2) -> tuple[pb.RerankRequest, list[str]]:
    texts = [jina.document_text(document, i) for i, document in enumerate(body.documents)]
    message = pb.RerankRequest(query=body.query, model=body.model or "", top_n=body.top_n or 0,
                               raw_scores=body.raw_scores)
    if getattr(body, "max_tokens_per_doc", None) is not None:
        message.max_passage_tokens = body.max_tokens_per_doc
    chunks = getattr(body, "max_chunks_per_doc", None)
    if chunks is not None:
        message.long_passages, message.max_chunks_per_passage = pb.CHUNK, chunks
    message.passages.extend(pb.Passage(text=text) for text in texts)
    return message, texts


def _results(passages: list[pb.ScoredPassage], documents: list | None) -> list[dict[str, Any]]:
    if documents is None:
        return [{"index": p.index, "relevance_score": p.score} for p in passages]
    return [{"index": p.index, "relevance_score": p.score, "document": jina.returned_document(documents[p.index])}
            for p in passages]


def routes(calls: Calls) -> tuple[APIRouter, dict[str, Route]]:
    router = APIRouter(tags=["Cohere / Jina"])

    @router.post("/v1/rerank", summary="Rerank (Cohere v1 and Jina)")
    async def rerank_v1(body: RerankV1, request: Request):
        message, _ = _request(body)
        passages, call = await calls.rerank(request, message)
        documents = body.documents if body.return_documents is not False else None
        stats = call.stats
        name = stats.model if stats is not None else (body.model or "")
        return json_response({
            "id": request.scope["rankstream.call"].request_id,
            "results": _results(passages, documents),
            "meta": {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}},
            **jina.fields(name, stats),
        })

    @router.post("/v2/rerank", summary="Rerank (Cohere v2)")
    async def rerank_v2(body: RerankV2, request: Request):
        message, _ = _request(body)
        passages, call = await calls.rerank(request, message)
        tokens = call.stats.tokens if call.stats is not None else 0
        return json_response({
            "id": request.scope["rankstream.call"].request_id,
            "results": _results(passages, body.documents if body.return_documents else None),
            "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                     "tokens": {"input_tokens": tokens}},
        })

    return router, {"/v1/rerank": Route("cohere", RERANK, "Rerank"), "/v2/rerank": Route("cohere", RERANK, "Rerank")}
