"""What differs between reranker families, as data: resolved once at load from the model's folder,
the way sentence-transformers' `CrossEncoder(folder)` reads it with no arguments, so scores match.

BERT, XLM-R, ELECTRA, DeBERTa and ModernBERT classifiers, Qwen2/3 sequence-classification
conversions and causal-LM yes/no rerankers differ only in this small record: the scoring head
(a classifier logit, or the logits of two answer tokens at the last position), the padding side,
the pair layout (the tokenizer's pair template, or a chat template with "query" and "document"
messages), the instruction (sentence-transformers' prompt) and the activation. Backends and the
batcher stay family-blind. What cannot be honoured is refused here with the key that would fix it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import transformers

from rankstream_server.config import ModelConfig
from rankstream_server.errors import ModelLoadError

# The sentence-transformers modules a CrossEncoder folder may list that rankstream serves.
_TRANSFORMER_MODULES = ("Transformer",)
_ANSWER_MODULE = "LogitScore"
_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "none"}


@dataclass(frozen=True)
class ScoringHead:
    """classifier: column `label` of the sequence classifier's logits. answer_tokens: the causal
    LM's logit of `true_token` minus that of `false_token` (or the true logit alone) at the last token."""

    kind: str  # "classifier" | "answer_tokens"
    label: int = 0
    true_token: int | None = None
    false_token: int | None = None


@dataclass(frozen=True)
class Family:
    architecture: str
    head: ScoringHead
    activation: str  # "sigmoid" | "none"
    chat_template: str | None = None  # pairs go through it as "query" / "document" messages
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)  # sentence-transformers' named prompts
    default_instruction: str | None = None

    @property
    def causal_lm(self) -> bool:
        return self.head.kind == "answer_tokens"

    @property
    def padding_side(self) -> str:
        """Causal LMs are scored at the last position, so every row must end there (left padding,
        as sentence-transformers pads them); classifiers pool themselves and take right padding."""
        return "left" if self.causal_lm else "right"

    def pooling(self, hf_config: Any) -> str:
        if self.causal_lm:
            return "last_token"
        if hasattr(hf_config, "classifier_pooling"):  # ModernBERT
            return str(hf_config.classifier_pooling)
        return "last_token" if _is_decoder_classifier(self.architecture, hf_config.model_type) else "cls"

    def describe_head(self) -> str:
        if self.head.kind == "classifier":
            return "classifier" if self.head.label == 0 else f"classifier (label {self.head.label})"
        false = f' - logit[{self.head.false_token}]' if self.head.false_token is not None else ""
        return f"answer-token logits (logit[{self.head.true_token}]{false})"


def _is_decoder_classifier(architecture: str, model_type: str) -> bool:
    """Sequence classifiers built on decoders (Qwen, Llama, Mistral, GPT-2, ...) pool the last real
    token: their model type has a causal LM and no masked LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return ("ForSequenceClassification" in architecture and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def _refuse(cfg: ModelConfig, reason: str, fix: str) -> ModelLoadError:
    return ModelLoadError(f"model {cfg.name!r} ({cfg.weights}): {reason}; {fix}")


def _module_kind(entry: dict[str, Any]) -> str:
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def _architecture(cfg: ModelConfig, hf_config: Any) -> str:
    architectures = getattr(hf_config, "architectures", None) or []
    if getattr(hf_config, "auto_map", None):
        raise _refuse(cfg, "its config.json maps the model to remote code (auto_map), which rankstream never runs",
                      "serve a conversion to a transformers architecture (config.json `architectures`)")
    if not architectures:
        return "ForSequenceClassification"  # no record: loaded as a sequence classifier, as sentence-transformers does
    architecture = architectures[0]
    if getattr(transformers, architecture, None) is None:
        raise _refuse(cfg, f"architecture {architecture!r} is not in transformers {transformers.__version__} "
                           "(it needs remote code, which rankstream never runs)",
                      "upgrade transformers or serve a conversion (config.json `architectures`)")
    return architecture


def _activation(cfg: ModelConfig, st_config: dict[str, Any], hf_config: Any, single_score: bool) -> str:
    """sentence-transformers' rule: the saved activation (config_sentence_transformers.json, else
    config.json), a path outside torch ignored; else sigmoid for one score, identity for several."""
    if cfg.activation != "auto":
        return cfg.activation
    saved = getattr(hf_config, "sentence_transformers", None) or {}
    path = st_config.get("activation_fn") or saved.get("activation_fn") or getattr(hf_config, "sbert_ce_default_activation_function", None)
    if path is None or not str(path).startswith("torch."):
        return "sigmoid" if single_score else "none"
    name = str(path).rsplit(".", 1)[-1]
    if name not in _ACTIVATIONS:
        raise _refuse(cfg, f"its activation {path!r} is not supported (sigmoid and identity are)",
                      "set `activation: sigmoid` or `activation: none` in the model's config entry")
    return _ACTIVATIONS[name]


def _label(cfg: ModelConfig, hf_config: Any) -> int:
    labels = int(getattr(hf_config, "num_labels", 1) or 1)
    if labels == 1:
        if cfg.label not in (None, 0):
            raise _refuse(cfg, f"`label: {cfg.label}` was set but the classifier has one output", "remove `label`")
        return 0
    names = {str(name): int(index) for index, name in (getattr(hf_config, "id2label", None) or {}).items()}
    if cfg.label is None:
        raise _refuse(cfg, f"the classifier has {labels} labels ({', '.join(sorted(names, key=names.get))}) "
                           "and a reranker needs one score", "set `label:` to the index or name of the relevance label")
    if isinstance(cfg.label, int) and 0 <= cfg.label < labels:
        return cfg.label
    if isinstance(cfg.label, str) and cfg.label in names:
        return names[cfg.label]
    raise _refuse(cfg, f"`label: {cfg.label}` is not one of its labels {sorted(names)} / 0..{labels - 1}", "fix `label:`")


def _answer_tokens(cfg: ModelConfig, tokenizer, modules: list[dict[str, Any]], read_json: Callable) -> tuple[int, int | None]:
    """The answer tokens: the folder's LogitScore module, else "yes" and "no" (sentence-transformers' default)."""
    if cfg.answer_tokens is not None:
        ids = [tokenizer.convert_tokens_to_ids(token) for token in cfg.answer_tokens]
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise _refuse(cfg, f"`answer_tokens: {cfg.answer_tokens}` are not single tokens of its vocabulary",
                          "name tokens of the vocabulary in `answer_tokens`")
        return ids[0], ids[1] if len(ids) > 1 else None
    for entry in modules:
        if _module_kind(entry) == _ANSWER_MODULE:
            saved = read_json(f"{entry.get('path', '')}/config.json".lstrip("/")) or {}
            if saved.get("true_token_id") is None:
                raise _refuse(cfg, "its LogitScore module has no true_token_id", "set `answer_tokens: [yes, no]`")
            return int(saved["true_token_id"]), (None if saved.get("false_token_id") is None else int(saved["false_token_id"]))
    true_id, false_id = (tokenizer.convert_tokens_to_ids(token) for token in ("yes", "no"))
    if true_id is None or false_id is None or tokenizer.unk_token_id in (true_id, false_id):
        raise _refuse(cfg, "it is a causal LM and its vocabulary has no single 'yes' / 'no' tokens to score with",
                      "set `answer_tokens: [<relevant>, <irrelevant>]`")
    return true_id, false_id


def _template(cfg: ModelConfig, tokenizer, transformer_config: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The chat template pairs go through, as sentence-transformers decides: whenever the tokenizer
    has one, unless the folder's modality config leaves messages out (or the config says none)."""
    template = getattr(tokenizer, "chat_template", None)
    modalities = transformer_config.get("modality_config")
    if cfg.chat_template == "none" or not template or (modalities is not None and "message" not in modalities):
        return None, {}
    if isinstance(template, dict):
        template = template.get("default")
        if template is None:
            raise _refuse(cfg, "its tokenizer has several named chat templates and none is 'default'",
                          "set `chat_template: none` to tokenize pairs without one")
    kwargs = dict((transformer_config.get("processing_kwargs") or {}).get("chat_template") or {})
    kwargs.pop("restore_suffix", None)  # the suffix is always kept whole here
    for size_key in ("padding", "truncation", "max_length", "return_tensors"):
        kwargs.pop(size_key, None)
    return template, kwargs


