"""The serving hot path without a GPU: token arrays equal Hugging Face's, pass shapes stay in
their buckets, collation is exact, priorities hold, messages are batched and split, and the
CUDA-only levers (buckets, padded rows, graphs) fall back cleanly on CPU."""

from __future__ import annotations

import asyncio
import shutil
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from rankstream.v1 import rankstream_pb2 as pb
from rankstream_server.config import BatchingConfig, ModelConfig
from rankstream_server.inference.backend import backend_for
from rankstream_server.inference.batcher import BULK, INTERACTIVE, DynamicBatcher, Job
from rankstream_server.inference.batches import ShapePolicy, collate, cut_batches, power_of_two_rows
from rankstream_server.inference.embedded import embedded_model_path
from rankstream_server.inference.model_loading import load_model
from rankstream_server.inference.tokenization import (
    CHARACTERS_PER_TOKEN_CUT,
    PairTokenizer,
    TextTokenizer,
    Tokens,
    TooLong,
    _PlainAscii,
)
from rankstream_server.serving.operations import Messages
from rankstream_server.serving.pipeline import ScoredChunk

from conftest import QUERY, TEXTS

HARD_TEXTS = [
    *TEXTS,
    "x" * 3000,  # no word boundary to cut at
    "Ünïcödé façade — naïve café, 東京 and مرحبا with zero\u200bwidth and emoji 🎉 " * 40,
    ("word " * 400).strip(),  # long: cut before tokenizing
    "a " * 30 + "b" * 120 + " tail",  # a long word near where a cut would fall
]


@pytest.fixture(scope="module")
def bert_tokenizer():
    return AutoTokenizer.from_pretrained(embedded_model_path())


def _rows(tokens: Tokens, with_types: bool) -> list[tuple[list[int], list[int] | None]]:
    rows = []
    for i, length in enumerate(tokens.lengths.tolist()):
        types = tokens.token_type_ids[i, :length].tolist() if with_types else None
        rows.append((tokens.input_ids[i, :length].tolist(), types))
    return rows


@pytest.mark.parametrize("max_length", [512, 128, 40, 24])
def test_pair_tokens_equal_hugging_face_only_second_truncation(bert_tokenizer, max_length):
    tokens = PairTokenizer(bert_tokenizer, max_length, "m", True).encode(QUERY, HARD_TEXTS)
    reference = bert_tokenizer([QUERY] * len(HARD_TEXTS), HARD_TEXTS, truncation="only_second", max_length=max_length)
    expected = list(zip(reference["input_ids"], reference["token_type_ids"]))
    assert _rows(tokens, True) == expected
    overflowing = sum(len(bert_tokenizer(QUERY, t)["input_ids"]) > max_length for t in HARD_TEXTS)
    assert tokens.truncated == overflowing


@pytest.mark.parametrize("max_length", [256, 32])
def test_single_text_tokens_equal_hugging_face(bert_tokenizer, max_length):
    tokens = TextTokenizer(bert_tokenizer, max_length, "query: ", "").encode(HARD_TEXTS, "query")
    reference = bert_tokenizer(["query: " + t for t in HARD_TEXTS], truncation=True, max_length=max_length)
    assert [ids for ids, _ in _rows(tokens, False)] == reference["input_ids"]


def test_a_long_passage_is_cut_before_it_is_tokenized(bert_tokenizer, monkeypatch):
    """Only about room x CHARACTERS_PER_TOKEN_CUT characters reach the tokenizer."""
    tokenizer = PairTokenizer(bert_tokenizer, 64, "m", True)
    seen: list[int] = []
    ids = tokenizer._ids

    def recording(texts):
        seen.extend(len(t) for t in texts)
        return ids(texts)

    monkeypatch.setattr(tokenizer, "_ids", recording)
    passage = "the quick brown fox jumps over the lazy dog " * 500  # 22,000 characters
    tokens = tokenizer.encode("fox", [passage])
    assert seen and max(seen) <= 64 * CHARACTERS_PER_TOKEN_CUT
    assert tokens.lengths[0] == 64 and tokens.truncated == 1


