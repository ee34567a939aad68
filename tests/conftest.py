"""Shared fixtures: models built by the tests, and real servers on 127.0.0.1 called over gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from rankstream import STATS_TRAILER
from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc
from rankstream_server.cli.demo import DEMO_CORPUS
from rankstream_server.config import Settings
from rankstream_server.index.build import build_index
from rankstream_server.serving.app import RankstreamServer

import model_factory


@dataclass(frozen=True)
class ModelDirs:
    bert: Path
    distilbert: Path
    deberta: Path  # weights only
    deberta_tokenizer: Path
    deberta_reference: Path  # weights + tokenizer in one folder, for sentence-transformers
    minilm: Path


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> ModelDirs:
    root = tmp_path_factory.mktemp("models")
    deberta = model_factory.tiny_deberta_v2(root / "tiny-deberta")
    deberta_tokenizer = model_factory.bert_tokenizer(root / "deberta-tokenizer")
    return ModelDirs(
        bert=model_factory.tiny_bert(root / "tiny-bert"),
        distilbert=model_factory.tiny_distilbert(root / "tiny-distilbert"),
        deberta=deberta,
        deberta_tokenizer=deberta_tokenizer,
        deberta_reference=model_factory.with_tokenizer(deberta, deberta_tokenizer, root / "tiny-deberta-ref"),
        minilm=model_factory.minilm_cross(root / "minilm-cross"),
    )


def model_entries(models: ModelDirs) -> list[dict]:
    # float32 pinned: these models' scores are checked against sentence-transformers' float32 to
    # 1e-5 on any machine; dtype auto (chosen by measurement, issue 19) has its own tests.
    return [
        {"name": "tiny-bert", "weights": str(models.bert), "dtype": "float32"},
        {"name": "tiny-distilbert", "weights": str(models.distilbert), "dtype": "float32"},
        {"name": "tiny-deberta", "weights": str(models.deberta), "tokenizer": str(models.deberta_tokenizer),
         "dtype": "float32"},
        {"name": "minilm", "weights": str(models.minilm), "dtype": "float32"},
    ]


def make_settings(models: list[dict], **sections) -> Settings:
    server = {"host": "127.0.0.1", "port": 0, **sections.pop("server", {})}
    return Settings(models=models, server=server, **sections)


@dataclass
class Harness:
    """A running server and aio stubs to call it."""

    server: RankstreamServer
    channel: grpc.aio.Channel
    reranker: pb_grpc.RerankerStub
    info: pb_grpc.InfoStub

    async def rerank(self, timeout: float | None = 60, **fields) -> tuple[list[pb.ScoredPassage], pb.RerankStats]:
        call = self.reranker.Rerank(pb.RerankRequest(**fields), timeout=timeout)
        passages = [passage async for message in call for passage in message.passages]
        return passages, stats_of(await call.trailing_metadata())

    async def model_info(self, name: str) -> pb.ModelInfo:
        response = await self.info.ListModels(pb.ListModelsRequest())
        return next(m for m in response.models if m.name == name)


def stats_of(trailing: grpc.aio.Metadata) -> pb.RerankStats:
    return pb.RerankStats.FromString(dict(trailing)[STATS_TRAILER])


@contextlib.asynccontextmanager
async def running(settings: Settings, load: bool = True) -> AsyncIterator[Harness]:
    server = RankstreamServer(settings)
    port = await server.start()
    if load:
        await server.load_models()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Harness(server, channel, pb_grpc.RerankerStub(channel), pb_grpc.InfoStub(channel))
    finally:
        await channel.close()
        await server.stop()


@pytest_asyncio.fixture(scope="session")
async def served(models: ModelDirs) -> AsyncIterator[Harness]:
    """One server with every test model, default limits and batching."""
    settings = make_settings(
        model_entries(models),
        limits={"max_passages": 64, "max_query_chars": 1000, "max_passage_chars": 5000},
        default_model="tiny-bert",
    )
    async with running(settings) as harness:
        yield harness


class ThreadedServer:
    """A RankstreamServer on a background thread with its own event loop."""

    def __init__(self, settings, load: bool = True):
        self._settings = settings
        self._load = load
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self.server: RankstreamServer | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> ThreadedServer:
        self._thread.start()

        async def create_and_start() -> int:  # grpc.aio objects belong to the loop they are made in
            self.server = RankstreamServer(self._settings)
            return await self.server.start()

        self.port = asyncio.run_coroutine_threadsafe(create_and_start(), self._loop).result(60)
        if self._load:
            self.load()
        return self

    def load(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.load_models(), self._loop).result(300)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def demo_settings(models, index_path: Path, **extra) -> Settings:
    return make_settings(
        [
            {"name": "minilm", "kind": "bi", "weights": "embedded:all-MiniLM-L6-v2"},
            {"name": "minilm-cross", "weights": str(models.minilm)},
            {"name": "tiny-bert", "weights": str(models.bert)},
        ],
        indexes=[{"name": "demo", "path": str(index_path), "model": "minilm"}],
        default_model="tiny-bert",
        **extra,
    )


@pytest.fixture(scope="session")
def demo_server(models, tmp_path_factory):
    """Bi- and cross-encoders and an index of the shipped demo corpus, served from a thread:
    for blocking clients (sync client, LangChain, Node) that must not block the test loop."""
    index_path = tmp_path_factory.mktemp("demo") / "demo-index"
    settings = demo_settings(models, index_path)
    build_index(settings, DEMO_CORPUS, index_path, model="minilm", progress=False)
    running = ThreadedServer(settings).start()
    yield running
    running.stop()


def passages(texts: list[str], **extra) -> list[pb.Passage]:
    return [pb.Passage(id=f"p{i}", text=text, **extra) for i, text in enumerate(texts)]


QUERY = "how do cross-encoders score a passage for a query"
TEXTS = [
    "A cross-encoder reads the query and the passage together and outputs one relevance score.",
    "Bi-encoders embed queries and passages separately, which makes them fast for retrieval.",
    "Paris is the capital of France.",
    "Dense retrieval with FAISS finds nearest neighbours of a query embedding among passage embeddings.",
    "The weather tomorrow will be sunny with a light breeze from the west.",
    "Rerankers re-order the candidates a first-stage retriever returns, trading speed for quality.",
    "short",
    "MS MARCO is a large collection of real web search queries with passages judged relevant.",
    " ".join(["A very long passage that has to be truncated to fit the model's maximum length."] * 60),
]
