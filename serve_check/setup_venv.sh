#!/usr/bin/env bash
# serve_check/.venv-NAME from serve_check/requirements-NAME.txt (NAME: vllm; the reference peft lives in .venv-bench). Idempotent.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME="$1"
VENV="$HERE/.venv-$NAME"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if [ ! -f "$VENV/.installed" ]; then
    "$VENV/bin/python" -m pip install -q -r "$HERE/requirements-$NAME.txt"
    if [ "$NAME" = vllm ]; then
        # These arrive as CUDA builds and break vLLM's import on a CPU-only machine; vLLM runs text models without them.
        "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    fi
    touch "$VENV/.installed"
fi
