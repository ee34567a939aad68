"""Choosing a model's precision on CPU by measurement, on the machine it runs on.

The same code meets very different CPUs: with AMX or avx512_bf16, bfloat16 passes run 2-4x faster
than float32; on an avx2-only CPU they run several times slower. So `dtype: auto` on CPU times
float32 against bfloat16 (and float16 where the CPU has AMX-FP16) at start-up, through the
backend's own passes (so every model family the backend runs is measured the same way), on
calibration text cut into the model's real pass shapes, with the threads and side-by-side passes
the caller's backend will use. A candidate is kept only when it is at least CANDIDATE_MARGIN
faster AND passes a quality guard against float32 on the same calibration pairs; otherwise
float32, which is never slower than before. An explicit dtype is obeyed; it is timed against
float32 only to warn when it is far slower on this CPU.

`decide` is a pure function of the measurements (unit-tested by forcing them); `settle_precision`
measures and applies the choice to a LoadedModel.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from rankstream_server.config import BatchingConfig
from rankstream_server.inference.backend import TorchBackend, backend_for
from rankstream_server.inference.batches import cut_batches
from rankstream_server.inference.model_loading import LoadedModel, dtype_name
from rankstream_server.inference.tokenization import ChatPairTokenizer, PairTokenizer, TextTokenizer, Tokens

log = logging.getLogger(__name__)

CANDIDATE_MARGIN = 1.2  # a lower precision must be this much faster than float32 to be kept
FAR_SLOWER = 1.5  # an explicit dtype this much slower than float32 gets a warning
TOP_K = 10
MIN_TOP_OVERLAP = 0.99  # cross-encoders: mean top-10 overlap with float32 over calibration queries
TIE_FRACTION = 0.005  # cross-encoders: float32 scores this close (of the spread) rank as ties
MAX_SCORE_DIFF = 0.02  # cross-encoders: max |score - float32 score|, as a fraction of float32's score spread
MIN_COSINE = 0.999  # bi-encoders: every calibration vector against its float32 twin
TIMING_SECONDS = 2.0  # timed rounds stop after about this long (at least MIN_ROUNDS)
MIN_ROUNDS = 2
MAX_ROUNDS = 5
GIVE_UP_RATIO = 2.0  # a candidate this much slower than float32 after a round is timed no more
ROUND_SECONDS = 0.5  # a timed float32 round's rough cost: big models time passes of fewer rows
GUARD_SECONDS = 2.0  # the float32 guard pass's rough cost: big models are guarded on fewer pairs
MIN_GUARD_PASSAGES = 20  # per query (top-10 overlap needs more than 10)
CALIBRATION_QUERIES = (
    "how does a cross-encoder rerank retrieved passages",
    "what should a server do when its work queue is full",
    "how long should stock simmer",
)
# Flags that say what a CPU's matrix units can do natively (reported with every choice).
PRECISION_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                   "amx_fp16", "amx_int8")
NATIVE_FP16_FLAGS = ("amx_fp16",)  # avx512_fp16 alone: torch 2.13 measured no faster than float32 here

FLOAT32 = "float32"
BFLOAT16 = "bfloat16"
FLOAT16 = "float16"


@lru_cache(maxsize=1)
def _cpu_info() -> dict:
    import cpuinfo

    try:
        return cpuinfo.get_cpu_info()
    except Exception:  # noqa: BLE001 - an unknown CPU is reported as such; measurement still decides
        log.warning("could not read the CPU's feature flags", exc_info=True)
        return {}


def cpu_flags() -> tuple[str, ...]:
    """The CPU's precision-relevant feature flags (py-cpuinfo), sorted."""
    return tuple(sorted(flag for flag in set(_cpu_info().get("flags", [])) if flag in PRECISION_FLAGS))


def cpu_name() -> str:
    return _cpu_info().get("brand_raw") or "unknown CPU"


def candidates_for(flags: tuple[str, ...]) -> list[str]:
    """Lower precisions worth timing on a CPU with these flags: bfloat16 always (measurement
    decides), float16 only with native fp16 matrix math."""
    return [BFLOAT16] + ([FLOAT16] if any(flag in flags for flag in NATIVE_FP16_FLAGS) else [])