@pytest.mark.parametrize("path", ["fast", "hugging face"])
def test_refuse_raises_too_long_with_the_whole_count_and_leaves_what_fits_alone(bert_tokenizer, path):
    """long_passages REFUSE at the tokenizer: the first input that would be cut raises TooLong with
    its position and its tokens uncut, special tokens (and the query) included, as Hugging Face
    counts them, also where the text was cut by characters before tokenizing. An input of exactly
    the room fits, and what fits gives the same arrays as without REFUSE."""
    pair, single = PairTokenizer(bert_tokenizer, 64, "m", True), TextTokenizer(bert_tokenizer, 64, "query: ", "")
    if path == "hugging face":
        pair._backend = single._backend = None
    room = 64 - 3 - len(bert_tokenizer(QUERY, add_special_tokens=False)["input_ids"])
    exact, over = " ".join(["word"] * room), " ".join(["word"] * (room + 1))
    huge = "the quick brown fox jumps over the lazy dog " * 500  # cut by characters before tokenizing
    for texts, index, passage in (([exact, over], 1, over), (["short", huge, over], 1, huge)):
        with pytest.raises(TooLong) as caught:
            pair.encode(QUERY, texts, refuse=True)
        assert (caught.value.index, caught.value.tokens) == (index, len(bert_tokenizer(QUERY, passage)["input_ids"]))
    fits = pair.encode(QUERY, ["short", exact], refuse=True)
    assert _rows(fits, True) == _rows(pair.encode(QUERY, ["short", exact]), True) and fits.truncated == 0
    with pytest.raises(TooLong) as caught:
        single.encode(["short", huge], "query", refuse=True)
    assert (caught.value.index, caught.value.tokens) == (1, len(bert_tokenizer("query: " + huge)["input_ids"]))
    assert _rows(single.encode(["short"], "query", refuse=True), False) == _rows(single.encode(["short"], "query"), False)


ASCII = st.text(alphabet=st.characters(max_codepoint=127), max_size=300)
MIXED = st.lists(st.one_of(ASCII, st.text(max_size=80)), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=MIXED, query=ASCII.filter(lambda q: any(c.isalnum() for c in q)))
def test_ascii_shortcut_gives_the_normalizers_ids_for_any_text(bert_tokenizer, texts, query):
    """ASCII text skips BERT's normalizer (lowercased by str.lower instead): any ASCII, control
    characters included, mixed in one request with any unicode, gives Hugging Face's ids."""
    pair = PairTokenizer(bert_tokenizer, 128, "m", True)
    assert pair._plain.active
    tokens = pair.encode(query, texts)
    reference = bert_tokenizer([query] * len(texts), texts, truncation="only_second", max_length=128)
    assert _rows(tokens, True) == list(zip(reference["input_ids"], reference["token_type_ids"]))
    single = TextTokenizer(bert_tokenizer, 64, "", "").encode(texts, "passage")
    assert [ids for ids, _ in _rows(single, False)] == bert_tokenizer(texts, truncation=True, max_length=64)["input_ids"]


def test_ascii_shortcut_is_taken_only_where_it_is_exact(bert_tokenizer):
    """Plain ASCII takes the shortcut; control characters, non-ASCII text and tokenizers with
    another normalizer (or none) take the full tokenizer."""
    from tokenizers import Tokenizer, normalizers

    plain = PairTokenizer(bert_tokenizer, 128, "m", True)._plain
    assert plain.takes("Plain ASCII, with\ttabs and\nnew lines.")
    assert not plain.takes("a bell \x07 rings") and not plain.takes("café") and not plain.takes("form\x0cfeed")
    other = Tokenizer.from_str(bert_tokenizer.backend_tokenizer.to_str())
    other.normalizer = normalizers.NFKC()
    assert not _PlainAscii(other).active and not _PlainAscii(other).takes("plain")
    other.normalizer = None
    assert not _PlainAscii(other).active


