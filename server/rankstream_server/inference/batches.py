"""Forming forward passes from many requests' token arrays: shapes, cutting, collating. Pure numpy.

On CUDA a forward pass should only ever meet a few shapes, each warmed (and captured as a CUDA
graph) at start-up: cuDNN attention spends ~240 ms building a plan for every new (rows, width).
So widths are rounded up to a multiple of `length_bucket` and row counts to one of `row_buckets`.
On the CPU in float32 no shape is costly to meet, so both default to exact; in bf16/fp16 oneDNN
builds a kernel per shape, so widths are bucketed there too (backend.shape_policy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShapePolicy:
    """Which (rows, width) shapes forward passes use."""

    max_length: int  # the model's max tokens per row
    max_rows: int
    max_tokens: int  # padded tokens per pass (rows x width)
    length_bucket: int = 1  # widths are multiples of this (capped at max_length)
    row_buckets: tuple[int, ...] = ()  # allowed row counts, ascending; () = any

    def width(self, longest: int) -> int:
        bucket = self.length_bucket
        return min(self.max_length, -(-longest // bucket) * bucket) if bucket > 1 else longest

    def rows_for(self, width: int) -> int:
        """How many rows a pass of this width carries when it is full."""
        rows = max(1, min(self.max_rows, self.max_tokens // max(width, 1)))
        if self.row_buckets:
            fitting = [r for r in self.row_buckets if r <= rows]
            rows = fitting[-1] if fitting else self.row_buckets[0]
        return rows

    def padded_rows(self, rows: int) -> int:
        """The shape's row count for a pass of `rows` real rows."""
        if not self.row_buckets:
            return rows
        return next((r for r in self.row_buckets if r >= rows), rows)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, width) a pass can have, for warming up (needs buckets to be finite)."""
        widths = sorted({self.width(w) for w in range(1, self.max_length + 1)})
        shapes = []
        for width in widths:
            full = self.rows_for(width)
            rows = [r for r in self.row_buckets if r <= full] if self.row_buckets else [full]
            shapes += [(r, width) for r in rows]
        return shapes


def power_of_two_rows(max_rows: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to max_rows (and max_rows itself)."""
    rows = []
    r = 1
    while r < max_rows:
        rows.append(r)
        r *= 2
    return (*rows, max_rows)


@dataclass(eq=False)  # identity: pieces and batches hold arrays, and are found by identity
class Piece:
    """Rows of one request inside a batch: `rows` in the request's arrays go to `slots` in the batch."""

    owner: object  # the request (a batcher Job)
    tokens: object  # its Tokens
    rows: np.ndarray  # int64, rows of tokens (= positions in the request)
    slots: np.ndarray  # int64, rows of the batch


@dataclass(eq=False)
class Batch:
    """One forward pass: `real` rows from `pieces`, padded to (rows, width)."""

    rows: int
    width: int
    real: int
    tokens: int  # real tokens (no padding)
    pieces: list[Piece]


def cut_batches(parts: Sequence[tuple[object, object, np.ndarray]], policy: ShapePolicy) -> list[Batch]:
    """Sorts the rows of every (owner, tokens, rows) part by length, longest first, across parts,
    and cuts them into batches under the policy (so rows of a batch have similar lengths)."""
    if not parts:
        return []
    part_of = np.concatenate([np.full(len(rows), i, dtype=np.int64) for i, (_, _, rows) in enumerate(parts)])
    row_of = np.concatenate([rows for _, _, rows in parts]).astype(np.int64, copy=False)
    lengths = np.concatenate([tokens.lengths[rows] for _, tokens, rows in parts]).astype(np.int64, copy=False)
    order = np.argsort(-lengths, kind="stable")
    part_of, row_of, lengths = part_of[order], row_of[order], lengths[order]
    batches = []
    start = 0
    total = len(order)
    while start < total:
        width = policy.width(int(lengths[start]))
        end = min(total, start + policy.rows_for(width))
        real = end - start
        batch_parts = part_of[start:end]
        pieces = []
        for index in np.unique(batch_parts):
            owner, tokens, _ = parts[int(index)]
            slots = np.flatnonzero(batch_parts == index)
            pieces.append(Piece(owner, tokens, row_of[start:end][slots], slots))
        batches.append(Batch(policy.padded_rows(real), width, real, int(lengths[start:end].sum()), pieces))
        start = end
    return batches


def collate(batch: Batch, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None,
            pad_id: int, left: bool = False) -> None:
    """Fills (rows, width) arrays, e.g. views of reusable pinned buffers, for one batch. Padding rows
    get one attended pad token, so no row of the pass is all-masked (that gives NaN in some kernels).
    `left`: rows end at the last column (causal LMs scored at the last position)."""
    width = batch.width
    input_ids.fill(pad_id)
    attention_mask.fill(0)
    if token_type_ids is not None:
        token_type_ids.fill(0)
    columns = np.arange(width)
    for piece in batch.pieces:
        source = piece.tokens.input_ids
        lengths = piece.tokens.lengths[piece.rows][:, None]
        if left:  # column c holds token c - (width - length) of the row
            taken = columns[None, :] - (width - lengths)
            real = taken >= 0
            rows = piece.tokens.input_ids[piece.rows[:, None], np.clip(taken, 0, source.shape[1] - 1)]
            input_ids[piece.slots] = np.where(real, rows, pad_id)
            attention_mask[piece.slots] = real
            continue
        take = min(width, source.shape[1])
        input_ids[piece.slots, :take] = source[piece.rows, :take]
        attention_mask[piece.slots] = columns < lengths
        if token_type_ids is not None:
            token_type_ids[piece.slots, :take] = piece.tokens.token_type_ids[piece.rows, :take]
    attention_mask[batch.real:, -1 if left else 0] = 1
