#!/usr/bin/env bash
# serve_check/.venv-llama: llama-cpp-python compiled from its sdist with the system cmake/gcc,
# and llama.cpp's converters unpacked from that same sdist into serve_check/.cache/llama.cpp, and nbpeft's dependencies.
# Idempotent. The compile (about 130 objects, one job at low priority) took 36 minutes on 2 busy cores.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="$HERE/.venv-llama"
CACHE="$HERE/.cache"
PY="$VENV/bin/python"
mkdir -p "$CACHE"
[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -m pip install -q -r "$HERE/requirements-llama.txt"

SDIST="$(ls "$CACHE"/llama_cpp_python-*.tar.gz 2>/dev/null | head -1 || true)"
if [ -z "$SDIST" ]; then
    "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python llama-cpp-python -d "$CACHE"
    SDIST="$(ls "$CACHE"/llama_cpp_python-*.tar.gz | head -1)"
fi
if [ ! -d "$CACHE/llama.cpp" ]; then
    top="$(basename "$SDIST" .tar.gz)"
    tar xzf "$SDIST" -C "$CACHE" --wildcards "$top/vendor/llama.cpp/convert_*.py" \
        "$top/vendor/llama.cpp/gguf-py/*" "$top/vendor/llama.cpp/conversion/*"
    mv "$CACHE/$top/vendor/llama.cpp" "$CACHE/llama.cpp" && rm -rf "${CACHE:?}/$top"
fi
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    # One compile job at low priority: the machine is shared. GGML_NATIVE=OFF: a portable AVX2 build instead of
    # -march=native (whose build crashed on every q8_0 file on an AVX-512 machine); LLAVA_BUILD=OFF: the
    # multimodal library is not used here and is a third of the compile.
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-1}" \
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
        nice -n 19 "$PY" -m pip install --no-binary llama-cpp-python "$SDIST"
fi
# nbpeft's own dependencies too (it runs from the repository with PYTHONPATH): its K-quant exports call llama.cpp's
# quantiser through llama-cpp-python, so they need both in one environment
"$PY" -m pip install -q torch==2.13.0 $("$PY" -c "import tomllib; print(' '.join(tomllib.load(open('$ROOT/pyproject.toml', 'rb'))['project']['dependencies']))")
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'ready')"
