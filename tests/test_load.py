"""The load test's 20-second version (benchmarks/load.py): past saturation the server survives,
no result goes to the wrong request or carries a wrong score, full queues answer
RESOURCE_EXHAUSTED rather than letting requests time out, and nothing leaks into the log.
Speed targets (goodput at saturation >= 0.9x the peak) live in the benchmark, not here."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import load  # noqa: E402


def test_overload_is_survived_with_every_result_correct(models, tmp_path):
    result = asyncio.run(load.measure(str(models.bert), seconds=8, clients=48, folder=tmp_path, pool_size=120))
    assert result["alive"], (tmp_path / "server.log").read_text()[-3000:]
    assert result["exit_code"] == 0
    assert result["wrong"] == [], result["wrong"][:5]
    saturated = result["saturated_codes"]
    assert saturated.get("OK", 0) > 0 and result["peak_codes"].get("OK", 0) > 0
    assert set(saturated) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"}, saturated
    finished = sum(saturated.values())
    assert saturated.get("DEADLINE_EXCEEDED", 0) < 0.1 * finished, f"requests timed out instead of being refused: {saturated}"
    assert result["task_exceptions_in_log"] == 0 and result["tracebacks_in_log"] == 0
    assert result["rss_mib_end"] < result["rss_mib_after_warmup"] * 1.5 + 100, "memory grew under load"
