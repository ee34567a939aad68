"""rankstream client: typed Python access to a rankstream server over gRPC.

Imports only grpcio and protobuf (no torch, transformers or faiss). The LangChain integration
lives in `rankstream.langchain` (needs langchain-core).
"""

from ._requests import STATS_TRAILER
from .aio import AsyncRankstreamClient, AsyncScoredStream
from .client import RankstreamClient, ScoredStream
from .errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    RankstreamError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .types import Embeddings, IndexInfo, ModelInfo, Passage, Ranking, ScoredPassage, ServerInfo, Stats, WriteResult

__all__ = [
    "STATS_TRAILER", "AsyncRankstreamClient", "AsyncScoredStream", "DeadlineExceeded", "Embeddings", "IndexInfo", "InvalidArgument", "ModelInfo",
    "NotFound", "Passage", "Ranking", "RankstreamClient", "RankstreamError", "ResourceExhausted", "ScoredPassage",
    "ScoredStream", "ServerInfo", "Stats", "Unauthenticated", "Unavailable", "WriteResult",
]
