"""Memory of sliding-window models (issue 15), on a small synthetic Gemma 3 that llama.cpp really
loads (tests/gguf_runnable.py): which layers slide, the cache llama.cpp allocates for each setting
against the estimate, the measured peak of a filled window against the estimate, the refusal, and
that a window-sized cache never answers from tokens it no longer holds."""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_clean_error
from gguf_factory import write_model
from gguf_runnable import gemma3_swa_layers, write_runnable_model
from localctx.errors import ModelFileError
from localctx.gguf_meta import read_facts
from localctx.memory import GENERATE, estimate, sliding_cells
from localctx.presets import load_preset, resolve

WINDOW = 256  # the synthetic model's sliding window (tokens)
TRAINED = 8192


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Wide enough that the KV cache, not the process, is what grows with the window.
    return write_runnable_model(tmp_path_factory.mktemp("swa") / "gemma3.gguf", "gemma3", n_layer=6, n_embd=256,
                                n_head=4, n_head_kv=2, n_ff=512, context=TRAINED, sliding_window=WINDOW)


def kv_log(cli, model: Path, ctx: int, *flags: str) -> list[tuple[int, int, float]]:
    """(cells, layers, MiB) of each KV cache llama.cpp created, from its own log."""
    result = cli("generate", "--model", str(model), "--ctx", str(ctx), "--preset", "extrapolate-16k", "-v",
                 "--max-tokens", "1", "--no-kv-cache", *flags, "Hello")
    assert result.returncode == 0, result.stderr
    found = re.findall(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers", result.stderr)
    return [(int(cells), int(layers), float(mib)) for mib, cells, layers in found]


def test_facts_follow_llama_cpps_pattern(gemma: Path, tmp_path: Path) -> None:
    facts = read_facts(gemma)
    assert facts.sliding_window == WINDOW and facts.sliding_kind == "standard"
    assert list(facts.sliding_layers) == gemma3_swa_layers(6) == [True] * 5 + [False]
    listed = write_model(tmp_path / "listed.gguf", "gemma3", n_layer=4, extra_kv={
        "gemma3.attention.sliding_window": 512, "gemma3.attention.sliding_window_pattern": 2})
    assert read_facts(listed).sliding_layers == (True, False, True, False)
    plain = read_facts(write_model(tmp_path / "plain.gguf", "gemma3", extra_kv={"gemma3.attention.sliding_window": 0}))
    assert plain.sliding_window == 0 and plain.kv_bytes_per_cell()[1] == 0


def test_other_architectures_follow_their_llama_cpp_rules(tmp_path: Path) -> None:
    # smallthinker: every fourth layer global counting from the first, window forced to 4,096.
    thinker = read_facts(write_model(tmp_path / "st.gguf", "smallthinker", n_layer=8,
                                     extra_kv={"smallthinker.attention.sliding_window": 100}))
    assert thinker.sliding_window == 4096 and thinker.sliding_layers == (False, True, True, True) * 2
    # llama4: chunked attention over 8,192 whatever the file says, and none when the file says 0.
    chunked = read_facts(write_model(tmp_path / "l4.gguf", "llama4", n_layer=4,
                                     extra_kv={"llama4.attention.sliding_window": 1}))
    assert (chunked.sliding_window, chunked.sliding_kind) == (8192, "chunked")
    assert chunked.sliding_layers == (True, True, True, False)
    off = read_facts(write_model(tmp_path / "l4off.gguf", "llama4", extra_kv={"llama4.attention.sliding_window": 0}))
    assert off.sliding_window == 0
    # gemma2 slides every other layer over 4,096 tokens even when the file names no window.
    assert read_facts(write_model(tmp_path / "g2.gguf", "gemma2", n_layer=4)).sliding_layers == (True, False) * 2


def test_the_sliding_cache_setting_comes_from_presets_flags_and_the_api(gemma: Path, tmp_path: Path) -> None:
    import localctx
    from localctx.errors import PresetError

    preset = tmp_path / "full.toml"
    preset.write_text('method = "extrapolate"\ntarget_ctx = 16384\n[context]\nswa_full = true\n')
    params = resolve(load_preset(str(preset)), read_facts(gemma))
    assert params.swa_full and "--swa-full" in params.llama_flags() and params.to_dict()["swa_full"] is True
    assert "swa_full" not in resolve(load_preset("extrapolate-16k"), read_facts(gemma)).to_dict()  # old keys stand
    preset.write_text('method = "extrapolate"\ntarget_ctx = 16384\n[context]\nswa_full = "yes"\n')
    with pytest.raises(PresetError, match="swa_full"):
        load_preset(str(preset))
    full, windowed = (localctx.estimate_memory("extrapolate-16k", gemma, swa_full=f) for f in (True, False))
    assert full.kv_bytes > windowed.kv_bytes and full.kv_sliding_full_bytes == windowed.kv_sliding_full_bytes


def test_a_window_with_no_sliding_layer_is_refused_before_llama_cpp_crashes(tmp_path: Path) -> None:
    path = write_model(tmp_path / "none.gguf", "gemma3", n_layer=4, extra_kv={
        "gemma3.attention.sliding_window": 512, "gemma3.attention.sliding_window_pattern": 1})
    with pytest.raises(ModelFileError, match="leaves no layer sliding"):
        read_facts(path)


@pytest.mark.parametrize("flags, grows", [((), False), (("--swa-full",), True)])
def test_the_sliding_cache_matches_llama_cpp_at_two_windows(gemma: Path, cli, flags: tuple[str, ...],
                                                            grows: bool) -> None:
    facts = read_facts(gemma)
    params = resolve(load_preset("extrapolate-16k"), facts)
    seen = {}
    for ctx in (2048, 8192):
        logged = kv_log(cli, gemma, ctx, *flags)
        (full_cells, full_layers, full_mib), (swa_cells, swa_layers, swa_mib) = logged
        assert (full_layers, swa_layers) == (1, 5)
        expected = sliding_cells(facts, ctx, swa_full=bool(flags))
        assert (full_cells, swa_cells) == (ctx, expected)
        est = estimate(facts, params.with_ctx_settings(n_ctx=ctx, swa_full=bool(flags)))
        assert abs(est.kv_bytes / 2**20 - (full_mib + swa_mib)) < 0.02
        assert abs(est.kv_sliding_bytes / 2**20 - swa_mib) < 0.02
        seen[ctx] = swa_cells
    assert (seen[8192] > seen[2048]) is grows
    if not grows:
        assert seen[2048] == seen[8192] == 768  # the window plus a micro-batch (512), rounded to 256


PEAK = """
import localctx.engine, json, sys
from localctx.memory import estimate
from localctx.runtime import RunSpec, open_engine
model, ctx, full, text = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", open(sys.argv[4]).read()
with open_engine(RunSpec(model=model, preset="extrapolate-16k", ctx=ctx, swa_full=full, kv_cache=False)) as e:
    tokens = (e.tokenize(text) * 8)[:ctx - 8]
    e.logits_at(tokens, range(len(tokens) - 512, len(tokens)))  # a full window, a batch of logits
    est = estimate(e.facts, e.params)
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"peak": peak, "estimate": est.total}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("ctx", [2048, 8192])
@pytest.mark.parametrize("full", [False, True])
def test_the_estimate_bounds_a_filled_window(gemma: Path, corpus: Path, ctx: int, full: bool) -> None:
    out = subprocess.run([sys.executable, "-c", PEAK, str(gemma), str(ctx), "1" if full else "0",
                          str(corpus / "alice.txt")], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["peak"] <= row["estimate"] <= 1.5 * row["peak"], row


def test_the_refusal_counts_the_sliding_saving_and_names_what_fits(gemma: Path, cli, monkeypatch) -> None:
    facts = read_facts(gemma)
    params = resolve(load_preset("extrapolate-16k"), facts)
    # generate plans for generating: one row of logits (localctx.memory.GENERATE)
    full, windowed = (estimate(facts, params.with_ctx_settings(n_ctx=16384, swa_full=f), GENERATE).total
                      for f in (True, False))
    monkeypatch.setenv("LOCALCTX_MEMORY_LIMIT", str((full + windowed) // 2))
    refused = cli("generate", "--model", str(gemma), "--preset", "extrapolate-16k", "--swa-full", "hi")
    assert_clean_error(refused, "Not enough memory", "5 sliding-window layers at the full window",
                       "the window-sized sliding-window cache fits", "--no-swa-full")
    monkeypatch.setenv("LOCALCTX_MEMORY_LIMIT", str(windowed - 2**20))
    refused = cli("generate", "--model", str(gemma), "--preset", "extrapolate-16k", "hi")
    assert_clean_error(refused, "5 sliding-window layers keep", "for the last 256 tokens instead of",
                       "a window of up to about")


def test_self_extend_is_refused_on_sliding_window_models(gemma: Path, cli) -> None:
    result = cli("generate", "--model", str(gemma), "--preset", "self-extend-16k", "hi")
    assert_clean_error(result, "sliding-window layers (5 of 6 see only the last 256 tokens)", "YaRN")


def test_inspect_and_presets_show_carry_both_cache_sizes(gemma: Path, cli) -> None:
    report = json.loads(cli("inspect", str(gemma), "--json").stdout)
    sliding = report["sliding_window"]
    assert sliding["tokens"] == WINDOW and sliding["layers"] == [0, 1, 2, 3, 4]
    assert report["kv_cache_bytes"]["32768"]["f16"] < sliding["kv_cache_bytes_swa_full"]["32768"]["f16"]
    assert "swa-full" in cli("inspect", str(gemma)).stdout
    shown = json.loads(cli("presets", "show", "extrapolate-16k", "--model", str(gemma), "--json").stdout)
    memory = shown["memory"]
    assert memory["total_bytes"] == sum(memory[k] for k in ("model_bytes", "kv_bytes", "compute_bytes"))
    assert 0 < memory["kv_sliding_bytes"] < memory["kv_sliding_full_bytes"]


def test_a_window_sized_cache_never_answers_from_tokens_it_dropped(gemma: Path, corpus: Path) -> None:
    """Going back to a prefix whose window the sliding cache no longer holds evaluates it again:
    the logits are bitwise a fresh engine's (the same batches from the first token)."""
    from localctx.runtime import RunSpec, open_engine

    with open_engine(RunSpec(model=str(gemma), preset="extrapolate-16k", ctx=4096, kv_cache=False)) as e:
        doc = e.tokenize((corpus / "alice.txt").read_text())[:1500]
        question = e.tokenize(" Why", add_bos=False)
        e.complete(doc + e.tokenize(" And then", add_bos=False) * 300, max_tokens=1)  # far past the window
        e.complete(doc + question, max_tokens=1)  # back to the document's end
        resumed = e.last_logits().copy()
        e.reset_cache()
        e.complete(doc + question, max_tokens=1)
        assert (e.last_logits() == resumed).all()
