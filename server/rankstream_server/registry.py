"""The models a server holds: each loaded model with its tokenizer and its batcher."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .backend import TorchCrossEncoder
from .batcher import DynamicBatcher
from .config import Settings
from .errors import NotFound
from .model_loading import LoadedCrossEncoder, dtype_name, load_cross_encoder
from .tokenization import PairTokenizer

log = logging.getLogger(__name__)

_WARMUP_QUERY = "what is a warm-up query"
_WARMUP_PASSAGES = ["A short passage.", "A somewhat longer passage that makes the warm-up batch uneven in length."]


@dataclass
class ServedModel:
    name: str
    loaded: LoadedCrossEncoder
    tokenizer: PairTokenizer
    batcher: DynamicBatcher

    @property
    def activation(self) -> str:
        return self.loaded.activation

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "weights": self.loaded.config.weights,
            "tokenizer": self.loaded.config.tokenizer or self.loaded.config.weights,
            "max_length": self.loaded.max_length,
            "dtype": dtype_name(self.loaded.dtype),
            "device": str(self.loaded.device),
            "activation": self.loaded.activation,
        }


class ModelRegistry:
    """Loads every configured model once; requests look models up by name."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._models: dict[str, ServedModel] = {}
        self.default_name = settings.default_model or settings.models[0].name

    def load_all(self) -> None:
        """Blocking: load and warm every model (call from a worker thread)."""
        for cfg in self._settings.models:
            loaded = load_cross_encoder(cfg)
            pair_tokenizer = PairTokenizer(loaded.tokenizer, loaded.max_length, cfg.name, loaded.uses_token_type_ids)
            backend = TorchCrossEncoder(loaded)
            if self._settings.server.warmup:
                backend.launch(pair_tokenizer.encode(_WARMUP_QUERY, _WARMUP_PASSAGES)).result()
            self._models[cfg.name] = ServedModel(
                cfg.name, loaded, pair_tokenizer, DynamicBatcher(cfg.name, backend, self._settings.batching)
            )

    @property
    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def get(self, name: str) -> ServedModel:
        name = name or self.default_name
        try:
            return self._models[name]
        except KeyError:
            raise NotFound(f"model: {name!r} is not loaded; loaded models: {sorted(self._models)}") from None

    def close(self) -> None:
        for model in self._models.values():
            model.batcher.close(timeout=30)
