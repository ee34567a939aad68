"""Models the tests build and save: tiny random BERT, DistilBERT and DeBERTa-v2 (v3-style)
sequence classifiers, one per loading path, and the full-size MiniLM cross-encoder."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertTokenizerFast,
)

from rankstream_server.inference.embedded import build_minilm_cross_encoder, embedded_model_path

VOCAB = 30522  # BERT uncased, the tokenizer of the MS MARCO cross-encoders and TAS-B


def _save(model: torch.nn.Module, out: Path, tokenizer=None) -> Path:
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def tiny_bert(out: Path) -> Path:
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=1,
    )
    return _save(BertForSequenceClassification(config).eval(), out, AutoTokenizer.from_pretrained(embedded_model_path()))


def tiny_distilbert(out: Path) -> Path:
    torch.manual_seed(2)
    config = DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128, num_labels=1,
    )
    tokenizer = DistilBertTokenizerFast.from_pretrained(embedded_model_path())
    return _save(DistilBertForSequenceClassification(config).eval(), out, tokenizer)


def tiny_deberta_v2(out: Path) -> Path:
    """DeBERTa-v3 style (relative attention, no token types). Weights only: like the
    DistilRankNET card, its tokenizer lives in another folder (see with_tokenizer)."""
    torch.manual_seed(3)
    config = DebertaV2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, type_vocab_size=0, relative_attention=True, position_buckets=64,
        max_relative_positions=-1, pos_att_type=["p2c", "c2p"], position_biased_input=False,
        norm_rel_ebd="layer_norm", share_att_key=True, num_labels=1,
    )
    return _save(DebertaV2ForSequenceClassification(config).eval(), out)


def bert_tokenizer(out: Path) -> Path:
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(out)
    return out


def with_tokenizer(weights: Path, tokenizer: Path, out: Path) -> Path:
    """A folder holding both, for the reference implementation, which expects one folder."""
    out.mkdir(parents=True, exist_ok=True)
    for source in (weights, tokenizer):
        for file in source.iterdir():
            (out / file.name).write_bytes(file.read_bytes())
    return out


def minilm_cross(out: Path) -> Path:
    return build_minilm_cross_encoder(out, seed=0)


def tiny_distilbert_cls_bi_encoder(out: Path) -> Path:
    """A TAS-B-shaped bi-encoder (DistilBERT, CLS pooling, dot product) in sentence-transformers layout."""
    import json

    torch.manual_seed(4)
    config = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128)
    from transformers import DistilBertModel

    _save(DistilBertModel(config).eval(), out, DistilBertTokenizerFast.from_pretrained(embedded_model_path()))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    ))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    return out
