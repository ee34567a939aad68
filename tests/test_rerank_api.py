"""Rerank's contract over gRPC: ranking, top_n, threshold, orders, echoing, and every bad input."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest

from rankstream.v1 import rankstream_pb2 as pb

from conftest import QUERY, TEXTS, passages


async def test_ranked_is_best_first_with_ranks_and_stats(served):
    results, stats = await served.rerank(query=QUERY, passages=passages(TEXTS), model="minilm")
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True)
    assert [r.rank for r in results] == list(range(1, len(TEXTS) + 1))
    assert sorted(r.index for r in results) == list(range(len(TEXTS)))
    assert all(r.id == f"p{r.index}" for r in results)
    assert all(r.text == "" for r in results), "text only when asked"
    assert (stats.passages, stats.scored, stats.returned) == (len(TEXTS), len(TEXTS), len(TEXTS))
    assert stats.batches >= 1 and stats.inference_ms > 0 and stats.total_ms >= stats.inference_ms


async def test_top_n_cuts_the_ranking(served):
    everything, _ = await served.rerank(query=QUERY, passages=passages(TEXTS))
    top, stats = await served.rerank(query=QUERY, passages=passages(TEXTS), top_n=3)
    assert [(r.index, r.score, r.rank) for r in top] == [(r.index, r.score, r.rank) for r in everything[:3]]
    assert stats.scored == len(TEXTS) and stats.returned == 3
    larger, _ = await served.rerank(query=QUERY, passages=passages(TEXTS), top_n=100)
    assert len(larger) == len(TEXTS)


async def test_raw_scores_are_logits_of_the_activated_ones(served):
    activated, _ = await served.rerank(query=QUERY, passages=passages(TEXTS))
    raw, _ = await served.rerank(query=QUERY, passages=passages(TEXTS), raw_scores=True)
    by_index = {r.index: r.score for r in raw}
    for result in activated:
        assert result.score == pytest.approx(1 / (1 + math.exp(-by_index[result.index])), abs=1e-6)
    assert [r.score for r in raw] == sorted((r.score for r in raw), reverse=True)
    assert any(r.score < 0 for r in raw) or any(r.score > 1 for r in raw), "logits are not probabilities"


async def test_threshold_keeps_scores_at_or_above(served):
    everything, _ = await served.rerank(query=QUERY, passages=passages(TEXTS), raw_scores=True)
    cut = everything[3].score
    kept, stats = await served.rerank(query=QUERY, passages=passages(TEXTS), raw_scores=True, score_threshold=cut)
    assert [r.index for r in kept] == [r.index for r in everything if r.score >= cut]
    assert stats.returned == len(kept) and stats.scored == len(TEXTS)


async def test_as_scored_streams_each_passage_once_with_the_same_scores(served):
    ranked, _ = await served.rerank(query=QUERY, passages=passages(TEXTS))
    streamed, stats = await served.rerank(query=QUERY, passages=passages(TEXTS), order=pb.AS_SCORED)
    assert sorted(r.index for r in streamed) == list(range(len(TEXTS)))
    assert all(r.rank == 0 for r in streamed)
    expected = {r.index: r.score for r in ranked}
    assert all(r.score == pytest.approx(expected[r.index], abs=1e-6) for r in streamed)
    assert stats.returned == len(TEXTS)


async def test_as_scored_applies_the_threshold(served):
    ranked, _ = await served.rerank(query=QUERY, passages=passages(TEXTS), raw_scores=True)
    cut = ranked[4].score
    streamed, _ = await served.rerank(
        query=QUERY, passages=passages(TEXTS), raw_scores=True, order=pb.AS_SCORED, score_threshold=cut
    )
    assert sorted(r.index for r in streamed) == sorted(r.index for r in ranked if r.score >= cut)


async def test_text_title_and_metadata_echo_only_when_asked(served):
    sent = [
        pb.Passage(id="a", text="first text", title="A title", metadata={"source": "wiki", "lang": "en"}),
        pb.Passage(id="b", text="second text"),
    ]
    quiet, _ = await served.rerank(query=QUERY, passages=sent)
    assert all(not r.text and not r.HasField("title") and not r.metadata for r in quiet)
    loud, _ = await served.rerank(query=QUERY, passages=sent, return_text=True, return_metadata=True)
    by_id = {r.id: r for r in loud}
    assert by_id["a"].text == "first text" and by_id["a"].title == "A title"
    assert dict(by_id["a"].metadata) == {"source": "wiki", "lang": "en"}
    assert by_id["b"].text == "second text" and not by_id["b"].HasField("title")


async def test_list_models_describes_each_model(served):
    response = await served.info.ListModels(pb.ListModelsRequest())
    assert response.default_model == "tiny-bert"
    by_name = {m.name: m for m in response.models}
    assert set(by_name) == {"tiny-bert", "tiny-distilbert", "tiny-deberta", "minilm"}
    minilm = by_name["minilm"]
    assert (minilm.kind, minilm.max_length, minilm.dtype, minilm.device, minilm.activation) == (
        pb.MODEL_KIND_CROSS, 512, "float32", "cpu", "sigmoid",
    )
    assert minilm.dtype_reason == "configured" and not minilm.dtype_measurements  # dtype float32, not measured
    assert by_name["tiny-bert"].max_length == 128, "capped at the model's position embeddings"
    assert by_name["tiny-deberta"].tokenizer.endswith("deberta-tokenizer")
    assert minilm.batcher.capacity > 0
    # How passes run, as start-up settled it: CPU, eager (batching.compile off), no graphs.
    assert minilm.max_batch_tokens > 0 and minilm.parallel_passes >= 1
    assert not minilm.compiled and minilm.cuda_graphs == 0


LONG_QUERY_WORDS = " ".join(["word"] * 150)  # 150 tokens, under the character limit


@pytest.mark.parametrize(
    ("fields", "code", "needles"),
    [
        ({"query": "", "passages": passages(["x"])}, grpc.StatusCode.INVALID_ARGUMENT, ["query", "empty"]),
        ({"query": "   ", "passages": passages(["x"])}, grpc.StatusCode.INVALID_ARGUMENT, ["query", "empty"]),
        ({"query": "q", "passages": []}, grpc.StatusCode.INVALID_ARGUMENT, ["passages", "at least one"]),
        ({"query": "q", "passages": passages(["x"] * 65)}, grpc.StatusCode.INVALID_ARGUMENT, ["passages", "max_passages=64"]),
        ({"query": "q" * 1001, "passages": passages(["x"])}, grpc.StatusCode.INVALID_ARGUMENT, ["query", "max_query_chars=1000"]),
        ({"query": "q", "passages": passages(["x", "y" * 5001])}, grpc.StatusCode.INVALID_ARGUMENT, ["passages[1]", "max_passage_chars=5000"]),
        ({"query": "q", "passages": passages(["x", " "])}, grpc.StatusCode.INVALID_ARGUMENT, ["passages[1].text", "empty"]),
        ({"query": "q", "passages": passages(["x"]), "top_n": -1}, grpc.StatusCode.INVALID_ARGUMENT, ["top_n", ">= 0"]),
        ({"query": "q", "passages": passages(["x"]), "score_threshold": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT, ["score_threshold", "finite"]),
        ({"query": "q", "passages": passages(["x"]), "model": "nope"}, grpc.StatusCode.NOT_FOUND, ["model", "nope", "tiny-bert"]),
        ({"query": "\u200b\x00", "passages": passages(["x"])}, grpc.StatusCode.INVALID_ARGUMENT, ["query", "control characters"]),
        ({"query": "q", "passages": passages(["x"]), "order": 7}, grpc.StatusCode.INVALID_ARGUMENT, ["order", "unknown value 7"]),
        ({"query": LONG_QUERY_WORDS, "passages": passages(["x"]), "model": "tiny-bert"}, grpc.StatusCode.INVALID_ARGUMENT, ["query is 150 tokens", "at most 124", "tiny-bert"]),
    ],
    ids=["empty-query", "blank-query", "no-passages", "too-many-passages", "long-query", "long-passage",
         "empty-passage", "negative-top-n", "nan-threshold", "unknown-model", "invisible-query", "unknown-order",
         "query-over-token-budget"],
)
async def test_bad_input_gets_a_clear_status(served, fields, code, needles):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.rerank(**fields)
    assert caught.value.code() == code
    for needle in needles:
        assert needle in caught.value.details()
    assert "Traceback" not in caught.value.details()
    # ...and the server keeps serving.
    results, _ = await served.rerank(query=QUERY, passages=passages(TEXTS[:2]))
    assert len(results) == 2


def test_query_too_long_for_the_model_is_a_token_check_not_truncation(models):
    from transformers import AutoTokenizer

    from rankstream_server.inference.tokenization import PairTokenizer

    tokenizer = PairTokenizer(AutoTokenizer.from_pretrained(models.bert), 32, "tiny-bert", True)
    pairs = tokenizer.encode("a short query", ["word " * 100, "tiny"])
    query_ids = AutoTokenizer.from_pretrained(models.bert)("a short query")["input_ids"]
    first = pairs.input_ids[0, : pairs.lengths[0]].tolist()
    assert len(first) == 32 and pairs.truncated == 1, "only the long passage was cut"
    assert first[: len(query_ids)] == query_ids, "the query survives truncation whole"
    assert first[-1] == query_ids[-1], "the pair still ends with [SEP]"
    assert pairs.lengths[1] < 32 and np.count_nonzero(pairs.token_type_ids[1]) == 2


def test_concurrent_tokenization_never_exceeds_max_length(models):
    """Tokenizer calls switch truncation on the shared Rust tokenizer: threads must not race."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer

    from rankstream_server.inference.tokenization import PairTokenizer

    tokenizer = PairTokenizer(AutoTokenizer.from_pretrained(models.bert), 64, "tiny-bert", True)
    long_passages = ["many words in a long passage " * 40] * 4
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: tokenizer.encode("a query", long_passages), range(300)))
    finally:
        sys.setswitchinterval(previous)
    assert max(int(tokens.lengths.max()) for tokens in results) == 64
    assert all(tokens.input_ids.shape == (4, 64) for tokens in results)
