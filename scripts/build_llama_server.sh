#!/usr/bin/env bash
# Build llama.cpp's own llama-server from the llama.cpp vendored in the pinned llama-cpp-python
# sdist, with the CMAKE_ARGS scripts/install.sh built this install's llama-cpp-python with, so a
# comparison against it (benchmarks/bench_parallel.py) measures the server, not the build.
# Built once into a cache keyed by version, CMAKE_ARGS, machine and compiler; prints the binary's
# path on stdout (everything else goes to stderr), so `server=$(scripts/build_llama_server.sh)`.
#
#   LOCALCTX_VENV=/path/to/.venv scripts/build_llama_server.sh   # default: ./.venv
#   JOBS=4 scripts/build_llama_server.sh                           # default: 2 build jobs
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_VERSION=$(sed -n 's/^LLAMA_CPP_VERSION=//p' scripts/install.sh)
VENV=${LOCALCTX_VENV:-.venv}
ARGS_FILE=$VENV/.localctx-cmake-args
log() { printf '[build_llama_server] %s\n' "$*" >&2; }

[ -n "$LLAMA_CPP_VERSION" ] || { log "LLAMA_CPP_VERSION not found in scripts/install.sh"; exit 1; }
if [ ! -r "$ARGS_FILE" ]; then
  # Guessing the flags could build a faster or slower ggml than the one being compared with.
  log "$ARGS_FILE is missing: run scripts/install.sh first (it records the CMAKE_ARGS it built"
  log "llama-cpp-python with), or point LOCALCTX_VENV at the venv it installed."
  exit 1
fi
CMAKE_ARGS=$(cat "$ARGS_FILE")
compiler=$(c++ --version | head -1)
key=$(printf '%s|%s|%s|%s' "$LLAMA_CPP_VERSION" "$CMAKE_ARGS" "$(uname -m)" "$compiler" | sha256sum | cut -c1-16)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/localctx/llama-server/$key
if [ -x "$cache/llama-server" ]; then
  echo "$cache/llama-server"
  exit 0
fi

log "building llama-server from llama-cpp-python $LLAMA_CPP_VERSION's llama.cpp (several minutes)"
log "CMAKE_ARGS=$CMAKE_ARGS"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/python" -m pip --disable-pip-version-check download -q --no-deps --no-binary :all: \
  -d "$tmp" "llama-cpp-python==$LLAMA_CPP_VERSION" >&2
tar -xzf "$tmp"/llama_cpp_python-"$LLAMA_CPP_VERSION".tar.gz -C "$tmp"
src=$tmp/llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp

# Shared libraries, as llama-cpp-python builds them (its CMakeLists forces BUILD_SHARED_LIBS), found
# beside the binary through $ORIGIN so the cached directory works on its own. No web UI (the
# prebuilt one is a download), no HTTPS, no curl: nothing the benchmark uses.
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of flags
cmake -S "$src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release $CMAKE_ARGS \
  -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_RPATH='$ORIGIN' -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$tmp/build" --config Release --target llama-server -j"${JOBS:-2}" >&2

mkdir -p "$(dirname "$cache")"
rm -rf "$cache.tmp" && mkdir "$cache.tmp"
cp -P "$tmp"/build/bin/llama-server "$tmp"/build/bin/*.so* "$cache.tmp"/
echo "$CMAKE_ARGS" > "$cache.tmp/cmake-args"
"$cache.tmp/llama-server" --version >&2
rm -rf "$cache" && mv "$cache.tmp" "$cache"
log "built $cache/llama-server"
echo "$cache/llama-server"
