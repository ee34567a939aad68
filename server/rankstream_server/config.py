"""The one typed configuration: a YAML file, overridden by RANKSTREAM_* env vars, then CLI flags.

Loaded once by the CLI and passed down; nothing reads it at import time.
Env overrides nest with "__", e.g. RANKSTREAM_SERVER__PORT=9000 or
RANKSTREAM_BATCHING__MAX_WAIT_MS=5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """One model the server loads."""

    name: str = Field(min_length=1, description="Name requests use to pick this model.")
    kind: Literal["cross", "bi"] = "cross"
    weights: str = Field(min_length=1, description="Hub id or local folder.")
    tokenizer: str | None = Field(None, description="Hub id or folder; defaults to weights.")
    max_length: int | None = Field(
        None, gt=2, description="Tokens per (query, passage) pair; default: the tokenizer's, capped at the model's positions."
    )
    activation: Literal["auto", "sigmoid", "none"] = Field(
        "auto", description="auto = what the checkpoint's sentence-transformers config says, else sigmoid."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = float16 on CUDA; on CPU float32 or bfloat16, whichever measures faster at start-up "
        "(>= 1.2x) and passes the quality guard against float32 (inference/precision.py; `rankstream doctor` shows it)."
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    # Cross-encoders only (the folder decides each when unset, as sentence-transformers reads it):
    instruction: str | None = Field(
        None, description="Default task instruction for rerankers that take one; default: the folder's default prompt."
    )
    label: int | str | None = Field(None, description="Multi-label classifiers: the index or name of the relevance label.")
    answer_tokens: list[str] | None = Field(
        None, min_length=1, max_length=2,
        description="Causal-LM rerankers: [relevant, irrelevant] tokens; default: the folder's LogitScore, else yes/no.",
    )
    chat_template: Literal["auto", "none"] = Field(
        "auto", description="auto = pairs go through the tokenizer's chat template when it has one; none = never."
    )
    # Bi-encoders only:
    pooling: Literal["auto", "cls", "mean"] = Field(
        "auto", description="auto = the checkpoint's 1_Pooling/config.json, else cls."
    )
    similarity: Literal["auto", "dot", "cosine"] = Field(
        "auto", description="auto = cosine when the checkpoint's modules.json normalizes, else dot."
    )
    query_prefix: str = ""
    passage_prefix: str = ""
    aliases: list[str] = Field([], description="Other names requests may use, e.g. another vendor's model id a client is hard-wired to.")


class HnswConfig(_Strict):
    m: int = Field(32, gt=1, description="Graph degree.")
    ef_construction: int = Field(200, gt=0)
    ef_search: int = Field(128, gt=0, description="Search breadth: higher = better recall, slower.")


class IvfConfig(_Strict):
    nlist: int | None = Field(None, gt=0, description="Clusters; default 4 x sqrt(count), at least 1.")
    nprobe: int = Field(32, gt=0, description="Clusters searched per query.")


class MilvusConfig(_Strict):
    """Where a `backend: milvus` index lives. Milvus holds passages, metadata and vectors; rankstream
    still embeds with its own bi-encoder."""

    uri: str = Field(min_length=1, description="http://host:19530 for a Milvus server, or a milvus-lite file path (one process only).")
    collection: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    db_name: str = ""
    token: str | None = Field(None, description="`user:password` or an API key; prefer token_file.", repr=False)
    token_file: str | None = Field(None, description="File holding the token (a mounted Secret).")
    index_type: Literal["FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX"] = Field("FLAT", description="FLAT = exact top_k.")
    timeout_seconds: float = Field(10.0, gt=0)


class SparseConfig(_Strict):
    """The keyword (BM25) side of a local index: built with the index, kept in its docs.sqlite."""

    enabled: bool = Field(True, description="Keep a BM25 side (SPARSE and HYBRID modes need it).")
    stemmer: str | None = Field("english", description="Snowball stemmer language (PyStemmer); null = no stemming.")
    stopwords: str | None = Field("en", description="Stop-word list removed before indexing (bm25s's); null = none.")


class HybridConfig(_Strict):
    """Reciprocal rank fusion of the dense and sparse sides."""

    rrf_k: float = Field(60.0, gt=0, description="RRF constant: a passage scores sum(1 / (rrf_k + rank)) over the sides.")
    depth: int = Field(1000, gt=0, description="Candidates each side contributes (at least top_k).")


class IndexConfig(_Strict):
    """One searchable corpus: an index folder built by `rankstream index build` (or created empty),
    or a Milvus collection (`backend: milvus`)."""

    name: str = Field(min_length=1)
    backend: Literal["local", "milvus"] = Field("local", description="local: SQLite + FAISS in `path`; milvus: a collection.")
    path: str = Field("", description="The index folder (backend local).")
    milvus: MilvusConfig | None = None
    model: str = Field(min_length=1, description="Name of the bi-encoder (kind: bi) that embeds it.")
    type: Literal["flat", "hnsw", "ivf"] = Field("flat", description="flat = exact inner product.")
    hnsw: HnswConfig = HnswConfig()
    ivf: IvfConfig = IvfConfig()
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto = GPU when faiss has GPU support and a device.")
    gpu_fp16: bool = Field(False, description="Store vectors as float16 on the GPU.")
    create: bool = Field(False, description="Create an empty index at `path` when there is none.")
    save_interval_seconds: float = Field(60.0, gt=0, description="How often changed vectors are saved (the store is durable at once).")
    mode: Literal["dense", "sparse", "hybrid"] = Field("dense", description="Retrieve's mode when a request names none.")
    sparse: SparseConfig = SparseConfig()
    hybrid: HybridConfig = HybridConfig()

    @model_validator(mode="after")
    def _backend_settings(self) -> IndexConfig:
        if self.backend == "local" and not self.path:
            raise ValueError(f"index {self.name!r}: path is required (the index folder) for backend local")
        if self.backend == "milvus" and self.milvus is None:
            raise ValueError(f"index {self.name!r}: backend milvus needs a milvus section (uri, collection)")
        if self.backend == "local" and self.milvus is not None:
            raise ValueError(f"index {self.name!r}: a milvus section is set but backend is local")
        if self.mode != "dense" and self.backend == "local" and not self.sparse.enabled:
            raise ValueError(f"index {self.name!r}: mode {self.mode} needs the keyword side (sparse.enabled: true)")
        if self.mode != "dense" and self.backend == "milvus":
            raise ValueError(f"index {self.name!r}: backend milvus serves mode dense only (no keyword side yet)")
        return self

    @property
    def has_sparse(self) -> bool:
        return self.backend == "local" and self.sparse.enabled


class BatchingConfig(_Strict):
    """Dynamic batching, per model."""

    max_batch_tokens: int | None = Field(
        None,
        gt=0,
        description="Padded tokens per forward pass (rows x longest row). Default by device: CPU 2048 "
        "(measured fastest per pair on CPU: caches beat big matrices), CUDA 16384.",
    )
    max_batch_size: int = Field(128, gt=0, description="Pairs per forward pass.")
    max_wait_ms: float = Field(2.0, ge=0, description="How long a batch waits for more work once it has some.")
    queue_capacity: int = Field(4096, gt=0, description="Pairs queued or running per model; beyond: RESOURCE_EXHAUSTED.")
    max_queue_seconds: float = Field(
        10.0, ge=0,
        description="Refuse (RESOURCE_EXHAUSTED) work that would queue behind more than this many seconds of measured work; 0 = off.",
    )
    bulk_max_wait_ms: float = Field(
        500.0, ge=0, description="Bulk work (upserts, builds) goes after queries and reranks, unless it has waited this long."
    )
    length_bucket: int | None = Field(
        None, gt=0, description="Pass widths are multiples of this. Default: CUDA 32 (few shapes, all warmed); CPU 16 in bfloat16 "
        "or float16 (oneDNN builds a kernel per shape), 1 (exact) in float32."
    )
    pad_rows: bool | None = Field(
        None, description="Pad pass row counts to powers of two (few shapes). Default: on CUDA, and on CPU in bfloat16 or "
        "float16 (oneDNN builds a kernel per shape)."
    )
    cuda_graphs: bool = Field(True, description="Capture each pass shape as a CUDA graph at start-up (CUDA only).")
    attention: Literal["auto", "cudnn", "flash", "efficient", "math"] = Field(
        "auto", description="SDPA attention kernel on CUDA; auto = the fastest measured at start-up."
    )
    compile: bool = Field(
        False,
        description="CPU: torch.compile the model at start-up (Inductor, dynamic shapes; needs a C++ compiler). "
        "Kept only where it matches eager scores and measures faster; costs seconds of start-up (cached on disk "
        "in TORCHINDUCTOR_CACHE_DIR). CUDA ignores it: passes there replay CUDA graphs.",
    )
    cpu_passes: int | None = Field(
        None, gt=0,
        description="Forward passes a model runs side by side on CPU, each on its own thread with torch's intra-op "
        "threads (Triton's instance count). Default: the cores divided by torch's intra-op threads.",
    )


class LimitsConfig(_Strict):
    """Request limits: past them a request gets INVALID_ARGUMENT naming the field and the limit."""

    max_passages: int = Field(1000, gt=0, description="Passages in a Rerank or Upsert request, ids in a Delete.")
    max_top_k: int = Field(1000, gt=0)
    max_query_chars: int = Field(2048, gt=0)
    max_passage_chars: int = Field(20000, gt=0, description="Characters of a passage's title + text.")
    max_id_bytes: int = Field(256, gt=0, description="UTF-8 bytes of a passage id.")
    max_metadata_entries: int = Field(32, ge=0, description="Metadata entries of one passage.")
    max_metadata_key_bytes: int = Field(128, gt=0, description="UTF-8 bytes of a metadata or filter key.")
    max_metadata_value_bytes: int = Field(1024, gt=0, description="UTF-8 bytes of a metadata or filter value.")
    max_filter_entries: int = Field(16, ge=0, description="Entries of a Retrieve filter.")
    max_chunks_per_passage: int = Field(16, gt=0, description="Windows a passage may be scored in (long_passages: CHUNK).")

    def max_request_bytes(self) -> int:
        """The largest request these limits admit (UTF-8 at 4 bytes a character, protobuf framing
        included), plus room: the server's receive limit, so nothing bigger is even read."""
        entry = self.max_metadata_key_bytes + self.max_metadata_value_bytes + 16
        passage = 4 * self.max_passage_chars + self.max_id_bytes + self.max_metadata_entries * entry + 32
        query = 4 * self.max_query_chars + self.max_filter_entries * entry + 64
        return self.max_passages * passage + query + 64 * 1024


