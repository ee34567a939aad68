"""rankstream's own operations as JSON: each body is the proto3 JSON mapping of the rankstream.v1
request message (camelCase or the proto's snake_case names), each answer the mapping of its
response; fields added to the proto appear here with no code change. RANKED results come as one
object `{"passages": [...], "stats": {...}}`; AS_SCORED ones stream as newline-delimited JSON,
one ScoredPassages per line as each micro-batch is scored, then a `{"stats": {...}}` line."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import orjson
from fastapi import APIRouter, Request
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from starlette.responses import StreamingResponse

from rankstream.v1 import rankstream_pb2 as pb
from rankstream_server.errors import InvalidArgument, RankstreamError
from rankstream_server.serving.http.front import CALL_KEY, Calls, HttpCall, Route, internal_error, json_response

PREFIX = "/rankstream/v1"


def _dict(message) -> dict:
    return json_format.MessageToDict(message)


async def _parse(request: Request, message_type):
    body = await request.body()
    try:
        return json_format.Parse(body or b"{}", message_type(), ignore_unknown_fields=False)
    except json_format.ParseError as error:
        raise InvalidArgument(f"body: not a valid {message_type.DESCRIPTOR.full_name} in JSON ({error})") from None


def proto_schema(descriptor: Descriptor) -> dict:
    """A JSON schema of a message's proto3 JSON mapping, for the OpenAPI description."""
    scalars = {
        FieldDescriptor.TYPE_STRING: {"type": "string"}, FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
        FieldDescriptor.TYPE_FLOAT: {"type": "number"}, FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
        FieldDescriptor.TYPE_INT32: {"type": "integer"}, FieldDescriptor.TYPE_UINT32: {"type": "integer"},
        FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
        FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
    }

    def of_field(field: FieldDescriptor) -> dict:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                return {"type": "object", "additionalProperties": of_field(field.message_type.fields_by_name["value"])}
            schema = proto_schema(field.message_type)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            schema = {"type": "string", "enum": [value.name for value in field.enum_type.values]}
        else:
            schema = dict(scalars.get(field.type, {"type": "integer"}))
        if field.is_repeated and not (
                field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry):
            return {"type": "array", "items": schema}
        return schema

    return {"type": "object", "title": descriptor.name,
            "properties": {field.json_name: of_field(field) for field in descriptor.fields}}


def _body_doc(message_type, response_type=None) -> dict:
    extra = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": proto_schema(message_type.DESCRIPTOR)}}}}
    if response_type is not None:
        extra["responses"] = {"200": {"description": response_type.DESCRIPTOR.full_name, "content": {
            "application/json": {"schema": proto_schema(response_type.DESCRIPTOR)}}}}
    return extra


