#!/usr/bin/env bash
# Every measurement behind benchmarks/RESULTS.md, in priority order under a wall-time budget.
#   bash benchmarks/run_benchmarks.sh             # BUDGET_S=14400 (4 h) by default
#   BUDGET_S=0 bash benchmarks/run_benchmarks.sh  # only re-render the tables from what is cached
#   ONLY=quality|speed bash benchmarks/run_benchmarks.sh
#   FROM=bench_summarize bash benchmarks/run_benchmarks.sh  # start at the first step naming this
# quality = perplexity and passkey cells (deterministic: they may share the machine);
# speed   = overhead, conversion, summarizer, throughput (timings: run them on an idle machine).
# Every perplexity/passkey cell is cached as soon as it finishes (localctx's eval cache), so a
# step cut by the budget, or a crash, loses only the cell in progress: run again to resume.
set -u
cd "$(dirname "$0")/.."
LC=.venv/bin/localctx
PY=.venv/bin/python
OUT=benchmarks/results
P4=extrapolate-32k,linear-32k,ntk-32k,yarn-32k
P4R=yarn-32k,ntk-32k,linear-32k,extrapolate-32k  # compute order: most promising first
END=32768  # the scored span is the 256 tokens before token 32768 of the text, at every length
ONLY=${ONLY:-all}
# The eval cache lives in the repository: finished cells are results, and a run resumes anywhere.
export LOCALCTX_CACHE_DIR=$PWD/$OUT/cache
mkdir -p "$OUT"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-14400} ))

step() {  # step quality|speed COMMAND...
  local kind=$1 left=$(( DEADLINE - $(date +%s) ))
  shift
  [ "$ONLY" = all ] || [ "$ONLY" = "$kind" ] || return 0
  if [ -n "${FROM:-}" ]; then [[ "$*" == *"$FROM"* ]] || return 0; FROM=; fi
  if [ "$left" -le 30 ]; then echo "== SKIPPED (budget spent): $*" >&2; return 0; fi
  echo "== $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $*" >&2
  timeout "$left" "$@" || echo "== stopped or failed (exit $?): $*" >&2
}

echo "== start $(date -Is), $(nproc) cores, ONLY=$ONLY" >&2
# Highest value first: a budget cut or a lost machine costs only the tail of this list.
step speed $PY benchmarks/overhead.py --reps 9 --prompt-tokens 512 --max-tokens 128 --json "$OUT/overhead.json"
step speed $PY benchmarks/bench_convert.py --gib 3 --reps 3 --results "$OUT/convert.md"
step quality sh -c "$LC convert \"\$($PY -c 'import localctx; print(localctx.read_model_facts().path)')\" \
  /tmp/localctx-verify-32k.gguf --preset yarn-32k --force --verify --verify-tokens 8352 \
  --verify-text ../shared/corpus/alice.txt --json > $OUT/convert_verify.json; rm -f /tmp/localctx-verify-32k.gguf"
