"""The LangChain classes inside real LangChain objects, against a real server: the compressor,
the retriever, ContextualCompressionRetriever, and a whole LCEL RAG chain with a fake chat model."""

from __future__ import annotations

from functools import partial

import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from rankstream import RankstreamClient
from rankstream.langchain import RankstreamRerank, RankstreamRetriever
from rankstream_server.cli.demo import DEMO_CORPUS
from rankstream_server.index.build import build_index

from conftest import ThreadedServer, demo_settings

QUERY = "How do I keep a retrieval-augmented chatbot from citing irrelevant passages?"
DOCUMENTS = [
    Document(page_content="Simmer roasted bones with onion, carrot and celery.", metadata={"source": "food.md"}, id="food"),
    Document(page_content="Drop retrieved passages whose relevance score falls below a threshold.", metadata={"source": "rag.md", "page": 3}, id="rag"),
    Document(page_content="Planets shift against the background stars.", metadata={"source": "sky.md"}, id="sky"),
]


def check_compressed(result: list[Document]) -> None:
    assert [d.id for d in result] == ["rag", "food"]
    best = result[0]
    assert best.metadata == {"source": "rag.md", "page": 3, "relevance_score": best.metadata["relevance_score"], "rank": 1}
    assert best.metadata["relevance_score"] > result[1].metadata["relevance_score"]
    assert "relevance_score" not in DOCUMENTS[1].metadata, "the inputs are copied, not changed"


def test_compressor_reranks_copies_and_annotates(demo_server):
    compressor = RankstreamRerank(target=demo_server.target, model="minilm", top_n=2)
    check_compressed(list(compressor.compress_documents(DOCUMENTS, QUERY)))


async def test_compressor_native_async(demo_server):
    compressor = RankstreamRerank(target=demo_server.target, model="minilm", top_n=2)
    check_compressed(list(await compressor.acompress_documents(DOCUMENTS, QUERY)))


async def test_empty_input_makes_no_call():
    compressor = RankstreamRerank(target="127.0.0.1:1", top_n=2)  # nothing listens there
    assert compressor.compress_documents([], QUERY) == []
    assert await compressor.acompress_documents([], QUERY) == []


def test_threshold_and_all_documents(demo_server):
    everything = RankstreamRerank(target=demo_server.target, model="minilm", top_n=None).compress_documents(DOCUMENTS, QUERY)
    assert len(everything) == 3
    # Between the 2nd and 3rd score: dynamic batching may move a score by ~1e-7 between calls.
    cut = (everything[1].metadata["relevance_score"] + everything[2].metadata["relevance_score"]) / 2
    kept = RankstreamRerank(target=demo_server.target, model="minilm", top_n=None, score_threshold=cut).compress_documents(DOCUMENTS, QUERY)
    assert [d.id for d in kept] == [d.id for d in everything[:2]]


@pytest.mark.parametrize("reranker", [None, "minilm"])
def test_retriever_sync_and_async(demo_server, reranker):
    retriever = RankstreamRetriever(target=demo_server.target, top_k=5, reranker=reranker, top_n=3)
    documents = retriever.invoke(QUERY)
    assert documents[0].id == "rag-04" and documents[0].metadata["title"] == "Keeping weak context out"
    assert documents[0].metadata["stage"] == ("retrieve" if reranker is None else "rerank")
    assert len(documents) == (5 if reranker is None else 3)
    assert documents[0].page_content.startswith("Drop retrieved passages")


@pytest.fixture(scope="module")
def split_server(models, tmp_path_factory):
    """The demo server with 2 KB ScoredPassages messages: a result with texts spans several."""
    index_path = tmp_path_factory.mktemp("split") / "demo-index"
    settings = demo_settings(models, index_path, server={"max_message_bytes": 2048})
    build_index(settings, DEMO_CORPUS, index_path, model="minilm", progress=False)
    running = ThreadedServer(settings).start()
    yield running
    running.stop()


@pytest.mark.parametrize("reranker", [None, "minilm"])
async def test_retriever_joins_a_result_split_over_messages(demo_server, split_server, reranker):
    """Every document comes back, in rank order, as from a server that sends one message."""
    arguments = {"top_k": 30, "reranker": reranker, "top_n": 30}
    whole = RankstreamRetriever(target=demo_server.target, **arguments).invoke(QUERY)
    retriever = RankstreamRetriever(target=split_server.target, **arguments)
    with RankstreamClient(split_server.target) as client:  # the same call, seen by the client: split
        call = client.retrieve if reranker is None else partial(client.retrieve_and_rerank, reranker=reranker, top_n=30)
        assert call(QUERY, top_k=30).stats.messages > 1
    for documents in (retriever.invoke(QUERY), await retriever.ainvoke(QUERY)):
        assert [d.metadata["rank"] for d in documents] == list(range(1, 31))
        assert [d.id for d in documents] == [d.id for d in whole]
        assert [d.page_content for d in documents] == [d.page_content for d in whole]


async def test_retriever_native_async_with_filter(demo_server):
    retriever = RankstreamRetriever(target=demo_server.target, top_k=2, filter={"topic": "food"})
    documents = await retriever.ainvoke("what to do with leftover bones")
    assert [d.metadata["topic"] for d in documents] == ["food", "food"] and documents[0].id == "food-02"


def test_inside_contextual_compression_retriever(demo_server):
    pipeline = ContextualCompressionRetriever(
        base_compressor=RankstreamRerank(target=demo_server.target, model="minilm", top_n=2),
        base_retriever=RankstreamRetriever(target=demo_server.target, top_k=8),
    )
    documents = pipeline.invoke(QUERY)
    assert len(documents) == 2 and documents[0].id == "rag-04"
    assert documents[0].metadata["rank"] == 1 and "retrieval_score" in documents[0].metadata


async def test_a_whole_rag_chain(demo_server):
    """retriever -> compressor -> prompt -> chat model, in LCEL, sync and async."""
    retriever = ContextualCompressionRetriever(
        base_compressor=RankstreamRerank(target=demo_server.target, model="minilm", top_n=2),
        base_retriever=RankstreamRetriever(target=demo_server.target, top_k=6),
    )
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from this context only:\n{context}"), ("human", "{question}")]
    )
    seen: list[str] = []

    def spy(prompt_value):
        seen.append(prompt_value.to_string())
        return prompt_value

    chain = (
        {"context": retriever | (lambda docs: "\n".join(d.page_content for d in docs)), "question": RunnablePassthrough()}
        | prompt
        | RunnableLambda(spy)
        | FakeListChatModel(responses=["Filter weak passages by score."])
        | StrOutputParser()
    )
    assert chain.invoke(QUERY) == "Filter weak passages by score."
    assert await chain.ainvoke(QUERY) == "Filter weak passages by score."
    assert len(seen) == 2 and all("Drop retrieved passages whose relevance score" in text for text in seen)
    assert all(QUERY in text for text in seen)
