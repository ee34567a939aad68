"""Running a model on a batch with torch, on CPU or CUDA.

The batcher sees one small interface: `launch(batch) -> PendingResult`, then
`PendingResult.result() -> float32 array` (cross-encoders: one logit per row; bi-encoders: one
embedding per row), and `shapes`, the ShapePolicy its batches must follow.

On CUDA:
- every pass has one of a few shapes (widths in buckets, rows in buckets), all warmed at
  start-up, so serving never meets a cold shape;
- inputs are collated straight into reusable pinned buffers and copied without blocking; the
  output comes back into a pinned buffer, with an event to wait on, so the batcher forms and
  launches the next pass while this one runs;
- each shape is captured as a CUDA graph, so small models stop paying per-kernel launch cost;
  a capture that fails, or whose output differs from the eager pass, turns graphs off for that
  model (logged) and serving goes on eagerly;
- the SDPA attention kernel is chosen by timing the candidates at start-up.
On CPU, passes run in exact shapes (bf16/fp16: widths in multiples of 16 and rows in powers of
two, see CPU_LOW_PRECISION_LENGTH_BUCKET) on `cpu_passes` worker threads side by side (one per core by
default, each with torch's intra-op threads), so tokenizing, the event loop and passes share the
cores without OpenMP threads spinning against each other; with `batching.compile` they run the
torch.compile'd model (checked against eager and timed at start-up).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from rankstream_server.config import BatchingConfig
from rankstream_server.inference.batches import Batch, Piece, ShapePolicy, collate, power_of_two_rows
from rankstream_server.inference.model_loading import LoadedModel
from rankstream_server.inference.tokenization import Tokens

log = logging.getLogger(__name__)

CPU_BATCH_TOKENS = 2048  # measured fastest per pair on CPU: caches beat big matrices
GPU_BATCH_TOKENS = 16384
GPU_LENGTH_BUCKET = 32
# bf16/fp16 on CPU: oneDNN builds (JIT-compiles) and caches a kernel for every matmul shape it
# meets, so exact shapes make nearly every pass build new ones and the cache (1,024 kernels)
# grow the RSS by hundreds of MiB. Widths in multiples of 16 and row counts in powers of two
# keep the shapes few (~20 in a varied load): measured on the MiniLM-L6 cross-encoder in bf16,
# one thread, passes of 2,048 tokens, ~20% more real tokens/s than exact widths despite the
# padding, and powers-of-two rows 5-17% more again. float32 stays exact: its kernels are not
# built per shape, and padding made it ~10% slower.
CPU_LOW_PRECISION_LENGTH_BUCKET = 16
TUNED_BATCH_TOKENS = (1024, 2048, 4096, 8192)  # CPU budgets tried at start-up when none is configured
TUNING_SECONDS = 2.0
TUNING_ROUNDS = 5  # timed rounds over every budget (fewer when a big model uses up TUNING_SECONDS)
BUDGET_TOLERANCE = 0.1  # a larger budget within 10% of the fastest is preferred
COMPILE_TOLERANCE = 1e-4  # compiled vs eager, fp32 logits or embeddings (measured: ~1e-7)
# bf16/fp16 passes round differently once fused (measured ~2e-4 on MiniLM-L6 logits in bf16): the
# float32 quality guard (inference/precision.py) judges them; this only catches a broken compile.
LOW_PRECISION_COMPILE_TOLERANCE = 1e-2
STAGING_SLOTS = 3  # pinned buffer sets in rotation (the batcher keeps at most two passes in flight)


def shape_policy(loaded: LoadedModel, config: BatchingConfig) -> ShapePolicy:
    """The shapes a model's passes take, by device and config."""
    cuda = loaded.device.type == "cuda"
    max_tokens = config.max_batch_tokens or (GPU_BATCH_TOKENS if cuda else CPU_BATCH_TOKENS)
    low_precision = loaded.dtype in (torch.bfloat16, torch.float16)
    length_bucket = config.length_bucket or (GPU_LENGTH_BUCKET if cuda else
                                             CPU_LOW_PRECISION_LENGTH_BUCKET if low_precision else 1)
    pad_rows = config.pad_rows if config.pad_rows is not None else (cuda or low_precision)
    rows = power_of_two_rows(config.max_batch_size) if pad_rows else ()
    return ShapePolicy(loaded.max_length, config.max_batch_size, max_tokens, length_bucket, rows)


