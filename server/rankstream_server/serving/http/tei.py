"""Hugging Face text-embeddings-inference (TEI): `POST /rerank`, `POST /embed`, `GET /info` and
`GET /health`, as TEI's own clients (LlamaIndex's TEI reranker, Haystack, Dify's TEI plugin) call
them. TEI serves one model; here `model` (an extension) picks another, and /info?model=NAME
describes it."""

from __future__ import annotations

import os
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from rankstream.v1 import rankstream_pb2 as pb
from rankstream_server.errors import Unavailable
from rankstream_server.serving.http import errors as http_errors
from rankstream_server.serving.http.front import Calls, Route, json_response

RERANK, EMBED, INFO = "/rankstream.v1.Reranker/Rerank", "/rankstream.v1.Embedder/Embed", "/rankstream.v1.Info/ListModels"
PROMPTS = {None: pb.INPUT_TYPE_PASSAGE, "passage": pb.INPUT_TYPE_PASSAGE, "document": pb.INPUT_TYPE_PASSAGE,
           "query": pb.INPUT_TYPE_QUERY}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TeiRerank(_Body):
    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool | None = Field(None, description="false: refuse texts longer than the model takes; default: cut them.")
    truncation_direction: Literal["Right", "right"] = Field("Right", description="Texts are cut at the end only.")
    model: str | None = Field(None, description="rankstream extension: model name or alias.")


class TeiEmbed(_Body):
    inputs: str | list[str]
    normalize: bool = True
    truncate: bool | None = Field(None, description="false: refuse inputs longer than the model takes; default: cut them.")
    truncation_direction: Literal["Right", "right"] = "Right"
    prompt_name: Literal["query", "passage", "document"] | None = Field(
        None, description="query: embed as a query (the model's query_prefix); default: as a passage.")
    model: str | None = None


def _long(truncate: bool | None) -> int:
    """TEI's truncate=false: a text past the model's length is an error (413, before anything is
    scored), not silently cut. Unset cuts, as TEI started with --auto-truncate does (/info says so)."""
    return pb.REFUSE if truncate is False else pb.TRUNCATE


def routes(calls: Calls) -> tuple[APIRouter, dict[str, Route]]:
    router = APIRouter(tags=["TEI"])

    @router.post("/rerank", summary="Rerank (TEI)")
    async def rerank(body: TeiRerank, request: Request):
        message = pb.RerankRequest(query=body.query, model=body.model or "", raw_scores=body.raw_scores,
                                   long_passages=_long(body.truncate))
        message.passages.extend(pb.Passage(text=text) for text in body.texts)
        passages, _ = await calls.rerank(request, message)
        texts = body.texts
        if body.return_text:
            return json_response([{"index": p.index, "score": p.score, "text": texts[p.index]} for p in passages])
        return json_response([{"index": p.index, "score": p.score} for p in passages])

    @router.post("/embed", summary="Embed (TEI)")
    async def embed(body: TeiEmbed, request: Request):
        inputs = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        message = pb.EmbedRequest(model=body.model or "", inputs=inputs, normalize=body.normalize,
                                  input_type=PROMPTS[body.prompt_name], long_inputs=_long(body.truncate))
        _, vectors, _ = await calls.embed(request, message)
        return json_response(vectors)

    @router.get("/info", summary="The served model (TEI)")
    async def info(request: Request, model: str = ""):
        served = calls.model(model)
        loaded = served.loaded
        settings = calls.settings
        if served.kind == "cross":
            model_type = {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
        else:
            model_type = {"embedding": {"pooling": loaded.pooling}}
        return json_response({
            "model_id": served.name, "model_sha": None, "model_dtype": str(loaded.dtype).removeprefix("torch."),
            "model_type": model_type, "max_concurrent_requests": settings.server.max_concurrent_rpcs,
            "max_input_length": loaded.max_length, "max_batch_tokens": served.backend.shapes.max_tokens,
            "max_batch_requests": None, "max_client_batch_size": settings.limits.max_passages,
            "auto_truncate": True, "tokenization_workers": settings.server.tokenizer_threads or os.cpu_count(),
            "version": "rankstream", "aliases": list(loaded.config.aliases),
        })

    @router.get("/health", summary="200 when serving, 503 while loading, draining or unwell (TEI)")
    async def health():
        if calls.readiness.serving and not calls.readiness.closing:
            return Response(status_code=200)
        return http_errors.render("tei", _unhealthy())

    return router, {"/rerank": Route("tei", RERANK, "Rerank"), "/embed": Route("tei", EMBED, "Embed"),
                    "/info": Route("tei", INFO, "ListModels"), "/health": Route("tei", None, "Health", quiet=True)}


def _unhealthy() -> Unavailable:
    return Unavailable("not serving: models loading, the server draining, or a model failing")
