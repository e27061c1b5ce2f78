"""Length-adaptive scaling (`--preset auto`): each request runs at the smallest step of a ladder
that holds it, over one set of loaded weights.

The ladder's resolution is checked on the default model's header; what runs uses the default
model's weights under a header that says it was trained on 1,024 tokens (conftest.short_model), so
that crossing the trained window costs seconds: 1,024 unscaled → 2,048 (YaRN s=2) → 4,096 (s=4)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import localctx
from localctx.engine import Engine
from localctx.errors import ContextOverflowError, PresetError
from localctx.presets import load_preset, parse_preset, resolve_ladder
from localctx.runtime import RunSpec, open_engine, resolve_spec

from conftest import SHORT_TRAINED

ANSWER = 16


def windows(ladder) -> list[tuple[int, str, float]]:
    return [(step.n_ctx, step.method, step.scale) for step in ladder.steps]


# --- the ladder, from the header alone -----------------------------------------------------------


def test_auto_ladder_on_the_default_model(facts):
    auto = load_preset("auto")
    assert windows(resolve_ladder(auto, facts)) == [(8192, "none", 1.0), (16384, "yarn", 2.0), (32768, "yarn", 4.0)]
    # A maximum between steps is the last step; one within the trained context is a single unscaled one.
    assert windows(resolve_ladder(auto, facts, ctx=20000)) == [(8192, "none", 1.0), (16384, "yarn", 2.0),
                                                               (20000, "yarn", 20000 / 8192)]
    assert windows(resolve_ladder(auto, facts, ctx=4096)) == [(4096, "none", 1.0)]
    # A static preset is one window.
    assert windows(resolve_ladder(load_preset("yarn-32k"), facts)) == [(32768, "yarn", 4.0)]


def test_each_request_gets_the_smallest_step_that_holds_it():
    resolved = resolve_spec(RunSpec(preset="auto"))
    assert resolved.params.n_ctx == 32768  # what memory is planned for
    assert resolved.params_for(100).method == "none"
    assert resolved.params_for(8192).method == "none"  # exactly the trained context: unscaled
    just_past = resolved.params_for(8193)
    assert (just_past.method, just_past.n_ctx, just_past.rope_freq_scale) == ("yarn", 16384, 0.5)
    assert resolved.params_for(16385).scale == 4.0


def test_a_preset_defines_its_own_steps_and_method(facts):
    data = {"method": "auto", "target_ctx": 32768, "auto": {"method": "ntk", "steps": [1.5, 3]}}
    ladder = resolve_ladder(parse_preset(data, "mine", "mine.toml"), facts)
    assert windows(ladder)[1:] == [(12288, "ntk", 1.5), (24576, "ntk", 3.0), (32768, "ntk", 4.0)]
    assert ladder.steps[1].rope_freq_base > facts.rope_freq_base  # NTK changes the base, not the positions
    # A factor whose window rounds to the trained context is no step of its own (no duplicate windows).
    tiny = {"method": "auto", "auto": {"steps": [1.00001, 1.00002, 3]}}
    assert windows(resolve_ladder(parse_preset(tiny, "tiny", "tiny.toml"), facts)) == [
        (8192, "none", 1.0), (24576, "yarn", 3.0), (32768, "yarn", 4.0)]


@pytest.mark.parametrize("auto, fragment", [
    ({"steps": [4, 2]}, "increasing"),
    ({"steps": [1, 2]}, "above 1"),
    ({"steps": []}, "auto.steps"),
    ({"steps": [2, float("inf")]}, "auto.steps"),
    ({"steps": ["2"]}, "auto.steps"),
    ({"method": "self-extend"}, "auto.method"),
    ({"window": 4}, "unknown field auto.window"),
])
def test_bad_auto_tables_are_refused_naming_the_field(auto, fragment):
    with pytest.raises(PresetError, match=fragment):
        parse_preset({"method": "auto", "auto": auto}, "bad", "bad.toml")


def test_an_auto_table_on_a_static_preset_is_refused():
    with pytest.raises(PresetError, match=r"\[auto\] applies to method = 'auto' only"):
        parse_preset({"method": "yarn", "target_ctx": 16384, "auto": {"steps": [2]}}, "bad", "bad.toml")


def test_presets_show_auto_prints_the_ladder(cli):
    result = cli("presets", "show", "auto")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    step_rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [row[:4] for row in step_rows] == [["1", "8,192", "none", "1"], ["2", "16,384", "yarn", "2"],
                                             ["3", "32,768", "yarn", "4"]]
    assert "--rope-scale 2 --yarn-orig-ctx 8192" in result.stdout
    data = json.loads(cli("presets", "show", "auto", "--ctx", "20000", "--json").stdout)
    assert [step["params"]["n_ctx"] for step in data["ladder"]] == [8192, 16384, 20000]
    assert data["params"]["n_ctx"] == 20000
    assert "ladder" not in json.loads(cli("presets", "show", "yarn-32k", "--json").stdout)


# --- requests on the short-trained model ----------------------------------------------------------


@pytest.fixture(scope="module")
def auto(short_model: Path) -> Iterator[Engine]:
    with open_engine(RunSpec(model=short_model, preset="auto")) as engine:
        yield engine


@pytest.fixture(scope="module")
def text_tokens(auto: Engine, corpus: Path) -> list[int]:
    return auto.tokenize((corpus / "alice.txt").read_text(encoding="utf-8"), add_bos=False)


def test_short_prompt_runs_unscaled_and_long_one_at_the_smallest_step(auto: Engine, text_tokens: list[int]):
    weights = auto.model
    localctx.generate_text(auto, "The capital of France is", max_tokens=ANSWER)
    assert (auto.params.method, auto.n_ctx) == ("none", SHORT_TRAINED)
    past = text_tokens[: SHORT_TRAINED - ANSWER + 10]  # 10 tokens past the trained window with the answer
    gen = auto.complete(past, max_tokens=ANSWER)
    assert gen.timings.prompt_tokens == len(past)
    assert (auto.params.method, auto.params.scale, auto.n_ctx) == ("yarn", 2.0, 2 * SHORT_TRAINED)
    assert auto.lane.ctx.n_ctx == 2 * SHORT_TRAINED  # the KV cache is the window in use, not the maximum
    assert auto.lane.ctx.model is weights and auto.model is weights  # a new context, the same weights
    assert [s.after.n_ctx for s in auto.switches[-1:]] == [2 * SHORT_TRAINED]
    localctx.generate_text(auto, "The capital of France is", max_tokens=ANSWER)
    assert auto.params.method == "none"  # the next short request is unscaled again


def test_a_request_past_the_maximum_fails_with_the_counts(auto: Engine, text_tokens: list[int]):
    too_long = text_tokens[: 4 * SHORT_TRAINED]
    before = len(auto.switches)
    with pytest.raises(ContextOverflowError) as err:
        auto.generate(too_long, max_tokens=ANSWER)
    assert "4,096 tokens and the answer budget 16: 4,112 in all" in str(err.value)
    assert "maximum window of 4,096" in str(err.value) and "Nothing was truncated" in str(err.value)
    assert len(auto.switches) == before  # refused before anything changed


@pytest.mark.slow  # 10-20 s: left out of the inner loop (-m 'not slow'), run by the suite
def test_logits_under_auto_equal_the_static_preset_with_the_same_parameters(auto: Engine, short_model: Path,
                                                                           text_tokens: list[int], tmp_path: Path):
    tokens = text_tokens[: SHORT_TRAINED + 200]
    positions = [SHORT_TRAINED - 1, SHORT_TRAINED + 199]
    adaptive = auto.logits_at(tokens, positions)
    used = auto.params
    assert (used.method, used.n_ctx) == ("yarn", 2 * SHORT_TRAINED)
    static = tmp_path / "yarn-2k.toml"
    static.write_text('method = "yarn"\ntarget_ctx = 2048\n')
    with open_engine(RunSpec(model=short_model, preset=str(static))) as fixed:
        assert {**fixed.params.to_dict(), "preset": "auto"} == used.to_dict()
        reference = fixed.logits_at(tokens, positions)
    np.testing.assert_array_equal(adaptive, reference)


def test_generate_json_records_the_parameters_used(cli, short_model: Path, corpus: Path, tmp_path: Path,
                                                   text_tokens: list[int], auto: Engine):
    short = json.loads(cli("generate", "--model", str(short_model), "--preset", "auto", "--max-tokens", "4",
                           "--json", "Hello").stdout)
    assert (short["params"]["method"], short["params"]["n_ctx"]) == ("none", SHORT_TRAINED)
    doc = tmp_path / "doc.txt"
    doc.write_text(auto.detokenize(text_tokens[:1500]), encoding="utf-8")
    result = cli("generate", "--model", str(short_model), "--preset", "auto", "--max-tokens", "4", "--json",
                 "--file", str(doc), "Who is it about?")
    assert result.returncode == 0, result.stderr
    used = json.loads(result.stdout)["params"]
    assert (used["preset"], used["method"], used["n_ctx"], used["scale"]) == ("auto", "yarn", 2048, 2.0)
    assert "4 answer budget: yarn s=2, window 2,048" in result.stderr  # and in words, on stderr


def test_piped_chat_switches_once_keeps_the_document_and_reports_the_scaling(cli, short_model: Path,
                                                                            tmp_path: Path, text_tokens: list[int],
                                                                            auto: Engine):
    doc = tmp_path / "alice.txt"
    doc.write_text(auto.detokenize(text_tokens[:1100]), encoding="utf-8")  # past 1,024 with the question
    script = f"/read {doc}\nWho is this story about? Answer in one sentence.\n/stats\nAnd in one word?\n/clear\n/stats\n"
    result = cli("chat", "--model", str(short_model), "--preset", "auto", "--max-tokens", "24", "-t", "0",
                 input=script)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("[scaling] this turn needs") == 1, result.stderr  # once, then it fits
    assert "moving to 2,048 tokens (yarn s=2)" in result.stderr
    assert "re-evaluated" in result.stderr and "weights not reloaded" in result.stderr
    first_reply = result.stdout.strip().splitlines()[0].lower()
    assert "rabbit" in first_reply or "alice" in first_reply, result.stdout  # it read the document
    stats = [line for line in result.stderr.splitlines() if line.startswith("scaling:")]
    assert stats == ["scaling: yarn s=2, window 2,048 of up to 4,096",
                     "scaling: unscaled, window 1,024 of up to 4,096"], result.stderr  # /clear: back to s = 1


def test_a_chat_that_outgrows_the_maximum_is_refused_cleanly(cli, short_model: Path, tmp_path: Path,
                                                             text_tokens: list[int], auto: Engine):
    doc = tmp_path / "long.txt"
    doc.write_text(auto.detokenize(text_tokens[:4200]), encoding="utf-8")
    result = cli("chat", "--model", str(short_model), "--preset", "auto", "--max-tokens", "8",
                 input=f"/read {doc}\nSummarize it.\n")
    assert result.returncode == 0
    assert "no longer fits the window" in result.stderr and "Dropping old turns would not help" in result.stderr
    assert "[scaling]" not in result.stderr  # nothing was evaluated


@pytest.mark.slow  # 10-20 s: left out of the inner loop (-m 'not slow'), run by the suite
def test_eval_cells_run_at_their_own_step_and_share_cells_with_static_presets(cli, short_model: Path,
                                                                              corpus: Path, tmp_path: Path):
    env = {"LOCALCTX_CACHE_DIR": str(tmp_path / "cache")}
    common = ["--model", str(short_model), "--text", str(corpus / "alice.txt"), "--span", "64", "--end", "3000",
              "--json"]
    result = cli("eval", "ppl", "--presets", "auto", "--lengths", "512,1536", *common, env=env)
    assert result.returncode == 0, result.stderr
    cells = json.loads(result.stdout)["cells"]
    assert [(c["length"], c["params"]["method"], c["params"]["n_ctx"]) for c in cells] == [
        (512, "none", SHORT_TRAINED), (1536, "yarn", 2 * SHORT_TRAINED)]
    # The same parameters are the same computation: native's 512 cell is auto's, from the cache.
    native = cli("eval", "ppl", "--presets", "native", "--lengths", "512", *common, env=env)
    assert "(cached)" in native.stderr and "0 cached" not in native.stderr, native.stderr
    assert json.loads(native.stdout)["cells"][0]["ppl"] == cells[0]["ppl"]


@pytest.mark.slow  # 10-20 s: left out of the inner loop (-m 'not slow'), run by the suite
def test_summarize_under_auto_scales_one_pass_only_as_far_as_the_rule_allows(short_model: Path, auto: Engine,
                                                                            text_tokens: list[int], tmp_path: Path):
    one_pass = tmp_path / "one.txt"  # past the trained window, within s = 2: one pass at s = 2
    one_pass.write_text(auto.detokenize(text_tokens[:1300]), encoding="utf-8")
    chunked = tmp_path / "chunked.txt"  # needs s = 4: map-reduce over unscaled chunks instead
    chunked.write_text(auto.detokenize(text_tokens[:2600]), encoding="utf-8")
    options = localctx.SummarizeOptions(max_summary_tokens=32)
    result = localctx.summarize_files([one_pass, chunked], model=short_model, preset="auto", options=options)
    first, second = result.records
    assert (first["strategy"], first["model_calls"]) == ("stuff", 1)
    assert second["strategy"] == "map-reduce" and second["chunks"] >= 3
    assert first["windows"] == [2 * SHORT_TRAINED]  # the one pass, at s = 2
    assert set(second["windows"]) == {SHORT_TRAINED}, second  # chunks and reduce calls unscaled


def test_summarize_default_instruction_fits_any_document_and_fiction_is_an_option(cli):
    from localctx.summarize import DEFAULT_PROMPT, PROMPTS

    assert "characters" not in DEFAULT_PROMPT and "main points" in DEFAULT_PROMPT
    assert "characters" in PROMPTS["fiction"]
    help_text = cli("summarize", "--help").stdout
    assert "--style [general|fiction]" in help_text


def test_auto_default_maximum_is_lowered_to_what_memory_holds(facts):
    from localctx.memory import estimate
    from localctx.runtime import planned_ladder

    resolved = resolve_spec(RunSpec(preset="auto"))
    top = estimate(facts, resolved.ladder.top).total
    second = estimate(facts, resolved.ladder.steps[1]).total
    assert second < top
    lowered = planned_ladder(resolved, 0, available=lambda: (second + top) // 2)
    assert [s.n_ctx for s in lowered.steps] == [8192, 16384] and "lowered to 16,384" in lowered.top.notes[-1]
    explicit = resolve_spec(RunSpec(preset="auto", ctx=32768))  # asked for: refused, not lowered
    with pytest.raises(localctx.ResourceError, match="Not enough memory"):
        planned_ladder(explicit, 0, available=lambda: (second + top) // 2)


def test_a_window_llama_cpp_cannot_create_leaves_the_engine_at_its_window(short_model: Path, text_tokens: list[int],
                                                                        monkeypatch: pytest.MonkeyPatch):
    """llama.cpp refusing a context (out of memory, say) mid-switch: a clean error, the engine still
    at its window and answering; if even that cannot be made again, every later request is a clean error."""
    from localctx.engine import windows as windows_module

    real = windows_module.Context

    def refuse_large(model, params, **kwargs):
        if params.n_ctx > SHORT_TRAINED:
            raise ValueError("Failed to create llama_context")
        return real(model, params, **kwargs)

    with open_engine(RunSpec(model=short_model, preset="auto")) as engine:
        monkeypatch.setattr(windows_module, "Context", refuse_large)
        with pytest.raises(localctx.ResourceError, match="engine stays at 1,024 tokens"):
            engine.complete(text_tokens[: SHORT_TRAINED + 100], max_tokens=ANSWER)
        assert (engine.params.method, engine.n_ctx, engine.switches) == ("none", SHORT_TRAINED, [])
        assert localctx.generate_text(engine, "The capital of France is", max_tokens=4).text.strip()

        def refuse_all(model, params, **kwargs):
            raise ValueError("Failed to create llama_context")

        # The largest window does not fit beside the open 1,024 one: that is freed first, and with
        # the new context refused the previous window is made again, when llama.cpp allows it.
        with pytest.raises(localctx.ResourceError, match="engine stays at 1,024 tokens"):
            engine.complete(text_tokens[: 2 * SHORT_TRAINED + 100], max_tokens=ANSWER)
        assert localctx.generate_text(engine, "The capital of France is", max_tokens=4).text.strip()
        monkeypatch.setattr(windows_module, "Context", refuse_all)
        with pytest.raises(localctx.ResourceError, match="nor restore the previous one"):
            engine.complete(text_tokens[: 2 * SHORT_TRAINED + 100], max_tokens=ANSWER)
        with pytest.raises(localctx.ResourceError, match="reopen"):
            localctx.generate_text(engine, "The capital of France is", max_tokens=4)
