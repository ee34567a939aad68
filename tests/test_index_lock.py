"""One writer per index folder (issue 8, defect 6): a second server, `index build --force` or
`eval --index` on a folder a server has open is refused with one line naming the holder (pid,
command, since when), exit code 2 from the CLI; the lock goes with its holder, however it ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rankstream_server.config import IndexConfig, ModelConfig, Settings
from rankstream_server.index.build import build_index
from rankstream_server.index.local import CorpusIndex
from rankstream_server.index.lock import IndexLocked
from rankstream_server.inference.model_loading import load_model

import corpus_factory
import model_factory
from index_helpers import fill, open_index

TESTS = Path(__file__).resolve().parent


def test_a_second_open_is_refused_naming_the_holder(tmp_path):
    index = open_index(tmp_path / "idx")
    fill(index, 5)
    with pytest.raises(IndexLocked) as caught:
        open_index(tmp_path / "idx")
    message = str(caught.value)
    assert f"is in use by pid {os.getpid()}, this process" in message and "index 't'" in message and " since 20" in message
    assert "\n" not in message
    index.close()
    again = open_index(tmp_path / "idx")  # free once closed
    assert again.count == 5
    again.close()


def test_build_force_is_refused_before_any_work(tmp_path):
    index = open_index(tmp_path / "idx")
    fill(index, 5)
    settings = Settings(models=[{"name": "bi", "kind": "bi", "weights": str(tmp_path / "no-such-model")}])
    with pytest.raises(IndexLocked, match="is in use by pid"):  # before loading the (missing) model
        build_index(settings, tmp_path / "corpus.jsonl", tmp_path / "idx", model="bi", force=True)
    assert index.count == 5  # the live index is untouched
    index.close()


def _child_holding(folder: Path, ready: str = "holding") -> subprocess.Popen:
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(TESTS)!r})
        from index_helpers import open_index
        index = open_index(__import__("pathlib").Path({str(folder)!r}))
        print({ready!r}, flush=True)
        time.sleep(600)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == ready
    return child


def test_the_lock_goes_with_a_killed_holder(tmp_path):
    child = _child_holding(tmp_path / "idx")
    try:
        with pytest.raises(IndexLocked, match=rf"in use by pid {child.pid} \(python -c; index 't'\) since "):
            open_index(tmp_path / "idx")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    index = open_index(tmp_path / "idx")
    index.close()


def _cli(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("rankstream")
    return subprocess.run([str(script), "--log-level", "WARNING", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _refused(done: subprocess.CompletedProcess, folder: Path) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1].startswith(f"rankstream: index folder {folder} is in use by pid {os.getpid()} ("), lines[-1]
    assert "; index 'live') since " in lines[-1]


def test_the_cli_refuses_a_live_folder_with_one_line_and_exit_2(tmp_path):
    """A second server, `index build --force` and `eval --index`, while this test holds the folder
    the way a server does."""
    tasb = model_factory.tiny_distilbert_cls_bi_encoder(tmp_path / "tasb")
    folder = tmp_path / "live"
    loaded = load_model(ModelConfig(name="tasb", kind="bi", weights=str(tasb)))
    held = CorpusIndex.open(IndexConfig(name="live", path=str(folder), model="tasb", create=True), loaded.identity(), 32)
    documents = corpus_factory.make_documents(12)
    data = corpus_factory.write_beir(tmp_path / "beir", documents, {"q0": documents[0]["text"]}, {"q0": {documents[0]["_id"]: 1}})
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "server": {"host": "127.0.0.1", "port": 0},
        "models": [{"name": "tasb", "kind": "bi", "weights": str(tasb)}],
        "indexes": [{"name": "live", "path": str(folder), "model": "tasb"}],
    }))
    try:
        _refused(_cli("index", "build", "--config", str(config), "--corpus", str(data), "--out", str(folder), "--force"), folder)
        _refused(_cli("eval", "--config", str(config), "--data", str(data), "--index", "live"), folder)
        _refused(_cli("serve", "--config", str(config)), folder)
        assert held.count == 0 and (folder / "manifest.json").exists()
    finally:
        held.close()


def test_closing_twice_is_harmless_and_frees_the_folder_once(tmp_path):
    index = open_index(tmp_path / "idx")
    fill(index, 3)
    index.close()
    other = open_index(tmp_path / "idx")
    index.close()  # must not save over, or unlock, the folder the other one now holds
    with pytest.raises(IndexLocked):
        open_index(tmp_path / "idx")
    other.close()