def resolve_family(cfg: ModelConfig, hf_config: Any, tokenizer, read_json: Callable[[str], Any]) -> Family:
    """The cross-encoder's family record. `read_json(name)` reads a file of the model's folder (None if absent)."""
    architecture = _architecture(cfg, hf_config)
    modules = read_json("modules.json") or []
    for entry in modules:
        if _module_kind(entry) not in (*_TRANSFORMER_MODULES, _ANSWER_MODULE):
            raise _refuse(cfg, f"its modules.json lists {entry.get('type')!r}, a scoring head rankstream does not serve",
                          "serve a folder whose modules are a Transformer (and a LogitScore)")
    transformer_entry = next((e for e in modules if _module_kind(e) in _TRANSFORMER_MODULES), {"path": ""})
    transformer_config = read_json(f"{transformer_entry.get('path', '')}/sentence_bert_config.json".lstrip("/")) or {}
    st_config = read_json("config_sentence_transformers.json") or {}
    task = transformer_config.get("transformer_task")
    causal = task == "text-generation" or (task is None and architecture.endswith("ForCausalLM"))
    if causal and not architecture.endswith("ForCausalLM"):
        raise _refuse(cfg, f"its sentence-transformers config asks for text generation but the architecture is {architecture}",
                      "serve the causal-LM checkpoint")
    if not causal and not architecture.endswith("ForSequenceClassification"):
        raise _refuse(cfg, f"architecture {architecture} has no reranking head (a sequence classifier or a causal LM)",
                      "serve a ...ForSequenceClassification or ...ForCausalLM checkpoint")
    if causal:
        true_token, false_token = _answer_tokens(cfg, tokenizer, modules, read_json)
        head = ScoringHead("answer_tokens", true_token=true_token, false_token=false_token)
    else:
        head = ScoringHead("classifier", label=_label(cfg, hf_config))
        if _is_decoder_classifier(architecture, hf_config.model_type) and getattr(hf_config, "pad_token_id", None) is None:
            raise _refuse(cfg, "it pools the last real token, found by config.json's pad_token_id, which is not set",
                          "set `pad_token_id` in its config.json to the tokenizer's pad token id")
    single_score = causal or int(getattr(hf_config, "num_labels", 1) or 1) == 1
    template, template_kwargs = _template(cfg, tokenizer, transformer_config)
    prompts = {str(k): str(v) for k, v in (st_config.get("prompts") or {}).items()}
    default_prompt = st_config.get("default_prompt_name")
    default_instruction = cfg.instruction if cfg.instruction is not None else prompts.get(default_prompt) if default_prompt else None
    return Family(
        architecture=architecture,
        head=head,
        activation=_activation(cfg, st_config, hf_config, single_score),
        chat_template=template,
        template_kwargs=template_kwargs,
        prompts=prompts,
        default_instruction=default_instruction or None,
    )