class PendingResult:
    """Output of a launched CUDA pass; `result()` waits for it."""

    def __init__(self, host: torch.Tensor, ready: torch.cuda.Event | None, rows: int):
        self._host = host
        self._ready = ready
        self._rows = rows

    def result(self) -> np.ndarray:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host[: self._rows].numpy().copy()  # the buffer is reused by a later pass


class CpuPendingResult:
    """Output of a CPU pass on a worker thread (`future`, set when it is submitted); `started_at`
    and `ended_at` (perf_counter) are when it ran, set by the worker: it may wait for a free one."""

    def __init__(self, rows: int, future: Future | None = None):
        self.future = future
        self._rows = rows
        self.started_at: float | None = None
        self.ended_at: float | None = None

    def result(self) -> np.ndarray:
        return self.future.result()[: self._rows].numpy()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        self.future.add_done_callback(lambda _: callback())


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _Staging:
    """One set of host buffers sized for the largest pass, viewed per shape: pinned on CUDA (for
    copies that do not block), plain on the CPU. `done` says when the pass using them has ended."""

    def __init__(self, capacity: int, rows: int, with_types: bool, pinned: bool = True):
        def buffer() -> torch.Tensor:
            return torch.empty(capacity, dtype=torch.int64, pin_memory=pinned)

        self.input_ids = buffer()
        self.attention_mask = buffer()
        self.token_type_ids = buffer() if with_types else None
        self.output: torch.Tensor | None = None  # allocated at the first result, when its width is known
        self.rows = rows
        self.done: torch.cuda.Event | Future | None = None

    def views(self, rows: int, width: int) -> dict[str, torch.Tensor]:
        count = rows * width
        views = {"input_ids": self.input_ids[:count].view(rows, width),
                 "attention_mask": self.attention_mask[:count].view(rows, width)}
        if self.token_type_ids is not None:
            views["token_type_ids"] = self.token_type_ids[:count].view(rows, width)
        return views


