"""`rankstream doctor`: what each configured model would run in on this machine, and why, without
serving: the same load and start-up measurement as `rankstream serve` (inference/precision.py),
with the server's torch threads and batching settings."""

from __future__ import annotations

from dataclasses import dataclass

from rankstream_server.config import Settings
from rankstream_server.inference.backend import available_cores
from rankstream_server.inference.model_loading import load_model
from rankstream_server.inference.precision import PrecisionChoice, cpu_flags, cpu_name, settle_precision


@dataclass
class ModelDiagnosis:
    name: str
    kind: str
    device: str
    choice: PrecisionChoice


def diagnose(settings: Settings, names: list[str] | None = None) -> list[ModelDiagnosis]:
    """Loads each configured model (or those named) as the server would and settles its dtype.
    Sets torch's intra-op threads to the server's (server.torch_threads)."""
    import torch

    torch.set_num_threads(settings.server.torch_threads or 1)
    diagnoses = []
    for cfg in settings.models:
        if names and cfg.name not in names:
            continue
        loaded = settle_precision(load_model(cfg), settings.batching)
        diagnoses.append(ModelDiagnosis(cfg.name, cfg.kind, str(loaded.device), loaded.precision))
        del loaded
    return diagnoses


def report(diagnoses: list[ModelDiagnosis]) -> str:
    """A table: one row per model and dtype timed, then each model's reason."""
    import torch

    lines = [
        f"CPU: {cpu_name()}, {available_cores()} cores; flags: {' '.join(cpu_flags()) or 'none known'}",
        f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads per pass",
        "",
        f"{'model':16s} {'kind':5s} {'device':7s} {'dtype':9s} {'rows/s':>9s} {'vs fp32':>8s}  guard",
    ]
    for item in diagnoses:
        choice = item.choice
        speeds = choice.speeds or {choice.dtype: float("nan")}
        base = speeds.get("float32")
        for dtype, rate in speeds.items():
            mark = "*" if dtype == choice.dtype else " "
            ratio = f"{rate / base:.2f}x" if base else "-"
            guard = choice.guards[dtype].describe() if dtype in choice.guards else ""
            lines.append(f"{item.name:16s} {item.kind:5s} {item.device:7s} {mark}{dtype:8s} {rate:9.1f} {ratio:>8s}  {guard}")
    lines.append("")
    lines += [f"{item.name}: runs in {item.choice.dtype}: {item.choice.reason}"
              + (f" (measured in {item.choice.seconds:.1f} s)" if item.choice.seconds else "") for item in diagnoses]
    lines.append("(* = the dtype `rankstream serve` would run; rows/s: calibration pairs or texts per second)")
    return "\n".join(lines)