@dataclass(frozen=True)
class Guard:
    """A candidate's outputs against float32's on the same calibration inputs."""

    passed: bool
    top_overlap: float | None = None  # cross-encoders, near-ties counted as agreeing (the guard's)
    strict_top_overlap: float | None = None  # cross-encoders, exact sets
    max_score_diff: float | None = None  # cross-encoders, in score (logit) units
    score_spread: float | None = None  # cross-encoders: float32's max - min score
    min_cosine: float | None = None  # bi-encoders

    def describe(self) -> str:
        if self.min_cosine is not None:
            return f"min cosine {self.min_cosine:.5f} ({'pass' if self.passed else 'FAIL'}, >= {MIN_COSINE})"
        return (f"top-{TOP_K} overlap {self.top_overlap:.3f} (strict {self.strict_top_overlap:.3f}), max score diff {self.max_score_diff:.2g} "
                f"({self.max_score_diff / self.score_spread if self.score_spread else 0:.1%} of spread) "
                f"({'pass' if self.passed else 'FAIL'})")


def cross_guard(reference: list[np.ndarray], candidate: list[np.ndarray]) -> Guard:
    """Per calibration query: float32's and the candidate's scores for the same passages. A
    passage in the candidate's top-k agrees when it is in float32's top-k or ties its k-th (float32
    scores within TIE_FRACTION of the spread: an order float32 itself barely makes); the strict
    overlap is reported beside it."""
    ref_all, cand_all = np.concatenate(reference), np.concatenate(candidate)
    difference = float(np.max(np.abs(ref_all - cand_all)))
    spread = float(np.max(ref_all) - np.min(ref_all))
    overlaps, strict = [], []
    for ref, cand in zip(reference, candidate, strict=True):
        k = min(TOP_K, len(ref))
        top_ref = np.argsort(-ref, kind="stable")[:k]
        top_cand = np.argsort(-cand, kind="stable")[:k]
        strict.append(len(set(top_ref.tolist()) & set(top_cand.tolist())) / k)
        overlaps.append(float(np.mean(ref[top_cand] >= ref[top_ref[-1]] - TIE_FRACTION * spread)))
    overlap = float(np.mean(overlaps))
    passed = bool(np.isfinite(difference) and overlap >= MIN_TOP_OVERLAP and difference <= MAX_SCORE_DIFF * spread)
    return Guard(passed, top_overlap=overlap, strict_top_overlap=float(np.mean(strict)), max_score_diff=difference,
                 score_spread=spread)


def bi_guard(reference: np.ndarray, candidate: np.ndarray) -> Guard:
    """Row by row: float32's and the candidate's embeddings of the same texts."""
    ref = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    cand = candidate / np.maximum(np.linalg.norm(candidate, axis=1, keepdims=True), 1e-12)
    cosine = float(np.min(np.sum(ref * cand, axis=1)))
    return Guard(bool(np.isfinite(cosine) and cosine >= MIN_COSINE), min_cosine=cosine)


@dataclass
class PrecisionChoice:
    """What a model runs in, and why: for logs, ListModels and `rankstream doctor`."""

    dtype: str
    reason: str
    speeds: dict[str, float] = field(default_factory=dict)  # rows/s measured, by dtype
    guards: dict[str, Guard] = field(default_factory=dict)  # the candidates that were fast enough to check
    cpu_flags: tuple[str, ...] = ()
    seconds: float = 0.0  # spent measuring

    def describe(self) -> str:
        parts = [f"{self.dtype} ({self.reason})"]
        if self.speeds:
            base = self.speeds.get(FLOAT32)
            parts.append("rows/s " + ", ".join(
                f"{dtype} {rate:.1f}" + (f" ({rate / base:.2f}x)" if base and dtype != FLOAT32 else "")
                for dtype, rate in self.speeds.items()))
        parts += [f"{dtype} guard: {guard.describe()}" for dtype, guard in self.guards.items()]
        parts.append(f"CPU flags: {' '.join(self.cpu_flags) or 'none known'}")
        if self.seconds:
            parts.append(f"measured in {self.seconds:.1f} s")
        return "; ".join(parts)

    def as_info(self) -> dict[str, object]:
        """ModelInfo's fields for it (dtype_reason, dtype_measurements, cpu_flags)."""
        measurements = []
        for dtype, rate in self.speeds.items():
            entry: dict[str, object] = {"dtype": dtype, "rows_per_second": rate}
            guard = self.guards.get(dtype)
            if guard is not None:
                entry["guard_passed"] = guard.passed
                for name in ("top_overlap", "strict_top_overlap", "max_score_diff", "score_spread", "min_cosine"):
                    if getattr(guard, name) is not None:
                        entry[name] = getattr(guard, name)
            measurements.append(entry)
        return {"dtype_reason": self.reason, "dtype_measurements": measurements, "cpu_flags": list(self.cpu_flags)}


