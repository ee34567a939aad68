"""Issue 19: dtype auto on CPU chosen by measurement. The decision is a pure function of measured
speeds and guard results (tested with forced measurements, as on CPUs we do not have); the
measurement itself runs on a tiny model through the real backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rankstream.v1 import rankstream_pb2 as pb
from rankstream_server.config import BatchingConfig, ModelConfig
from rankstream_server.inference import precision
from rankstream_server.inference.model_loading import load_model
from rankstream_server.inference.precision import (
    Guard,
    PrecisionChoice,
    bi_guard,
    candidates_for,
    cross_guard,
    decide,
    far_slower,
    settle_precision,
)

PASS = Guard(True, min_cosine=0.9999)
FAIL = Guard(False, min_cosine=0.98)


# -- the decision, from forced measurements -------------------------------------------------


def test_avx2_only_cpu_where_bf16_is_six_times_slower_keeps_float32():
    dtype, reason = decide({"float32": 18.0, "bfloat16": 3.0}, {})
    assert dtype == "float32"
    assert "bfloat16 measured 0.17x" in reason


def test_bf16_faster_but_under_the_margin_keeps_float32():
    assert decide({"float32": 100.0, "bfloat16": 119.0}, {"bfloat16": PASS})[0] == "float32"


def test_bf16_clearly_faster_and_guarded_is_chosen():
    dtype, reason = decide({"float32": 18.0, "bfloat16": 57.0}, {"bfloat16": PASS})
    assert dtype == "bfloat16" and "3.17x" in reason


@pytest.mark.parametrize("guards", [{"bfloat16": FAIL}, {}], ids=["guard failed", "never guarded"])
def test_a_fast_candidate_without_a_passed_guard_keeps_float32(guards):
    dtype, reason = decide({"float32": 18.0, "bfloat16": 57.0}, guards)
    assert dtype == "float32" and "failed the quality guard" in reason


def test_the_fastest_guarded_candidate_wins():
    speeds = {"float32": 10.0, "bfloat16": 30.0, "float16": 40.0}
    assert decide(speeds, {"bfloat16": PASS, "float16": PASS})[0] == "float16"
    assert decide(speeds, {"bfloat16": PASS, "float16": FAIL})[0] == "bfloat16"


def test_only_candidates_over_the_margin_are_guarded():
    assert precision.fast_enough({"float32": 10.0, "bfloat16": 12.0, "float16": 11.9}) == ["bfloat16"]


def test_explicit_dtype_far_slower_than_float32_is_flagged():
    assert far_slower({"float32": 18.0, "bfloat16": 3.0}, "bfloat16")
    assert not far_slower({"float32": 18.0, "bfloat16": 57.0}, "bfloat16")
    assert not far_slower({"float32": 18.0}, "float32")


def test_float16_is_a_candidate_only_with_native_fp16_matrix_math():
    assert candidates_for(("avx2",)) == ["bfloat16"]
    assert candidates_for(("avx512_fp16", "amx_bf16")) == ["bfloat16"]
    assert candidates_for(("amx_fp16", "amx_bf16")) == ["bfloat16", "float16"]


# -- the guards -----------------------------------------------------------------------------


def test_cross_guard_passes_identical_and_slightly_noisy_scores():
    rng = np.random.default_rng(0)
    reference = [rng.normal(size=30).astype(np.float32) for _ in range(3)]
    assert cross_guard(reference, reference).passed
    noisy = [r + rng.normal(scale=1e-4, size=r.shape).astype(np.float32) for r in reference]
    guard = cross_guard(reference, noisy)
    assert guard.passed and guard.max_score_diff < 1e-3


def test_cross_guard_fails_a_real_reordering_of_the_top_ten():
    reference = [np.arange(30, dtype=np.float32)]
    swapped = reference[0].copy()
    swapped[[29, 0]] = swapped[[0, 29]]  # the best passage falls to the bottom
    guard = cross_guard(reference, [swapped])
    assert not guard.passed and guard.top_overlap < 0.99


def test_cross_guard_counts_a_near_tie_at_the_tenth_place_as_agreeing():
    scores = np.arange(30, dtype=np.float32)
    scores[19] = scores[20] - 1e-4  # 10th and 11th best nearly tie in float32
    candidate = scores.copy()
    candidate[19] += 2e-4  # and swap in the candidate
    guard = cross_guard([scores], [candidate])
    assert guard.strict_top_overlap == pytest.approx(0.9)
    assert guard.top_overlap == 1.0 and guard.passed


def test_cross_guard_bounds_the_score_difference():
    reference = [np.arange(30, dtype=np.float32)]
    shifted = [reference[0] + 2.0]  # same order, every score off by 7% of the spread
    guard = cross_guard(reference, shifted)
    assert guard.top_overlap == 1.0 and not guard.passed


def test_bi_guard_checks_every_vector():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(8, 16)).astype(np.float32)
    assert bi_guard(reference, reference * 1.0001).passed
    skewed = reference.copy()
    skewed[3] = rng.normal(size=16)  # one vector wrong is enough
    assert not bi_guard(reference, skewed).passed


# -- measuring, on a tiny model -------------------------------------------------------------


def test_auto_on_cpu_measures_and_applies_its_choice(models):
    loaded = settle_precision(load_model(ModelConfig(name="m", weights=str(models.bert))), BatchingConfig())
    choice = loaded.precision
    assert list(choice.speeds) == ["float32", "bfloat16"] and all(rate > 0 for rate in choice.speeds.values())
    assert choice.reason.startswith("auto: ")
    assert (choice.dtype, set(choice.guards)) == (decide(choice.speeds, choice.guards)[0], set(precision.fast_enough(choice.speeds)))
    assert {p.dtype for p in loaded.model.parameters()} == {getattr(torch, choice.dtype)} and loaded.dtype == getattr(torch, choice.dtype)


@pytest.mark.parametrize("speeds, expected", [
    ({"float32": 18.0, "bfloat16": 3.0}, torch.float32),  # an avx2-only CPU
    ({"float32": 18.0, "bfloat16": 57.0}, torch.bfloat16),  # AMX, as issue 19 measured
])
def test_forced_speeds_decide_what_the_model_runs_in(models, monkeypatch, speeds, expected):
    monkeypatch.setattr(precision, "_time", lambda backends, timed: dict(speeds))
    monkeypatch.setattr(precision, "cross_guard", lambda reference, candidate: Guard(
        True, top_overlap=1.0, strict_top_overlap=1.0, max_score_diff=0.0, score_spread=1.0))
    loaded = settle_precision(load_model(ModelConfig(name="m", weights=str(models.bert))))
    assert loaded.dtype == expected
    assert {p.dtype for p in loaded.model.parameters()} == {expected}
    assert loaded.precision.speeds == speeds


def test_bi_encoder_guard_runs_on_its_embeddings(models, monkeypatch):
    monkeypatch.setattr(precision, "_time", lambda backends, timed: {"float32": 10.0, "bfloat16": 30.0})
    loaded = settle_precision(load_model(ModelConfig(name="b", kind="bi", weights=str(models.bert))))
    guard = loaded.precision.guards["bfloat16"]
    assert guard.min_cosine is not None and guard.top_overlap is None
    assert loaded.precision.dtype == ("bfloat16" if guard.passed else "float32")


def test_explicit_float32_is_not_measured(models):
    loaded = settle_precision(load_model(ModelConfig(name="m", weights=str(models.bert), dtype="float32")))
    assert loaded.precision.speeds == {} and loaded.precision.reason == "configured" and loaded.dtype == torch.float32


def test_explicit_bf16_is_obeyed_and_warned_about_when_far_slower(models, monkeypatch, caplog):
    monkeypatch.setattr(precision, "_time", lambda backends, timed: {"float32": 18.0, "bfloat16": 3.0})
    loaded = settle_precision(load_model(ModelConfig(name="m", weights=str(models.bert), dtype="bfloat16")))
    assert loaded.dtype == torch.bfloat16 and {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert "6.0x slower than float32" in loaded.precision.reason
    assert any("slower than float32 on this CPU" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_choice_fits_model_info():
    choice = PrecisionChoice("bfloat16", "auto: measured 3.17x float32, quality guard passed",
                             {"float32": 18.0, "bfloat16": 57.0},
                             {"bfloat16": Guard(True, top_overlap=1.0, strict_top_overlap=0.9, max_score_diff=3e-4,
                                                score_spread=0.05)},
                             ("amx_bf16", "avx512_bf16"))
    info = pb.ModelInfo(name="m", dtype=choice.dtype, **choice.as_info())
    assert [m.dtype for m in info.dtype_measurements] == ["float32", "bfloat16"]
    assert not info.dtype_measurements[0].HasField("guard_passed")
    checked = info.dtype_measurements[1]
    assert checked.guard_passed and checked.top_overlap == 1.0 and not checked.HasField("min_cosine")
    assert list(info.cpu_flags) == ["amx_bf16", "avx512_bf16"] and info.dtype_reason.startswith("auto")


def test_cpu_flags_are_the_kernels_own():
    proc = Path("/proc/cpuinfo")
    if not proc.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    line = next(line for line in proc.read_text().splitlines() if line.startswith("flags"))
    kernel = set(line.split(":", 1)[1].split())
    assert set(precision.cpu_flags()) == kernel & set(precision.PRECISION_FLAGS)


# -- through the server ---------------------------------------------------------------------


async def test_list_models_reports_the_measured_choice(models):
    from conftest import make_settings, running

    settings = make_settings([{"name": "auto", "weights": str(models.bert)},
                              {"name": "auto-bi", "kind": "bi", "weights": str(models.bert)}])
    async with running(settings) as harness:
        response = await harness.info.ListModels(pb.ListModelsRequest())
    by_name = {m.name: m for m in response.models}
    for name in ("auto", "auto-bi"):
        info = by_name[name]
        measured = {m.dtype: m for m in info.dtype_measurements}
        assert list(measured)[:2] == ["float32", "bfloat16"] and all(m.rows_per_second > 0 for m in measured.values())
        assert info.dtype_reason.startswith("auto: ") and set(info.cpu_flags) == set(precision.cpu_flags())
        if info.dtype != "float32":
            assert measured[info.dtype].guard_passed
            assert measured[info.dtype].rows_per_second >= precision.CANDIDATE_MARGIN * measured["float32"].rows_per_second
        else:
            assert not any(m.HasField("guard_passed") and m.guard_passed
                           and m.rows_per_second >= precision.CANDIDATE_MARGIN * measured["float32"].rows_per_second
                           for m in measured.values())
    bi_guard_fields = [m for m in by_name["auto-bi"].dtype_measurements if m.HasField("guard_passed")]
    assert all(m.HasField("min_cosine") and not m.HasField("top_overlap") for m in bi_guard_fields)


def test_doctor_prints_each_models_choice_without_serving(models, tmp_path, capsys):
    from rankstream_server.cli.main import main

    config = tmp_path / "c.yaml"
    config.write_text(f"models:\n  - {{name: auto-cross, weights: {models.bert}}}\n"
                      f"  - {{name: pinned, weights: {models.bert}, dtype: float32}}\n")
    assert main(["--log-level", "WARNING", "doctor", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "flags:" in out and "intra-op threads per pass" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("auto-cross ", "pinned "))]
    auto_rows = [row for row in rows if row[0] == "auto-cross"]
    assert [row[3].lstrip("*") for row in auto_rows] == ["float32", "bfloat16"]
    assert sum(row[3].startswith("*") for row in auto_rows) == 1  # the one serve would run
    assert "auto-cross: runs in" in out and "pinned: runs in float32: configured" in out


@pytest.mark.parametrize("family", ["modernbert", "qwen3-seq-cls-template", "qwen3-yes-no"])
def test_every_reranker_family_is_measured_and_guarded_through_its_own_passes(tmp_path, monkeypatch, family):
    import family_factory

    folder = {
        "modernbert": lambda: family_factory.tiny_modernbert(tmp_path / "mb", "cls"),
        "qwen3-seq-cls-template": lambda: family_factory.tiny_qwen3_seq_cls(tmp_path / "q3t", chat_template=True),
        "qwen3-yes-no": lambda: family_factory.tiny_qwen3_yes_no(tmp_path / "yn"),
    }[family]()
    monkeypatch.setattr(precision, "_time", lambda backends, timed: {"float32": 10.0, "bfloat16": 30.0})
    loaded = settle_precision(load_model(ModelConfig(name=family, weights=str(folder))))
    guard = loaded.precision.guards["bfloat16"]  # computed on the family's real bf16 and fp32 outputs
    assert np.isfinite(guard.max_score_diff) and guard.score_spread > 0 and 0 <= guard.top_overlap <= 1
    assert loaded.precision.dtype == ("bfloat16" if guard.passed else "float32")
    assert {p.dtype for p in loaded.model.parameters()} == {getattr(torch, loaded.precision.dtype)}