def test_shape_policy_buckets_widths_and_rows():
    policy = ShapePolicy(max_length=512, max_rows=256, max_tokens=16384, length_bucket=32, row_buckets=power_of_two_rows(256))
    assert [policy.width(n) for n in (1, 32, 33, 100, 500, 512)] == [32, 32, 64, 128, 512, 512]
    assert policy.rows_for(32) == 256 and policy.rows_for(512) == 32 and policy.rows_for(96) == 128
    assert [policy.padded_rows(n) for n in (1, 3, 100, 256)] == [1, 4, 128, 256]
    shapes = policy.shapes()
    assert len(shapes) == len(set(shapes)) < 150, "few shapes: all can be warmed at start-up"
    assert all(rows * width <= 16384 for rows, width in shapes)
    assert {width for _, width in shapes} == {32 * k for k in range(1, 17)}
    exact = ShapePolicy(max_length=512, max_rows=8, max_tokens=100)
    assert exact.width(37) == 37 and exact.padded_rows(3) == 3 and exact.rows_for(30) == 3


@pytest.mark.parametrize("device, dtype, configured, width_of_37", [
    ("cpu", torch.float32, None, 37),  # float32 kernels are not built per shape: exact widths
    ("cpu", torch.bfloat16, None, 48),  # oneDNN builds a kernel per bf16 shape: widths in 16s
    ("cpu", torch.float16, None, 48),
    ("cpu", torch.bfloat16, 1, 37),  # the config wins
    ("cuda", torch.float16, None, 64),
])
def test_the_default_pass_widths_depend_on_device_and_dtype(device, dtype, configured, width_of_37):
    from types import SimpleNamespace

    from rankstream_server.inference.backend import shape_policy

    loaded = SimpleNamespace(device=torch.device(device), dtype=dtype, max_length=512)
    policy = shape_policy(loaded, BatchingConfig(length_bucket=configured))
    assert policy.width(37) == width_of_37
    padded = device == "cuda" or dtype != torch.float32
    assert policy.padded_rows(5) == (8 if padded else 5), "rows in powers of two with the widths"


def _tokens(lengths: list[int], start: int) -> Tokens:
    lengths_array = np.array(lengths, dtype=np.int32)
    ids = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = start + i * 1000 + np.arange(n)
    return Tokens(ids, ids % 2, lengths_array, 0)


def test_batches_cut_across_requests_longest_first_and_collate_exactly():
    policy = ShapePolicy(max_length=64, max_rows=8, max_tokens=128, length_bucket=16, row_buckets=power_of_two_rows(8))
    first, second = _tokens([5, 40, 17, 3, 33], 1), _tokens([60, 2, 16, 9], 500_000)
    parts = [("a", first, np.arange(5)), ("b", second, np.array([0, 2, 3]))]  # row 1 of b not queued
    batches = cut_batches(parts, policy)
    seen = []
    for batch in batches:
        assert batch.width % 16 == 0 and batch.rows in power_of_two_rows(8) and batch.rows * batch.width <= 128
        ids = np.empty((batch.rows, batch.width), np.int64)
        mask = np.empty_like(ids)
        types = np.empty_like(ids)
        collate(batch, ids, mask, types, pad_id=0)
        lengths_in_slot_order = [0] * batch.real
        for piece in batch.pieces:
            for row, slot in zip(piece.rows, piece.slots):
                n = int(piece.tokens.lengths[row])
                lengths_in_slot_order[slot] = n
                assert ids[slot, :n].tolist() == piece.tokens.input_ids[row, :n].tolist()
                assert types[slot, :n].tolist() == piece.tokens.token_type_ids[row, :n].tolist()
                assert mask[slot].tolist() == [1] * n + [0] * (batch.width - n)
                assert not ids[slot, n:].any()
                seen.append((piece.owner, int(row)))
        assert lengths_in_slot_order == sorted(lengths_in_slot_order, reverse=True)
        assert mask[batch.real:].sum() == batch.rows - batch.real, "a padding row attends its first token only"
    assert sorted(seen) == sorted([("a", i) for i in range(5)] + [("b", 0), ("b", 2), ("b", 3)])


