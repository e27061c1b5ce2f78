#!/usr/bin/env bash
# The CLI as shipped (no wrapper) on the CUDA build that device_run.sh left in build/keep: it must
# not crash where "import numpy; import llama_cpp" does (see localctx/cli.py, benchmarks/RESULTS.md).
export PYTHONPATH=$PWD/build/keep/site:/tmp/site:$PWD LD_LIBRARY_PATH=/usr/local/cuda/lib64
M=$PWD/build/keep/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
cat build/keep/model.part00 .dev2/model.part01 > $M
[ -e localctx/builtin_presets ] || ln -s ../presets localctx/builtin_presets
mkdir -p ../shared/corpus && cp .dev2/pride_and_prejudice.txt ../shared/corpus/
python3 -c "import numpy, llama_cpp; llama_cpp.Llama('$M', n_gpu_layers=-1, verbose=False)" 2>/dev/null; echo "numpy first, plain llama_cpp: rc=$?"
python3 -m localctx generate -m $M --preset yarn-32k --device cuda --gpu-layers all --max-tokens 8 "The capital of France is" 2>&1 | tail -3; echo "generate rc=$?"
LOCALCTX_CACHE_DIR=/tmp/v python3 -m localctx eval ppl -m $M --presets yarn-32k --lengths 32k --end 32768 --device cuda --gpu-layers all 2>/dev/null; echo "eval rc=$?"
printf 'Hello\n/stats\n' | python3 -m localctx chat -m $M --preset yarn-32k --device cuda --gpu-layers all --max-tokens 16 2>&1 | tail -12; echo "chat rc=$?"
python3 -m pytest -q -p no:cacheprovider tests/test_cli.py -k "load_llama_cpp_before_numpy" 2>&1 | tail -3
