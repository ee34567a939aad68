"""Every reranker family people deploy is served with `kind: cross` and `weights:` alone and scores
as sentence-transformers' CrossEncoder.predict does (fp32, CPU, within 1e-5); what cannot be
honoured is refused at load with the reason and the config key that fixes it (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder

from rankstream.v1 import rankstream_pb2 as pb
from rankstream_server.config import ModelConfig
from rankstream_server.errors import ModelLoadError
from rankstream_server.inference.backend import CrossEncoderBackend
from rankstream_server.inference.model_loading import load_model

import family_factory
from conftest import make_settings, passages, running

TOLERANCE = 1e-5
QUERY = "what is the capital of china and how does gravity pull a planet to the sun"
# Mixed lengths, the longest past the tiny ModernBERT's 16-token local window many times over.
TEXTS = [
    "beijing is the capital of china",
    "gravity is a force that pulls a planet to the sun " * 6,
    "the weather is lovely and sunny in paris france",
    "no",
    "a cross encoder reads the query and the passage together and the rerankers score candidates " * 3,
    "dense and sparse retrieval of relevant passages for a web search query",
]
INSTRUCTION = "Given a question, retrieve passages that answer it"


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    dirs = {
        "xlm-roberta": family_factory.tiny_xlm_roberta(root / "xlmr"),
        "electra": family_factory.tiny_electra(root / "electra"),
        "modernbert-cls": family_factory.tiny_modernbert(root / "mb-cls", "cls"),
        "modernbert-mean": family_factory.tiny_modernbert(root / "mb-mean", "mean"),
        "qwen3-seq-cls": family_factory.tiny_qwen3_seq_cls(root / "q3", chat_template=False),
        "qwen3-seq-cls-template": family_factory.tiny_qwen3_seq_cls(root / "q3t", chat_template=True),
        "qwen2-seq-cls": family_factory.tiny_qwen2_seq_cls(root / "q2"),
        "qwen3-yes-no": family_factory.tiny_qwen3_yes_no(root / "yn"),
    }
    # A template that transforms its content (trims it) cannot be split once and filled in: its
    # pairs are rendered one by one, and must still match.
    trimmed = family_factory.tiny_qwen3_yes_no(root / "yn-trim")
    family_factory.qwen_tokenizer(trimmed, family_factory.RERANKER_TEMPLATE.replace("{{ ns.document }}", "{{ ns.document | trim }}"))
    dirs["qwen3-yes-no-trimming-template"] = trimmed
    dirs["st6-identity"] = family_factory.saved_by_sentence_transformers(models.bert, root / "st-identity", torch.nn.Identity())
    dirs["st6-yes-no-prompt"] = family_factory.saved_by_sentence_transformers(
        dirs["qwen3-yes-no"], root / "yn-st", prompts={"web": INSTRUCTION}, default_prompt="web")
    dirs["st6-bert-prompt"] = family_factory.saved_by_sentence_transformers(
        models.bert, root / "bert-st", prompts={"q": "query: "}, default_prompt="q")
    return dirs


@pytest.fixture(scope="module")
async def family_server(family_dirs, models):
    # float32 pinned: scores are checked against CrossEncoder.predict's float32 to 1e-5 on any
    # machine (dtype auto is chosen by measurement, issue 19; tests/test_precision.py).
    entries = [{"name": name, "weights": str(folder), "dtype": "float32"} for name, folder in family_dirs.items()]
    entries.append({"name": "tiny-deberta", "weights": str(models.deberta_reference), "dtype": "float32"})
    entries.append({"name": "tiny-distilbert", "weights": str(models.distilbert), "dtype": "float32"})
    settings = make_settings(entries, limits={"max_passages": 64, "max_passage_chars": 20000})
    async with running(settings) as harness:
        yield harness


def reference(folder: Path, texts: list[str], raw: bool, prompt: str | None = None) -> np.ndarray:
    model = CrossEncoder(str(folder), device="cpu")
    kwargs = {"activation_fn": torch.nn.Identity()} if raw else {}
    if prompt is not None:
        kwargs["prompt"] = prompt
    return np.asarray(model.predict([(QUERY, text) for text in texts], batch_size=4, **kwargs), dtype=np.float32)


def by_index(results, count: int) -> np.ndarray:
    got = np.full(count, np.nan, dtype=np.float32)
    for result in results:
        got[result.index] = result.score
    return got


FAMILIES = ["xlm-roberta", "electra", "modernbert-cls", "modernbert-mean", "qwen3-seq-cls", "qwen3-seq-cls-template",
            "qwen2-seq-cls", "qwen3-yes-no", "qwen3-yes-no-trimming-template", "st6-identity", "st6-yes-no-prompt", "st6-bert-prompt"]


@pytest.mark.parametrize("raw", [False, True], ids=["activated", "raw"])
@pytest.mark.parametrize("name", FAMILIES)
async def test_each_family_scores_as_sentence_transformers(family_server, family_dirs, name, raw):
    expected = reference(family_dirs[name], TEXTS, raw)
    results, stats = await family_server.rerank(query=QUERY, passages=passages(TEXTS), model=name, raw_scores=raw)
    np.testing.assert_allclose(by_index(results, len(TEXTS)), expected, rtol=0, atol=TOLERANCE)
    assert stats.truncated == 0


def test_a_template_that_transforms_content_is_rendered_pair_by_pair(family_dirs):
    def template(name: str):
        return load_model(ModelConfig(name=name, weights=str(family_dirs[name]), device="cpu")).pair_template

    assert template("qwen3-yes-no").split
    assert not template("qwen3-yes-no-trimming-template").split


async def test_identity_saved_by_sentence_transformers_6_is_not_sigmoided(family_server):
    info = await family_server.model_info("st6-identity")
    assert info.activation == "none"


@pytest.mark.parametrize("name", ["qwen3-yes-no", "qwen3-seq-cls-template", "st6-bert-prompt"])
async def test_an_instruction_scores_as_the_prompt_does(family_server, family_dirs, name):
    expected = reference(family_dirs[name], TEXTS, raw=True, prompt=INSTRUCTION)
    results, _ = await family_server.rerank(query=QUERY, passages=passages(TEXTS), model=name, raw_scores=True,
                                            instruction=INSTRUCTION)
    np.testing.assert_allclose(by_index(results, len(TEXTS)), expected, rtol=0, atol=TOLERANCE)
    default, _ = await family_server.rerank(query=QUERY, passages=passages(TEXTS), model=name, raw_scores=True)
    assert not np.allclose(by_index(default, len(TEXTS)), expected, atol=1e-6), "the instruction changed nothing"


@pytest.mark.parametrize("name", ["electra", "qwen3-seq-cls", "tiny-distilbert"])
async def test_an_instruction_to_a_model_that_takes_none_is_refused(family_server, name):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await family_server.rerank(query=QUERY, passages=passages(TEXTS[:1]), model=name, instruction=INSTRUCTION)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "instruction" in error.value.details() and name in error.value.details()


async def test_list_models_describes_each_family(family_server):
    yes_no = await family_server.model_info("qwen3-yes-no")
    assert yes_no.architecture == "Qwen3ForCausalLM"
    assert yes_no.head.startswith("answer-token logits")
    assert (yes_no.pooling, yes_no.padding_side, yes_no.template) == ("last_token", "left", "chat template")
    assert yes_no.accepts_instruction and yes_no.activation == "sigmoid"
    prompted = await family_server.model_info("st6-yes-no-prompt")
    assert prompted.default_instruction == INSTRUCTION
    modernbert = await family_server.model_info("modernbert-cls")
    assert (modernbert.architecture, modernbert.head, modernbert.pooling) == ("ModernBertForSequenceClassification", "classifier", "cls")
    assert (await family_server.model_info("modernbert-mean")).pooling == "mean"
    seq_cls = await family_server.model_info("qwen3-seq-cls")
    assert (seq_cls.pooling, seq_cls.template, seq_cls.accepts_instruction) == ("last_token", "tokenizer pair template", False)
    assert (seq_cls.dtype, seq_cls.device, seq_cls.max_length) == ("float32", "cpu", 512)


async def test_a_long_passage_keeps_the_template_suffix_and_matches_sentence_transformers(family_server, family_dirs):
    """Past max_length the document is cut, never the template: the answer is read after its suffix."""
    long_text = "gravity is a force that pulls a planet to the sun " * 80  # ~800 tokens > 512
    expected = reference(family_dirs["qwen3-yes-no"], [long_text, TEXTS[0]], raw=True)
    results, stats = await family_server.rerank(query=QUERY, passages=passages([long_text, TEXTS[0]]),
                                                model="qwen3-yes-no", raw_scores=True)
    assert stats.truncated == 1
    np.testing.assert_allclose(by_index(results, 2), expected, rtol=0, atol=TOLERANCE)


# -- the 4D-mask shortcut is proven per model -------------------------------------------------


def test_the_4d_mask_check_rejects_models_it_would_change(family_dirs, models):
    """ModernBERT's sliding window and a decoder's causal mask are lost with a ready 4D mask: the
    check (varied tokens and lengths, longer than the window) must refuse the shortcut for them, and
    keep it for BERT, where it is exact."""
    def backend(folder: Path) -> CrossEncoderBackend:
        return CrossEncoderBackend(load_model(ModelConfig(name="m", weights=str(folder), device="cpu")))

    assert backend(models.bert)._mask_4d
    for name in ("modernbert-cls", "qwen3-seq-cls"):
        probe = backend(family_dirs[name])
        assert not probe._mask_4d
        # And the check can fail for a reason: forcing the shortcut changes this model's scores.
        batch = probe.mask_probe()
        plain = probe.launch(batch).result()
        probe._mask_4d = True
        assert np.abs(probe.launch(batch).result() - plain).max() > 1e-4


# -- refusals ----------------------------------------------------------------------------------


def _refusal(folder: Path, **config) -> str:
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelConfig(name="refused", weights=str(folder), device="cpu", **config))
    return str(error.value)


def test_several_labels_with_no_label_chosen_are_refused_and_a_label_serves(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rankstream_server.inference.embedded import embedded_model_path

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        num_labels=3, id2label={0: "contradiction", 1: "entailment", 2: "neutral"},
                        label2id={"contradiction": 0, "entailment": 1, "neutral": 2})
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(tmp_path)
    message = _refusal(tmp_path)
    assert "refused" in message and "3 labels" in message and "label:" in message
    loaded = load_model(ModelConfig(name="nli", weights=str(tmp_path), device="cpu", label="entailment"))
    assert loaded.family.head.label == 1 and loaded.activation == "none"


def test_remote_code_and_unknown_heads_are_refused(tmp_path, models):
    remote = tmp_path / "remote"
    remote.mkdir()
    for file in Path(models.bert).iterdir():
        (remote / file.name).write_bytes(file.read_bytes())
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForSequenceClassification": "x.Y"}}))
    assert "remote code" in _refusal(remote)

    dense = tmp_path / "dense"
    dense.mkdir()
    for file in Path(models.bert).iterdir():
        (dense / file.name).write_bytes(file.read_bytes())
    (dense / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.base.modules.dense.Dense"}]))
    message = _refusal(dense)
    assert "Dense" in message and "scoring head" in message


def test_a_chat_template_without_pair_roles_is_refused(tmp_path):
    chat_only = ("{% for m in messages %}{% if m.role in ['system', 'user', 'assistant'] %}"
                 "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}")
    folder = family_factory.tiny_qwen3_seq_cls(tmp_path / "chat", chat_template=False)
    family_factory.qwen_tokenizer(folder, chat_only)
    message = _refusal(folder)
    assert "query" in message and "chat_template: none" in message
    served = load_model(ModelConfig(name="plain", weights=str(folder), device="cpu", chat_template="none"))
    assert served.family.chat_template is None


def test_a_causal_lm_without_answer_tokens_is_refused(tmp_path):
    folder = family_factory.tiny_qwen3_yes_no(tmp_path / "yn")
    message = _refusal(folder, answer_tokens=["definitely-not-a-token"])
    assert "answer_tokens" in message


# -- long passages: CHUNK scores windows and keeps the best ----------------------------------

CHUNK_QUERY = "how does gravity hold a planet in its orbit"
SENTENCES = ["gravity bends the path of a planet around its star", "the recipe needs two eggs and flour",
             "stock prices fell sharply on monday", "orbits are ellipses with the sun at one focus",
             "a planet stays in orbit because gravity pulls it inward", "football fans filled the stadium"]


@pytest.fixture(scope="module")
async def short_window_server(models):
    settings = make_settings([{"name": "minilm-32", "weights": str(models.minilm), "max_length": 32, "dtype": "float32"}])
    async with running(settings) as harness:
        yield harness


async def test_chunk_finds_what_the_model_ranks_best_past_max_length_where_truncate_misses(short_window_server, models):
    """The sentence this model scores highest, placed past max_length behind the one it scores
    lowest: TRUNCATE never sees it; CHUNK scores every window and keeps the best, which equals
    CrossEncoder.predict on that window's text."""
    reference = CrossEncoder(str(models.minilm), device="cpu", max_length=32)
    identity = torch.nn.Identity()
    alone = reference.predict([(CHUNK_QUERY, s) for s in SENTENCES], activation_fn=identity)
    best, worst = SENTENCES[int(np.argmax(alone))], SENTENCES[int(np.argmin(alone))]
    long_text = " ".join([worst] * 4 + [best, worst])
    tokenizer = reference.tokenizer
    query_tokens = len(tokenizer(CHUNK_QUERY, add_special_tokens=False)["input_ids"])
    passage_tokens = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    room = 32 - 3 - query_tokens
    assert len(passage_tokens) > room and passage_tokens.index(tokenizer(best, add_special_tokens=False)["input_ids"][0]) >= room
    from rankstream_server.inference.tokenization import windows

    parts, lost = windows(passage_tokens, room, 16)
    window_scores = reference.predict([(CHUNK_QUERY, tokenizer.decode(part)) for part in parts], activation_fn=identity)
    truncated_score = reference.predict([(CHUNK_QUERY, long_text)], activation_fn=identity)[0]

    truncate, truncate_stats = await short_window_server.rerank(
        query=CHUNK_QUERY, passages=passages([long_text]), raw_scores=True)
    chunk, chunk_stats = await short_window_server.rerank(
        query=CHUNK_QUERY, passages=passages([long_text]), raw_scores=True, long_passages=pb.CHUNK)
    assert abs(truncate[0].score - truncated_score) <= TOLERANCE and truncate_stats.truncated == 1
    assert not lost and len(parts) > 1
    assert abs(chunk[0].score - float(np.max(window_scores))) <= TOLERANCE
    assert chunk[0].score > truncate[0].score + 1e-3
    assert (chunk_stats.chunked, chunk_stats.windows, chunk_stats.truncated) == (1, len(parts), 0)


