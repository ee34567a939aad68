"""Running a model on a batch of tokenized inputs with torch, on CPU or CUDA.

The batcher sees one small interface: `launch(inputs) -> PendingResult`, then
`PendingResult.result() -> float32 array` (cross-encoders: one logit per row;
bi-encoders: one embedding per row). On CUDA, launch only queues the work
(pinned host memory, non-blocking copies, an event after the copy back), so the
batcher forms and launches the next batch while this one runs. On CPU, launch
computes at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .model_loading import LoadedModel
from .tokenization import TokenizedInput


class PendingResult:
    """Output of a launched batch; `result()` waits for it."""

    def __init__(self, host: torch.Tensor, ready: torch.cuda.Event | None):
        self._host = host
        self._ready = ready

    def result(self) -> np.ndarray:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.numpy()


class TorchBackend:
    """Pads a batch, runs the model's forward pass, hands back float32 rows."""

    def __init__(self, loaded: LoadedModel):
        self._model = loaded.model
        self._device = loaded.device
        self._pad_id = loaded.tokenizer.pad_token_id or 0
        self._uses_token_type_ids = loaded.uses_token_type_ids
        self.asynchronous = loaded.device.type == "cuda"

    def _collate(self, inputs: Sequence[TokenizedInput]) -> dict[str, torch.Tensor]:
        width = max(len(p.input_ids) for p in inputs)
        input_ids = np.full((len(inputs), width), self._pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(inputs), width), dtype=np.int64)
        token_type_ids = np.zeros((len(inputs), width), dtype=np.int64) if self._uses_token_type_ids else None
        for row, item in enumerate(inputs):
            n = len(item.input_ids)
            input_ids[row, :n] = item.input_ids
            attention_mask[row, :n] = 1
            if token_type_ids is not None:
                token_type_ids[row, :n] = item.token_type_ids
        arrays = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            arrays["token_type_ids"] = token_type_ids
        tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
        if self.asynchronous:
            return {name: t.pin_memory().to(self._device, non_blocking=True) for name, t in tensors.items()}
        return tensors

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def launch(self, inputs: Sequence[TokenizedInput]) -> PendingResult:
        if not self.asynchronous:
            return PendingResult(self._forward(self._collate(inputs)).float(), None)
        with torch.cuda.device(self._device):  # streams and events of the model's own GPU
            output = self._forward(self._collate(inputs)).float()
            host = torch.empty(output.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(output, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        return PendingResult(host, ready)


class CrossEncoderBackend(TorchBackend):
    """One logit per (query, passage) pair."""

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._model(**batch).logits.reshape(-1)


class BiEncoderBackend(TorchBackend):
    """One embedding per text: CLS or mean pooling, L2-normalized for cosine similarity
    (as sentence-transformers' Pooling and Normalize modules compute them)."""

    def __init__(self, loaded: LoadedModel):
        super().__init__(loaded)
        self._pooling = loaded.pooling
        self._normalize = loaded.similarity == "cosine"

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self._model(**batch).last_hidden_state
        if self._pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self._normalize:
            pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
        return pooled


def backend_for(loaded: LoadedModel) -> TorchBackend:
    return CrossEncoderBackend(loaded) if loaded.kind == "cross" else BiEncoderBackend(loaded)
