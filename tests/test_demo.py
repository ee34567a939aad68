"""`make demo`, the README's first command, end to end: it must keep working."""

from __future__ import annotations

import os
import subprocess
import sys


def test_the_demo_runs_every_call_and_stops_cleanly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rankstream_server.cli.demo"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RANKSTREAM_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
                               "RANKSTREAM_DEMO_HTTP_PORT": "0"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    for expected in ("Retrieve top 4", "HYBRID mode", "RetrieveAndRerank in one call", "UpsertPassages",
                     "INVALID_ARGUMENT", "POST /v2/rerank (Cohere) -> 200", "the same scores as gRPC Rerank: True",
                     "POST /v1/embeddings (OpenAI) -> 200", "an unknown model -> 404", "server stopped (exit code 0)"):
        assert expected in out, expected
    assert "Traceback" not in done.stderr
