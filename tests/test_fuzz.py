"""Fuzzing every request message against a real server (hypothesis): random unicode (zero-width,
RTL, NUL, emoji; surrogates as the raw bad UTF-8 a non-Python client can send), empty and huge
strings, huge repeated fields, extreme numbers, unknown enum values. Every answer is a result
or a clean client-error status with a message; never INTERNAL or UNKNOWN, no stack trace, and
the server keeps answering."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc

from conftest import ThreadedServer, make_settings

LIMITS = {"max_passages": 20, "max_top_k": 50, "max_query_chars": 300, "max_passage_chars": 2000}
CLEAN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
SPECIAL = "\u200b\u200c\u200d\u2060\ufeff\u202e\u202d\u0000\u0007\n\t \u00a0\u3000🎉東京مرحبا"

texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from(SPECIAL), max_size=30),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=200),
    st.sampled_from(["", " ", "\u200b", "a" * 301, "word " * 500]),
)
numbers = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, -1, 1, 49, 50, 51]))
floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32))
metadata = st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4)
passage = st.builds(
    lambda id_, text, title, meta: pb.Passage(id=id_, text=text, metadata=meta, **({"title": title} if title is not None else {})),
    st.text(max_size=12), texts, st.one_of(st.none(), texts), metadata,
)


@pytest.fixture(scope="module")
def fuzz_server(models, tmp_path_factory):
    settings_ = make_settings(
        [{"name": "tiny-bert", "weights": str(models.bert)},
         {"name": "bi", "kind": "bi", "weights": str(models.distilbert), "pooling": "mean"}],
        limits=LIMITS, default_model="tiny-bert",
        indexes=[{"name": "fuzz", "path": str(tmp_path_factory.mktemp("fuzz") / "idx"), "model": "bi", "create": True}],
    )
    server = ThreadedServer(settings_).start()
    channel = grpc.insecure_channel(server.target)
    yield channel
    channel.close()
    server.stop()


def _call(run) -> None:
    """Runs a call to the end; a failure must be a clean client error with a plain message."""
    try:
        run()
    except grpc.RpcError as error:
        assert error.code() in CLEAN, (error.code(), error.details())
        details = error.details() or ""
        assert details and "Traceback" not in details and ".py" not in details, details


def _still_serving(channel) -> None:
    info = pb_grpc.InfoStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    assert {m.name for m in info.models} == {"tiny-bert", "bi"}


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(query=texts, passages=st.lists(passage, max_size=24), top_n=numbers, order=numbers,
       threshold=floats, model=st.sampled_from(["", "tiny-bert", "bi", "nope", "\u0000"]), flags=st.booleans())
def test_rerank_requests(fuzz_server, query, passages, top_n, order, threshold, model, flags):
    request = pb.RerankRequest(query=query, passages=passages, top_n=top_n, order=order, model=model,
                               raw_scores=flags, return_text=flags, return_metadata=not flags)
    if threshold is not None:
        request.score_threshold = threshold
    _call(lambda: list(pb_grpc.RerankerStub(fuzz_server).Rerank(request, timeout=60)))
    _still_serving(fuzz_server)


@FUZZ
@given(query=texts, top_k=numbers, top_n=numbers, order=numbers, threshold=floats, filter_=metadata,
       index=st.sampled_from(["", "fuzz", "nope"]), rerank=st.booleans())
def test_retrieve_requests(fuzz_server, query, top_k, top_n, order, threshold, filter_, index, rerank):
    stub = pb_grpc.RetrieverStub(fuzz_server)
    if rerank:
        request = pb.RetrieveAndRerankRequest(query=query, top_k=top_k, top_n=top_n, order=order, filter=filter_, index=index)
        call = stub.RetrieveAndRerank
    else:
        request = pb.RetrieveRequest(query=query, top_k=top_k, filter=filter_, index=index, return_text=True)
        call = stub.Retrieve
    if threshold is not None:
        request.score_threshold = threshold
    _call(lambda: list(call(request, timeout=60)))
    _still_serving(fuzz_server)


@FUZZ
@given(passages=st.lists(passage, max_size=24), ids=st.lists(st.text(max_size=12), max_size=30))
def test_upsert_and_delete_requests(fuzz_server, passages, ids):
    stub = pb_grpc.RetrieverStub(fuzz_server)
    _call(lambda: stub.UpsertPassages(pb.UpsertPassagesRequest(index="fuzz", passages=passages), timeout=60))
    _call(lambda: stub.DeletePassages(pb.DeletePassagesRequest(index="fuzz", ids=ids), timeout=60))
    _still_serving(fuzz_server)


BAD_UTF8 = b"\x0a\x03\xed\xa0\x80"  # field 1 (a string in every request but ListModels's) holding a UTF-16 surrogate
BROKEN = [b"\xff\xff\xff", b"\x12\xff\x01"]  # a bad tag; a length past the end
UNDECODABLE = [
    *[(method, payload) for method in ("/rankstream.v1.Reranker/Rerank", "/rankstream.v1.Retriever/Retrieve",
                                       "/rankstream.v1.Retriever/UpsertPassages") for payload in [BAD_UTF8, *BROKEN]],
    *[("/rankstream.v1.Info/ListModels", payload) for payload in BROKEN],  # it has no field 1 to hold bad UTF-8
]


@pytest.mark.parametrize(("method", "payload"), UNDECODABLE)
def test_undecodable_bytes_get_invalid_argument(fuzz_server, method, payload):
    """Bad UTF-8 or a broken message, as the raw bytes a non-Python client can send."""
    unary = method.endswith(("UpsertPassages", "ListModels"))
    factory = fuzz_server.unary_unary if unary else fuzz_server.unary_stream
    call = factory(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as caught:
        result = call(payload, timeout=30)
        if not unary:
            list(result)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "not a valid message" in caught.value.details()
    _still_serving(fuzz_server)
