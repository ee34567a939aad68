"""What a server holds: each loaded model with its tokenizer and batcher, and each index."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from rankstream_server.config import Settings
from rankstream_server.errors import InvalidArgument, NotFound
from rankstream_server.index.local import CorpusIndex
from rankstream_server.index.milvus import MilvusIndex
from rankstream_server.inference.backend import TorchBackend, backend_for
from rankstream_server.inference.batcher import DynamicBatcher
from rankstream_server.inference.batches import cut_batches
from rankstream_server.inference.estimates import TokenSizes
from rankstream_server.inference.model_loading import LoadedModel, dtype_name, load_model
from rankstream_server.inference.precision import settle_precision
from rankstream_server.inference.tokenization import ChatPairTokenizer, PairTokenizer, TextTokenizer

log = logging.getLogger(__name__)

_WARMUP_QUERY = "what is a warm-up query"
_WARMUP_PASSAGES = ["A short passage.", "A somewhat longer passage that makes the warm-up batch uneven in length."]


@dataclass
class ServedModel:
    name: str
    loaded: LoadedModel
    tokenizer: PairTokenizer | ChatPairTokenizer | TextTokenizer  # pairs for cross-encoders, single texts for bi-encoders
    batcher: DynamicBatcher
    backend: TorchBackend
    sizes: TokenSizes = field(default_factory=TokenSizes)  # characters per token, for estimates before tokenizing

    @property
    def kind(self) -> str:
        return self.loaded.kind

    @property
    def accepts_instruction(self) -> bool:
        """A chat template that renders the system message, or sentence-transformers prompts
        (put before the query) that the folder or the config declares."""
        family = self.loaded.family
        if family is None:
            return False
        if isinstance(self.tokenizer, ChatPairTokenizer):
            return self.tokenizer.template.takes_instruction
        return bool(family.prompts) or family.default_instruction is not None

    def instruction(self, requested: str) -> str | None:
        """The instruction a request's pairs get: its own, else the model's default."""
        if requested and not self.accepts_instruction:
            raise InvalidArgument(f"instruction: model {self.name!r} takes no instruction (ListModels: accepts_instruction)")
        return requested or (self.loaded.family.default_instruction if self.loaded.family else None)

    def describe(self) -> dict[str, object]:
        loaded = self.loaded
        family = loaded.family
        if family is not None:
            cross = {
                "architecture": family.architecture,
                "head": family.describe_head(),
                "pooling": family.pooling(loaded.hf_config),
                "template": "chat template" if family.chat_template else "tokenizer pair template",
                "accepts_instruction": self.accepts_instruction,
                "default_instruction": family.default_instruction or "",
                "padding_side": family.padding_side,
            }
        else:
            cross = {"pooling": loaded.pooling}
        return {
            "name": self.name,
            "weights": loaded.source,
            "tokenizer": loaded.config.tokenizer or loaded.source,
            "max_length": loaded.max_length,
            "dtype": dtype_name(loaded.dtype),
            "device": str(loaded.device),
            "activation": loaded.activation,
            "similarity": loaded.similarity,
            **cross,
            "max_batch_tokens": self.backend.shapes.max_tokens,
            "parallel_passes": self.backend.parallel_passes,
            "compiled": self.backend.compiled,
            "cuda_graphs": self.backend.graphs,
            "aliases": list(loaded.config.aliases),
            "dimension": loaded.dimension or 0,
            **(loaded.precision.as_info() if loaded.precision else {}),
        }


class ModelRegistry:
    """Loads every configured model and index once; requests look them up by name."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._models: dict[str, ServedModel] = {}
        self._indexes: dict[str, CorpusIndex | MilvusIndex] = {}
        self.default_name = settings.default_model or settings.models[0].name
        self.default_index = settings.default_index or ""
        self.default_embedder = settings.default_embedder or ""
        # Each alias names its model (aliases are unique across names and aliases: see Settings).
        self._aliases = {alias: m.name for m in settings.models for alias in m.aliases}

    def load_all(self) -> None:
        """Blocking: load and warm every model, then open every index (call from a worker thread).
        On failure, what was started is stopped again."""
        try:
            self._load_all()
        except BaseException:
            self.close()
            raise

    def _load_all(self) -> None:
        for cfg in self._settings.models:
            loaded = settle_precision(load_model(cfg), self._settings.batching)
            backend = backend_for(loaded, self._settings.batching)
            if loaded.pair_template is not None:
                tokenizer = ChatPairTokenizer(loaded.tokenizer, loaded.max_length, cfg.name, loaded.pair_template)
                tokenizer.encode(_WARMUP_QUERY, _WARMUP_PASSAGES)
            elif loaded.kind == "cross":
                tokenizer = PairTokenizer(loaded.tokenizer, loaded.max_length, cfg.name, loaded.uses_token_type_ids,
                                          cache_passages=self._settings.server.passage_token_cache if self._settings.indexes else 0)
                tokenizer.encode(_WARMUP_QUERY, _WARMUP_PASSAGES)
            else:
                tokenizer = TextTokenizer(loaded.tokenizer, loaded.max_length, cfg.query_prefix, cfg.passage_prefix)
                probe = tokenizer.encode(_WARMUP_PASSAGES, "passage")
                probe_batch = cut_batches([(None, probe, np.arange(len(probe)))], backend.shapes)[0]
                loaded.dimension = backend.launch(probe_batch).result().shape[-1]
            if self._settings.server.warmup:
                backend.warm_up()
            batcher = DynamicBatcher(cfg.name, backend, self._settings.batching)
            self._models[cfg.name] = ServedModel(cfg.name, loaded, tokenizer, batcher, backend)
        for index_cfg in self._settings.indexes:
            model = self._models[index_cfg.model].loaded
            opener = MilvusIndex.open if index_cfg.backend == "milvus" else CorpusIndex.open
            self._indexes[index_cfg.name] = opener(index_cfg, model.identity(), model.dimension)

    @property
    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    @property
    def indexes(self) -> list[CorpusIndex | MilvusIndex]:
        return list(self._indexes.values())

    def get(self, name: str) -> ServedModel:
        """The model with this name or alias; empty = the default reranker."""
        name = name or self.default_name
        try:
            return self._models[self._aliases.get(name, name)]
        except KeyError:
            raise NotFound(f"model: {name!r} is not loaded; loaded models: {sorted(self._models)}") from None

    def embedder(self, name: str) -> ServedModel:
        """The bi-encoder with this name or alias; empty = the default embedder."""
        if not name and not self.default_embedder:
            raise InvalidArgument("model: this server loads no bi-encoder (kind: bi), so it cannot embed")
        model = self.get(name or self.default_embedder)
        if model.kind != "bi":
            raise InvalidArgument(f"model: {name!r} is a cross-encoder; embedding needs a bi-encoder: "
                                  f"{sorted(m.name for m in self._models.values() if m.kind == 'bi')}")
        return model

    def index(self, name: str) -> tuple[CorpusIndex | MilvusIndex, ServedModel]:
        """The index and the bi-encoder that embeds for it."""
        name = name or self.default_index
        try:
            index = self._indexes[name]
        except KeyError:
            raise NotFound(f"index: {name!r} is not served; indexes: {sorted(self._indexes)}") from None
        return index, self._models[index.config.model]

    def save_indexes(self) -> None:
        """Saves each index; one failing (a rebuild that fails, say) does not skip the others."""
        for name, index in self._indexes.items():
            try:
                index.save()
            except Exception:  # noqa: BLE001 - logged; the store has the data, the next save retries
                log.exception("index %s: save failed; the next save retries", name)

    def close(self) -> None:
        for model in self._models.values():
            model.batcher.close(timeout=30)
        for name, index in self._indexes.items():
            try:
                index.close()
            except Exception:  # noqa: BLE001 - the other indexes still close (and release their locks)
                log.exception("index %s: closing failed", name)
