#!/usr/bin/env bash
# Installs minigptq into ./.venv from scratch (CPU torch pinned: an unpinned torch pulls a multi-GB CUDA build).
#   bash tools/install.sh          the package (compiles the C++ kernels; the CUDA ones too when nvcc is found)
#   bash tools/install.sh --test   + test tools, transformers (test oracle), and the peer stack in ./.venv-peer
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
if [ "${1:-}" = "--test" ]; then
  .venv/bin/pip install -q -e ".[test]"
  if [ ! -x .venv-peer/bin/python ]; then
    SHARED=${MINIGPTQ_SHARED:-../shared}
    if [ -f "$SHARED/tools/install_peer.sh" ]; then
      bash "$SHARED/tools/install_peer.sh" .venv-peer
    else
      echo "note: $SHARED/tools/install_peer.sh not found; interop tests with GPTQModel will be skipped" >&2
    fi
  fi
else
  .venv/bin/pip install -q -e .
fi
.venv/bin/python -c "import minigptq, torch; print('minigptq installed; torch', torch.__version__)"
