"""The memory estimate per workload (issue 23): generating is charged one row of logits per
sequence, scoring a whole batch of them (what llama.cpp's output buffer and the graph's logits
tensor hold for each), and N sequences are planned as one unified KV cache of N x window cells.
Checked against llama.cpp's own allocation log and a measured peak."""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import REPO
from gguf_runnable import write_runnable_model
from localctx.errors import ResourceError
from localctx.gguf_meta import ModelFacts, read_facts
from localctx.memory import GENERATE, SCORE, Workload, check_memory, estimate, human, sliding_cells
from localctx.presets import load_preset, resolve

GEMMA3_VOCAB = 262_144  # the vocabulary that made a one-shot generate look like 2 GiB


@pytest.fixture(scope="module")
def native(facts: ModelFacts):
    return resolve(load_preset("native"), facts)


def test_generating_is_charged_one_row_of_logits_per_sequence(facts: ModelFacts, native) -> None:
    big = replace(facts, n_vocab=GEMMA3_VOCAB)
    score, generate = (estimate(big, native, w) for w in (SCORE, GENERATE))
    row = 4 * GEMMA3_VOCAB
    assert generate.output_bytes == 2 * row  # llama.cpp's output buffer and the sampled copy
    assert estimate(big, native, Workload("generate", 4)).output_bytes == 2 * 4 * row
    assert score.output_bytes == 2 * native.n_batch * row
    # A whole batch for generate again (buffer, copy and the graph's logits tensor): 1.5 GiB more.
    assert score.total - generate.total > 1.4 * 2**30
    assert (generate.model_bytes, generate.kv_bytes) == (score.model_bytes, score.kv_bytes)
    # A larger batch is more logits to score, and no more to generate.
    wide = native.with_ctx_settings(n_batch=2048)
    assert estimate(big, wide, GENERATE).total == generate.total
    assert estimate(big, wide, SCORE).output_bytes == 4 * score.output_bytes
    assert estimate(big, native).total == score.total  # scoring is the default: the safe side


def test_sequences_share_one_unified_cache_of_n_windows(facts: ModelFacts, native) -> None:
    one, four = estimate(facts, native, GENERATE), estimate(facts, native, Workload("generate", 4))
    assert four.kv_bytes == 4 * one.kv_bytes  # no sliding layers on the default model: 4 x 8,192 cells
    assert estimate(facts, native.with_ctx_settings(n_ctx=4 * native.n_ctx), GENERATE).kv_bytes == four.kv_bytes
    for bad in (0, -1, 257, True, 2.0):
        with pytest.raises(ResourceError, match="parallel sequences must be from 1 to 256"):
            Workload("generate", bad)  # type: ignore[arg-type]


def test_the_refusal_says_what_was_planned_for_n_sequences(facts: ModelFacts, native) -> None:
    four = Workload("generate", 4)
    need = estimate(facts, native, four).total
    two, three = (estimate(facts, native, Workload("generate", n)).total for n in (2, 3))
    with pytest.raises(ResourceError) as refused:
        check_memory(facts, native, workload=four, available=lambda: (two + three) // 2)
    message = str(refused.value)
    assert f"planned for 4 sequences of 8,192 tokens: {human(need)} (model" in message
    assert "fewer sequences fit: up to 2 of 8,192 tokens (--parallel 2)" in message
    assert "tokens per sequence fits: --preset auto --ctx" in message
    # One sequence: the message as before.
    one = estimate(facts, native, GENERATE).total
    with pytest.raises(ResourceError, match=rf"at 8,192 tokens: it needs about {re.escape(human(one))} \(model"):
        check_memory(facts, native, workload=GENERATE, available=lambda: one - 1)
    assert check_memory(facts, native, workload=GENERATE, available=lambda: one).total == one


def test_planned_ladder_plans_for_the_workload(facts: ModelFacts) -> None:
    from localctx.runtime import RunSpec, planned_ladder, resolve_spec

    resolved = resolve_spec(RunSpec(preset="native"))
    generate = estimate(facts, resolved.params, GENERATE).total
    assert planned_ladder(resolved, 0, available=lambda: generate, workload=GENERATE) == resolved.ladder
    with pytest.raises(ResourceError, match="it needs about"):
        planned_ladder(resolved, 0, available=lambda: generate)  # the default plans for scoring
    with pytest.raises(ResourceError, match="planned for 2 sequences"):
        planned_ladder(resolved, 0, available=lambda: generate, workload=Workload("generate", 2))


# llama.cpp's allocations for N sequences, as the engine creates them (its own log, --verbose).
ALLOCATED = """
import localctx.engine, sys
from localctx.memory import Workload
from localctx.runtime import RunSpec, open_engine
model, window, n_seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open_engine(RunSpec(model=model, preset="extrapolate-16k", ctx=window, kv_cache=False, verbose=True),
                 workload=Workload("generate", n_seq)) as e:
    pass
"""


def test_n_sequences_match_what_llama_cpp_allocates(tmp_path: Path) -> None:
    model = write_runnable_model(tmp_path / "gemma3.gguf", "gemma3", n_layer=6, n_embd=256, n_head=4, n_head_kv=2,
                                 n_ff=512, context=8192, sliding_window=256)
    facts = read_facts(model)
    window, n_seq = 2048, 3
    out = subprocess.run([sys.executable, "-c", ALLOCATED, str(model), str(window), str(n_seq)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    caches = re.findall(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +\d+ layers, +\d+/(\d+) seqs",
                        out.stderr)  # cells per sequence (a stream each), then the streams
    (full_mib, full_cells, streams), (swa_mib, swa_cells, _) = caches[-2:]
    assert int(streams) == n_seq and int(full_cells) * n_seq == n_seq * window
    assert int(swa_cells) * n_seq == sliding_cells(facts, window, n_seq=n_seq) == 2304  # 3 x (256 + 512): a stream each
    params = resolve(load_preset("extrapolate-16k"), facts).with_ctx_settings(n_ctx=window)
    est = estimate(facts, params, Workload("generate", n_seq))
    assert abs(est.kv_bytes / 2**20 - (float(full_mib) + float(swa_mib))) < 0.02
    output_mib = float(re.findall(r"output buffer size = +([\d.]+) MiB", out.stderr)[-1])
    assert abs(output_mib - n_seq * 4 * facts.n_vocab / 2**20) < 0.01  # one row per sequence
    assert est.output_bytes == 2 * n_seq * 4 * facts.n_vocab


PEAK = """
import localctx.engine, json, sys
from localctx.memory import GENERATE, SCORE, estimate
from localctx.runtime import RunSpec, open_engine
with open_engine(RunSpec(preset=sys.argv[1], kv_cache=False)) as e:
    prompt = e.tokenize(open(sys.argv[2]).read())[:600]  # more than one micro-batch
    e.complete(prompt, max_tokens=4)
    est = {w.kind: estimate(e.facts, e.params, w).total for w in (GENERATE, SCORE)}
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"peak": peak, **est}))
"""


def test_a_one_shot_generate_peaks_within_its_estimate(corpus: Path) -> None:
    """Measured: a generation over a prompt of more than a micro-batch peaks below its estimate
    and within 15 % of it (on this model the whole-batch charge put it 80 % above)."""
    out = subprocess.run([sys.executable, "-c", PEAK, "native", str(corpus / "alice.txt")],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["peak"] <= row["generate"] <= 1.15 * row["peak"], row
    assert row["score"] > 1.5 * row["peak"], row
