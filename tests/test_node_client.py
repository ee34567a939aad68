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
def test_node_client_streams_rerank_and_retrieve_and_sees_statuses(demo_server):
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists(), "run `make test` (it runs npm ci in tests/node)"
    done = subprocess.run([NODE, str(NODE_DIR / "client.mjs"), demo_server.target], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["health"] == "SERVING"
    assert [r["id"] for r in seen["reranked"]] == ["rag", "food"]
    assert [r["rank"] for r in seen["reranked"]] == [1, 2] and seen["reranked"][1]["text"].startswith("Simmer")
    assert seen["retrieved"][0]["id"] == "food-02" and seen["retrieved"][0]["stage"] == "STAGE_RETRIEVE"
    assert len(seen["retrieved"]) == 3
    assert seen["invalid"]["code"] == "INVALID_ARGUMENT" and "query" in seen["invalid"]["details"]