class _Graph:
    """One captured pass of a fixed shape: static inputs to copy into, a static output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict[str, torch.Tensor], output: torch.Tensor):
        self.graph = graph
        self.inputs = inputs
        self.output = output


class TorchBackend:
    """Collates a batch, runs the model's forward pass, hands back float32 rows."""

    def __init__(self, loaded: LoadedModel, config: BatchingConfig | None = None):
        config = config or BatchingConfig()
        self._model = loaded.model
        self._runner: Callable = loaded.model  # what a pass calls: the model, or its compiled form
        self._compiled: Callable | None = None  # the compiled model, where it ran and matched eager
        self._device = loaded.device
        family = loaded.family
        self._left_padding = family is not None and family.padding_side == "left"
        config_pad = getattr(loaded.hf_config, "pad_token_id", None)
        # Decoder classifiers find their last real token by config.json's pad id: pad with that one.
        self._pad_id = (config_pad if family is not None and family.pooling(loaded.hf_config) == "last_token"
                        and config_pad is not None else loaded.tokenizer.pad_token_id or 0)
        self._vocab = int(getattr(loaded.hf_config, "vocab_size", 0) or getattr(loaded.tokenizer, "vocab_size", 0) or 30000)
        self._local_window = int(getattr(loaded.hf_config, "local_attention", 0) or getattr(loaded.hf_config, "sliding_window", 0) or 0)
        self._dtype = loaded.dtype
        self._uses_token_type_ids = loaded.uses_token_type_ids
        self.cuda = loaded.device.type == "cuda"
        threads = torch.get_num_threads()
        # Passes running at once: one per CPU worker; one on a GPU.
        self.parallel_passes = 1 if self.cuda else (config.cpu_passes or max(1, available_cores() // threads))
        self.asynchronous = self.cuda or self.parallel_passes > 1  # launch returns before the pass ends
        # Passes the batcher may have launched and not collected. CUDA: one running, the next being
        # launched. CPU workers get one more, queued, so a worker that frees up starts it at once
        # instead of waiting for the batcher to collate.
        self.passes_in_flight = 2 if self.cuda else self.parallel_passes + (1 if self.parallel_passes > 1 else 0)
        self.shapes = shape_policy(loaded, config)
        self._use_graphs = self.cuda and config.cuda_graphs
        self._attention = config.attention
        self._sdpa_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._graph_pool = None
        # Any pass fits: rows x width <= the token budget, or one row of up to max_length.
        capacity = max(self.shapes.max_tokens, self.shapes.max_length, *TUNED_BATCH_TOKENS) * 2
        self._workers: ThreadPoolExecutor | None = None
        if self.cuda:
            with torch.cuda.device(self._device):
                self._staging = [_Staging(capacity, self.shapes.rows_for(1), self._uses_token_type_ids)
                                 for _ in range(STAGING_SLOTS)]
        else:
            # One buffer set per pass that can be in flight, plus the one being filled.
            self._staging = [_Staging(capacity, self.shapes.rows_for(1), self._uses_token_type_ids, pinned=False)
                             for _ in range(self.passes_in_flight + 1)]
            if self.parallel_passes > 1:
                self._workers = ThreadPoolExecutor(self.parallel_passes, thread_name_prefix="forward",
                                                   initializer=torch.set_num_threads, initargs=(threads,))
        self._next_slot = 0
        self._mask_4d = False
        self._mask_4d = self._takes_4d_mask()
        self._tune_tokens = config.max_batch_tokens is None and not self.cuda
        self._compile = config.compile and not self.cuda

    @property
    def compiled(self) -> bool:
        """Passes run the torch.compile'd model."""
        return self._compiled is not None and self._runner is self._compiled

    def close(self) -> None:
        """Ends the CPU pass workers (a backend used only to measure, say); passes in flight finish."""
        if self._workers is not None:
            self._workers.shutdown(wait=True)

    @property
    def graphs(self) -> int:
        """Shapes captured as CUDA graphs."""
        return len(self._graphs)

    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _model_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the model is called with: a ready 4D boolean mask where the model takes one
        unchanged (it skips transformers' per-call mask building, ~20-70% of a small model's CPU
        time), else the 2D mask."""
        if not self._mask_4d:
            return inputs
        return {**inputs, "attention_mask": inputs["attention_mask"].bool()[:, None, None, :]}

    @torch.inference_mode()
    def _takes_4d_mask(self) -> bool:
        """Whether the model gives the same output with a ready 4D mask as with its own 2D-mask path.
        transformers uses a given 4D mask as is, so a model whose attention is more than padding
        (causal decoders, ModernBERT's sliding window) must fail this check: it runs on rows of
        different, varied tokens and lengths, padded, longer than any local attention window."""
        self._mask_4d = False
        batch = self.mask_probe()
        views = {name: t.to(self._device) for name, t in self._collate_into(self._probe_buffers(), batch).items()}
        try:
            plain = self._forward(views).float()
            self._mask_4d = True
            shaped = self._forward(views).float()
        except Exception:  # noqa: BLE001 - a model that refuses a 4D mask gets the 2D one
            self._mask_4d = False
            return False
        self._mask_4d = False
        same = bool(torch.allclose(plain, shaped, atol=1e-5, rtol=1e-4))
        if not same:
            log.info("the ready 4D attention mask changes this model's output (max diff %.3g): its own masks are used",
                     float((plain - shaped).abs().max()))
        return same

    def mask_probe(self) -> Batch:
        """Three padded rows of seeded random tokens, the longest past any local attention window."""
        width = min(self.shapes.max_length, max(64, 2 * self._local_window + 16), 1024)
        lengths = np.array([width, (2 * width) // 3, width // 3 + 1], dtype=np.int32)
        ids = np.random.default_rng(0).integers(low=min(5, self._vocab - 1), high=self._vocab, size=(3, width), dtype=np.int64)
        tokens = Tokens(ids, np.zeros_like(ids) if self._uses_token_type_ids else None, lengths, 0)
        rows = np.arange(3, dtype=np.int64)
        return Batch(3, width, 3, int(lengths.sum()), [Piece(None, tokens, rows, rows)])

    def _probe_buffers(self) -> _Staging:
        return self._staging[0]

    def _collate_into(self, buffers: _Staging, batch: Batch) -> dict[str, torch.Tensor]:
        views = buffers.views(batch.rows, batch.width)
        types = views.get("token_type_ids")
        collate(batch, views["input_ids"].numpy(), views["attention_mask"].numpy(),
                types.numpy() if types is not None else None, self._pad_id, self._left_padding)
        return views

    def _next_buffers(self) -> _Staging:
        if not self.cuda:  # CPU passes end in any order: take any set whose pass has ended
            for slot in self._staging:
                if slot.done is None or slot.done.done():
                    return slot
        slot = self._staging[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self._staging)
        if slot.done is not None:
            if self.cuda:
                slot.done.synchronize()  # its last pass has finished with the buffers
            else:
                slot.done.exception()  # waits, whatever the outcome
        return slot

    @torch.inference_mode()
    def _forward_cpu(self, inputs: dict[str, torch.Tensor], pending: CpuPendingResult | None = None) -> torch.Tensor:
        if pending is not None:
            pending.started_at = time.perf_counter()
        try:
            return self._forward(inputs).float()
        finally:
            if pending is not None:
                pending.ended_at = time.perf_counter()

    @torch.inference_mode()
    def launch(self, batch: Batch) -> PendingResult | CpuPendingResult:
        slot = self._next_buffers()
        host = self._collate_into(slot, batch)
        if not self.cuda:
            if self._workers is None:
                done: Future = Future()
                try:
                    done.set_result(self._forward_cpu(host))
                except Exception as error:  # noqa: BLE001 - raised by result(), like a worker's
                    done.set_exception(error)
                slot.done = done
                return CpuPendingResult(batch.real, done)
            pending = CpuPendingResult(batch.real)
            pending.future = slot.done = self._workers.submit(self._forward_cpu, host, pending)
            return pending
        with torch.cuda.device(self._device), self._sdpa_context():
            graph = self._graphs.get((batch.rows, batch.width))
            if graph is not None:
                for name, tensor in host.items():
                    graph.inputs[name].copy_(tensor, non_blocking=True)
                graph.graph.replay()
                output = graph.output
            else:
                device_inputs = {name: tensor.to(self._device, non_blocking=True) for name, tensor in host.items()}
                output = self._forward(device_inputs).float()
            if slot.output is None or slot.output.shape[1:] != output.shape[1:]:
                slot.output = torch.empty((slot.rows, *output.shape[1:]), dtype=torch.float32, pin_memory=True)
            slot.output[: batch.rows].copy_(output, non_blocking=True)
            slot.done = torch.cuda.Event()
            slot.done.record()
        return PendingResult(slot.output, slot.done, batch.real)

    # -- warm-up (CUDA) ------------------------------------------------------------------

    def _dummy(self, rows: int, width: int) -> Batch:
        """A pass of the given shape, rows of mixed lengths (so masks are not all ones)."""
        lengths = np.linspace(max(1, width // 2), width, num=rows).astype(np.int32) if rows > 1 else np.array([width], np.int32)
        ids = np.full((rows, width), min(1000, self._vocab - 1), dtype=np.int64)
        tokens = Tokens(ids, np.zeros_like(ids) if self._uses_token_type_ids else None, lengths, 0)
        rows_index = np.arange(rows, dtype=np.int64)
        return Batch(rows, width, rows, int(lengths.sum()), [Piece(None, tokens, rows_index, rows_index)])

    @torch.inference_mode()
    def warm_up(self) -> None:
        """CUDA: choose the attention kernel, meet every shape once, capture graphs. CPU: one pass."""
        if not self.cuda:
            self.launch(self._dummy(2, 8)).result()
            if self._compile:
                self._compile_for_cpu()
            if self._tune_tokens:
                self._tune_batch_tokens()
            return
        shapes = self.shapes.shapes()
        started = time.perf_counter()
        self._choose_attention()
        for rows, width in shapes:
            self.launch(self._dummy(rows, width)).result()
        if self._use_graphs:
            self._capture(shapes)
        log.info("warmed %d shapes (%d as CUDA graphs) in %.1f s", len(shapes), len(self._graphs), time.perf_counter() - started)

    def _compile_for_cpu(self) -> None:
        """torch.compile (Inductor, C++ wrapper) with dynamic shapes: fuses the small element-wise
        kernels (GELU, layer norms, residual adds) and drops the per-op Python, so passes side by
        side hardly contend for the GIL. Both shape families are met now (dynamo specializes one-row
        passes), so serving does not compile. Kept only where it runs, matches eager within
        COMPILE_TOLERANCE, and is faster on a ~90-token pass; else eager, logged."""
        started = time.perf_counter()
        try:
            # cpp_wrapper: a pass is one C++ call, not a Python line per kernel; the GIL is held
            # once per pass rather than between every kernel (measured +12% pairs/s on 2 cores).
            compiled = torch.compile(self._model, dynamic=True, options={"cpp_wrapper": True})
            probes = [self._dummy(rows, width) for rows, width in ((8, min(96, self.shapes.max_length)), (1, 16))]
            eager = [self.launch(probe).result() for probe in probes]
            self._runner = compiled
            for probe, expected in zip(probes, eager):
                difference = float(np.max(np.abs(self.launch(probe).result() - expected)))
                tolerance = COMPILE_TOLERANCE if self._dtype == torch.float32 else \
                    LOW_PRECISION_COMPILE_TOLERANCE * max(1.0, float(np.max(np.abs(expected))))
                if not difference <= tolerance:
                    raise RuntimeError(f"compiled output differs from eager by {difference:.3g}")
        except Exception as error:  # noqa: BLE001 - compiling is an optimization: serve eagerly instead
            self._runner = self._model
            log.warning("torch.compile off for this model (%s: %s); serving eagerly", type(error).__name__, error)
            return
        self._compiled = compiled
        compile_seconds = time.perf_counter() - started
        timed = self._dummy(max(1, min(self.shapes.max_rows, 4096 // 96)), min(96, self.shapes.max_length))
        seconds = {}
        for _ in range(3):  # alternated, best of each: a noisy moment does not decide
            for name, runner in (("eager", self._model), ("compiled", compiled)):
                self._runner = runner
                begun = time.perf_counter()
                self.launch(timed).result()
                seconds[name] = min(time.perf_counter() - begun, seconds.get(name, float("inf")))
        faster = seconds["compiled"] < seconds["eager"]
        self._runner = compiled if faster else self._model
        log.info("torch.compile %s in %.1f s (ms per %d-row pass: eager %.2f, compiled %.2f)",
                 "on" if faster else "off: no faster than eager", compile_seconds, timed.rows,
                 seconds["eager"] * 1000, seconds["compiled"] * 1000)

    def _tune_batch_tokens(self) -> None:
        """CPU: the padded-token budget per pass, among TUNED_BATCH_TOKENS, timed on passes of
        ~90-token rows (a small model wants big passes to spread per-pass overhead; a big one
        wants small passes that stay in cache). Budgets are timed in alternating rounds, each
        keeping its best pass, so a noisy moment does not decide. The largest budget within
        BUDGET_TOLERANCE of the fastest wins: serving adds per-pass costs (batching, futures,
        result delivery) that a bare pass does not show. Bounded in time."""
        width = min(96, self.shapes.max_length)
        batches: dict[int, Batch] = {}
        spent = 0.0
        for budget in TUNED_BATCH_TOKENS:  # each size met once, untimed; a slow pass ends the list
            batches[budget] = self._dummy(max(1, min(self.shapes.max_rows, budget // width)), width)
            begun = time.perf_counter()
            self.launch(batches[budget]).result()
            spent += time.perf_counter() - begun
            if time.perf_counter() - begun > TUNING_SECONDS / 4:  # per-pass overhead is noise here already
                break
        best_seconds: dict[int, float] = {}
        for _ in range(TUNING_ROUNDS):
            for budget, batch in batches.items():
                begun = time.perf_counter()
                self.launch(batch).result()
                elapsed = time.perf_counter() - begun
                spent += elapsed
                best_seconds[budget] = min(elapsed, best_seconds.get(budget, elapsed))
            if spent > TUNING_SECONDS:
                break
        if not best_seconds:
            return
        rates = {budget: batches[budget].real / seconds for budget, seconds in best_seconds.items()}
        fastest = max(rates.values())
        chosen = max(budget for budget, rate in rates.items() if rate >= (1 - BUDGET_TOLERANCE) * fastest)
        self.shapes = dataclasses.replace(self.shapes, max_tokens=chosen)
        log.info("batch token budget %d (rows/s by budget: %s)", chosen, {k: round(v) for k, v in rates.items()})

    def _choose_attention(self) -> None:
        """Times each SDPA kernel on a large pass and keeps the fastest that runs."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        candidates = {
            "cudnn": [SDPBackend.CUDNN_ATTENTION],
            "flash": [SDPBackend.FLASH_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION],
            "math": [SDPBackend.MATH],
        }
        if self._attention != "auto":
            chosen = candidates[self._attention]
            self._sdpa_context = lambda: sdpa_kernel(chosen)
            return
        width = min(self.shapes.max_length, 128)
        rows = self.shapes.rows_for(width)
        timings = {}
        for name, kernels in candidates.items():
            self._sdpa_context = lambda kernels=kernels: sdpa_kernel(kernels)
            try:
                self.launch(self._dummy(rows, width)).result()  # meets the shape (cuDNN builds its plan)
                torch.cuda.synchronize(self._device)
                begun = time.perf_counter()
                for _ in range(3):
                    self.launch(self._dummy(rows, width)).result()
                timings[name] = (time.perf_counter() - begun) / 3
            except RuntimeError as error:  # this kernel cannot run this model or mask
                log.debug("attention kernel %s unavailable: %s", name, error)
        best = min(timings, key=timings.get, default=None)
        self._sdpa_context = (lambda: sdpa_kernel(candidates[best])) if best else contextlib.nullcontext
        log.info("attention kernel %s (ms per pass of %dx%d: %s)", best, rows, width,
                 {k: round(v * 1000, 2) for k, v in timings.items()})

    def _capture(self, shapes: list[tuple[int, int]]) -> None:
        device = self._device
        try:
            with torch.cuda.device(device), self._sdpa_context():
                self._graph_pool = torch.cuda.graph_pool_handle()
                for rows, width in sorted(shapes, reverse=True):  # largest first: the pool fits the rest
                    self._graphs[(rows, width)] = self._capture_one(rows, width)
                rows, width = shapes[len(shapes) // 2]
                self._check_graph(rows, width)
        except Exception as error:  # noqa: BLE001 - graphs are an optimization: serve eagerly instead
            log.warning("CUDA graphs off for this model (%s: %s); serving eagerly", type(error).__name__, error)
            self._graphs.clear()
            self._graph_pool = None
            torch.cuda.synchronize(device)

    def _capture_one(self, rows: int, width: int) -> _Graph:
        device = self._device
        inputs = {"input_ids": torch.full((rows, width), self._pad_id, dtype=torch.int64, device=device),
                  "attention_mask": torch.ones((rows, width), dtype=torch.int64, device=device)}
        if self._uses_token_type_ids:
            inputs["token_type_ids"] = torch.zeros((rows, width), dtype=torch.int64, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            output = self._forward(inputs).float()
        return _Graph(graph, inputs, output)

    def _check_graph(self, rows: int, width: int) -> None:
        """The graph's output must equal the eager pass's on the same input."""
        batch = self._dummy(rows, width)
        graphed = self.launch(batch).result()
        saved, self._graphs = self._graphs, {}
        try:
            eager = self.launch(batch).result()
        finally:
            self._graphs = saved
        difference = float(np.max(np.abs(graphed - eager))) if graphed.size else 0.0
        if not np.isfinite(difference) or difference > 1e-2:
            raise RuntimeError(f"graph output differs from eager by {difference}")


class CrossEncoderBackend(TorchBackend):
    """One raw score per (query, passage) pair, by the family's head: the classifier's logit (its
    chosen label's), or for causal LMs the answer tokens' logits at the last position (rows are
    left-padded, so that is every row's last token; only that position's logits are computed)."""

    def __init__(self, loaded: LoadedModel, config: BatchingConfig | None = None):
        head = loaded.family.head
        self._label = head.label
        self._answer = (head.true_token, head.false_token) if head.kind == "answer_tokens" else None
        super().__init__(loaded, config)

    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._answer is None:
            logits = self._runner(**self._model_inputs(inputs)).logits
            return logits[:, self._label] if logits.dim() == 2 else logits.reshape(-1)
        logits = self._runner(**self._model_inputs(inputs), logits_to_keep=1).logits[:, -1]
        true, false = self._answer
        return logits[:, true] - logits[:, false] if false is not None else logits[:, true]


class BiEncoderBackend(TorchBackend):
    """One embedding per text: CLS or mean pooling, L2-normalized for cosine similarity
    (as sentence-transformers' Pooling and Normalize modules compute them)."""

    def __init__(self, loaded: LoadedModel, config: BatchingConfig | None = None):
        super().__init__(loaded, config)
        self._pooling = loaded.pooling
        self._normalize = loaded.similarity == "cosine"

    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self._runner(**self._model_inputs(inputs)).last_hidden_state
        if self._pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self._normalize:
            pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
        return pooled


def backend_for(loaded: LoadedModel, config: BatchingConfig | None = None) -> TorchBackend:
    return CrossEncoderBackend(loaded, config) if loaded.kind == "cross" else BiEncoderBackend(loaded, config)
