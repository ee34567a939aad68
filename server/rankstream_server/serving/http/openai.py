"""OpenAI's embeddings API: `POST /v1/embeddings` and `GET /v1/models`, for the `openai` SDK
(`OpenAI(base_url="http://host:8080/v1")`), LiteLLM and LangChain's OpenAIEmbeddings."""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from rankstream.v1 import rankstream_pb2 as pb
from rankstream_server.errors import InvalidArgument
from rankstream_server.serving.http.front import Calls, Route, json_response

EMBED, INFO = "/rankstream.v1.Embedder/Embed", "/rankstream.v1.Info/ListModels"
INPUT_TYPES = {None: pb.INPUT_TYPE_PASSAGE, "passage": pb.INPUT_TYPE_PASSAGE, "document": pb.INPUT_TYPE_PASSAGE,
               "query": pb.INPUT_TYPE_QUERY}


class Embeddings(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = Field(None, description="Bi-encoder name or alias; default: the server's default embedder.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="Only the model's own dimension is accepted (no truncation).")
    user: str | None = None
    input_type: Literal["query", "passage", "document"] | None = Field(
        None, description="Extension (as NVIDIA's and others' OpenAI-style APIs): embed as a query or as a passage (default).")


def _texts(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if value and not all(isinstance(item, str) for item in value):
        raise InvalidArgument("input: token ids are not accepted; send text (a string or a list of strings)")
    return list(value)


def _encoded(vectors: np.ndarray, encoding: str) -> list:
    if encoding == "base64":  # what the openai SDK asks for by default: little-endian float32
        little = vectors.astype("<f4", copy=False)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    return list(vectors)


def routes(calls: Calls) -> tuple[APIRouter, dict[str, Route]]:
    router = APIRouter(tags=["OpenAI"])

    @router.post("/v1/embeddings", summary="Embeddings (OpenAI)")
    async def embeddings(body: Embeddings, request: Request):
        message = pb.EmbedRequest(model=body.model or "", inputs=_texts(body.input),
                                  input_type=INPUT_TYPES[body.input_type])
        if body.dimensions is not None:
            dimension = calls.readiness.require().embedder(message.model).loaded.dimension
            if body.dimensions != dimension:
                raise InvalidArgument(f"dimensions: {body.dimensions} is not supported by this model, whose "
                                      f"embeddings have {dimension} dimensions (leave it out or send {dimension})")
        name, vectors, stats = await calls.embed(request, message)
        data = [{"object": "embedding", "index": i, "embedding": vector}
                for i, vector in enumerate(_encoded(vectors, body.encoding_format))]
        return json_response({"object": "list", "data": data, "model": name,
                              "usage": {"prompt_tokens": stats.tokens, "total_tokens": stats.tokens}})

    @router.get("/v1/models", summary="Models and their aliases (OpenAI)")
    async def models():
        registry = calls.readiness.require()
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "rankstream"}
                for model in registry.models for name in (model.name, *model.loaded.config.aliases)]
        return json_response({"object": "list", "data": data})

    return router, {"/v1/embeddings": Route("openai", EMBED, "Embed"), "/v1/models": Route("openai", INFO, "ListModels")}
