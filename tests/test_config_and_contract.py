"""Configuration loading and the proto contract's generated code."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from rankstream_server.config import ConfigError, load_settings
from rankstream_server.inference.ranking import rank

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_then_env_then_cli_overrides(tmp_path, monkeypatch):
    path = write(tmp_path, "server: {port: 6000, host: 127.0.0.1}\nbatching: {max_wait_ms: 3}\nmodels:\n  - {name: a, weights: /m/a}\n  - {name: b, weights: /m/b, dtype: bfloat16}\n")
    monkeypatch.setenv("RANKSTREAM_BATCHING__MAX_WAIT_MS", "7.5")
    monkeypatch.setenv("RANKSTREAM_SERVER__PORT", "6001")
    settings = load_settings(path, **{"server.port": 7000, "server.host": None})
    assert settings.server.port == 7000, "CLI wins"
    assert settings.server.host == "127.0.0.1", "file value kept where nothing overrides it"
    assert settings.batching.max_wait_ms == 7.5, "env overrides the file"
    assert settings.default_model == "a"
    assert settings.model("b").dtype == "bfloat16" and settings.model("a").device == "auto"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("models:\n  - {name: a, weights: x}\n  - {name: a, weights: y}\n", "duplicate names ['a']"),
        ("models:\n  - {name: a, weights: x}\ndefault_model: b\n", "default_model 'b'"),
        ("models:\n  - {name: a, weights: x}\nlimits: {max_passages: 50}\nbatching: {queue_capacity: 10}\n", "must not exceed"),
        ("models:\n  - {name: a, weights: x, dtype: float64}\n", "dtype"),
        ("models:\n  - {name: a, weights: x, device: tpu}\n", "device"),
        ("models:\n  - {name: a, weights: x, colour: red}\n", "colour"),
        ("models: []\n", "models"),
    ],
)
def test_bad_config_is_refused_with_the_reason(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert needle in message and message.startswith(f"{path}: ") and "\n" not in message


def test_cli_override_is_validated(tmp_path):
    with pytest.raises(ValidationError):
        load_settings(write(tmp_path, "models:\n  - {name: a, weights: x}\n"), **{"server.port": 70000})


def test_shipped_configs_are_valid():
    shipped = sorted((ROOT / "deploy" / "config").glob("*.yaml"))
    assert len(shipped) >= 2
    for path in shipped:
        settings = load_settings(path)
        assert settings.models, path


def test_generated_stubs_match_the_proto(tmp_path):
    """Fails when protos/ changed without `make proto`."""
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "protos", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *[f"protos/{p}" for p in protos]],
        cwd=ROOT, check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert generated, "protoc produced nothing"
    for relative in generated:
        committed = ROOT / "client" / relative
        assert committed.exists(), f"{relative} is not committed: run make proto"
        assert filecmp.cmp(tmp_path / relative, committed, shallow=False), f"{relative} is stale: run make proto"


def test_rank_breaks_ties_by_position_and_applies_threshold_before_top_n():
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.9], dtype=np.float32)
    assert rank(scores, 0, None).tolist() == [1, 4, 0, 2, 3]
    assert rank(scores, 3, None).tolist() == [1, 4, 0]
    assert rank(scores, 0, 0.5).tolist() == [1, 4, 0, 2]
    assert rank(scores, 10, 0.95).tolist() == []