def fast_enough(speeds: dict[str, float]) -> list[str]:
    """The candidates at least CANDIDATE_MARGIN faster than float32 (they get a quality guard)."""
    base = speeds[FLOAT32]
    return [dtype for dtype, rate in speeds.items() if dtype != FLOAT32 and rate >= CANDIDATE_MARGIN * base]


def decide(speeds: dict[str, float], guards: dict[str, Guard]) -> tuple[str, str]:
    """The dtype for `dtype: auto` on CPU, and why: the fastest candidate that is at least
    CANDIDATE_MARGIN faster than float32 and passed its guard; else float32."""
    base = speeds[FLOAT32]
    kept = [dtype for dtype in fast_enough(speeds) if dtype in guards and guards[dtype].passed]
    if kept:
        best = max(kept, key=lambda dtype: speeds[dtype])
        return best, f"auto: measured {speeds[best] / base:.2f}x float32, quality guard passed"
    reasons = []
    for dtype, rate in speeds.items():
        if dtype == FLOAT32:
            continue
        if rate < CANDIDATE_MARGIN * base:
            reasons.append(f"{dtype} measured {rate / base:.2f}x (under {CANDIDATE_MARGIN}x)")
        else:
            reasons.append(f"{dtype} failed the quality guard")
    return FLOAT32, "auto: " + ("; ".join(reasons) or "no lower precision to try")


def far_slower(speeds: dict[str, float], dtype: str) -> bool:
    """An explicit dtype that measured FAR_SLOWER or more below float32."""
    return dtype != FLOAT32 and speeds[dtype] * FAR_SLOWER <= speeds[FLOAT32]


# -- measuring --------------------------------------------------------------------------------


def _calibration_text() -> tuple[list[str], list[str]]:
    """Queries and ~100-token passages (two demo-corpus passages of a topic joined: the length of a
    typical reranked passage), shipped with the package so start-up needs no data."""
    lines = resources.files("rankstream_server").joinpath("data/demo_corpus.jsonl").read_text(encoding="utf-8")
    records = [json.loads(line) for line in lines.splitlines() if line.strip()]
    texts = [f"{r['title']}. {r['text']}" for r in records]
    passages = [f"{texts[i]} {texts[(i + 1) % len(texts)]}" for i in range(len(texts))]
    return list(CALIBRATION_QUERIES), passages


def _calibration_tokens(loaded: LoadedModel) -> list[Tokens]:
    """Cross-encoders: one Tokens per query (its pairs with every passage). Bi-encoders: the
    queries, then the passages."""
    queries, passages = _calibration_text()
    if loaded.kind == "cross":  # pairs laid out as the server lays them out for this family
        if loaded.pair_template is not None:
            tokenizer = ChatPairTokenizer(loaded.tokenizer, loaded.max_length, loaded.config.name, loaded.pair_template)
        else:
            tokenizer = PairTokenizer(loaded.tokenizer, loaded.max_length, loaded.config.name, loaded.uses_token_type_ids)
        instruction = loaded.family.default_instruction if loaded.family is not None else None
        return [tokenizer.encode(query, passages, instruction=instruction) for query in queries]
    tokenizer = TextTokenizer(loaded.tokenizer, loaded.max_length, loaded.config.query_prefix, loaded.config.passage_prefix)
    return [tokenizer.encode(queries, "query"), tokenizer.encode(passages, "passage")]