async def test_chunk_leaves_short_passages_alone_and_streams_each_passage_once(short_window_server):
    texts = [SENTENCES[0], " ".join(SENTENCES * 3), SENTENCES[2]]
    truncate, _ = await short_window_server.rerank(query=CHUNK_QUERY, passages=passages(texts), raw_scores=True)
    chunk, stats = await short_window_server.rerank(query=CHUNK_QUERY, passages=passages(texts), raw_scores=True,
                                                    long_passages=pb.CHUNK, order=pb.AS_SCORED)
    assert sorted(r.index for r in chunk) == [0, 1, 2]
    plain, chunked = by_index(truncate, 3), by_index(chunk, 3)
    np.testing.assert_allclose(chunked[[0, 2]], plain[[0, 2]], rtol=0, atol=TOLERANCE)
    assert chunked[1] >= plain[1] - TOLERANCE  # the first window is the truncated passage
    assert stats.chunked == 1
    capped, capped_stats = await short_window_server.rerank(query=CHUNK_QUERY, passages=passages(texts), raw_scores=True,
                                                            long_passages=pb.CHUNK, max_chunks_per_passage=1)
    np.testing.assert_allclose(by_index(capped, 3), plain, rtol=0, atol=TOLERANCE)
    assert (capped_stats.chunked, capped_stats.truncated) == (0, 1)


