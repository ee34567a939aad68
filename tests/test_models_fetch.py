"""`rankstream models fetch`: what it fetches, one clear line when it cannot, and a filled cache
that a server then loads offline. No network here: the cache is laid out as the hub's own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rankstream_server.config import Settings
from rankstream_server.inference.model_fetch import hub_sources

RANKSTREAM = str(Path(sys.executable).with_name("rankstream"))


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([RANKSTREAM, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def test_sources_are_hub_repositories_once_each(models):
    settings = Settings(models=[
        {"name": "a", "weights": "org/cross", "revision": "v2"},
        {"name": "b", "weights": "org/deberta", "tokenizer": "org/tokenizer"},
        {"name": "c", "weights": "org/deberta", "tokenizer": "org/tokenizer"},
        {"name": "d", "kind": "bi", "weights": "embedded:all-MiniLM-L6-v2"},
        {"name": "e", "weights": str(models.bert)},
    ])
    sources, notes = hub_sources(settings)
    assert [(s.repo, s.revision) for s in sources] == [("org/cross", "v2"), ("org/deberta", None), ("org/tokenizer", None)]
    assert any("ships in a package" in n for n in notes) and any("local folder" in n for n in notes)


def test_offline_without_the_files_fails_with_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "ce", "weights": "cross-encoder/ms-marco-MiniLM-L-6-v2"}]}))
    done = _run("models", "fetch", "--config", str(config), "--to", str(tmp_path / "cache"), env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "model 'ce'" in lines[0] and "cross-encoder/ms-marco-MiniLM-L-6-v2" in lines[0]


def _as_hub_cache(folder: Path, repo: str, cache: Path) -> None:
    """The hub cache layout (models--org--name/{refs,snapshots}) holding a model the tests built."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)


def test_a_filled_cache_is_fetched_and_served_offline(models, tmp_path):
    cache = tmp_path / "cache"
    _as_hub_cache(models.bert, "rankstream-tests/tiny-cross", cache)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"server": {"host": "127.0.0.1", "port": 0},
                                      "models": [{"name": "tiny", "weights": "rankstream-tests/tiny-cross"}]}))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    fetched = _run("models", "fetch", "--config", str(config), "--to", str(cache), env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert "rankstream-tests/tiny-cross ->" in fetched.stdout
    process = subprocess.Popen([RANKSTREAM, "serve", "--config", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    try:
        assert process.stdout.readline().startswith("rankstream listening on")
        port = None
        for line in iter(process.stderr.readline, ""):
            if "serving ['tiny']" in line:
                port = int(line.rsplit(" ", 1)[1])
                break
        assert port, "the server did not load the model from the cache"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        process.kill()
        process.wait()
