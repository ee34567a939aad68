"""The CPU serving levers of issue 7, each measured alone, in-process (no gRPC):

    .venv/bin/python benchmarks/cpu_levers.py          # about 2 minutes on 2 cores

a. Tokenizing 6,400 Cranfield passages of ~60 words: the `tokenizers` calls the server could make
   (pairs with encode_batch, as the bench's reference; passages alone with encode_batch and
   encode_batch_fast; passages without BERT's normalizer after `str.lower`, the ASCII shortcut),
   and the server's PairTokenizer itself, with the tokenizer's thread pool on and off.
b. The host-path model (BERT 1 layer, hidden 32) forward alone, 44 x 92 tokens, eager and
   torch.compile (Python and C++ wrappers), on 1 and 2 threads side by side: pairs/s and how busy
   the threads kept the cores (below 100% a thread: the GIL).
c. The DynamicBatcher fed pre-tokenized requests (32 at a time, 19,200 pairs), eager and compiled:
   pairs/s and CPU, what the batcher and the model do without the tokenizer or gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROWS, WIDTH = 44, 92


def _rate(function, items: int, seconds: float) -> float:
    function()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        function()
        done += items
    return done / (time.perf_counter() - started)


def tokenizing(model_dir: Path, text: common.Text, seconds: float) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from rankstream_server.inference.tokenization import PairTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    passages = text.passages
    pairs = [(text.queries[i // 100 % len(text.queries)], p) for i, p in enumerate(passages)]
    reference = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    reference.enable_truncation(common.max_length_of(model_dir), strategy="only_second")
    bare = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    plain = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    plain.normalizer = None
    server = PairTokenizer(hf, common.max_length_of(model_dir), "host", True)
    requests = [(text.queries[i % len(text.queries)], passages[i * 100:(i + 1) * 100]) for i in range(len(passages) // 100)]
    rows = [
        ("pairs, encode_batch (the bench's reference)", lambda: reference.encode_batch(pairs)),
        ("passages alone, encode_batch", lambda: bare.encode_batch(passages, add_special_tokens=False)),
        ("passages alone, encode_batch_fast", lambda: bare.encode_batch_fast(passages, add_special_tokens=False)),
        ("passages alone, no normalizer, str.lower first (the ASCII shortcut)",
         lambda: plain.encode_batch_fast([p.lower() for p in passages], add_special_tokens=False)),
    ]
    table = []
    for label, function in rows:
        table.append([label, "all", _rate(function, len(passages), seconds)])
    for parallel in ("true", "false"):
        os.environ["TOKENIZERS_PARALLELISM"] = parallel
        table.append(["rankstream PairTokenizer, 100-passage requests one after another",
                      "all" if parallel == "true" else "1 (the server's CPU default)",
                      _rate(lambda: [server.encode(q, ps) for q, ps in requests], len(passages), seconds)])
    os.environ.pop("TOKENIZERS_PARALLELISM", None)
    common.heading(f"a. Tokenizing {len(passages):,} passages ({text.source})")
    common.table(["call", "tokenizer's threads", "passages/s"], table)


def forward(model_dir: Path, seconds: float) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(1)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    inputs = {"input_ids": torch.randint(1000, 2000, (ROWS, WIDTH)), "token_type_ids": torch.zeros(ROWS, WIDTH, dtype=torch.long),
              "attention_mask": torch.ones(ROWS, WIDTH, dtype=torch.bool)[:, None, None, :]}
    table = []
    for label, runner in (("eager", model),
                          ("torch.compile, Python wrapper", torch.compile(model, dynamic=True)),
                          ("torch.compile, C++ wrapper (the server's)", torch.compile(model, dynamic=True, options={"cpp_wrapper": True}))):
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                expected = model(**inputs).logits
                difference = float((runner(**inputs).logits - expected).abs().max())
        except Exception as error:  # noqa: BLE001 - no C++ compiler, say: report it and go on
            table.append([label, "-", "-", "-", f"failed: {type(error).__name__}", "-"])
            continue
        compile_seconds = time.perf_counter() - started

        def passes(until: float) -> None:
            torch.set_num_threads(1)
            with torch.inference_mode():
                while time.perf_counter() < until:
                    runner(**inputs)  # noqa: B023 - the threads are joined before the loop moves on
                    counts[threading.get_ident()] = counts.get(threading.get_ident(), 0) + 1  # noqa: B023

        for threads in (1, 2):
            counts: dict[int, int] = {}
            cpu, wall = time.process_time(), time.perf_counter()
            workers = [threading.Thread(target=passes, args=(wall + seconds,)) for _ in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            wall = time.perf_counter() - wall
            busy = 100 * (time.process_time() - cpu) / wall
            table.append([label, threads, sum(counts.values()) * ROWS / wall, f"{busy:.0f}%", f"{difference:.1g}",
                          f"{compile_seconds:.1f}"])
    common.heading(f"b. The host-path model's forward alone, {ROWS} x {WIDTH} tokens, one torch thread each")
    common.table(["model", "threads side by side", "pairs/s", "CPU, % of one core", "max abs diff vs eager",
                  "first call, s"], table)


def batcher(model_dir: Path, text: common.Text) -> None:
    import torch

    from rankstream_server.config import BatchingConfig, ModelConfig
    from rankstream_server.inference.backend import backend_for
    from rankstream_server.inference.batcher import INTERACTIVE, DynamicBatcher, Job
    from rankstream_server.inference.model_loading import load_model
    from rankstream_server.inference.tokenization import PairTokenizer

    torch.set_num_threads(1)
    loaded = load_model(ModelConfig(name="host", weights=str(model_dir)))
    tokenizer = PairTokenizer(loaded.tokenizer, loaded.max_length, "host", loaded.uses_token_type_ids)
    requests = [tokenizer.encode(text.queries[i % len(text.queries)], text.passages[i * 100:(i + 1) * 100])
                for i in range(len(text.passages) // 100)]
    table = []
    for compiled in (False, True):
        config = BatchingConfig(compile=compiled)
        backend = backend_for(loaded, config)
        backend.warm_up()

        async def run() -> tuple[float, float]:
            subject = DynamicBatcher("host", backend, config)  # noqa: B023 - run() is awaited within this iteration

            async def client(k: int) -> None:
                for r in range(6):
                    job = Job(size=100, lane=INTERACTIVE)
                    subject.submit(job, requests[(k * 6 + r) % len(requests)])
                    async for _ in job.results():
                        pass

            cpu, wall = time.process_time(), time.perf_counter()
            await asyncio.gather(*(client(k) for k in range(32)))
            wall = time.perf_counter() - wall
            subject.close()
            return 32 * 6 * 100 / wall, 100 * (time.process_time() - cpu) / wall / len(os.sched_getaffinity(0))

        rate, busy = asyncio.run(run())
        table.append(["compiled" if backend.compiled else "eager", backend.parallel_passes, backend.shapes.max_tokens,
                      rate, f"{busy:.0f}%"])
    common.heading("c. DynamicBatcher fed pre-tokenized requests, 32 at a time (no tokenizer, no gRPC)")
    common.table(["model", "passes side by side", "padded tokens a pass", "pairs/s", "CPU, % of all cores"], table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per figure")
    parser.add_argument("--data", default=None, help="folder holding cranfield/ (default: ../shared/data)")
    args = parser.parse_args()
    common.print_machine()
    model_dir = common.host_path_model()
    # As the bench's host-path part: Cranfield passages of ~60 words, cycled to 6,400.
    text = common.load_text(passages=6400, queries=64, corpora=("cranfield",), fill=False, data_root=args.data)
    if not text.passages:
        text = common.load_text(passages=6400, queries=64, data_root=args.data)  # synthetic, without the data
    text.passages = [text.passages[i % len(text.passages)] for i in range(6400)]
    tokenizing(model_dir, text, args.seconds)
    forward(model_dir, args.seconds)
    batcher(model_dir, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
