"""LangChain integration (langchain-core 1.x): a document compressor over Rerank, a retriever
over Retrieve / RetrieveAndRerank and Embeddings over Embed, each with native async (grpc.aio,
no threads)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun, Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

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
    instruction: str = Field("", description="Task instruction for rerankers that take one (LLM rerankers).")
    long_passages: Literal["truncate", "chunk", "refuse"] = Field(
        "truncate", description="chunk: a long document is scored in windows and keeps its best window's score; "
                                "refuse: a document longer than the model takes fails the call.")
    max_chunks_per_passage: int = Field(0, ge=0, description="With chunk: windows per document; 0 = the server's limit.")
    max_passage_tokens: int = Field(0, ge=0, description="Cut each document (with chunk: each window) to this many "
                                    "tokens; 0 = as many as the model's max_length leaves.")

    def _request(self, documents: Sequence[Document], query: str) -> dict[str, Any]:
        return {
            "query": query,
            "passages": [Passage(text=d.page_content, id=str(i)) for i, d in enumerate(documents)],
            "top_n": self.top_n or 0,
            "model": self.model,
            "score_threshold": self.score_threshold,
            "instruction": self.instruction,
            "long_passages": self.long_passages,
            "max_chunks_per_passage": self.max_chunks_per_passage,
            "max_passage_tokens": self.max_passage_tokens,
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

    `k` documents come back (LangChain's convention: a constructor parameter, and a keyword of
    `invoke(query, k=...)`); `top_k` is accepted as another name for it. With a reranker,
    `candidates` passages are retrieved and the best `k` of them returned. `mode` picks dense,
    sparse (BM25) or hybrid retrieval; empty = the index's default.

    Each Document has the passage's id, text as page_content, its metadata (and title), plus
    `relevance_score`, `rank`, `stage` and `retrieval_score`, and in sparse or hybrid mode each
    side's `dense_score`/`dense_rank` and `sparse_score`/`sparse_rank` where that side found it.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: str = Field("", description="Index name; empty = the server's default.")
    k: int = Field(10, gt=0, description="Documents to return.")
    filter: dict[str, str] = Field(default_factory=dict, description="Exact-match metadata filter.")
    mode: Literal["", "dense", "sparse", "hybrid"] = Field("", description="Retrieval mode; empty = the index's default.")
    reranker: str | None = Field(None, description="Cross-encoder to rerank with, in the same call.")
    candidates: int = Field(50, gt=0, description="With a reranker: passages retrieved to rerank (at least k).")
    instruction: str = Field("", description="With a reranker that takes one: its task instruction.")
    max_passage_tokens: int = Field(0, ge=0, description="With a reranker: cut each passage to this many tokens; "
                                    "0 = as many as the model's max_length leaves.")

    @model_validator(mode="before")
    @classmethod
    def _earlier_names(cls, data: Any) -> Any:
        """`top_k` is another name for `k`. Before `k`, a reranking retriever took `top_k`
        candidates and returned `top_n`: those still mean that."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "top_n" in data:
            top_n = data.pop("top_n")
            if data.get("reranker") is None:
                top_n = None  # without a reranker, top_n never applied
            elif "top_k" in data:
                data.setdefault("candidates", data.pop("top_k"))
            if top_n is not None:
                data.setdefault("k", top_n)
        if "top_k" in data:
            data.setdefault("k", data.pop("top_k"))
        return data

    @property
    def top_k(self) -> int:
        return self.k

    def _call_arguments(self, k: int | None) -> dict[str, Any]:
        k = k or self.k
        arguments: dict[str, Any] = {"filter": self.filter, "index": self.index, "mode": self.mode}
        if self.reranker is None:
            arguments.update(top_k=k)
        else:
            arguments.update(top_k=max(k, self.candidates), top_n=k, reranker=self.reranker, instruction=self.instruction,
                             max_passage_tokens=self.max_passage_tokens)
        return arguments

    @staticmethod
    def _document(scored: ScoredPassage) -> Document:
        metadata: dict[str, Any] = dict(scored.metadata)
        if scored.title is not None:
            metadata["title"] = scored.title
        metadata.update(
            relevance_score=scored.score, rank=scored.rank, stage=scored.stage, retrieval_score=scored.retrieval_score
        )
        for side in ("dense", "sparse"):
            if getattr(scored, f"{side}_rank"):
                metadata[f"{side}_score"] = getattr(scored, f"{side}_score")
                metadata[f"{side}_rank"] = getattr(scored, f"{side}_rank")
        return Document(page_content=scored.text, metadata=metadata, id=scored.id)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None) -> list[Document]:
        client = self._connected().sync
        call = client.retrieve if self.reranker is None else client.retrieve_and_rerank
        return [self._document(s) for s in call(query, **self._call_arguments(k))]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        client = self._connected().aio
        call = client.retrieve if self.reranker is None else client.retrieve_and_rerank
        return [self._document(s) for s in await call(query, **self._call_arguments(k))]


class RankstreamEmbeddings(_RankstreamConnection, Embeddings):
    """LangChain Embeddings over a rankstream bi-encoder (the Embed RPC): documents are embedded
    as passages, queries as queries (models with query/passage prefixes treat them differently).

    Example:
        embeddings = RankstreamEmbeddings(target="localhost:50051", model="tas-b")
        vectors = embeddings.embed_documents(["first text", "second text"])
    """

    model: str = Field("", description="Bi-encoder name or alias; empty = the server's default embedder.")
    normalize: bool = Field(False, description="Scale vectors to unit length (cosine models already are).")
    batch_size: int = Field(256, gt=0, description="Texts per call (each call at most the server's max_passages).")

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def _batches(self, texts: list[str]) -> list[list[str]]:
        return [texts[start:start + self.batch_size] for start in range(0, len(texts), self.batch_size)]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        client = self._connected().sync
        return [vector for batch in self._batches(list(texts))
                for vector in client.embed(batch, model=self.model, input_type="passage", normalize=self.normalize).vectors]

    def embed_query(self, text: str) -> list[float]:
        return self._connected().sync.embed([text], model=self.model, input_type="query", normalize=self.normalize).vectors[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        client = self._connected().aio
        vectors: list[list[float]] = []
        for batch in self._batches(list(texts)):
            vectors.extend((await client.embed(batch, model=self.model, input_type="passage", normalize=self.normalize)).vectors)
        return vectors

    async def aembed_query(self, text: str) -> list[float]:
        answer = await self._connected().aio.embed([text], model=self.model, input_type="query", normalize=self.normalize)
        return answer.vectors[0]
