from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Order(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RANKED: _ClassVar[Order]
    AS_SCORED: _ClassVar[Order]

class LongPassages(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATE: _ClassVar[LongPassages]
    CHUNK: _ClassVar[LongPassages]
    REFUSE: _ClassVar[LongPassages]

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_RETRIEVE: _ClassVar[Stage]
    STAGE_RERANK: _ClassVar[Stage]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_DEFAULT: _ClassVar[Mode]
    DENSE: _ClassVar[Mode]
    SPARSE: _ClassVar[Mode]
    HYBRID: _ClassVar[Mode]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_CROSS: _ClassVar[ModelKind]
    MODEL_KIND_BI: _ClassVar[ModelKind]

class InputType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_TYPE_UNSPECIFIED: _ClassVar[InputType]
    INPUT_TYPE_QUERY: _ClassVar[InputType]
    INPUT_TYPE_PASSAGE: _ClassVar[InputType]
RANKED: Order
AS_SCORED: Order
TRUNCATE: LongPassages
CHUNK: LongPassages
REFUSE: LongPassages
STAGE_UNSPECIFIED: Stage
STAGE_RETRIEVE: Stage
STAGE_RERANK: Stage
MODE_DEFAULT: Mode
DENSE: Mode
SPARSE: Mode
HYBRID: Mode
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_CROSS: ModelKind
MODEL_KIND_BI: ModelKind
INPUT_TYPE_UNSPECIFIED: InputType
INPUT_TYPE_QUERY: InputType
INPUT_TYPE_PASSAGE: InputType

class Passage(_message.Message):
    __slots__ = ("id", "text", "title", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    title: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., title: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("query", "passages", "top_n", "model", "raw_scores", "order", "return_text", "score_threshold", "return_metadata", "instruction", "long_passages", "max_chunks_per_passage", "max_passage_tokens")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    RETURN_TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    RETURN_METADATA_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    LONG_PASSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_PER_PASSAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_PASSAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    query: str
    passages: _containers.RepeatedCompositeFieldContainer[Passage]
    top_n: int
    model: str
    raw_scores: bool
    order: Order
    return_text: bool
    score_threshold: float
    return_metadata: bool
    instruction: str
    long_passages: LongPassages
    max_chunks_per_passage: int
    max_passage_tokens: int
    def __init__(self, query: _Optional[str] = ..., passages: _Optional[_Iterable[_Union[Passage, _Mapping]]] = ..., top_n: _Optional[int] = ..., model: _Optional[str] = ..., raw_scores: _Optional[bool] = ..., order: _Optional[_Union[Order, str]] = ..., return_text: _Optional[bool] = ..., score_threshold: _Optional[float] = ..., return_metadata: _Optional[bool] = ..., instruction: _Optional[str] = ..., long_passages: _Optional[_Union[LongPassages, str]] = ..., max_chunks_per_passage: _Optional[int] = ..., max_passage_tokens: _Optional[int] = ...) -> None: ...

class ScoredPassage(_message.Message):
    __slots__ = ("id", "index", "score", "rank", "text", "title", "metadata", "stage", "retrieval_score", "dense_score", "sparse_score", "dense_rank", "sparse_rank")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    DENSE_SCORE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_SCORE_FIELD_NUMBER: _ClassVar[int]
    DENSE_RANK_FIELD_NUMBER: _ClassVar[int]
    SPARSE_RANK_FIELD_NUMBER: _ClassVar[int]
    id: str
    index: int
    score: float
    rank: int
    text: str
    title: str
    metadata: _containers.ScalarMap[str, str]
    stage: Stage
    retrieval_score: float
    dense_score: float
    sparse_score: float
    dense_rank: int
    sparse_rank: int
    def __init__(self, id: _Optional[str] = ..., index: _Optional[int] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ..., text: _Optional[str] = ..., title: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., stage: _Optional[_Union[Stage, str]] = ..., retrieval_score: _Optional[float] = ..., dense_score: _Optional[float] = ..., sparse_score: _Optional[float] = ..., dense_rank: _Optional[int] = ..., sparse_rank: _Optional[int] = ...) -> None: ...

class ScoredPassages(_message.Message):
    __slots__ = ("passages",)
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    passages: _containers.RepeatedCompositeFieldContainer[ScoredPassage]
    def __init__(self, passages: _Optional[_Iterable[_Union[ScoredPassage, _Mapping]]] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("query", "top_k", "filter", "return_text", "return_metadata", "index", "score_threshold", "mode")
    class FilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    RETURN_TEXT_FIELD_NUMBER: _ClassVar[int]
    RETURN_METADATA_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    query: str
    top_k: int
    filter: _containers.ScalarMap[str, str]
    return_text: bool
    return_metadata: bool
    index: str
    score_threshold: float
    mode: Mode
    def __init__(self, query: _Optional[str] = ..., top_k: _Optional[int] = ..., filter: _Optional[_Mapping[str, str]] = ..., return_text: _Optional[bool] = ..., return_metadata: _Optional[bool] = ..., index: _Optional[str] = ..., score_threshold: _Optional[float] = ..., mode: _Optional[_Union[Mode, str]] = ...) -> None: ...

class RetrieveAndRerankRequest(_message.Message):
    __slots__ = ("query", "top_k", "top_n", "reranker", "filter", "return_text", "return_metadata", "index", "raw_scores", "order", "score_threshold", "mode", "instruction", "long_passages", "max_chunks_per_passage", "max_passage_tokens")
    class FilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    RERANKER_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    RETURN_TEXT_FIELD_NUMBER: _ClassVar[int]
    RETURN_METADATA_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    LONG_PASSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_PER_PASSAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_PASSAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    query: str
    top_k: int
    top_n: int
    reranker: str
    filter: _containers.ScalarMap[str, str]
    return_text: bool
    return_metadata: bool
    index: str
    raw_scores: bool
    order: Order
    score_threshold: float
    mode: Mode
    instruction: str
    long_passages: LongPassages
    max_chunks_per_passage: int
    max_passage_tokens: int
    def __init__(self, query: _Optional[str] = ..., top_k: _Optional[int] = ..., top_n: _Optional[int] = ..., reranker: _Optional[str] = ..., filter: _Optional[_Mapping[str, str]] = ..., return_text: _Optional[bool] = ..., return_metadata: _Optional[bool] = ..., index: _Optional[str] = ..., raw_scores: _Optional[bool] = ..., order: _Optional[_Union[Order, str]] = ..., score_threshold: _Optional[float] = ..., mode: _Optional[_Union[Mode, str]] = ..., instruction: _Optional[str] = ..., long_passages: _Optional[_Union[LongPassages, str]] = ..., max_chunks_per_passage: _Optional[int] = ..., max_passage_tokens: _Optional[int] = ...) -> None: ...

class UpsertPassagesRequest(_message.Message):
    __slots__ = ("index", "passages")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    index: str
    passages: _containers.RepeatedCompositeFieldContainer[Passage]
    def __init__(self, index: _Optional[str] = ..., passages: _Optional[_Iterable[_Union[Passage, _Mapping]]] = ...) -> None: ...

class UpsertPassagesResponse(_message.Message):
    __slots__ = ("upserted", "count", "version")
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    count: int
    version: int
    def __init__(self, upserted: _Optional[int] = ..., count: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class DeletePassagesRequest(_message.Message):
    __slots__ = ("index", "ids")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    index: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, index: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeletePassagesResponse(_message.Message):
    __slots__ = ("deleted", "not_found", "count", "version")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    not_found: int
    count: int
    version: int
    def __init__(self, deleted: _Optional[int] = ..., not_found: _Optional[int] = ..., count: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class RerankStats(_message.Message):
    __slots__ = ("model", "passages", "scored", "returned", "truncated", "tokenize_ms", "queue_ms", "inference_ms", "total_ms", "batches", "max_batch_size", "shared_batches", "retrieve_ms", "candidates", "messages", "tokens", "chunked", "windows")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    RETURNED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHARED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_MS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKED_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    model: str
    passages: int
    scored: int
    returned: int
    truncated: int
    tokenize_ms: float
    queue_ms: float
    inference_ms: float
    total_ms: float
    batches: int
    max_batch_size: int
    shared_batches: int
    retrieve_ms: float
    candidates: int
    messages: int
    tokens: int
    chunked: int
    windows: int
    def __init__(self, model: _Optional[str] = ..., passages: _Optional[int] = ..., scored: _Optional[int] = ..., returned: _Optional[int] = ..., truncated: _Optional[int] = ..., tokenize_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batches: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., shared_batches: _Optional[int] = ..., retrieve_ms: _Optional[float] = ..., candidates: _Optional[int] = ..., messages: _Optional[int] = ..., tokens: _Optional[int] = ..., chunked: _Optional[int] = ..., windows: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model", "indexes", "default_index")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_INDEX_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    indexes: _containers.RepeatedCompositeFieldContainer[IndexInfo]
    default_index: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ..., indexes: _Optional[_Iterable[_Union[IndexInfo, _Mapping]]] = ..., default_index: _Optional[str] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("name", "model", "count", "dimension", "similarity", "index_type", "device", "version", "sparse", "default_mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    count: int
    dimension: int
    similarity: str
    index_type: str
    device: str
    version: int
    sparse: bool
    default_mode: Mode
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., count: _Optional[int] = ..., dimension: _Optional[int] = ..., similarity: _Optional[str] = ..., index_type: _Optional[str] = ..., device: _Optional[str] = ..., version: _Optional[int] = ..., sparse: _Optional[bool] = ..., default_mode: _Optional[_Union[Mode, str]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "kind", "weights", "tokenizer", "max_length", "dtype", "device", "activation", "batcher", "pooling", "similarity", "max_batch_tokens", "parallel_passes", "compiled", "cuda_graphs", "architecture", "head", "template", "accepts_instruction", "default_instruction", "padding_side", "aliases", "dimension", "dtype_reason", "dtype_measurements", "cpu_flags")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    BATCHER_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_PASSES_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    PADDING_SIDE_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_REASON_FIELD_NUMBER: _ClassVar[int]
    DTYPE_MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    CPU_FLAGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ModelKind
    weights: str
    tokenizer: str
    max_length: int
    dtype: str
    device: str
    activation: str
    batcher: BatcherStats
    pooling: str
    similarity: str
    max_batch_tokens: int
    parallel_passes: int
    compiled: bool
    cuda_graphs: int
    architecture: str
    head: str
    template: str
    accepts_instruction: bool
    default_instruction: str
    padding_side: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    dimension: int
    dtype_reason: str
    dtype_measurements: _containers.RepeatedCompositeFieldContainer[DtypeMeasurement]
    cpu_flags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., weights: _Optional[str] = ..., tokenizer: _Optional[str] = ..., max_length: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., activation: _Optional[str] = ..., batcher: _Optional[_Union[BatcherStats, _Mapping]] = ..., pooling: _Optional[str] = ..., similarity: _Optional[str] = ..., max_batch_tokens: _Optional[int] = ..., parallel_passes: _Optional[int] = ..., compiled: _Optional[bool] = ..., cuda_graphs: _Optional[int] = ..., architecture: _Optional[str] = ..., head: _Optional[str] = ..., template: _Optional[str] = ..., accepts_instruction: _Optional[bool] = ..., default_instruction: _Optional[str] = ..., padding_side: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., dimension: _Optional[int] = ..., dtype_reason: _Optional[str] = ..., dtype_measurements: _Optional[_Iterable[_Union[DtypeMeasurement, _Mapping]]] = ..., cpu_flags: _Optional[_Iterable[str]] = ...) -> None: ...

class DtypeMeasurement(_message.Message):
    __slots__ = ("dtype", "rows_per_second", "guard_passed", "top_overlap", "max_score_diff", "score_spread", "min_cosine", "strict_top_overlap")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    GUARD_PASSED_FIELD_NUMBER: _ClassVar[int]
    TOP_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORE_DIFF_FIELD_NUMBER: _ClassVar[int]
    SCORE_SPREAD_FIELD_NUMBER: _ClassVar[int]
    MIN_COSINE_FIELD_NUMBER: _ClassVar[int]
    STRICT_TOP_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    rows_per_second: float
    guard_passed: bool
    top_overlap: float
    max_score_diff: float
    score_spread: float
    min_cosine: float
    strict_top_overlap: float
    def __init__(self, dtype: _Optional[str] = ..., rows_per_second: _Optional[float] = ..., guard_passed: _Optional[bool] = ..., top_overlap: _Optional[float] = ..., max_score_diff: _Optional[float] = ..., score_spread: _Optional[float] = ..., min_cosine: _Optional[float] = ..., strict_top_overlap: _Optional[float] = ...) -> None: ...

class BatcherStats(_message.Message):
    __slots__ = ("batches", "items", "dropped", "in_flight", "capacity", "rejected", "max_requests_per_batch", "max_batch_size", "tokens", "padded_tokens")
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUESTS_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PADDED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    batches: int
    items: int
    dropped: int
    in_flight: int
    capacity: int
    rejected: int
    max_requests_per_batch: int
    max_batch_size: int
    tokens: int
    padded_tokens: int
    def __init__(self, batches: _Optional[int] = ..., items: _Optional[int] = ..., dropped: _Optional[int] = ..., in_flight: _Optional[int] = ..., capacity: _Optional[int] = ..., rejected: _Optional[int] = ..., max_requests_per_batch: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., tokens: _Optional[int] = ..., padded_tokens: _Optional[int] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("model", "inputs", "input_type", "normalize", "long_inputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TYPE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    LONG_INPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    input_type: InputType
    normalize: bool
    long_inputs: LongPassages
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., input_type: _Optional[_Union[InputType, str]] = ..., normalize: _Optional[bool] = ..., long_inputs: _Optional[_Union[LongPassages, str]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "model", "dimension", "tokens", "truncated")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    model: str
    dimension: int
    tokens: int
    truncated: int
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., model: _Optional[str] = ..., dimension: _Optional[int] = ..., tokens: _Optional[int] = ..., truncated: _Optional[int] = ...) -> None: ...
