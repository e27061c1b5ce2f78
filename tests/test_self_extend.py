"""Self-Extend: presets validated, resolution bounded by its reach, and the engine's grouping on
the real model: nothing changes inside the trained context, no position ever reaches it past it,
and the text is still modelled (the version built on llama_memory_seq_div was not: perplexity
over 1,000). Runs on the default weights under a header claiming 1,024 trained tokens
(`conftest.short_model`), so crossing the trained context costs seconds."""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHORT_TRAINED, assert_clean_error
from gguf_factory import write_model
from gguf_runnable import write_runnable_model
from localctx.errors import ConversionError, PresetError
from localctx.gguf_meta import read_facts
from localctx.presets import load_preset, parse_preset, resolve, self_extend_reach
from localctx.runtime import RunSpec, open_engine

GROUP, WINDOW, TARGET = 4, 512, 2500  # reach on 1,024 trained tokens: (1024 - 512) x 4 + 512 - 3 = 2,557


@pytest.fixture(scope="module")
def preset_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("presets") / "se-test.toml"
    path.write_text(f'method = "self-extend"\ntarget_ctx = {TARGET}\n[self_extend]\ngroup = {GROUP}\nwindow = {WINDOW}\n')
    return path


@pytest.fixture(scope="module")
def tokens(short_model: Path, corpus: Path) -> list[int]:
    with open_engine(RunSpec(model=str(short_model), preset="native", kv_cache=False)) as engine:
        return engine.tokenize((corpus / "alice.txt").read_text())[:2400]


def nll(logits: np.ndarray, targets: list[int]) -> float:
    lp = logits - logits.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    return float(-np.mean(lp[np.arange(len(targets)), targets]))


# --- Presets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("table, fragment", [
    (None, r"needs a \[self_extend\] table"),
    ({"group": 1, "window": 512}, "self_extend.group must be a whole number from 2"),
    ({"group": "4", "window": 512}, "self_extend.group must be int"),
    ({"group": 4, "window": 0}, "self_extend.window must be at least 1"),
    ({"group": 4, "window": 512, "shift": 2}, "unknown field self_extend.shift"),
])
def test_bad_self_extend_tables_are_refused(table: dict | None, fragment: str) -> None:
    data = {"method": "self-extend", "target_ctx": 16384}
    if table is not None:
        data["self_extend"] = table
    with pytest.raises(PresetError, match=fragment):
        parse_preset(data, "bad", "bad.toml")


def test_self_extend_table_on_another_method_is_refused() -> None:
    with pytest.raises(PresetError, match=r"\[self_extend\] applies to method = 'self-extend' only"):
        parse_preset({"method": "yarn", "target_ctx": 16384, "self_extend": {"group": 4, "window": 512}}, "b", "b.toml")


def test_shipped_presets_resolve_within_their_reach(facts) -> None:
    for name, group in (("self-extend-16k", 3), ("self-extend-32k", 6)):
        p = resolve(load_preset(name), facts)
        assert (p.method, p.group_size, p.neighbor_window, p.rope_scaling_type, p.rope_freq_scale) == \
            ("self-extend", group, 2048, "none", 1.0)
        assert p.n_ctx <= self_extend_reach(facts.trained_context, group, 2048)
        assert "--grp-attn-n" in p.llama_flags()


def test_a_target_past_the_reach_is_refused_with_the_numbers(facts) -> None:
    with pytest.raises(PresetError, match=r"reaches \(trained 8,192 - window 2,048\) x 6 \+ 2,048 - 5 = 38,907 tokens"):
        resolve(load_preset("self-extend-32k"), facts, ctx=40_000)


