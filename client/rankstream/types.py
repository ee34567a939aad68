"""Typed values the client takes and returns (plain dataclasses, no protobuf in user code)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Union

from rankstream.v1 import rankstream_pb2 as pb


@dataclass(frozen=True)
class Passage:
    text: str
    id: str = ""
    title: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


PassageLike = Union[str, Passage, Mapping]


@dataclass(frozen=True)
class ScoredPassage:
    id: str
    index: int  # position in the request (Rerank) or in the candidate list (Retriever)
    score: float
    rank: int  # 1-based in RANKED order; 0 when streamed AS_SCORED
    stage: str  # "rerank" or "retrieve"
    retrieval_score: float = 0.0
    text: str = ""
    title: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Retrieved passages: each side's score and 1-based rank (None / 0 where it did not find it).
    dense_score: float | None = None
    sparse_score: float | None = None
    dense_rank: int = 0
    sparse_rank: int = 0


@dataclass(frozen=True)
class Stats:
    """Timings and counts the server reports for one call."""

    model: str = ""
    passages: int = 0
    scored: int = 0
    returned: int = 0
    truncated: int = 0
    tokenize_ms: float = 0.0
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    retrieve_ms: float = 0.0
    total_ms: float = 0.0
    batches: int = 0  # micro-batches that carried this call's passages
    candidates: int = 0  # what the retrieval stage produced
    max_batch_size: int = 0  # largest micro-batch (all requests together) that carried this call
    shared_batches: int = 0  # micro-batches shared with other requests
    messages: int = 0  # ScoredPassages messages the server sent
    tokens: int = 0  # real tokens (no padding) run through the model
    chunked: int = 0  # passages scored in more than one window (long_passages="chunk")
    windows: int = 0  # (query, passage window) pairs scored


@dataclass(frozen=True)
class Ranking:
    """Scored passages, best first, and the call's stats."""

    passages: list[ScoredPassage]
    stats: Stats

    def __iter__(self):
        return iter(self.passages)

    def __len__(self) -> int:
        return len(self.passages)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str  # "cross" | "bi"
    weights: str
    max_length: int
    dtype: str
    device: str
    activation: str
    pooling: str
    similarity: str
    aliases: tuple[str, ...] = ()  # other names requests may use
    dimension: int = 0  # bi-encoders: the embedding size


@dataclass(frozen=True)
class Embeddings:
    """Embed's answer: one vector per input, in input order."""

    vectors: list[list[float]]
    model: str  # the model's name (also when the request used an alias)
    dimension: int
    tokens: int  # real tokens run through the model
    truncated: int  # inputs cut to fit the model's max_length

    def __len__(self) -> int:
        return len(self.vectors)


def from_embed(response: pb.EmbedResponse) -> Embeddings:
    return Embeddings([list(e.values) for e in response.embeddings], response.model, response.dimension,
                      response.tokens, response.truncated)


@dataclass(frozen=True)
class IndexInfo:
    name: str
    model: str
    count: int
    dimension: int
    similarity: str
    index_type: str
    device: str
    version: int


@dataclass(frozen=True)
class ServerInfo:
    models: list[ModelInfo]
    indexes: list[IndexInfo]
    default_model: str
    default_index: str


@dataclass(frozen=True)
class WriteResult:
    """What an upsert or delete changed."""

    changed: int  # passages written, or removed
    count: int  # passages in the index afterwards
    version: int  # the store's change counter afterwards
    not_found: int = 0  # deletes only


_STAGES = {pb.STAGE_RETRIEVE: "retrieve", pb.STAGE_RERANK: "rerank", pb.STAGE_UNSPECIFIED: "rerank"}


def to_passage(value: PassageLike, position: int) -> pb.Passage:
    if isinstance(value, str):
        return pb.Passage(id=str(position), text=value)
    if isinstance(value, Passage):
        return pb.Passage(id=value.id or str(position), text=value.text, title=value.title, metadata=dict(value.metadata))
    if isinstance(value, Mapping):
        metadata = {str(k): str(v) for k, v in (value.get("metadata") or {}).items()}
        return pb.Passage(id=str(value.get("id", position)), text=value["text"], title=value.get("title"), metadata=metadata)
    raise TypeError(f"passages[{position}]: expected str, Passage or mapping, got {type(value).__name__}")


def from_scored(message: pb.ScoredPassages) -> list[ScoredPassage]:
    """The passages of one stream message.

    Built without ScoredPassage.__init__: a frozen dataclass's __init__ pays an object.__setattr__
    per field, about a third of the conversion; here each passage's fields go in as one dict."""
    stages, new, set_attribute = _STAGES, object.__new__, object.__setattr__
    batch = []
    for p in message.passages:
        scored = new(ScoredPassage)
        set_attribute(scored, "__dict__", {
            "id": p.id, "index": p.index, "score": p.score, "rank": p.rank, "stage": stages[p.stage],
            "retrieval_score": p.retrieval_score, "text": p.text,
            "title": p.title if p.HasField("title") else None,
            "metadata": dict(p.metadata) if p.metadata else {},  # dict() of an empty map costs more than the rest
            "dense_score": p.dense_score if p.dense_rank else None,
            "sparse_score": p.sparse_score if p.sparse_rank else None,
            "dense_rank": p.dense_rank, "sparse_rank": p.sparse_rank,
        })
        batch.append(scored)
    return batch


_STATS_FIELDS = tuple(f.name for f in fields(Stats))


def from_stats(stats: pb.RerankStats | None) -> Stats:
    if stats is None:
        return Stats()
    return Stats(**{name: getattr(stats, name) for name in _STATS_FIELDS})


def from_info(response: pb.ListModelsResponse) -> ServerInfo:
    kinds = {pb.MODEL_KIND_CROSS: "cross", pb.MODEL_KIND_BI: "bi"}
    return ServerInfo(
        models=[
            ModelInfo(m.name, kinds.get(m.kind, "unknown"), m.weights, m.max_length, m.dtype, m.device,
                      m.activation, m.pooling, m.similarity, tuple(m.aliases), m.dimension)
            for m in response.models
        ],
        indexes=[
            IndexInfo(i.name, i.model, i.count, i.dimension, i.similarity, i.index_type, i.device, i.version)
            for i in response.indexes
        ],
        default_model=response.default_model,
        default_index=response.default_index,
    )