class HeldBackend:
    """Records which jobs each pass carried; held until released, to pile work up."""

    asynchronous = False

    def __init__(self):
        self.order: list[list[object]] = []
        self.gate = threading.Event()

    def launch(self, batch):
        self.gate.wait(10)
        self.order.append([piece.owner for piece in batch.pieces])
        scores = np.zeros(batch.real, dtype=np.float32)
        return type("Done", (), {"result": lambda self: scores})()


async def _drain(job: Job) -> None:
    async for _ in job.results():
        pass


@pytest.mark.parametrize("aged", [False, True])
async def test_queries_go_before_bulk_work_unless_it_has_waited_too_long(aged):
    backend = HeldBackend()
    subject = DynamicBatcher("lanes", backend, BatchingConfig(max_wait_ms=0, max_batch_size=4, bulk_max_wait_ms=0 if aged else 60_000))
    blocker = Job(size=1)
    subject.submit(blocker, _tokens([3], 0))
    await asyncio.sleep(0.05)  # the thread holds the blocker's pass
    bulk = Job(size=8, lane=BULK)
    subject.submit(bulk, _tokens([4] * 8, 0))
    query = Job(size=1, lane=INTERACTIVE)
    subject.submit(query, _tokens([4], 0))
    backend.gate.set()
    await asyncio.gather(_drain(blocker), _drain(bulk), _drain(query))
    subject.close()
    first_after_blocker = backend.order[1]
    assert (bulk in first_after_blocker) == aged and (query in first_after_blocker) == (not aged)


async def test_cancel_frees_the_queue_at_once_and_the_work_never_runs():
    backend = HeldBackend()
    subject = DynamicBatcher("cancel", backend, BatchingConfig(max_wait_ms=0, queue_capacity=100))
    subject.submit(Job(size=1), _tokens([3], 0))
    await asyncio.sleep(0.05)
    doomed = [Job(size=10) for _ in range(5)]
    for job in doomed:
        subject.submit(job, _tokens([5] * 10, 0))
    assert subject.in_flight == 51
    for job in doomed:
        subject.cancel(job)
        subject.cancel(job)  # twice is harmless
    assert subject.in_flight == 1 and subject.counters.dropped == 50
    survivor = Job(size=2)
    subject.submit(survivor, _tokens([5, 5], 0))
    backend.gate.set()
    await _drain(survivor)
    subject.close()
    assert not any(job in owners for owners in backend.order for job in doomed)
    assert subject.in_flight == 0


def test_bucketed_padded_passes_score_like_exact_ones_and_graphs_fall_back_on_cpu(models):
    """CUDA's shape levers forced on the CPU: same scores as exact shapes; no graphs off CUDA."""
    loaded = load_model(ModelConfig(name="m", weights=str(models.bert)))
    tokens = PairTokenizer(loaded.tokenizer, loaded.max_length, "m", loaded.uses_token_type_ids).encode(QUERY, TEXTS)
    everything = np.arange(len(tokens))

    def scores(config: BatchingConfig) -> tuple[np.ndarray, int]:
        backend = backend_for(loaded, config)
        backend.warm_up()
        output = np.zeros(len(tokens), np.float32)
        for batch in cut_batches([(None, tokens, everything)], backend.shapes):
            result = backend.launch(batch).result()
            assert result.shape[0] == batch.real
            for piece in batch.pieces:
                output[piece.rows] = result[piece.slots]
        return output, backend.graphs

    exact, _ = scores(BatchingConfig(max_batch_size=4))
    bucketed, graphs = scores(BatchingConfig(max_batch_size=4, length_bucket=16, pad_rows=True, cuda_graphs=True))
    np.testing.assert_allclose(bucketed, exact, atol=1e-5)
    assert graphs == 0


