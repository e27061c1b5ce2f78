#!/usr/bin/env bash
# The benchmark behind benchmarks/RESULTS.md, in priority order under a wall-time budget.
#   bash benchmarks/run_benchmarks.sh            # BUDGET_S=2700 (45 min) by default
#   BUDGET_S=0 bash benchmarks/run_benchmarks.sh # only re-render the report from the cache
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
mkdir -p "$OUT"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-2700} ))

step() {
  local left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -le 30 ]; then echo "== SKIPPED (budget spent): $*" >&2; return 0; fi
  echo "== $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $*" >&2
  timeout "$left" "$@" || echo "== stopped or failed (exit $?): $*" >&2
}

echo "== start $(date -Is), $(nproc) cores" >&2
# Highest value first: under a busy machine the budget may end the run early (see RESULTS.md).
step $PY benchmarks/overhead.py --reps 3 --prompt-tokens 128 --max-tokens 64 --json "$OUT/overhead.json"
step $LC eval ppl --presets native --lengths 2k,4k,8k --end $END
step $LC eval ppl --presets $P4R --lengths 16k --end $END
step $LC eval passkey --presets $P4R --lengths 8k --depths 0.5
step $PY benchmarks/throughput.py --depths 2k --configs fa-f16,nofa-f16,fa-q8_0 --out "$OUT/throughput.json"
step $LC eval ppl --presets $P4R --lengths 8k --end $END
step $LC eval ppl --presets $P4R --lengths 32k --end $END
step $PY benchmarks/throughput.py --depths 2k,8k --configs fa-f16,nofa-f16,fa-q8_0 --out "$OUT/throughput.json"
step $LC eval passkey --presets $P4R --lengths 8k --depths 0,0.5,1
step $LC eval passkey --presets $P4R --lengths 16k,32k --depths 0.5
step $PY benchmarks/throughput.py --depths 2k,8k,16k,32k --configs fa-f16 --out "$OUT/throughput.json"
echo "== end of budgeted steps $(date -Is)" >&2

# The report: everything finished so far, from the cache ('-' marks cells not run).
$LC eval ppl --presets native,$P4 --lengths 2k,4k,8k,16k,32k --end $END --cached-only \
  --plot "$OUT/ppl.png" --json > "$OUT/ppl.json"
$LC eval ppl --presets native,$P4 --lengths 2k,4k,8k,16k,32k --end $END --cached-only > "$OUT/ppl.txt"
$LC eval passkey --presets $P4 --lengths 8k,16k,32k --depths 0,0.5,1 --cached-only \
  --plot "$OUT/passkey.png" --json > "$OUT/passkey.json"
$LC eval passkey --presets $P4 --lengths 8k,16k,32k --depths 0,0.5,1 --cached-only > "$OUT/passkey.txt"
cat "$OUT/ppl.txt" "$OUT/passkey.txt"
