"""LangChain integration (langchain-core 1.x): a document compressor over Rerank and a
retriever over Retrieve / RetrieveAndRerank, each with native async (grpc.aio, no threads)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun, Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.retrievers import BaseRetriever
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from .aio import AsyncRankstreamClient
from .client import RankstreamClient
from .types import Passage, ScoredPassage


class _Connected:
    """Lazily opened sync and asyncio clients for one target (an asyncio client per event loop)."""

    def __init__(self, options: dict[str, Any]):
        self._options = options
        self._sync: RankstreamClient | None = None
        self._async: tuple[asyncio.AbstractEventLoop, AsyncRankstreamClient] | None = None

    @property
    def sync(self) -> RankstreamClient:
        if self._sync is None:
            self._sync = RankstreamClient(**self._options)
        return self._sync

    @property
    def aio(self) -> AsyncRankstreamClient:
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            self._async = (loop, AsyncRankstreamClient(**self._options))
        return self._async[1]


class _RankstreamConnection(BaseModel):
    """Connection fields shared by the compressor and the retriever."""

    target: str = Field("localhost:50051", description="host:port, or dns:///service:port for a headless Service.")
    timeout: float | None = 30.0
    tls: bool = False
    token: str | None = Field(None, description="Bearer token; default: the RANKSTREAM_TOKEN environment variable.",
                              repr=False)
    root_certificates: bytes | None = Field(None, description="PEM roots for tls; default: the system's.")
    certificate_chain: bytes | None = Field(None, description="PEM client certificate (mTLS).")
    private_key: bytes | None = Field(None, description="PEM client key (mTLS).", repr=False)

    _clients: _Connected | None = PrivateAttr(None)

    def _connected(self) -> _Connected:
        if self._clients is None:
            self._clients = _Connected(self._connection_options())
        return self._clients

    def _connection_options(self) -> dict[str, Any]:
        return {
            "target": self.target, "timeout": self.timeout, "tls": self.tls, "token": self.token,
            "root_certificates": self.root_certificates, "certificate_chain": self.certificate_chain,
            "private_key": self.private_key,
        }


class RankstreamRerank(_RankstreamConnection, BaseDocumentCompressor):
    """Reranks documents with a rankstream cross-encoder.

    Returns copies of the best `top_n` documents, best first, with `metadata["relevance_score"]`
    and `metadata["rank"]` set; ids and the rest of the metadata are kept.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str = Field("", description="Cross-encoder name; empty = the server's default.")
    top_n: int | None = Field(3, description="How many documents to keep; None = all.")
    score_threshold: float | None = None

    def _request(self, documents: Sequence[Document], query: str) -> dict[str, Any]:
        return {
            "query": query,
            "passages": [Passage(text=d.page_content, id=str(i)) for i, d in enumerate(documents)],
            "top_n": self.top_n or 0,
            "model": self.model,
            "score_threshold": self.score_threshold,
        }

    @staticmethod
    def _annotated(documents: Sequence[Document], ranking) -> list[Document]:
        kept = []
        for scored in ranking:
            original = documents[scored.index]
            metadata = {**original.metadata, "relevance_score": scored.score, "rank": scored.rank}
            kept.append(Document(page_content=original.page_content, metadata=metadata, id=original.id))
        return kept

    def compress_documents(self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None) -> Sequence[Document]:
        if not documents:
            return []
        return self._annotated(documents, self._connected().sync.rerank(**self._request(documents, query)))

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        if not documents:
            return []
        return self._annotated(documents, await self._connected().aio.rerank(**self._request(documents, query)))


class RankstreamRetriever(_RankstreamConnection, BaseRetriever):
    """Documents from a rankstream index: Retrieve, or RetrieveAndRerank when `reranker` is set.

    Each Document has the passage's id, text as page_content, its metadata (and title), plus
    `relevance_score`, `rank`, `stage` and `retrieval_score`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: str = Field("", description="Index name; empty = the server's default.")
    top_k: int = Field(10, description="Passages to retrieve (candidates, when reranking).")
    filter: dict[str, str] = Field(default_factory=dict, description="Exact-match metadata filter.")
    reranker: str | None = Field(None, description="Cross-encoder to rerank with, in the same call.")
    top_n: int = Field(5, description="Passages to return after reranking.")

    def _call_arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {"top_k": self.top_k, "filter": self.filter, "index": self.index}
        if self.reranker is not None:
            arguments.update(top_n=self.top_n, reranker=self.reranker)
        return arguments

    @staticmethod
    def _document(scored: ScoredPassage) -> Document:
        metadata: dict[str, Any] = dict(scored.metadata)
        if scored.title is not None:
            metadata["title"] = scored.title
        metadata.update(
            relevance_score=scored.score, rank=scored.rank, stage=scored.stage, retrieval_score=scored.retrieval_score
        )
        return Document(page_content=scored.text, metadata=metadata, id=scored.id)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        client = self._connected().sync
        call = client.retrieve if self.reranker is None else client.retrieve_and_rerank
        return [self._document(s) for s in call(query, **self._call_arguments())]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        client = self._connected().aio
        call = client.retrieve if self.reranker is None else client.retrieve_and_rerank
        return [self._document(s) for s in await call(query, **self._call_arguments())]