def routes(calls: Calls) -> tuple[APIRouter, dict[str, Route]]:
    router = APIRouter(prefix=PREFIX, tags=["rankstream.v1 (JSON)"])
    reranker, retriever, embedder, info = (calls.services.reranker, calls.services.retriever,
                                           calls.services.embedder, calls.services.info)

    async def scored(request: Request, message, operation: Callable):
        """A streaming operation's answer: one JSON object (RANKED) or NDJSON lines (AS_SCORED)."""
        record = request.scope[CALL_KEY]
        record.passages_in = len(getattr(message, "passages", ()))
        if getattr(message, "order", pb.RANKED) != pb.AS_SCORED:  # Retrieve has no order: one object
            async def work(context: HttpCall) -> pb.ScoredPassages:
                merged = pb.ScoredPassages()
                async with contextlib.aclosing(operation(message, context)) as stream:
                    async for batch in stream:
                        merged.passages.extend(batch.passages)
                return merged

            merged, context = await calls.run(request, work)
            record.passages_out = len(merged.passages)
            answer = _dict(merged)
            answer.setdefault("passages", [])
            if context.stats is not None:
                answer["stats"] = _dict(context.stats)
            return json_response(answer)
        # The first micro-batch is awaited here, so a request refused up front gets its status.
        context = HttpCall()
        stream = operation(message, context)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException as error:
            await stream.aclose()
            if isinstance(error, Exception) and not isinstance(error, RankstreamError):
                raise internal_error(error) from None
            raise
        return StreamingResponse(_lines(record, first, stream, context), media_type="application/x-ndjson")

    async def _lines(record, first, stream, context: HttpCall) -> AsyncIterator[bytes]:
        # StreamingResponse cancels this when the client disconnects: aclosing then drops the queued work.
        async with contextlib.aclosing(stream):
            try:
                if first is not None:
                    record.passages_out += len(first.passages)
                    yield orjson.dumps(_dict(first)) + b"\n"
                    async for batch in stream:
                        record.passages_out += len(batch.passages)
                        yield orjson.dumps(_dict(batch)) + b"\n"
            except Exception as error:  # noqa: BLE001 - the status line is sent: the error is the last line
                failure = error if isinstance(error, RankstreamError) else internal_error(error)
                record.code = failure.code.name
                yield orjson.dumps({"error": {"status": failure.code.name, "message": str(failure)}}) + b"\n"
                return
        if context.stats is not None:
            yield orjson.dumps({"stats": _dict(context.stats)}) + b"\n"

    async def unary(request: Request, message, operation: Callable):
        answer, _ = await calls.run(request, lambda context: operation(message, context))
        return json_response(_dict(answer))

    @router.post("/rerank", openapi_extra=_body_doc(pb.RerankRequest, pb.ScoredPassages))
    async def rerank(request: Request):
        """Reranker.Rerank."""
        return await scored(request, await _parse(request, pb.RerankRequest), reranker.Rerank)

    @router.post("/retrieve", openapi_extra=_body_doc(pb.RetrieveRequest, pb.ScoredPassages))
    async def retrieve(request: Request):
        """Retriever.Retrieve (always one JSON object: it has no AS_SCORED order)."""
        message = await _parse(request, pb.RetrieveRequest)
        return await scored(request, message, retriever.Retrieve)

    @router.post("/retrieve-and-rerank", openapi_extra=_body_doc(pb.RetrieveAndRerankRequest, pb.ScoredPassages))
    async def retrieve_and_rerank(request: Request):
        """Retriever.RetrieveAndRerank."""
        return await scored(request, await _parse(request, pb.RetrieveAndRerankRequest), retriever.RetrieveAndRerank)

    @router.post("/upsert", openapi_extra=_body_doc(pb.UpsertPassagesRequest, pb.UpsertPassagesResponse))
    async def upsert(request: Request):
        """Retriever.UpsertPassages (a write token)."""
        message = await _parse(request, pb.UpsertPassagesRequest)
        request.scope[CALL_KEY].passages_in = len(message.passages)
        return await unary(request, message, retriever.UpsertPassages)

    @router.post("/delete", openapi_extra=_body_doc(pb.DeletePassagesRequest, pb.DeletePassagesResponse))
    async def delete(request: Request):
        """Retriever.DeletePassages (a write token)."""
        message = await _parse(request, pb.DeletePassagesRequest)
        request.scope[CALL_KEY].passages_in = len(message.ids)
        return await unary(request, message, retriever.DeletePassages)

    @router.post("/embed", openapi_extra=_body_doc(pb.EmbedRequest, pb.EmbedResponse))
    async def embed(request: Request):
        """Embedder.Embed."""
        message = await _parse(request, pb.EmbedRequest)
        request.scope[CALL_KEY].passages_in = len(message.inputs)
        return await unary(request, message, embedder.Embed)

    @router.get("/models", openapi_extra={"responses": {"200": {"description": "rankstream.v1.ListModelsResponse",
                                                               "content": {"application/json": {"schema": proto_schema(
                                                                   pb.ListModelsResponse.DESCRIPTOR)}}}}})
    async def models(request: Request):
        """Info.ListModels."""
        return await unary(request, pb.ListModelsRequest(), info.ListModels)

    method = "/rankstream.v1.{}".format
    table = {
        "/rerank": Route("native", method("Reranker/Rerank"), "Rerank"),
        "/retrieve": Route("native", method("Retriever/Retrieve"), "Retrieve"),
        "/retrieve-and-rerank": Route("native", method("Retriever/RetrieveAndRerank"), "RetrieveAndRerank"),
        "/upsert": Route("native", method("Retriever/UpsertPassages"), "UpsertPassages"),
        "/delete": Route("native", method("Retriever/DeletePassages"), "DeletePassages"),
        "/embed": Route("native", method("Embedder/Embed"), "Embed"),
        "/models": Route("native", method("Info/ListModels"), "ListModels"),
    }
    return router, {PREFIX + path: route for path, route in table.items()}