@pytest.mark.parametrize("fields, needle", [
    ({"max_chunks_per_passage": 99, "long_passages": pb.CHUNK}, "max_chunks_per_passage"),
    ({"max_chunks_per_passage": 2}, "max_chunks_per_passage: set only with long_passages: CHUNK"),
    ({"max_chunks_per_passage": 2, "long_passages": pb.REFUSE}, "max_chunks_per_passage: set only with long_passages: CHUNK"),
    ({"max_passage_tokens": 8, "long_passages": pb.REFUSE}, "max_passage_tokens: not with long_passages: REFUSE"),
    ({"long_passages": 7}, "long_passages: unknown value 7"),
])
async def test_bad_chunk_settings_are_refused_naming_the_field(short_window_server, fields, needle):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await short_window_server.rerank(query=CHUNK_QUERY, passages=passages(SENTENCES), **fields)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in error.value.details()


async def test_refuse_fails_a_long_passage_before_anything_is_scored(short_window_server, models):
    """long_passages REFUSE: a passage past max_length fails the call, naming the passage, its
    tokens with the query (as Hugging Face counts them) and the limit, and the model's batcher runs
    nothing for it; passages that fit score as with TRUNCATE."""
    from transformers import AutoTokenizer

    long_text = " ".join(SENTENCES * 2)
    tokens = len(AutoTokenizer.from_pretrained(str(models.minilm))(CHUNK_QUERY, long_text)["input_ids"])
    before = (await short_window_server.model_info("minilm-32")).batcher
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await short_window_server.rerank(query=CHUNK_QUERY, passages=passages([SENTENCES[0], long_text]),
                                         long_passages=pb.REFUSE)
    after = (await short_window_server.model_info("minilm-32")).batcher
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == (f"passages[1]: {tokens} tokens with the query, longer than model 'minilm-32' "
                                     "takes (max_length=32); long_passages=REFUSE")
    assert (after.batches, after.items, after.tokens, after.in_flight) == (before.batches, before.items, before.tokens, 0)
    refused, stats = await short_window_server.rerank(query=CHUNK_QUERY, passages=passages(SENTENCES[:3]),
                                                      raw_scores=True, long_passages=pb.REFUSE)
    truncated, _ = await short_window_server.rerank(query=CHUNK_QUERY, passages=passages(SENTENCES[:3]), raw_scores=True)
    np.testing.assert_allclose(by_index(refused, 3), by_index(truncated, 3), rtol=0, atol=TOLERANCE)
    assert stats.truncated == 0 and stats.scored == 3


