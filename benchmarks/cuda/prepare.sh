#!/usr/bin/env bash
# Prepares, on a machine with network, what benchmarks/cuda/device_run.sh needs on a GPU machine
# that has none: the llama-cpp-python sdist without what a CUDA build never reads (so it and half
# the model fit one 64 MiB transfer), the default model in two parts, the corpus text, and wheels
# of the pure-Python dependencies the GPU image lacks. All of it lands in git-ignored folders.
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PY=.venv/bin/python
for d in .dev1 .dev2 .whl; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; done
rm -rf .dev1 .dev2 .whl && mkdir -p .dev1 .dev2 .whl
tmp=$(mktemp -d)
$PY -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
tar xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp"
src=$tmp/llama_cpp_python-$VERSION V=$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp
rm -rf "$src/.git" "$V"/{models,docs,benches,tests,examples,conversion,media,gguf-py} "$V/tools/ui" "$V/tools/server" \
  "$V"/ggml/src/ggml-{et,metal,hexagon,sycl,vulkan,opencl}
tar czf .dev1/lcp-cuda-src.tgz -C "$tmp" "llama_cpp_python-$VERSION"
model=$($PY -c 'import localctx; print(localctx.read_model_facts().path)')
split -b 52000000 -d "$model" "$tmp/model.part"
mv "$tmp/model.part00" .dev1/ && mv "$tmp/model.part01" .dev2/
sha256sum "$model" > .dev2/model.sha256
cp ../shared/corpus/pride_and_prejudice.txt .dev2/
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "gguf==$($PY -c 'import importlib.metadata as m; print(m.version("gguf"))')" platformdirs diskcache
rm -rf "$tmp"
du -sh .dev1 .dev2 .whl
