"""From logits to the scores and order a client sees."""

from __future__ import annotations

import numpy as np
import torch


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """The model's activation, as sentence-transformers applies it (float32 sigmoid)."""
    if activation == "sigmoid":
        return torch.sigmoid(torch.from_numpy(logits.astype(np.float32))).numpy()
    return logits.astype(np.float32, copy=False)


def passing(scores: np.ndarray, threshold: float | None) -> np.ndarray:
    """Mask of scores at or above the threshold (all when there is none)."""
    if threshold is None:
        return np.ones(scores.shape, dtype=bool)
    return scores >= threshold


def rank(scores: np.ndarray, top_n: int, threshold: float | None) -> np.ndarray:
    """Positions of the best scores, best first (ties: earlier position first), cut at top_n (0 = all)."""
    order = np.argsort(-scores, kind="stable")
    order = order[passing(scores[order], threshold)]
    return order[:top_n] if top_n > 0 else order