@pytest.mark.parametrize("name", ["qwen3-yes-no", "electra"])
async def test_refuse_counts_the_whole_pair_in_each_family(family_server, name):
    """A chat-template reranker counts the template around the document too."""
    max_length = (await family_server.model_info(name)).max_length
    long_text = " ".join(["planet"] * 2 * max_length)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await family_server.rerank(query=QUERY, passages=passages([TEXTS[0], long_text]), model=name,
                                   long_passages=pb.REFUSE)
    field, count, *_ = error.value.details().split()
    assert field == "passages[1]:" and int(count) > 2 * max_length
    assert error.value.details().endswith(f"(max_length={max_length}); long_passages=REFUSE")
    _, stats = await family_server.rerank(query=QUERY, passages=passages(TEXTS[:1]), model=name, long_passages=pb.REFUSE)
    assert stats.scored == 1


def test_retrieve_and_rerank_takes_the_same_pair_options(demo_server):
    """The clients pass instruction and long_passages through RetrieveAndRerank; the rules are the
    same as Rerank's (a model that takes no instruction refuses one)."""
    from rankstream import RankstreamClient
    from rankstream.errors import InvalidArgument

    with RankstreamClient(demo_server.target) as client:
        plain = client.retrieve_and_rerank("what is a cross-encoder", top_k=5, top_n=5, reranker="tiny-bert")
        chunked = client.retrieve_and_rerank("what is a cross-encoder", top_k=5, top_n=5, reranker="tiny-bert",
                                             long_passages="chunk", max_chunks_per_passage=4)
        assert [p.id for p in plain] == [p.id for p in chunked]  # the demo passages fit: one window each
        assert chunked.stats.windows == 5 and chunked.stats.chunked == 0
        with pytest.raises(InvalidArgument, match="instruction"):
            client.retrieve_and_rerank("what is a cross-encoder", top_k=5, reranker="tiny-bert", instruction="Judge relevance")
        with pytest.raises(InvalidArgument, match="long_passages: REFUSE is for passages the caller sends"):
            client.retrieve_and_rerank("what is a cross-encoder", top_k=5, reranker="tiny-bert", long_passages="refuse")