def _scores(backend, tokens: Tokens, in_flight: int = 3) -> np.ndarray:
    """Every row's score, passes launched `in_flight` at a time (side by side on CPU workers)."""
    output = np.zeros(len(tokens), np.float32)
    batches = cut_batches([(None, tokens, np.arange(len(tokens)))], backend.shapes)
    for start in range(0, len(batches), in_flight):
        launched = [(batch, backend.launch(batch)) for batch in batches[start:start + in_flight]]
        for batch, pending in launched:
            result = pending.result()
            for piece in batch.pieces:
                output[piece.rows] = result[piece.slots]
    return output


NEEDS_CXX = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                               reason="batching.compile (Inductor on CPU) needs a C++ compiler")


@NEEDS_CXX
@pytest.mark.parametrize("rows", [1, 3])
def test_compiled_cpu_passes_score_like_eager_side_by_side(models, rows):
    """batching.compile: the compiled model (one-row passes are their own shape family for
    dynamo) gives eager's scores, with two passes running at once on CPU workers."""
    loaded = load_model(ModelConfig(name="m", weights=str(models.bert)))
    tokens = PairTokenizer(loaded.tokenizer, loaded.max_length, "m", loaded.uses_token_type_ids).encode(QUERY, TEXTS * 3)
    config = BatchingConfig(max_batch_size=rows, max_batch_tokens=4096, cpu_passes=2)
    eager = _scores(backend_for(loaded, config), tokens)
    backend = backend_for(loaded, config.model_copy(update={"compile": True}))
    backend.warm_up()
    assert backend._compiled is not None, "compiling failed or did not match eager on the probes"
    backend._runner = backend._compiled  # whether or not it measured faster here
    assert backend.compiled
    np.testing.assert_allclose(_scores(backend, tokens), eager, atol=1e-5)


def test_a_model_that_fails_to_compile_or_compiles_wrong_is_served_eagerly(models, monkeypatch, caplog):
    loaded = load_model(ModelConfig(name="m", weights=str(models.bert)))
    tokens = PairTokenizer(loaded.tokenizer, loaded.max_length, "m", loaded.uses_token_type_ids).encode(QUERY, TEXTS)
    config = BatchingConfig(max_batch_size=4, max_batch_tokens=4096, compile=True)
    eager = _scores(backend_for(loaded, config.model_copy(update={"compile": False})), tokens)

    def broken(model, **options):
        def run(**inputs):
            raise RuntimeError("no C++ compiler")
        return run

    def wrong(model, **options):
        def run(**inputs):
            output = model(**inputs)
            output.logits = output.logits + 1.0
            return output
        return run

    for fake, reason in ((broken, "no C++ compiler"), (wrong, "differs from eager")):
        monkeypatch.setattr(torch, "compile", fake)
        backend = backend_for(loaded, config)
        with caplog.at_level("WARNING"):
            backend.warm_up()
        assert not backend.compiled and reason in caplog.text
        np.testing.assert_allclose(_scores(backend, tokens), eager, atol=1e-6)


def _chunk(indices, ranks=None) -> ScoredChunk:
    indices = np.array(indices)
    return ScoredChunk(indices, np.linspace(1, 0, len(indices)).astype(np.float32),
                       np.array(ranks if ranks is not None else np.zeros(len(indices)), dtype=np.int32))


def test_results_go_in_one_message_and_split_only_past_the_size_limit():
    docs = [(f"id{i}", "text " * 200, None, {"k": "v"}) for i in range(50)]
    one = Messages(lambda i: docs[i], want_text=False, want_metadata=False, max_bytes=4000)
    messages = one.build(_chunk(range(50), range(1, 51)))
    assert len(messages) == 1 and [p.rank for p in messages[0].passages] == list(range(1, 51))

    split = Messages(lambda i: docs[i], want_text=True, want_metadata=True, max_bytes=4000)
    messages = split.build(_chunk(range(50), range(1, 51)))
    assert len(messages) > 1
    assert all(m.ByteSize() <= 4000 for m in messages)
    assert [p.id for m in messages for p in m.passages] == [f"id{i}" for i in range(50)], "the ranking continues in order"
    assert (split.sent_passages, split.sent_messages) == (50, len(messages))
    retrieved = Messages(lambda i: docs[i], False, False, 4000, stage=pb.STAGE_RETRIEVE,
                         retrieval_scores=np.arange(50, dtype=np.float32))
    passage = retrieved.build(_chunk([7], [1]))[0].passages[0]
    assert (passage.stage, passage.retrieval_score, passage.text) == (pb.STAGE_RETRIEVE, 7.0, "")