class TlsConfig(_Strict):
    """TLS for the server port; with client_ca_file, clients must present a certificate it signed (mTLS)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


class AuthConfig(_Strict):
    """Bearer-token authentication with roles. `mode: none` turns it off on purpose (for example
    behind a mesh that does mTLS); a server reachable from other machines needs one or the other."""

    mode: Literal["tokens", "none"] = "tokens"
    tokens_file: str | None = Field(
        None, description="One `ROLE TOKEN` per line, ROLE read or write; blank lines and # comments allowed. "
        "Re-read when it changes.",
    )
    reload_seconds: float = Field(2.0, gt=0, description="How often the tokens and TLS files are checked for changes.")

    @model_validator(mode="after")
    def _tokens_file_for_tokens(self) -> AuthConfig:
        if self.mode == "tokens" and not self.tokens_file:
            raise ValueError("auth.tokens_file is required (or auth.mode: none, on purpose)")
        if self.mode == "none" and self.tokens_file:
            raise ValueError("auth.tokens_file is set but auth.mode is none: remove one of them")
        return self


class ServerConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(50051, ge=0, le=65535)
    torch_threads: int | None = Field(
        None, gt=0,
        description="torch intra-op threads per forward pass. Default 1: on CPU a model then runs one pass per core "
        "side by side (batching.cpu_passes), which measured faster under load than passes split across cores, whose "
        "OpenMP threads contend with tokenization.",
    )
    tokenizer_threads: int | None = Field(
        None, gt=0, description="Threads tokenizing requests, each request on one thread. Default: one per core.",
    )
    tokenizer_parallel: bool | None = Field(
        None,
        description="Also spread one request's texts over the Rust tokenizer's own thread pool (TOKENIZERS_PARALLELISM): "
        "lower latency for a lone large request, but it hands every request to other threads again, which under "
        "load on 2 CPU cores measured ~10% fewer pairs/s. Default: on when CUDA is available (host cores are free "
        "and a request's latency is mostly tokenizing), off on CPU-only machines (the forward passes need the cores).",
    )
    warmup: bool = True
    drain_seconds: float = Field(
        0.0, ge=0,
        description="On SIGTERM: seconds to keep serving while health reports NOT_SERVING, so load balancers "
        "stop sending new calls before the port closes (Kubernetes: a few seconds).",
    )
    grace_seconds: float = Field(10.0, ge=0, description="After the drain: time in-flight calls get to finish.")
    max_concurrent_rpcs: int = Field(
        512, gt=0, description="RPCs in progress at once (health checks excepted); past it: RESOURCE_EXHAUSTED at once."
    )
    refusal_hold_ms: float = Field(
        3000.0, ge=0,
        description="Under overload a refusal is answered up to this late (within its pushback, or before the "
                    "caller's deadline), with the pushback shortened to match: clients that retry at once then "
                    "cannot spend the server's CPU on refusals. Holding costs no CPU; at most max_concurrent_rpcs "
                    "refusals are held at once. 0 = answer refusals at once.",
    )
    max_connection_age_seconds: float | None = Field(
        300.0, gt=0,
        description="Connections are closed gracefully (GOAWAY) after this long, so round_robin clients of a headless "
        "Service reconnect and spread over replicas added since; null = never.",
    )
    health_port: int | None = Field(
        None, ge=0, le=65535,
        description="A plaintext port serving grpc.health.v1 only, for probes that cannot speak TLS (the kubelet's); "
        "unset = health on the main port only.",
    )
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port; unset = off.")
    http_port: int | None = Field(
        None, ge=0, le=65535,
        description="The HTTP front (Cohere, Jina, TEI, OpenAI and native JSON APIs) on server.host, in the same "
        "process and event loop as gRPC; unset = off.",
    )
    metrics_host: str | None = Field(None, description="Address the metrics port binds; default: server.host.")
    passage_token_cache: int = Field(
        100_000, ge=0,
        description="Corpus passages whose cross-encoder tokens are kept (LRU) for RetrieveAndRerank; 0 = off. About 0.5 KB each.",
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024 - 64 * 1024, gt=1024,
        description="Largest ScoredPassages message sent; bigger results are split over several. "
        "Default: under gRPC clients' 4 MiB receive limit.",
    )
    tls: TlsConfig | None = None


class Settings(BaseSettings):
    """The whole configuration."""

    model_config = SettingsConfigDict(env_prefix="RANKSTREAM_", env_nested_delimiter="__", extra="forbid")

    server: ServerConfig = ServerConfig()
    auth: AuthConfig | None = None
    limits: LimitsConfig = LimitsConfig()
    batching: BatchingConfig = BatchingConfig()
    models: list[ModelConfig] = Field(min_length=1)
    default_model: str | None = Field(None, description="Rerank's model when a request names none; default: the first cross-encoder, else the first model.")
    default_embedder: str | None = Field(None, description="Embed's model when a request names none; default: the first bi-encoder.")
    indexes: list[IndexConfig] = []
    default_index: str | None = Field(None, description="Index used when a request names none; default: the first.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Env vars override the file's values (passed as init kwargs).
        return env_settings, init_settings

    @model_validator(mode="after")
    def _check_models(self) -> Settings:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models: duplicate names {duplicates}")
        if self.default_model is None:
            self.default_model = next((m.name for m in self.models if m.kind == "cross"), names[0])
        elif self.default_model not in names:
            raise ValueError(f"default_model {self.default_model!r} is not one of models {names}")
        kinds = {m.name: m.kind for m in self.models}
        claimed = names + [alias for m in self.models for alias in m.aliases]
        if len(set(claimed)) != len(claimed):
            raise ValueError(f"models: names and aliases must be unique; {sorted({n for n in claimed if claimed.count(n) > 1})} "
                             "appear more than once")
        if self.default_embedder is None:
            self.default_embedder = next((m.name for m in self.models if m.kind == "bi"), None)
        elif kinds.get(self.default_embedder) != "bi":
            raise ValueError(f"default_embedder {self.default_embedder!r} must be a bi-encoder (kind: bi) among "
                             f"{[n for n, k in kinds.items() if k == 'bi']}")
        index_names = [i.name for i in self.indexes]
        for index in self.indexes:
            if kinds.get(index.model) != "bi":
                bi = [n for n, k in kinds.items() if k == "bi"]
                raise ValueError(f"index {index.name!r}: model {index.model!r} must be a bi-encoder (kind: bi) among {bi}")
        if len(set(index_names)) != len(index_names):
            raise ValueError(f"indexes: duplicate names {index_names}")
        paths = [str(Path(i.path).resolve()) for i in self.indexes if i.backend == "local"]
        if len(set(paths)) != len(paths):
            raise ValueError(f"indexes: two indexes share one folder ({sorted(p for p in paths if paths.count(p) > 1)[0]}); "
                             "a folder has one writer")
        if self.default_index is None:
            self.default_index = index_names[0] if index_names else None
        elif self.default_index not in index_names:
            raise ValueError(f"default_index {self.default_index!r} is not one of indexes {index_names}")
        if self.limits.max_passages > self.batching.queue_capacity:
            raise ValueError(
                f"limits.max_passages ({self.limits.max_passages}) must not exceed "
                f"batching.queue_capacity ({self.batching.queue_capacity}): such a request could never be queued"
            )
        return self

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)


class ConfigError(ValueError):
    """The configuration cannot be read or is invalid: one line naming the file and the problem."""


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read a YAML file (if given), apply env overrides, then `overrides` (the CLI's)."""
    data: dict[str, Any] = {}
    source = str(path) if path is not None else "the environment"
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as error:
            raise ConfigError(f"{path}: cannot read the config ({error.strerror or error})") from error
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise ConfigError(f"{path}: not valid YAML{at} ({getattr(error, 'problem', None) or error})") from error
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        settings = Settings(**data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'config'}: {e['msg']}" for e in error.errors(include_url=False)
        )
        raise ConfigError(f"{source}: {problems}") from error
    for dotted, value in overrides.items():
        if value is not None:
            section, _, key = dotted.partition(".")
            setattr(getattr(settings, section), key, value)
    return settings
