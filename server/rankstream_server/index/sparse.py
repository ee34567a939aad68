"""The sparse (keyword) side of an index: BM25 over `title + " " + text`.

Text is tokenized by bm25s's tokenizer (lower case, words of two or more characters, English
stop words removed) and, optionally, stemmed with Snowball (PyStemmer). The tokens go into an
SQLite FTS5 table inside the index's own docs.sqlite, written in the same transaction as the
passage itself: an acknowledged upsert or delete is visible to keyword search at once and
survives `kill -9`, with nothing else to catch up. FTS5's bm25() ranks (k1 1.2, b 0.75, its
defaults); the score reported is that value divided by k1 + 1, which is exactly the Robertson
BM25 that bm25s computes (`method="robertson"`) for the same tokens.

Fusion (hybrid mode) is reciprocal rank fusion: each side's top `depth` candidates, a passage
scoring the sum of 1 / (rrf_k + rank) over the sides that found it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rankstream_server.index.corpus import passage_text

K1, B = 1.2, 0.75  # FTS5's bm25() defaults


class BM25Tokenizer:
    """bm25s's tokenizer with English stop words and optional Snowball stemming."""

    def __init__(self, stemmer: str | None = "english", stopwords: str | None = "en"):
        self.stemmer_name = stemmer
        self.stopwords = stopwords
        self._stemmer = None
        if stemmer:
            import Stemmer

            self._stemmer = Stemmer.Stemmer(stemmer)

    @classmethod
    def for_index(cls, config) -> BM25Tokenizer | None:
        """The tokenizer of an IndexConfig's keyword side; None when it has none."""
        return cls(config.sparse.stemmer, config.sparse.stopwords) if config.has_sparse else None

    def identity(self) -> dict[str, object]:
        """What makes the tokens what they are (in the manifest: a change rebuilds the table)."""
        return {"tokenizer": "bm25s", "stopwords": self.stopwords, "stemmer": self.stemmer_name}

    def tokenize(self, texts: list[str]) -> list[list[str]]:
        import bm25s

        if not texts:
            return []
        stemmer = self._stemmer.stemWords if self._stemmer is not None else None
        return bm25s.tokenize(texts, stopwords=self.stopwords or [], stemmer=stemmer, return_ids=False,
                              show_progress=False)

    def documents(self, texts: list[str]) -> list[str]:
        """One space-joined token string per text, as stored in the FTS table."""
        return [" ".join(tokens) for tokens in self.tokenize(texts)]

    def passages(self, rows: list[tuple[str | None, str]]) -> list[str]:
        """documents() of (title, text) rows, read as the models read them."""
        return self.documents([passage_text(text, title) for title, text in rows])

    def match_expression(self, query: str) -> str | None:
        """An FTS5 query: any of the query's terms (each quoted). None when it has no term."""
        terms = sorted(set(self.tokenize([query])[0])) if query else []
        if not terms:
            return None
        return " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)


def robertson_score(fts_rank: float) -> float:
    """FTS5's bm25() (negative, lower is better) as bm25s's Robertson score."""
    return -fts_rank / (K1 + 1)


@dataclass
class Fused:
    """Hybrid results: keys best first with their fused score and each side's score and rank
    (rank 0 and score NaN where that side did not find the passage)."""

    keys: np.ndarray
    scores: np.ndarray
    dense_scores: np.ndarray
    dense_ranks: np.ndarray
    sparse_scores: np.ndarray
    sparse_ranks: np.ndarray


def reciprocal_rank_fusion(dense: list[tuple[int, float]], sparse: list[tuple[int, float]], rrf_k: float,
                           top_k: int) -> Fused:
    """Fuses two rankings of (key, score), each best first. Ties keep dense order, then sparse."""
    found: dict[int, list] = {}
    for side, ranking in ((0, dense), (1, sparse)):
        for rank, (key, score) in enumerate(ranking, start=1):
            entry = found.setdefault(key, [0.0, np.nan, 0, np.nan, 0, len(found)])
            entry[0] += 1.0 / (rrf_k + rank)
            entry[1 + 2 * side] = score
            entry[2 + 2 * side] = rank
    order = sorted(found.items(), key=lambda item: (-item[1][0], item[1][5]))[:top_k]

    def column(i: int, dtype) -> np.ndarray:
        return np.array([entry[i] for _, entry in order], dtype=dtype)

    return Fused(np.array([key for key, _ in order], dtype=np.int64), column(0, np.float64), column(1, np.float32),
                 column(2, np.int32), column(3, np.float32), column(4, np.int32))