def test_cpu_token_budget_is_measured_unless_configured(models):
    from rankstream_server.inference.backend import TUNED_BATCH_TOKENS

    loaded = load_model(ModelConfig(name="m", weights=str(models.bert)))
    tuned = backend_for(loaded, BatchingConfig())
    tuned.warm_up()
    assert tuned.shapes.max_tokens in TUNED_BATCH_TOKENS
    fixed = backend_for(loaded, BatchingConfig(max_batch_tokens=3000))
    fixed.warm_up()
    assert fixed.shapes.max_tokens == 3000


@pytest.mark.parametrize("name", ["bert", "distilbert", "deberta"])
def test_models_that_take_a_ready_4d_mask_get_one_and_score_the_same(models, name):
    entry = {"bert": {"weights": str(models.bert)}, "distilbert": {"weights": str(models.distilbert)},
             "deberta": {"weights": str(models.deberta), "tokenizer": str(models.deberta_tokenizer)}}[name]
    loaded = load_model(ModelConfig(name=name, **entry))
    backend = backend_for(loaded)
    assert backend._mask_4d, "all three take a 4D mask unchanged"
    tokens = PairTokenizer(loaded.tokenizer, loaded.max_length, name, loaded.uses_token_type_ids).encode(QUERY, TEXTS)
    batch = cut_batches([(None, tokens, np.arange(len(tokens)))], backend.shapes)[0]
    with_4d = backend.launch(batch).result()
    backend._mask_4d = False
    with_2d = backend.launch(batch).result()
    np.testing.assert_allclose(with_4d, with_2d, atol=1e-6)


def test_split_messages_hold_the_limit_for_any_text_and_empty_results_send_nothing():
    docs = [("東京" * 400 + str(i), "東京タワー 🎉" * 100, "🎉" * 50, {"キー": "値" * 30}) for i in range(30)]
    for want_text, want_metadata in [(True, True), (False, False), (True, False)]:
        messages = Messages(lambda i: docs[i], want_text, want_metadata, max_bytes=9000).build(_chunk(range(30), range(1, 31)))
        assert all(m.ByteSize() <= 9000 for m in messages), [m.ByteSize() for m in messages]
        assert [p.rank for m in messages for p in m.passages] == list(range(1, 31))
    nothing = Messages(lambda i: docs[i], True, True, 9000)
    assert nothing.build(_chunk([], [])) == [] and nothing.sent_messages == 0


def test_corpus_passages_are_tokenized_once_and_give_the_same_tokens(bert_tokenizer):
    cached = PairTokenizer(bert_tokenizer, 48, "m", True, cache_passages=100)
    fresh = PairTokenizer(bert_tokenizer, 48, "m", True)
    for query in ["short", QUERY, "a much longer query " * 4]:  # every query leaves a different room
        reused = cached.encode(query, HARD_TEXTS, reuse=True)
        plain = fresh.encode(query, HARD_TEXTS)
        assert _rows(reused, True) == _rows(plain, True)
        assert reused.truncated == plain.truncated
    assert len(set(HARD_TEXTS)) == len(HARD_TEXTS)
    assert (cached.cache.misses, cached.cache.hits) == (len(HARD_TEXTS), 2 * len(HARD_TEXTS))
    small = PairTokenizer(bert_tokenizer, 48, "m", True, cache_passages=3)
    small.encode("q", HARD_TEXTS, reuse=True)
    assert len(small.cache._entries) == 3, "least recently used passages leave"