step quality $LC eval ppl --presets native --lengths 2k,4k,8k --end $END
step quality $LC eval ppl --presets $P4R --lengths 8k --end $END
step quality $LC eval ppl --presets native --mode chunks --ctx 512 --chunks 40 --json
step quality $LC eval ppl --presets native --lengths 512 --end $END
step speed $PY benchmarks/bench_summarize.py --json "$OUT/summarize.json"
step quality $LC eval ppl --presets $P4R --lengths 16k --end $END
step quality $LC eval ppl --presets $P4R --lengths 32k --end $END
step quality $LC eval passkey --presets native --lengths 1k,2k,4k,8k --depths 0,0.5,1
step speed $PY benchmarks/throughput.py --depths 2k,8k --configs fa-f16,fa-q8_0,nofa-f16 --out "$OUT/throughput.json"
step quality $LC eval passkey --presets $P4R --lengths 8k --depths 0,0.5,1
step quality $LC eval passkey --presets $P4R --lengths 16k --depths 0.5
step speed $PY benchmarks/throughput.py --depths 2k,8k,16k,32k --configs fa-f16,fa-q8_0,nofa-f16 --out "$OUT/throughput.json"
step quality $LC eval passkey --presets $P4R --lengths 32k --depths 0.5
# Issue 12: auto's cells are the static cells with the same parameters (the cache key is the
# parameters, not the preset's name); only yarn-16k at 16K and yarn-32k's short passkey cells are new.
step quality $LC eval ppl --presets yarn-16k,auto --lengths 2k,4k,8k,16k,32k --end $END
step quality $LC eval passkey --presets yarn-32k,auto --lengths 2k,4k,8k,16k --depths 0,0.5,1
step speed $PY benchmarks/bench_auto.py switch planner --json "$OUT/auto.json"
# Issue 13: KV snapshots (a 12K-token document asked twice, chat, sizes, batch-split logits).
step speed $PY benchmarks/bench_kvcache.py --json "$OUT/kvcache.json"
# Issue 14: Self-Extend beside the RoPE presets (their cells are cached above), its mechanism and speed.
step quality $LC eval ppl --presets self-extend-32k --lengths 2k,8k,16k,32k --end $END
step quality $LC eval passkey --presets self-extend-32k --lengths 8k,16k,32k --depths 0,0.5,1
step speed $PY benchmarks/bench_self_extend.py --json "$OUT/self_extend.json"
# Issue 15: peak memory of a filled window against the estimate (memory, not time: may share the
# machine), and what the window-sized sliding cache costs when a cache is reused.
step quality $PY benchmarks/bench_memory.py --validate --json "$OUT/memory.json"
step speed $PY benchmarks/bench_swa_reuse.py --json "$OUT/swa_reuse.json"
# Issue 25: RULER-style tasks, every task, 5 samples per task and length (deterministic: cells may
# share the machine); 2K for every preset first (the short-text column), then longer lengths.
RULER=native,yarn-16k,yarn-32k,ntk-32k,self-extend-32k,auto
step quality $LC eval ruler --presets $RULER --lengths 2k
step quality $LC eval ruler --presets native,yarn-32k,self-extend-32k --lengths 4k
step quality $LC eval ruler --presets ntk-32k,yarn-16k,auto --lengths 4k
step quality $LC eval ruler --presets native,yarn-32k,self-extend-32k,ntk-32k,yarn-16k,auto --lengths 8k
step quality $LC eval ruler --presets yarn-32k,ntk-32k,self-extend-32k,yarn-16k,auto --lengths 16k
step quality $LC eval ruler --presets yarn-32k,ntk-32k,self-extend-32k,auto --lengths 32k
step speed $PY benchmarks/bench_ruler.py --presets $RULER --lengths 2k,4k,8k,16k,32k --parallel 4 --json "$OUT/ruler.json"
# Issue 26: tune. The 16K search is cached (a rerun computes nothing); 32K is the GPU run (hours a
# trial here). The preset is written to the user presets directory; RESULTS §18 keeps a copy.
TUNE16="--target 16k --retrieval niah_single_2 --samples 1 --name smollm2-yarn-16k-pp"
step quality sh -c "$LC tune $TUNE16 --trials 8 --json > $OUT/tune/smollm2-yarn-16k-pp.json"
step quality $PY benchmarks/bench_tune.py transfer --target 16k --retrieval niah_single_2 --samples 1 \
  --presets yarn-16k,tuned-smollm2-yarn-16k-pp,$OUT/cache/tune/smollm2-yarn-16k-pp/trial-1e3e2c36861f.toml \
  --json "$OUT/tune/transfer.json"
step quality sh -c "$PY benchmarks/prove_llama_server.py --server \"\$(scripts/build_llama_server.sh)\" \
  --preset tuned-smollm2-yarn-16k-pp --json $OUT/tune/llama_server_proof.json"
step speed $PY benchmarks/bench_tune.py workers --trials 5 --workers 2 --json "$OUT/tune/workers.json"
step quality sh -c "$LC tune --target 32k --trials 24 --name smollm2-yarn-32k-pp --json > $OUT/tune/smollm2-yarn-32k-pp.json"
echo "== end of budgeted steps $(date -Is)" >&2

# The tables: everything finished so far, from the cache ('-' marks cells not run).
PPL=native,extrapolate-32k,linear-32k,ntk-32k,yarn-16k,yarn-32k,auto
$LC eval ppl --presets $PPL --lengths 2k,4k,8k,16k,32k --end $END --cached-only \
  --plot "$OUT/ppl.png" --json > "$OUT/ppl.json"
$LC eval ppl --presets $PPL --lengths 2k,4k,8k,16k,32k --end $END --cached-only > "$OUT/ppl.txt"
$LC eval ppl --presets native --mode chunks --ctx 512 --chunks 40 --cached-only --json > "$OUT/ppl_chunks.json"
$LC eval ppl --presets native --lengths 512 --end $END --cached-only --json > "$OUT/ppl_512.json"
$LC eval passkey --presets native,$P4 --lengths 1k,2k,4k,8k,16k,32k --depths 0,0.5,1 --cached-only \
  --plot "$OUT/passkey.png" --json > "$OUT/passkey.json"
$LC eval passkey --presets native,$P4 --lengths 1k,2k,4k,8k,16k,32k --depths 0,0.5,1 --cached-only > "$OUT/passkey.txt"
$LC eval passkey --presets yarn-32k,auto --lengths 2k,4k,8k,16k --depths 0,0.5,1 --cached-only > "$OUT/passkey_auto.txt"
$LC eval passkey --presets self-extend-32k,yarn-32k,ntk-32k --lengths 8k,16k,32k --depths 0,0.5,1 --cached-only \
  > "$OUT/passkey_self_extend.txt"
$LC eval ruler --presets $RULER --lengths 2k,4k,8k,16k,32k --cached-only --summary --plot "$OUT/ruler.png" > "$OUT/ruler.txt"
cat "$OUT/ppl.txt" "$OUT/passkey.txt" "$OUT/passkey_auto.txt" "$OUT/passkey_self_extend.txt" "$OUT/ruler.txt"
