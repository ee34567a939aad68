"""LangChain's own standard test suite for retrievers (langchain-tests), against a live server.
langchain-tests has no standard suite for document compressors (checked: 1.1.9 ships
retriever, vector store, tool, chat model and embeddings suites), so RankstreamRerank is covered
by tests/test_langchain.py alone."""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import RetrieversIntegrationTests

from rankstream.langchain import RankstreamRetriever


class TestRankstreamRetrieverStandard(RetrieversIntegrationTests):
    target = ""

    @pytest.fixture(autouse=True)
    def _live_server(self, demo_server):
        type(self).target = demo_server.target

    @property
    def retriever_constructor(self) -> type[RankstreamRetriever]:
        return RankstreamRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"target": self.target, "mode": "hybrid"}

    @property
    def retriever_query_example(self) -> str:
        return "what should I do with leftover bones"
