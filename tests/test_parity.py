"""Scores through the server equal sentence-transformers' CrossEncoder.predict for the same checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder

from conftest import QUERY, TEXTS, passages

TOLERANCE = 1e-5

CASES = {
    "tiny-bert": lambda m: m.bert,
    "tiny-distilbert": lambda m: m.distilbert,
    "tiny-deberta": lambda m: m.deberta_reference,
    "minilm": lambda m: m.minilm,
}


def reference_scores(folder, raw: bool) -> np.ndarray:
    model = CrossEncoder(str(folder), device="cpu")
    pairs = [(QUERY, text) for text in TEXTS]
    kwargs = {"activation_fn": torch.nn.Identity()} if raw else {}
    return np.asarray(model.predict(pairs, batch_size=4, **kwargs), dtype=np.float32)


@pytest.mark.parametrize("raw", [False, True], ids=["activated", "raw"])
@pytest.mark.parametrize("name", list(CASES))
async def test_scores_equal_sentence_transformers(served, models, name, raw):
    expected = reference_scores(CASES[name](models), raw)
    results, stats = await served.rerank(query=QUERY, passages=passages(TEXTS), model=name, raw_scores=raw)
    got = np.empty(len(TEXTS), dtype=np.float32)
    for result in results:
        got[result.index] = result.score
    assert len(results) == len(TEXTS)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
    assert stats.model == name
    assert stats.truncated == 1  # the long passage was cut to max_length, and still matches
    if not raw:
        assert np.all((got > 0) & (got < 1)), "activated scores are sigmoid outputs"


async def test_title_is_prepended_like_beir(served, models):
    reference = CrossEncoder(str(models.bert), device="cpu")
    expected = reference.predict([(QUERY, "Cross-encoders " + TEXTS[0])])[0]
    results, _ = await served.rerank(
        query=QUERY, passages=passages([TEXTS[0]], title="Cross-encoders"), model="tiny-bert"
    )
    assert abs(results[0].score - expected) <= TOLERANCE