async def test_cpu_passes_side_by_side_score_like_one_at_a_time(models):
    """cpu_passes=2: passes run on two worker threads at once and every request still gets its
    own exact scores, with the buffers of a running pass never overwritten by the next one."""
    loaded = load_model(ModelConfig(name="m", weights=str(models.bert)))
    tokenizer = PairTokenizer(loaded.tokenizer, loaded.max_length, "m", loaded.uses_token_type_ids)
    requests = [tokenizer.encode(f"{QUERY} {i}", TEXTS[i % len(TEXTS):] + TEXTS[: i % len(TEXTS)]) for i in range(12)]

    async def run(passes: int) -> list[np.ndarray]:
        config = BatchingConfig(max_batch_size=3, max_batch_tokens=4096, max_wait_ms=0, cpu_passes=passes)
        backend = backend_for(loaded, config)
        assert backend.parallel_passes == passes and backend.asynchronous == (passes > 1)
        subject = DynamicBatcher("m", backend, config)
        jobs = [Job(size=len(tokens)) for tokens in requests]
        for job, tokens in zip(jobs, requests):
            subject.submit(job, tokens)
        results = []
        for job, tokens in zip(jobs, requests):
            output = np.zeros(len(tokens), np.float32)
            async for rows, scores in job.results():
                output[rows] = scores
            results.append(output)
        subject.close()
        assert subject.in_flight == 0
        return results

    one_at_a_time = await run(1)
    side_by_side = await run(2)
    for alone, parallel in zip(one_at_a_time, side_by_side):
        np.testing.assert_allclose(parallel, alone, atol=1e-6)


class _ParallelBackend:
    """Passes on two worker threads; the first pass holds until a second one runs beside it."""

    asynchronous = True
    parallel_passes = 2

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(2)
        self._lock = threading.Lock()
        self.second_started = threading.Event()
        self.passes = 0
        self.running = 0
        self.most_at_once = 0

    def _run(self, batch):
        with self._lock:
            self.passes += 1
            first = self.passes == 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        if first:
            self.second_started.wait(5)
        else:
            self.second_started.set()
        with self._lock:
            self.running -= 1
        scores = np.zeros(batch.real, np.float32)
        for piece in batch.pieces:
            scores[piece.slots] = piece.tokens.lengths[piece.rows]
        return scores

    def launch(self, batch):
        future = self._pool.submit(self._run, batch)

        class Pending:
            def result(self):
                return future.result()

            def add_done_callback(self, callback):
                future.add_done_callback(lambda _: callback())

        return Pending()


async def test_work_arriving_while_a_pass_runs_starts_beside_it():
    """A second request must not wait for the first one's pass to end when a worker is free: the
    first pass here only ends early once the second has started beside it."""
    backend = _ParallelBackend()
    subject = DynamicBatcher("m", backend, BatchingConfig(max_wait_ms=0, max_batch_size=4))
    first, second = Job(size=2), Job(size=2)
    subject.submit(first, _tokens([5, 6], 0))
    while backend.running == 0:
        await asyncio.sleep(0.001)
    subject.submit(second, _tokens([7, 8], 0))
    await _drain(second)
    await _drain(first)
    subject.close()
    assert backend.second_started.is_set() and backend.most_at_once == 2


async def test_requests_are_tokenized_one_per_thread_unless_asked_or_on_cuda(models, monkeypatch):
    """server.tokenizer_parallel: the one process-wide switch of the `tokenizers` library. CPU-only
    servers default to off (the forward passes need the cores); true or a CUDA machine turns it on."""
    import os

    from rankstream_server.serving.app import RankstreamServer

    from conftest import make_settings

    entries = [{"name": "m", "weights": str(models.bert)}]
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "unset")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    RankstreamServer(make_settings(entries))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    RankstreamServer(make_settings(entries, server={"tokenizer_parallel": True}))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    RankstreamServer(make_settings(entries))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    RankstreamServer(make_settings(entries, server={"tokenizer_parallel": False}))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
