#!/usr/bin/env bash
# CUDA offload check and GPU measurements, as run on a lent H100/H200 machine with no network.
# Idempotent stages, so the work can be split over calls to a machine that stays warm between them:
#   build  : llama-cpp-python from its source tarball with -DGGML_CUDA=on (~3.5 min on 16 cores)
#   checks : localctx doctor / generate on the GPU, perplexity and passkey cells, throughput
# Inputs come from benchmarks/cuda/prepare.sh (git-ignored .dev1, .dev2, .whl): a 64 MiB transfer
# limit means two calls, the first carrying .dev1 (sources + model part 1), the second .dev2 and .whl:
#   DEADLINE_S=500 bash benchmarks/cuda/device_run.sh     # carry .dev1: builds, keeps model part 1
#   DEADLINE_S=470 bash benchmarks/cuda/device_run.sh     # carry .dev2 .whl: runs every check
# The measured run (benchmarks/results/cuda) set LC="python3 lc_first.py", a three-line wrapper that
# imported llama_cpp before localctx: the CLI segfaulted on that machine otherwise; localctx/cli.py
# now loads llama.cpp first itself, and benchmarks/cuda/verify_cli.sh showed the plain CLI working.
# Results go to $OUT (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
# The device tool keeps only ignored paths that .gitignore names (build/) between warm calls.
KEEP=$PWD/build/keep
SRC=$PWD/.keep  # the compiled objects live in .keep/build, which also survives as a build/ folder
mkdir -p "$KEEP" "$SRC" "$OUT"
LOG=$OUT/log.txt
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
left() { echo $(( ${DEADLINE_S:-480} - ($(date +%s) - T0) )); }
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
[ -f .dev1/model.part00 ] && cp .dev1/model.part00 "$KEEP/"

if [ ! -f "$KEEP/site/llama_cpp/__init__.py" ] || [ ! -f "$KEEP/built" ]; then
  echo "== build $(date -Is)"; nvidia-smi -L; nvcc --version | tail -1; nproc
  compgen -G "$SRC/llama_cpp_python-*/pyproject.toml" > /dev/null || tar xzf .dev1/lcp-cuda-src.tgz -C "$SRC"
  sdist=$(dirname "$(compgen -G "$SRC/llama_cpp_python-*/pyproject.toml" | head -1)")  # version: prepare.sh's
  # One architecture (Hopper) keeps the CUDA build short; the CPU flags avoid -march=native (AMX).
  export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=OFF \
-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
  export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
  time timeout "$(left)" python3 -m pip install -q --no-build-isolation --no-deps --no-index --no-cache-dir \
    --target "$KEEP/site" -C build-dir="$SRC/build" "$sdist" && touch "$KEEP/built"
  echo "== build done rc=$? $(date -Is)"
fi

[ -f .dev2/model.part01 ] || { echo "== no model part 2 yet: stop after the build"; exit 0; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$KEEP/site:/tmp/site:$PWD
# Run from the source tree, not installed: give the package its presets where an install puts them.
[ -e localctx/builtin_presets ] || ln -s ../presets localctx/builtin_presets
MODEL=$KEEP/SmolLM2-135M-Instruct.Q4_1.gguf
cat "$KEEP/model.part00" .dev2/model.part01 > "$MODEL"
echo "$(cut -d' ' -f1 .dev2/model.sha256)  $MODEL" | sha256sum -c || exit 1
mkdir -p ../shared/corpus && cp .dev2/pride_and_prejudice.txt ../shared/corpus/
export LOCALCTX_CACHE_DIR=/tmp/lc-cache LOCALCTX_HOME=/tmp/lc-home
LC=${LC:-python3 -m localctx}
GPU="--device cuda --gpu-layers all"

echo "== doctor"; $LC doctor
echo "== generate on the GPU (llama.cpp's log: offload lines)"
$LC generate -m "$MODEL" --preset yarn-32k $GPU --temperature 0 --max-tokens 16 -v "The capital of France is" \
  2> "$OUT/generate_stderr.txt"; echo "rc=$?"; grep -E "offload|CUDA0|ggml_cuda_init|Device 0" "$OUT/generate_stderr.txt" | head -20
echo "== the same cells on this machine's CPU (own cache), to compare with the GPU's below"
LOCALCTX_CACHE_DIR=/tmp/lc-cpu timeout 120 $LC eval ppl -m "$MODEL" --presets native,yarn-32k --lengths 4k --end 32768 --device cpu
P4=extrapolate-32k,linear-32k,ntk-32k,yarn-32k
echo "== perplexity, every cell of the CPU table, on the GPU"
timeout "$(left)" $LC eval ppl -m "$MODEL" --presets native --lengths 2k,4k,8k --end 32768 $GPU
timeout "$(left)" $LC eval ppl -m "$MODEL" --presets $P4 --lengths 8k,16k,32k --end 32768 $GPU
echo "== throughput on the GPU"
timeout "$(left)" python3 benchmarks/throughput.py --model "$MODEL" --depths 2k,8k,16k,32k --configs fa-f16,nofa-f16,fa-q8_0 \
  --out "$OUT/throughput_cuda.json"
echo "== passkey on the GPU: every length and depth, 3 trials"
for L in 32k 16k 8k; do
  timeout "$(left)" $LC eval passkey -m "$MODEL" --presets $P4 --lengths $L --depths 0,0.25,0.5,0.75,1 --trials 3 $GPU
done
timeout "$(left)" $LC eval passkey -m "$MODEL" --presets native --lengths 1k,2k,4k,8k --depths 0,0.25,0.5,0.75,1 --trials 3 $GPU
tar czf "$OUT/cuda-cache.tgz" -C /tmp/lc-cache .
echo "== end $(date -Is), $(( $(date +%s) - T0 )) s"
