"""Loading a configured model: device and dtype, weights and tokenizer, and the serving settings
a checkpoint carries (sentence-transformers config files) so our scores match its scores."""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import cached_file

from rankstream_server.config import ModelConfig
from rankstream_server.errors import ModelLoadError
from rankstream_server.inference import embedded
from rankstream_server.inference.chat_template import ChatPairTemplate
from rankstream_server.inference.families import Family, resolve_family

if TYPE_CHECKING:
    from rankstream_server.inference.precision import PrecisionChoice

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {setting!r} requested but torch sees no CUDA device")
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if setting == "float16" and device.type == "cpu":
        raise ModelLoadError("dtype float16 is not supported on CPU: use float32 or bfloat16")
    return _DTYPES[setting]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in _DTYPES.items() if value == dtype)


@dataclass
class LoadedModel:
    """A model ready to run: the torch module, its tokenizer and its serving settings."""

    config: ModelConfig  # with `embedded:` sources resolved to folders
    source: str  # weights as configured (hub id, folder or embedded:NAME): the model's identity
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    max_length: int
    uses_token_type_ids: bool
    activation: str = "none"  # cross-encoders: "sigmoid" | "none"
    pooling: str = ""  # bi-encoders: "cls" | "mean"
    similarity: str = ""  # bi-encoders: "dot" | "cosine"
    dimension: int = 0  # bi-encoders: embedding size, measured at warm-up
    family: Family | None = None  # cross-encoders: head, padding, template, instruction
    pair_template: ChatPairTemplate | None = None  # cross-encoders whose pairs go through a chat template
    hf_config: Any = None
    precision: PrecisionChoice | None = None  # the dtype and why (inference/precision.py: settle_precision)

    @property
    def kind(self) -> str:
        return self.config.kind

    def identity(self) -> dict[str, object]:
        """What makes a bi-encoder's embeddings what they are (recorded in index manifests)."""
        return {
            "weights": self.source,
            "pooling": self.pooling,
            "similarity": self.similarity,
            "max_length": self.max_length,
            "query_prefix": self.config.query_prefix,
            "passage_prefix": self.config.passage_prefix,
        }


def _describe_missing(cfg: ModelConfig, what: str, exc: Exception) -> ModelLoadError:
    source = getattr(cfg, what) or cfg.weights
    return ModelLoadError(
        f"model {cfg.name!r}: cannot load {what} from {source!r}: {str(exc).rstrip('.')}. "
        "Give a local folder, or make the hub id available: on a machine with network access run "
        f"`hf download {source}` (or let the first start download it), "
        "and set HF_HUB_OFFLINE=1 to serve from that cache without a network."
    )


def _read_json(repo: str, filename: str, revision: str | None) -> dict[str, Any] | None:
    """A small JSON file from a local folder or the hub cache; None when the checkpoint has none."""
    path = cached_file(
        repo,
        filename,
        revision=revision,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _max_length(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, hf_config: Any) -> int:
    """The configured value, else the checkpoint's (sentence-transformers' rule)."""
    positions = getattr(hf_config, "max_position_embeddings", None) or 512
    if cfg.max_length is not None:
        if cfg.max_length > positions:
            raise ModelLoadError(f"model {cfg.name!r}: max_length {cfg.max_length} exceeds the model's {positions} positions")
        return cfg.max_length
    st_config = _read_json(cfg.weights, "sentence_bert_config.json", cfg.revision) or {}
    length = st_config.get("max_seq_length") or tokenizer.model_max_length
    return int(min(length, positions))


def _bi_encoder_settings(cfg: ModelConfig) -> tuple[str, str]:
    """Pooling and similarity: configured, else what the sentence-transformers folder says."""
    pooling = cfg.pooling
    if pooling == "auto":
        saved = _read_json(cfg.weights, "1_Pooling/config.json", cfg.revision) or {}
        pooling = "mean" if saved.get("pooling_mode_mean_tokens") else "cls"
    similarity = cfg.similarity
    if similarity == "auto":
        modules = _read_json(cfg.weights, "modules.json", cfg.revision) or []
        normalizes = any(m.get("type", "").endswith("Normalize") for m in modules)
        similarity = "cosine" if normalizes else "dot"
    return pooling, similarity


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Loads a cross-encoder (sequence classifier, one logit) or a bi-encoder (bare encoder)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source = cfg.weights
    try:
        resolved = {"weights": embedded.resolve(cfg.weights), "tokenizer": cfg.tokenizer and embedded.resolve(cfg.tokenizer)}
        cfg = cfg.model_copy(update=resolved)
    except ValueError as exc:
        raise ModelLoadError(f"model {cfg.name!r}: {exc}") from exc
    try:
        hf_config = AutoConfig.from_pretrained(cfg.weights, revision=cfg.revision)
    except (OSError, ValueError) as exc:
        raise _describe_missing(cfg, "weights", exc) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.weights, revision=None if cfg.tokenizer else cfg.revision)
    except (OSError, ValueError) as exc:
        raise _describe_missing(cfg, "tokenizer", exc) from exc
    family = None
    if cfg.kind == "cross":
        family = resolve_family(cfg, hf_config, tokenizer, lambda name: _read_json(cfg.weights, name, cfg.revision))
        # Checked before the weights load: a template that cannot carry a pair is refused at once.
        pair_template = ChatPairTemplate(tokenizer, family.chat_template, family.template_kwargs, cfg.name) if family.chat_template else None
        model_class = AutoModelForCausalLM if family.causal_lm else AutoModelForSequenceClassification
    else:
        model_class = AutoModel
    try:
        model = model_class.from_pretrained(cfg.weights, revision=cfg.revision, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise _describe_missing(cfg, "weights", exc) from exc
    model.to(device).eval()
    loaded = LoadedModel(
        config=cfg,
        source=source,
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        max_length=_max_length(cfg, tokenizer, hf_config),
        # Pairs need segment ids where the model has them; DistilBERT and DeBERTa-v3 never get
        # them. Single texts (bi-encoders) are one segment: all zeros, the models' default.
        uses_token_type_ids=(
            cfg.kind == "cross"
            and (family is None or family.chat_template is None)  # a rendered template is one sequence
            and "token_type_ids" in tokenizer.model_input_names
            and getattr(hf_config, "type_vocab_size", 0) > 0
            and "token_type_ids" in inspect.signature(model.forward).parameters
        ),
    )
    loaded.hf_config = hf_config
    if family is not None:
        loaded.family, loaded.pair_template = family, pair_template
        loaded.activation = family.activation
    else:
        loaded.pooling, loaded.similarity = _bi_encoder_settings(cfg)
    log.info(
        "loaded %s-encoder %s from %s on %s (%s, max_length=%d%s)",
        cfg.kind, cfg.name, cfg.weights, device, dtype_name(dtype), loaded.max_length,
        f", activation={loaded.activation}" if cfg.kind == "cross" else f", {loaded.pooling} pooling, {loaded.similarity}",
    )
    return loaded
