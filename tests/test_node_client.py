"""Any language can call rankstream: a Node.js client that loads protos/ directly."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed on this machine: the Node.js client cannot run")
def test_node_client_streams_batches_reads_stats_and_sees_statuses(demo_server):
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists(), "run `make test` (it runs npm ci in tests/node)"
    done = subprocess.run([NODE, str(NODE_DIR / "client.mjs"), demo_server.target], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["health"] == "SERVING"

    reranked = seen["reranked"]  # RANKED: the whole ranking in one ScoredPassages message
    assert reranked["messages"] == 1 and reranked["stats"]["messages"] == 1
    assert [r["id"] for r in reranked["passages"]] == ["rag", "food"]
    assert [r["rank"] for r in reranked["passages"]] == [1, 2] and reranked["passages"][1]["text"].startswith("Simmer")
    assert reranked["stats"]["model"] == "minilm" and reranked["stats"]["returned"] == 2

    as_scored = seen["as_scored"]  # AS_SCORED: one message per micro-batch, together every passage once
    assert sorted(r["index"] for r in as_scored["passages"]) == list(range(24))
    assert all(r["rank"] == 0 for r in as_scored["passages"])
    assert as_scored["messages"] == as_scored["stats"]["messages"] == as_scored["stats"]["batches"] >= 1
    assert as_scored["stats"]["tokens"] > 0  # an int64 field of the RerankStats Node decoded from the trailer

    retrieved = seen["retrieved"]
    assert retrieved["messages"] == 1 and len(retrieved["passages"]) == 3
    assert retrieved["passages"][0]["id"] == "food-02" and retrieved["passages"][0]["stage"] == "STAGE_RETRIEVE"
    assert retrieved["stats"]["candidates"] == 3 and retrieved["stats"]["returned"] == 3

    hybrid = seen["hybrid"]["passages"]  # mode HYBRID: fused, with each side's rank
    assert len(hybrid) == 3 and all(p["dense_rank"] or p["sparse_rank"] for p in hybrid)
    assert any(p["sparse_rank"] > 0 for p in hybrid)

    assert seen["invalid"]["code"] == "INVALID_ARGUMENT" and "query" in seen["invalid"]["details"]
