"""One RPC's use of the models: tokenize on the pool, queue on a batcher, collect results,
and account for timings. Knows nothing of gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from rankstream_server.errors import DeadlineExceeded, TooLarge
from rankstream_server.inference.batcher import BULK, INTERACTIVE, Job
from rankstream_server.inference.tokenization import Tokens, TooLong
from rankstream_server.serving.registry import ServedModel


@dataclass(frozen=True)
class PairOptions:
    """How a request's pairs are formed: the instruction (None = none) and, for long passages,
    how many windows a passage may take (1 = truncate), or whether one is refused (long_passages
    REFUSE: the request fails before anything is scored)."""

    instruction: str | None = None
    chunks: int = 1
    passage_tokens: int = 0  # a passage's (or window's) tokens at most; 0 = what max_length leaves
    refuse: bool = False


def refusal(model: ServedModel, long: TooLong, field: str, setting: str, with_query: bool = False) -> TooLarge:
    """The error for an input past max_length that the request would not have cut: which one,
    its tokens, the limit, and the setting that asked for the refusal."""
    context = " with the query" if with_query else ""
    return TooLarge(f"{field}[{long.index}]: {long.tokens} tokens{context}, longer than model {model.name!r} takes "
                    f"(max_length={model.loaded.max_length}); {setting}=REFUSE")


class ModelCall:
    """Runs one request's work through models; `close()` cancels whatever is still queued."""

    def __init__(self, pool: ThreadPoolExecutor, time_remaining: float | None):
        self._pool = pool
        self._deadline = None if time_remaining is None else time.monotonic() + time_remaining
        self._jobs: list[tuple[ServedModel, Job]] = []
        self.tokenize_s = 0.0
        self.truncated = 0
        self.chunked = 0
        self.windows = 0
        self.passages = 0
        self.scored = 0

    def _precheck(self, model: ServedModel, texts: list[str], extra_chars: int = 0, chunks: int = 1) -> int:
        """Refuses at once, before tokenizing, what the batcher would refuse, and work whose caller's
        deadline has passed already. The token count is estimated from characters (at the model's
        measured characters per token, each row capped at its max_length, or at `chunks` windows
        of it). Returns the characters counted, for learning that ratio."""
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise DeadlineExceeded("deadline passed before the request was tokenized")
        ratio = model.sizes.chars_per_token
        cap = ratio * model.loaded.max_length
        chars = sum(len(text) for text in texts) + extra_chars * len(texts)
        tokens = int(sum(min(len(text) + extra_chars, cap * chunks) for text in texts) / ratio)
        rows = len(texts) if chunks == 1 else sum(min(chunks, 1 + int(len(text) // cap)) for text in texts)
        model.batcher.precheck(rows, tokens, self._deadline)
        return chars

    async def _tokenize(self, model: ServedModel, chars: int, function, *args) -> Tokens:
        started = time.perf_counter()
        tokens = await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)
        self.tokenize_s += time.perf_counter() - started
        self.truncated += tokens.truncated
        self.chunked += tokens.chunked
        if not tokens.truncated and not tokens.chunked:  # truncated rows would overstate characters per token
            model.sizes.learn(chars, tokens.token_count)
        return tokens

    def _submit(self, model: ServedModel, tokens: Tokens, lane: int) -> Job:
        job = Job(size=len(tokens), deadline=self._deadline, lane=lane, group=self)
        model.batcher.submit(job, tokens)
        self._jobs.append((model, job))
        return job

    async def embed(self, model: ServedModel, texts: list[str], role: str, lane: int | None = None,
                    refuse: bool = False) -> np.ndarray:
        """Bi-encoder embeddings of texts ("query" or "passage" role), one row per text. By default
        passages (upserts) go in the bulk lane, behind queries. `refuse`: a text past max_length
        raises TooLong (before anything is queued) instead of being cut."""
        chars = self._precheck(model, texts)
        tokens = await self._tokenize(model, chars, model.tokenizer.encode, texts, role, refuse)
        job = self._submit(model, tokens, lane if lane is not None else (BULK if role == "passage" else INTERACTIVE))
        output = np.zeros((len(texts), model.loaded.dimension), dtype=np.float32)
        async for indices, rows in job.results():
            output[indices] = rows
        return output

    async def score(self, model: ServedModel, query: str, texts: list[str], reuse: bool = False,
                    options: PairOptions = PairOptions()) -> AsyncIterator[tuple[np.ndarray, np.ndarray]]:
        """Raw scores of (query, text) pairs as they come: (indices, scores) per micro-batch.
        Cross-encoders give logits; bi-encoders give the similarity of the two embeddings.
        `reuse`: the texts are corpus passages that recur; their tokens may come from a cache.
        A passage scored in windows (options.chunks > 1) comes once all its windows are scored,
        with the best window's score. With options.refuse a passage past max_length fails the call
        (TooLarge) after tokenizing, before anything is queued."""
        self.passages += len(texts)
        if model.kind == "cross":
            chars = self._precheck(model, texts, extra_chars=len(query) + len(options.instruction or ""),
                                   chunks=options.chunks)
            try:
                tokens = await self._tokenize(model, chars, model.tokenizer.encode, query, texts,
                                              reuse and options.chunks == 1, options.instruction, options.chunks,
                                              options.passage_tokens, options.refuse)
            except TooLong as long:
                raise refusal(model, long, "passages", "long_passages", with_query=True) from None
            self.windows += len(tokens)
            results = self._submit(model, tokens, INTERACTIVE).results()
            if tokens.owners is not None:
                results = best_window(results, tokens.owners, len(texts))
            async for chunk in results:
                self.scored += len(chunk[0])
                yield chunk
            return
        # One after the other: a failed embedding leaves no orphan task behind. Passages first: a
        # refused one (options.refuse) fails the call before anything runs.
        try:
            passage_vectors = await self.embed(model, texts, "passage", lane=INTERACTIVE, refuse=options.refuse)
        except TooLong as long:
            raise refusal(model, long, "passages", "long_passages") from None
        query_vector = await self.embed(model, [query], "query")
        self.scored += len(texts)
        yield np.arange(len(texts)), passage_vectors @ query_vector[0]

    def close(self) -> None:
        for model, job in self._jobs:
            if not job.done:
                model.batcher.cancel(job)

    def stats(self) -> dict[str, float | int]:
        """Timings and counts over every job of this call."""
        jobs = [job for _, job in self._jobs]
        firsts = [(j.stats.first_batch_at - j.stats.enqueued_at) for j in jobs if j.stats.first_batch_at is not None]
        return {
            "passages": self.passages,
            "scored": self.scored,
            "truncated": self.truncated,
            "chunked": self.chunked,
            "windows": self.windows,
            "tokenize_ms": round(self.tokenize_s * 1000, 3),
            "queue_ms": round(max(firsts, default=0.0) * 1000, 3),
            "inference_ms": round(busy_seconds({k: v for j in jobs for k, v in j.stats.passes.items()}) * 1000, 3),
            "batches": sum(j.stats.batches for j in jobs),
            "max_batch_size": max((j.stats.max_batch_size for j in jobs), default=0),
            "shared_batches": sum(j.stats.shared_batches for j in jobs),
            "tokens": sum(j.stats.tokens for j in jobs),
        }


def busy_seconds(passes: dict[float, float]) -> float:
    """Wall time some pass of the request was running: passes side by side (CPU workers) or
    shared by several of its jobs count once."""
    total, reached = 0.0, float("-inf")
    for start, seconds in sorted(passes.items()):
        end = start + seconds
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


async def best_window(results: AsyncIterator[tuple[np.ndarray, np.ndarray]], owners: np.ndarray,
                      count: int) -> AsyncIterator[tuple[np.ndarray, np.ndarray]]:
    """Window scores to passage scores: each passage comes, with its best window's score, in the
    micro-batch that scores its last window. (The max of logits is the max of any monotonic
    activation of them, so raw and activated scores keep the same window.)"""
    best = np.full(count, -np.inf, dtype=np.float32)
    left = np.bincount(owners, minlength=count)
    async for rows, scores in results:
        passages = owners[rows]
        np.maximum.at(best, passages, scores)
        np.subtract.at(left, passages, 1)
        done = np.unique(passages[left[passages] == 0])
        if len(done):
            yield done, best[done]