Part = tuple[Tokens, np.ndarray]  # a calibration input and the rows of it to run


def _run_all(backend: TorchBackend, parts: list[Part]) -> list[np.ndarray]:
    """The rows of every part through the backend, cut into its pass shapes, every pass launched
    before any is collected (so side-by-side passes run side by side); outputs per part, indexed
    like its tokens' rows."""
    batches = cut_batches([(i, tokens, rows) for i, (tokens, rows) in enumerate(parts)], backend.shapes)
    pending = [backend.launch(batch) for batch in batches]
    outputs: list[np.ndarray | None] = [None] * len(parts)
    for batch, result in zip(batches, pending):
        values = result.result()
        for piece in batch.pieces:
            if outputs[piece.owner] is None:
                outputs[piece.owner] = np.zeros((len(parts[piece.owner][0]), *values.shape[1:]), dtype=np.float32)
            outputs[piece.owner][piece.rows] = values[piece.slots]
    return outputs


def _whole(tokens: Tokens) -> Part:
    return tokens, np.arange(len(tokens), dtype=np.int64)


def _variant(loaded: LoadedModel, dtype: torch.dtype) -> LoadedModel:
    """A copy of the loaded model in another dtype (its own weights; the rest shared)."""
    twin = copy.copy(loaded)
    twin.model = copy.deepcopy(loaded.model).to(dtype)
    twin.dtype = dtype
    return twin


def _time(backends: dict[str, TorchBackend], timed: dict[str, list[Part]]) -> dict[str, float]:
    """Rows/s per dtype: alternating rounds, each dtype keeping its best (other work on the machine
    only ever slows a round down); at least MIN_ROUNDS, then until TIMING_SECONDS."""
    rows = sum(len(rows) for _, rows in next(iter(timed.values())))
    best: dict[str, float] = {}
    active = list(backends)
    started = time.perf_counter()
    for round_number in range(MAX_ROUNDS):
        for name in active:
            begun = time.perf_counter()
            _run_all(backends[name], timed[name])
            best[name] = min(time.perf_counter() - begun, best.get(name, float("inf")))
        # A candidate far slower than float32 (bfloat16 on an avx2-only CPU) is not timed on.
        active = [name for name in active if name == FLOAT32 or best[name] <= GIVE_UP_RATIO * best[FLOAT32]]
        if round_number + 1 >= MIN_ROUNDS and time.perf_counter() - started > TIMING_SECONDS:
            break
    return {name: rows / seconds for name, seconds in best.items()}


def _timed_round(source: Tokens, backend: TorchBackend, seconds_per_row: float) -> list[Part]:
    """One timed round: a pass per pass the backend runs side by side, in the server's shapes
    (full passes; fewer rows where float32 would take over ROUND_SECONDS), rows cycled to fill."""
    full = backend.shapes.rows_for(backend.shapes.width(int(source.lengths.max())))
    rows_per_pass = max(1, min(full, int(ROUND_SECONDS / max(seconds_per_row, 1e-9))))
    return [(source, np.arange(backend.parallel_passes * rows_per_pass, dtype=np.int64) % len(source))]


