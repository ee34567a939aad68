"""One tiny random-weight reranker per architecture people deploy, each saved as a folder that
sentence-transformers' `CrossEncoder(folder)` loads with no arguments (issue 17's table)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    ElectraConfig,
    ElectraForSequenceClassification,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForSequenceClassification,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from rankstream_server.inference.embedded import embedded_model_path

VOCAB = 30522  # BERT uncased
BERT_IDS = {"pad_token_id": 0, "cls_token_id": 101, "sep_token_id": 102, "bos_token_id": 101, "eos_token_id": 102}

# How LLM rerankers ship their prompt: a chat template that carries the pair as "query" and
# "document" messages, and a system message (sentence-transformers' prompt) as the instruction.
RERANKER_TEMPLATE = (
    "{%- set ns = namespace(instruction='Given a web search query, retrieve relevant passages that answer the query') -%}"
    "{%- for message in messages -%}{%- if message.role == 'system' -%}{%- set ns.instruction = message.content -%}{%- endif -%}"
    "{%- if message.role == 'query' -%}{%- set ns.query = message.content -%}{%- endif -%}"
    "{%- if message.role == 'document' -%}{%- set ns.document = message.content -%}{%- endif -%}{%- endfor -%}"
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
    "<Instruct>: {{ ns.instruction }}\n<Query>: {{ ns.query }}\n<Document>: {{ ns.document }}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)

_WORDS = (
    "yes no the a of to and in is was for on that with as by it at from this be are or an which what how "
    "query document passage capital china beijing paris france gravity force planet sun weather lovely sunny "
    "judge whether meets requirements based instruct provided answer can only web search retrieve relevant "
    "passages cross encoder reads score rerankers candidates retrieval dense sparse model length"
).split()


def qwen_tokenizer(out: Path, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer shaped like Qwen's: no pair template (a pair is the two texts
    concatenated), <|endoftext|> pads, ChatML specials, and "yes" / "no" as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(len(_WORDS))] * 10 + ["yes", "no", " yes", " no"] * 50
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template is not None:
        wrapped.chat_template = chat_template
    wrapped.save_pretrained(out)
    return wrapped


def _qwen_config(config_class, tokenizer, **extra):
    return config_class(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **extra,
    )


def _save(model: torch.nn.Module, out: Path, tokenizer=None) -> Path:
    model.eval().save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _bert_tokenizer():
    return AutoTokenizer.from_pretrained(embedded_model_path())


def tiny_xlm_roberta(out: Path) -> Path:
    """bge-reranker-v2-m3's shape (XLM-RoBERTa); BERT's vocabulary keeps the test small."""
    torch.manual_seed(11)
    config = XLMRobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=160, type_vocab_size=2, num_labels=1,
                              pad_token_id=0, bos_token_id=101, eos_token_id=102)
    return _save(XLMRobertaForSequenceClassification(config), out, _bert_tokenizer())


def tiny_electra(out: Path) -> Path:
    torch.manual_seed(12)
    config = ElectraConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=128, num_labels=1)
    return _save(ElectraForSequenceClassification(config), out, _bert_tokenizer())


def tiny_modernbert(out: Path, pooling: str) -> Path:
    """gte-reranker-modernbert / granite-r2's shape: alternating global and sliding-window (local)
    attention; the local window (16 tokens) is far shorter than the test passages."""
    torch.manual_seed(13 if pooling == "cls" else 14)
    config = ModernBertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, max_position_embeddings=256, local_attention=16,
                              global_attn_every_n_layers=3, classifier_pooling=pooling, num_labels=1, **BERT_IDS)
    return _save(ModernBertForSequenceClassification(config), out, _bert_tokenizer())


def tiny_qwen3_seq_cls(out: Path, chat_template: bool) -> Path:
    """A sequence-classification conversion of an LLM reranker (last-token pooling, causal mask)."""
    torch.manual_seed(15 if chat_template else 16)
    tokenizer = qwen_tokenizer(out, RERANKER_TEMPLATE if chat_template else None)
    config = _qwen_config(Qwen3Config, tokenizer, num_labels=1)
    return _save(Qwen3ForSequenceClassification(config), out)


def tiny_qwen2_seq_cls(out: Path) -> Path:
    torch.manual_seed(17)
    tokenizer = qwen_tokenizer(out)
    config = _qwen_config(Qwen2Config, tokenizer, num_labels=1)
    return _save(Qwen2ForSequenceClassification(config), out)


def tiny_qwen3_yes_no(out: Path) -> Path:
    """Qwen3-Reranker's shape: a causal LM scored by the logits of "yes" and "no" at the last token."""
    torch.manual_seed(18)
    tokenizer = qwen_tokenizer(out, RERANKER_TEMPLATE)
    return _save(Qwen3ForCausalLM(_qwen_config(Qwen3Config, tokenizer)), out)


def saved_by_sentence_transformers(source: Path, out: Path, activation: torch.nn.Module | None = None,
                                   prompts: dict[str, str] | None = None, default_prompt: str | None = None) -> Path:
    """The folder sentence-transformers 6 writes for a CrossEncoder (activation, prompts and
    modules in its own config files)."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(source), device="cpu", activation_fn=activation, prompts=prompts,
                         default_prompt_name=default_prompt)
    model.save(str(out))
    return out
