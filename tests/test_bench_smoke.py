"""The benchmarks' smoke modes run: `benchmarks/gpu.sh --smoke` (the GPU benchmark's code path on
CPU with tiny models, so it cannot rot between runs on a GPU) and `benchmarks/bench.py --smoke`
(`make bench` with tiny workloads) and `benchmarks/cpu_levers.py` with short timings. Checks that they exit 0 and print their tables; never timings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_gpu_benchmark_smoke_mode_runs_and_prints_its_tables(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "RANKSTREAM_BENCH_CACHE": str(tmp_path / "models")}
    done = subprocess.run([str(REPO / "benchmarks" / "gpu.sh"), "--smoke", "--keep", str(tmp_path / "scratch")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=570)
    output = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{output[-4000:]}\n{done.stderr[-4000:]}"
    for heading in (
        "## Machine",
        "## Ceilings in-process (no server)",
        "## Embedding: `rankstream index build`",
        "## Rerank over gRPC, 100 passages a call",
        "## Retrieve and RetrieveAndRerank over gRPC",
        "## Parity: server logits vs sentence-transformers fp32",
        "## Summary against issue 7's GPU targets",
    ):
        assert heading in output, f"missing {heading!r} in:\n{output[-4000:]}"
    summary = output.split("## Summary against issue 7's GPU targets", 1)[1]
    for measure in ("MiniLM-L6 pairs/s, 32 clients", "TinyBERT-L2 server / tokenizer", "Retrieve p50 ms, 1 client",
                    "RetrieveAndRerank top_k 100", "embedding: index build", "parity minilm"):
        assert measure in summary, f"missing {measure!r} in the summary:\n{summary}"
    assert "WARNING:" not in output.replace("WARNING: other processes took", ""), output[-4000:]


@pytest.mark.timeout(600)
def test_cpu_benchmark_smoke_mode_runs_and_prints_its_tables(tmp_path):
    env = {**os.environ, "RANKSTREAM_BENCH_CACHE": str(tmp_path / "models")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--smoke", "--keep", str(tmp_path / "scratch")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=570)
    output = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{output[-4000:]}\n{done.stderr[-4000:]}"
    for heading in ("## Machine", "## a. Host-path ceiling", "## b. MiniLM-L6-H384", "## c. Index build",
                    "## d. Retrieve, RetrieveAndRerank", "## f. The same rerank load over HTTP",
                    "## g. Goodput under overload", "## Summary against the CPU targets (issues 7, 19 and 20)"):
        assert heading in output, f"missing {heading!r} in:\n{output[-4000:]}"
    for line in ("cpu flags for precision:", "torch ", "server / tokenizer", "server / CrossEncoder.predict",
                 "server's start-up choice:", "server / CE.predict fp32", "/ float32 build", "HTTP / gRPC pairs/s:",
                 "us of server CPU per refusal", "server RSS:",
                 "overload: gRPC goodput at 48 clients / peak", "overload: HTTP goodput at 48 clients / peak"):
        assert line in output, f"missing {line!r} in:\n{output[-4000:]}"
    assert "WARNING:" not in output.replace("WARNING: other processes took", ""), output[-4000:]


@pytest.mark.timeout(600)
def test_cpu_levers_benchmark_runs_and_prints_its_tables(tmp_path):
    env = {**os.environ, "RANKSTREAM_BENCH_CACHE": str(tmp_path / "models")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cpu_levers.py"), "--seconds", "0.2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=570)
    output = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{output[-4000:]}\n{done.stderr[-4000:]}"
    for heading in ("## Machine", "## a. Tokenizing", "## b. The host-path model's forward alone",
                    "## c. DynamicBatcher fed pre-tokenized requests"):
        assert heading in output, f"missing {heading!r} in:\n{output[-4000:]}"
    for line in ("the ASCII shortcut", "torch.compile, C++ wrapper (the server's)", "| eager "):
        assert line in output, f"missing {line!r} in:\n{output[-4000:]}"
    if shutil.which("g++") or shutil.which("clang++"):  # batching.compile needs a C++ compiler
        assert "| compiled " in output, output[-4000:]
