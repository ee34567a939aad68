"""Running a cross-encoder on a batch of tokenized pairs with torch, on CPU or CUDA.

The batcher sees one small interface: `launch(pairs) -> PendingScores`, then
`PendingScores.result() -> float32 logits`. On CUDA, launch only queues the
work (pinned host memory, non-blocking copies, an event after the copy back),
so the batcher forms and launches the next batch while this one runs. On CPU,
launch computes at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .model_loading import LoadedCrossEncoder
from .tokenization import EncodedPair


class PendingScores:
    """Logits of a launched batch; `result()` waits for them."""

    def __init__(self, host: torch.Tensor, ready: torch.cuda.Event | None):
        self._host = host
        self._ready = ready

    def result(self) -> np.ndarray:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.numpy()


class TorchCrossEncoder:
    """Scores padded batches of pairs with one torch sequence-classification model."""

    def __init__(self, loaded: LoadedCrossEncoder):
        self._model = loaded.model
        self._device = loaded.device
        self._pad_id = loaded.tokenizer.pad_token_id or 0
        self._uses_token_type_ids = loaded.uses_token_type_ids
        self.asynchronous = loaded.device.type == "cuda"

    def _collate(self, pairs: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
        width = max(len(p.input_ids) for p in pairs)
        input_ids = np.full((len(pairs), width), self._pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(pairs), width), dtype=np.int64)
        token_type_ids = np.zeros((len(pairs), width), dtype=np.int64) if self._uses_token_type_ids else None
        for row, pair in enumerate(pairs):
            n = len(pair.input_ids)
            input_ids[row, :n] = pair.input_ids
            attention_mask[row, :n] = 1
            if token_type_ids is not None:
                token_type_ids[row, :n] = pair.token_type_ids
        arrays = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            arrays["token_type_ids"] = token_type_ids
        tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
        if self.asynchronous:
            return {name: t.pin_memory().to(self._device, non_blocking=True) for name, t in tensors.items()}
        return tensors

    @torch.inference_mode()
    def launch(self, pairs: Sequence[EncodedPair]) -> PendingScores:
        inputs = self._collate(pairs)
        logits = self._model(**inputs).logits.reshape(-1).float()
        if not self.asynchronous:
            return PendingScores(logits, None)
        host = torch.empty(logits.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(logits, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return PendingScores(host, ready)