def test_the_clients_and_langchain_pass_max_passage_tokens(demo_server):
    """max_passage_tokens reaches the server from the sync and asyncio clients and both LangChain
    wrappers: with CHUNK, 8-token windows make more windows than whole passages; with TRUNCATE the
    scores are those of the cut passages."""
    import asyncio

    from langchain_core.documents import Document

    from rankstream import AsyncRankstreamClient, RankstreamClient
    from rankstream.langchain import RankstreamRerank, RankstreamRetriever

    query, cross = "what is a cross-encoder", "minilm-cross"
    texts = [t for t in TEXTS if len(t) > 40]
    with RankstreamClient(demo_server.target) as client:
        whole = client.rerank(query, texts, model=cross, long_passages="chunk")
        windowed = client.rerank(query, texts, model=cross, long_passages="chunk", max_passage_tokens=8)
        assert whole.stats.windows == len(texts) and windowed.stats.windows > 2 * len(texts)
        retrieved = client.retrieve_and_rerank(query, top_k=5, top_n=5, reranker=cross, long_passages="chunk",
                                               max_passage_tokens=8)
        assert retrieved.stats.windows > 2 * 5
        cut = client.rerank(query, texts, model=cross, max_passage_tokens=8)
        assert cut.stats.truncated == len(texts)
        expected = {p.index: p.score for p in cut}
        uncut = {p.index: p.score for p in client.rerank(query, texts, model=cross)}
        assert max(abs(expected[i] - uncut[i]) for i in expected) > 1e-3, "the cut changed no score"
        cut_retrieved = {p.id: p.score for p in client.retrieve_and_rerank(query, top_k=5, top_n=5, reranker=cross,
                                                                           max_passage_tokens=8)}

    async def asynchronously():
        async with AsyncRankstreamClient(demo_server.target) as client:
            return await client.rerank(query, texts, model=cross, long_passages="chunk", max_passage_tokens=8)

    assert asyncio.run(asynchronously()).stats.windows == windowed.stats.windows
    documents = [Document(page_content=t, id=str(i)) for i, t in enumerate(texts)]
    compressed = RankstreamRerank(target=demo_server.target, model=cross, top_n=None,
                                  max_passage_tokens=8).compress_documents(documents, query)
    assert {int(d.id): d.metadata["relevance_score"] for d in compressed} == pytest.approx(expected, abs=1e-5)
    found = RankstreamRetriever(target=demo_server.target, k=5, candidates=5, reranker=cross,
                                max_passage_tokens=8).invoke(query)
    assert {d.id: d.metadata["relevance_score"] for d in found} == pytest.approx(cut_retrieved, abs=1e-5)


@pytest.mark.parametrize("name", ["qwen3-yes-no", "electra"])
async def test_max_passage_tokens_cuts_the_document_and_keeps_the_template(family_server, family_dirs, name):
    """Each passage keeps its first N tokens; the query and the template's suffix stay whole, so
    the result equals scoring the passage's first N tokens' text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(family_dirs[name]))
    heads = [tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"][:3]) for t in TEXTS]
    cut, stats = await family_server.rerank(query=QUERY, passages=passages(TEXTS), model=name, raw_scores=True,
                                            max_passage_tokens=3)
    whole, _ = await family_server.rerank(query=QUERY, passages=passages(heads), model=name, raw_scores=True)
    np.testing.assert_allclose(by_index(cut, len(TEXTS)), by_index(whole, len(TEXTS)), rtol=0, atol=TOLERANCE)
    assert stats.truncated == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) > 3 for t in TEXTS)