def test_a_window_not_below_the_trained_context_is_refused(short_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "wide.toml"
    path.write_text('method = "self-extend"\ntarget_ctx = 4096\n[self_extend]\ngroup = 4\nwindow = 1024\n')
    with pytest.raises(PresetError, match="window 1,024 must be below the trained context 1,024"):
        resolve(load_preset(str(path)), read_facts(short_model))


def test_positions_other_than_rope_are_refused(tmp_path: Path) -> None:
    facts = read_facts(write_model(tmp_path / "bloom.gguf", "bloom", rope_base=None, context=2048))
    with pytest.raises(PresetError, match="ALiBi biases, not RoPE"):
        resolve(load_preset("self-extend-16k"), facts)


def test_a_model_whose_cache_cannot_shift_is_refused_at_load(tmp_path: Path, preset_file: Path, cli) -> None:
    # qwen2vl's M-RoPE positions are several per token: llama.cpp cannot re-rotate its keys, and
    # says so through llama_memory_can_shift; only loading the model tells.
    model = write_runnable_model(tmp_path / "mrope.gguf", "qwen2vl", context=1024)
    result = cli("generate", "--model", str(model), "--preset", str(preset_file), "--max-tokens", "2", "Hello")
    assert_clean_error(result, "Self-Extend moves positions", "cannot shift this one", "qwen2vl")
    ok = cli("generate", "--model", str(model), "--preset", "native", "--max-tokens", "2", "Hello")
    assert ok.returncode == 0, ok.stderr


def test_convert_refuses_self_extend(model_path: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "se.gguf"
    result = cli("convert", str(model_path), str(out), "--preset", "self-extend-32k")
    assert_clean_error(result, "procedure", "not metadata a GGUF can carry")
    assert not out.exists()
    from localctx.convert import plan_conversion
    with pytest.raises(ConversionError):
        plan_conversion(model_path, "self-extend-32k")


def test_presets_show_says_what_it_does(cli) -> None:
    text = cli("presets", "show", "self-extend-32k").stdout
    assert "index // 6" in text and "--grp-attn-n 6 --grp-attn-w 2048" in text and "llama-server -m" not in text
    report = json.loads(cli("presets", "show", "self-extend-32k", "--json").stdout)
    assert report["params"]["group_size"] == 6 and report["llama_server"] is None


# --- The engine ------------------------------------------------------------------------------


def test_inside_the_trained_context_logits_equal_native(short_model: Path, preset_file: Path,
                                                        tokens: list[int]) -> None:
    n = SHORT_TRAINED - 24
    with open_engine(RunSpec(model=str(short_model), preset=str(preset_file), kv_cache=False)) as se, \
         open_engine(RunSpec(model=str(short_model), preset="native", kv_cache=False)) as native:
        positions = list(range(0, n, 50))
        assert np.array_equal(se.logits_at(tokens[:n], positions), native.logits_at(tokens[:n], positions))
        assert se.max_position() == n - 1


@pytest.mark.slow
def test_past_the_trained_context_no_position_reaches_it_and_the_text_is_modelled(
        short_model: Path, preset_file: Path, tokens: list[int]) -> None:
    """2,400 tokens on a header of 1,024: positions stay below 1,024, and the last 400 tokens are
    predicted about as well as by the unedited model (whose weights were really trained on 8K)."""
    span = list(range(1999, 2399))
    targets = tokens[2000:2400]
    with open_engine(RunSpec(model=str(short_model), preset=str(preset_file), kv_cache=False)) as se:
        grouped = nll(se.logits_at(tokens, span), targets)
        assert se.max_position() < SHORT_TRAINED and se.max_position() > SHORT_TRAINED - 64
    with open_engine(RunSpec(model=str(short_model), preset="native", ctx=2400, kv_cache=False)) as plain:
        unedited = nll(plain.logits_at(tokens, span), targets)
    assert np.exp(grouped) < 1.15 * np.exp(unedited), (np.exp(grouped), np.exp(unedited))


@pytest.mark.slow
def test_generate_chat_and_summarize_run_past_the_trained_context(short_model: Path, preset_file: Path,
                                                                  tokens: list[int], tmp_path: Path, cli) -> None:
    with open_engine(RunSpec(model=str(short_model), preset="native", kv_cache=False)) as engine:
        doc = tmp_path / "alice.txt"
        doc.write_text(engine.detokenize(tokens[1:1700]))
    args = ["--model", str(short_model), "--preset", str(preset_file)]
    gen = cli("generate", "--file", str(doc), "Who is in this story?", "--chat", "--max-tokens", "12", "--json", *args)
    assert gen.returncode == 0, gen.stderr
    report = json.loads(gen.stdout)
    assert report["params"]["method"] == "self-extend" and report["text"].strip()
    assert report["timings"]["prompt_tokens"] > SHORT_TRAINED and "[kv]" not in gen.stderr  # no snapshots here
    chat = cli("chat", "--file", str(doc), "-t", "0", "--max-tokens", "12", *args,
               input="Who is in this story?\nAnd where is she?\n/stats\n")
    assert chat.returncode == 0 and "self-extend G=4 W=512" in chat.stderr, chat.stderr
    assert chat.stderr.count("last turn") == 1 and len([l for l in chat.stdout.splitlines() if l.strip()]) >= 2
    summary = cli("summarize", str(doc), "--strategy", "stuff", "--max-summary-tokens", "24", "--json", *args)
    assert summary.returncode == 0, summary.stderr
    assert json.loads(summary.stdout.splitlines()[0])["summary"].strip()


@pytest.mark.slow
def test_eval_ppl_runs_self_extend_cells(short_model: Path, preset_file: Path, cli) -> None:
    result = cli("eval", "ppl", "--model", str(short_model), "--presets", f"native,{preset_file}", "--lengths", "512,2k",
                 "--span", "64", "--json", "--no-cache")
    assert result.returncode == 0, result.stderr
    cells = {(c["preset"], c["length"]): c for c in json.loads(result.stdout)["cells"]}
    se = [c for (p, n), c in cells.items() if p != "native" and n == 2048][0]
    assert se["params"]["method"] == "self-extend" and 1 < se["ppl"] < 100


def test_eval_cache_keys_of_other_presets_are_unchanged(facts) -> None:
    """The Self-Extend fields appear only when it is on: every eval cell and summarizer result
    computed before them keeps its key (the benchmark caches and users' caches would otherwise miss)."""
    from localctx.params import result_params

    assert "group_size" not in result_params(resolve(load_preset("yarn-32k"), facts))
    assert "neighbor_window" not in resolve(load_preset("native"), facts).to_dict()  # records
    assert result_params(resolve(load_preset("self-extend-32k"), facts))["group_size"] == 6


@pytest.mark.slow
def test_a_prompt_that_diverges_inside_the_grouped_region_is_evaluated_afresh(short_model: Path, preset_file: Path,
                                                                              tokens: list[int]) -> None:
    """After a long prompt, the next one shares only tokens that now sit at grouped positions
    (several per position, so the cache cannot be cut there): it must give what a fresh engine gives."""
    other = tokens[:400] + tokens[1000:2000]
    with open_engine(RunSpec(model=str(short_model), preset=str(preset_file), kv_cache=False)) as se:
        se.complete(tokens, max_tokens=1)
        assert se.slot(0).positions.grouped > 400  # the shared 400 tokens are grouped now
        se.complete(other, max_tokens=1)
        reused = se.last_logits()
        se.reset_cache()
        se.complete(other, max_tokens=1)
        assert np.array_equal(reused, se.last_logits())