def _guard_parts(loaded: LoadedModel, parts: list[Tokens], rows_budget: int) -> list[Part]:
    """The calibration inputs the guard compares, cut to about `rows_budget` rows (big models):
    cross-encoders keep at least MIN_GUARD_PASSAGES passages of at least one query."""
    if loaded.kind == "cross":
        passages = min(len(parts[0]), max(MIN_GUARD_PASSAGES, rows_budget // len(parts)))
        queries = min(len(parts), max(1, rows_budget // passages))
        return [(tokens, np.arange(passages, dtype=np.int64)) for tokens in parts[:queries]]
    queries, passages = parts
    return [_whole(queries), (passages, np.arange(min(len(passages), max(MIN_GUARD_PASSAGES, rows_budget)), dtype=np.int64))]


def measure(loaded: LoadedModel, dtypes: list[str], batching: BatchingConfig | None = None,
            guard: bool = True) -> tuple[dict[str, float], dict[str, Guard], dict[str, LoadedModel]]:
    """Times float32 and `dtypes` through the backend's passes; guards those fast enough.
    Returns speeds (rows/s), guards, and the loaded variants by dtype name."""
    config = (batching or BatchingConfig()).model_copy(update={"compile": False})
    current = dtype_name(loaded.dtype)
    variants = {name: loaded if name == current else _variant(loaded, getattr(torch, name))
                for name in dict.fromkeys([FLOAT32, current, *dtypes])}  # float32 first
    backends = {name: backend_for(variant, config) for name, variant in variants.items()}
    try:
        parts = _calibration_tokens(loaded)
        source = parts[0] if loaded.kind == "cross" else parts[1]  # a query's pairs, or passages
        probe = [(source, np.arange(min(2, len(source)), dtype=np.int64))]
        for backend in backends.values():  # each meets the model once, untimed
            _run_all(backend, probe)
        begun = time.perf_counter()
        _run_all(backends[FLOAT32], probe)
        seconds_per_row = (time.perf_counter() - begun) / len(probe[0][1])
        timed = {name: _timed_round(source, backend, seconds_per_row) for name, backend in backends.items()}
        speeds = _time(backends, timed)
        guards: dict[str, Guard] = {}
        checked = fast_enough(speeds) if guard else []
        if checked:
            rows_budget = int(GUARD_SECONDS * backends[FLOAT32].parallel_passes / max(seconds_per_row, 1e-9))
            compared = _guard_parts(loaded, parts, rows_budget)
            reference = [out[rows] for out, (_, rows) in zip(_run_all(backends[FLOAT32], compared), compared)]
            for name in checked:
                outputs = [out[rows] for out, (_, rows) in zip(_run_all(backends[name], compared), compared)]
                guards[name] = (cross_guard(reference, outputs) if loaded.kind == "cross"
                                else bi_guard(np.concatenate(reference), np.concatenate(outputs)))
    finally:
        for backend in backends.values():
            backend.close()
    return speeds, guards, variants


def settle_precision(loaded: LoadedModel, batching: BatchingConfig | None = None) -> LoadedModel:
    """Sets `loaded.precision` and, for `dtype: auto` on CPU, switches the model to the measured
    choice (its other copies are dropped). Call with torch's thread count as the caller will run
    (the server sets it before loading), and the batching config its backend will use. Blocking:
    seconds of model work."""
    flags = cpu_flags() if loaded.device.type == "cpu" else ()
    configured = loaded.config.dtype
    current = dtype_name(loaded.dtype)
    if loaded.device.type != "cpu":
        loaded.precision = PrecisionChoice(current, f"{loaded.device.type}: {configured}")
        return loaded
    if configured == FLOAT32:
        loaded.precision = PrecisionChoice(current, "configured", cpu_flags=flags)
        return loaded
    started = time.perf_counter()
    if configured != "auto":
        speeds, _, _ = measure(loaded, [], batching, guard=False)
        reason = "configured"
        if far_slower(speeds, current):
            reason = f"configured, though it measured {speeds[FLOAT32] / speeds[current]:.1f}x slower than float32 here"
            log.warning("model %s: dtype %s is %.1fx slower than float32 on this CPU (flags: %s); "
                        "dtype: auto would choose by measurement", loaded.config.name, current,
                        speeds[FLOAT32] / speeds[current], " ".join(flags) or "none known")
        loaded.precision = PrecisionChoice(current, reason, speeds, {}, flags, time.perf_counter() - started)
        return loaded
    speeds, guards, variants = measure(loaded, candidates_for(flags), batching)
    chosen, reason = decide(speeds, guards)
    winner = variants[chosen]
    loaded.model, loaded.dtype = winner.model, winner.dtype
    loaded.precision = PrecisionChoice(chosen, reason, speeds, guards, flags, time.perf_counter() - started)
    log.info("model %s runs in %s", loaded.config.name, loaded.precision.describe())
    return loaded
