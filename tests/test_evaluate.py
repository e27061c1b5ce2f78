"""Long-context evaluation: scoring, windows, the passkey builder, the cache and the `eval` CLI,
with the real default model at small lengths."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

import localctx

from localctx.engine import Engine
from localctx.errors import InputError
from localctx.evaluate import CellCache, PasskeyRequest, PplRequest, Text, load_text, parse_depths, parse_lengths
from localctx.evaluate.passkey import KEY_LINE, QUESTION, TASK, build_passkey_prompt, first_integer, passkey_key, run_passkey
from localctx.evaluate.ppl import fixed_window, run_ppl, token_nll
from localctx.runtime import Resolved

from conftest import assert_clean_error


class Counting:
    """Wraps the shared real engine: counts factory calls and records every logits request."""

    loads = 0

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.n_ctx = engine.n_ctx
        self.params = engine.params
        self.requests: list[tuple[int, list[int], int]] = []  # (window length, positions, rows returned)
        self.completions = 0

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_bos=add_bos)

    def logits_at(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        out = self.engine.logits_at(tokens, positions)
        self.requests.append((len(tokens), list(positions), out.shape[0]))
        return out

    def complete(self, tokens: Sequence[int], **kwargs: Any) -> Any:
        self.completions += 1
        return self.engine.complete(tokens, **kwargs)

    def close(self) -> None:  # the shared engine outlives each run
        pass


@pytest.fixture(scope="module")
def engine(native_engine: Engine) -> Engine:
    return native_engine


@pytest.fixture
def factory(engine):
    made: list[Counting] = []

    def make(resolved: Resolved) -> Counting:
        made.append(Counting(engine))
        return made[-1]

    make.made = made  # type: ignore[attr-defined]
    return make


@pytest.fixture(scope="module")
def alice(corpus) -> Text:
    return load_text(corpus / "alice.txt")


# --- pure pieces -------------------------------------------------------------------------------


def test_parse_lengths_and_depths():
    assert parse_lengths("2k, 512,2k,32K") == [512, 2048, 32768]
    assert parse_depths("1,0,0.5") == [0.0, 0.5, 1.0]
    for bad in ("2x", "0", ""):
        with pytest.raises(InputError):
            parse_lengths(bad)
    with pytest.raises(InputError):
        parse_depths("1.5")


def test_token_nll_matches_log_softmax():
    logits = np.array([[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]], dtype=np.float32)
    nll = token_nll(logits, [2, 0])
    assert nll[0] == pytest.approx(-(2 - math.log(1 + math.e + math.e**2)))
    assert nll[1] == pytest.approx(math.log(3))


def test_fixed_window_is_exact_or_refuses():
    tokens = list(range(1000))
    window = fixed_window(tokens, [7], 300, end=800, span=50)
    assert len(window) == 300 and window[0] == 7 and window[-1] == 799  # BOS + the 299 tokens before 800
    assert window[1:] == tokens[501:800]
    with pytest.raises(InputError, match="1,000 tokens"):
        fixed_window(tokens, [], 300, end=1200, span=50)  # text too short: never a shorter window
    with pytest.raises(InputError, match="--end"):
        fixed_window(tokens, [], 900, end=800, span=50)  # not enough text before the span
    with pytest.raises(InputError, match="span"):
        fixed_window(tokens, [], 50, end=800, span=50)


def test_first_integer():
    assert first_integer(" 12345. Remember") == 12345
    assert first_integer(" the pass key.") is None


def test_cache_roundtrip_and_key_mismatch(tmp_path):
    cache = CellCache(tmp_path)
    cache.put({"a": 1}, {"ppl": 2.0})
    assert cache.get({"a": 1}) == {"ppl": 2.0}
    assert cache.get({"a": 2}) is None
    assert CellCache(tmp_path, enabled=False).get({"a": 1}) is None


def test_cache_directory_follows_the_environment(tmp_path, monkeypatch, isolated_home):
    assert CellCache().directory == isolated_home / "cache" / "eval"
    monkeypatch.setenv("LOCALCTX_CACHE_DIR", str(tmp_path / "shared-cache"))
    CellCache().put({"a": 1}, {"ppl": 2.0})
    assert CellCache(tmp_path / "shared-cache" / "eval").get({"a": 1}) == {"ppl": 2.0}


# --- perplexity with the real model ------------------------------------------------------------


def test_fixed_span_ppl_is_finite_and_scores_only_the_span(alice, factory):
    request = PplRequest(["native"], [512, 1024], alice, span=128)
    result = run_ppl(request, cache=CellCache(enabled=False), engine_factory=factory)
    cells = {c["length"]: c for c in result.cells}
    for length in (512, 1024):
        cell = cells[length]
        assert cell["status"] == "ok" and math.isfinite(cell["ppl"]) and 1 < cell["ppl"] < 1000
        assert cell["scored_tokens"] == 128 and cell["evaluated_tokens"] == length
    # Logits were asked for the 128 scored positions only, and the window was the full length.
    counting = factory.made[0]
    assert [(n, len(p), rows) for n, p, rows in counting.requests] == [(512, 128, 128), (1024, 128, 128)]
    assert counting.requests[1][1] == list(range(1024 - 129, 1023))
    assert result.settings["end"] == 1024  # both lengths score the same span, ending at token 1024


def test_length_above_window_is_na_and_loads_nothing(alice, factory):
    result = run_ppl(PplRequest(["native"], [16384], alice), engine_factory=factory)
    (cell,) = result.cells
    assert cell["status"] == "n/a" and "8,192-token window" in cell["reason"]
    assert factory.made == []


def test_text_too_short_is_an_error(tmp_path, factory):
    short = tmp_path / "short.txt"
    short.write_text("A short text. " * 40)
    with pytest.raises(InputError, match="longer --text"):
        run_ppl(PplRequest(["native"], [1024], load_text(short)), engine_factory=factory)


def test_second_identical_run_does_no_model_work(alice, factory):
    request = PplRequest(["native"], [384], alice, span=64)
    first = run_ppl(request, engine_factory=factory)
    assert len(factory.made) == 1 and first.computed == 1
    second = run_ppl(request, engine_factory=factory)
    assert len(factory.made) == 1 and second.computed == 0  # no engine loaded at all
    assert second.cells[0]["ppl"] == first.cells[0]["ppl"]
    # A different span or text is a different cell.
    run_ppl(PplRequest(["native"], [384], alice, span=32), engine_factory=factory)
    assert len(factory.made) == 2


def test_chunks_mode_scores_second_half_of_each_window(alice, factory):
    request = PplRequest(["native"], [256], alice, mode="chunks", max_chunks=2)
    result = run_ppl(request, cache=CellCache(enabled=False), engine_factory=factory)
    (cell,) = result.cells
    assert cell["chunks"] == 2 and cell["scored_tokens"] == 2 * 127 and math.isfinite(cell["ppl"])
    assert [(n, p[0], len(p), rows) for n, p, rows in factory.made[0].requests] == [(256, 128, 127, 127)] * 2
    assert cell["llama_perplexity"].startswith("llama-perplexity -m ") and " -c 256 " in cell["llama_perplexity"]


def test_parallel_ppl_gives_each_cell_its_one_at_a_time_result(cli, short_model, corpus):
    """--parallel: cells of one step of auto's ladder are scored together (200 and 520 tokens at the
    1,024-token step, 1,030 alone at 2,048; windows of a cell in chunks mode), each with exactly the
    result it gets alone; a repeat computes nothing."""
    text, model = corpus / "alice.txt", str(short_model)
    fixed = ("eval", "ppl", "--model", model, "--presets", "auto", "--lengths", "200,520,1030",
             "--span", "64", "--text", str(text), "--json")
    together = cli(*fixed, "--parallel", "3")
    assert together.returncode == 0, together.stderr
    assert "200, 520: computing" in together.stderr and "1,030: computing" in together.stderr
    alone = localctx.evaluate_perplexity(["auto"], [200, 520, 1030], model=model, span=64,
                                               text=text, use_cache=False)
    assert [c["ppl"] for c in json.loads(together.stdout)["cells"]] == [c["ppl"] for c in alone.cells]
    assert [c["window"] for c in alone.cells] == [1024, 1024, 2048]
    again = cli(*fixed, "--parallel", "3")
    assert "0 cell(s) computed" in again.stderr  # cached (the one-at-a-time run rewrote them: the same)
    assert [c["ppl"] for c in json.loads(again.stdout)["cells"]] == [c["ppl"] for c in alone.cells]
    chunks = lambda n: localctx.evaluate_perplexity(  # noqa: E731
        ["native"], [128], mode="chunks", max_chunks=3, parallel=n, text=text, use_cache=False).cells[0]
    assert chunks(3)["ppl"] == chunks(1)["ppl"]
    assert_clean_error(cli("eval", "ppl", "--parallel", "0"), "--parallel")


# --- passkey -----------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n_tokens", [200, 777])
def test_passkey_prompt_exact_length_and_depth(engine, n_tokens, depth):
    tokenize = lambda s: engine.tokenize(s, add_bos=False)  # noqa: E731
    prefix = engine.tokenize("", add_bos=True)
    key = passkey_key(0, 0)
    prompt = build_passkey_prompt(tokenize, prefix, n_tokens, depth, key)
    assert len(prompt.tokens) == n_tokens
    key_line = tokenize(" " + KEY_LINE.format(key=key))
    assert prompt.tokens[prompt.key_start : prompt.key_start + len(key_line)] == key_line
    assert prompt.filler_start == len(prefix) + len(tokenize(TASK))
    assert abs(prompt.depth - depth) <= 1 / prompt.filler_tokens
    if depth == 0.0:
        assert prompt.key_start == prompt.filler_start  # right after the task line
    if depth == 1.0:  # right before the question
        assert prompt.key_start + len(key_line) == n_tokens - len(tokenize(" " + QUESTION))
    text = engine.detokenize(prompt.tokens)
    assert text.count(f"The pass key is {key}.") == 1 and text.endswith(QUESTION)
    assert "The sky is blue." in text


def test_passkey_prompt_too_short_is_an_error(engine):
    with pytest.raises(InputError, match="at least"):
        build_passkey_prompt(lambda s: engine.tokenize(s, add_bos=False), [], 20, 0.5, 12345)


def test_passkey_run_uses_exact_lengths_and_caches(factory):
    request = PasskeyRequest(["native"], [256], [0.0, 1.0], trials=1, seed=3)
    result = run_passkey(request, engine_factory=factory)
    assert [c["depth"] for c in result.cells] == [0.0, 1.0]
    for cell in result.cells:
        assert cell["prompt_tokens"] == 256 - 8 and cell["key"] == passkey_key(3, 0)
        assert cell["correct"] == (first_integer(cell["answer"]) == cell["key"])
    again = run_passkey(request, engine_factory=factory)
    assert again.computed == 0 and len(factory.made) == 1
    na = run_passkey(PasskeyRequest(["native"], [16384], [0.5]), engine_factory=factory)
    assert na.cells[0]["status"] == "n/a" and len(factory.made) == 1


# --- the CLI (in-process) ---------------------------------------------------------------


def test_cli_ppl_fixed_and_chunks_json_csv_plot(cli, corpus, tmp_path):
    text = str(corpus / "alice.txt")
    fixed = cli("eval", "ppl", "--presets", "native", "--lengths", "512", "--text", text, "--json")
    assert fixed.returncode == 0, fixed.stderr
    fixed_ppl = json.loads(fixed.stdout)["cells"][0]["ppl"]
    chunks = cli("eval", "ppl", "--presets", "native", "--mode", "chunks", "--ctx", "512", "--chunks", "3",
                     "--text", text, "--json")
    assert chunks.returncode == 0, chunks.stderr
    chunk_cell = json.loads(chunks.stdout)["cells"][0]
    assert chunk_cell["scored_tokens"] == 3 * 255 and math.isfinite(chunk_cell["ppl"])
    # Same model, same window size, different tokens scored: the same order of magnitude.
    assert 0.2 < chunk_cell["ppl"] / fixed_ppl < 5, (chunk_cell["ppl"], fixed_ppl)
    # The same cell again: from the cache (no model work), as CSV, with a plot.
    png = tmp_path / "ppl.png"
    again = cli("eval", "ppl", "--presets", "native", "--lengths", "512", "--text", text, "--csv", "--plot", str(png))
    assert again.returncode == 0, again.stderr
    assert "0 cell(s) computed" in again.stderr and "loading" not in again.stderr
    header, row = again.stdout.strip().splitlines()
    assert header.startswith("preset,method,window,length,status,ppl") and row.startswith("native,none,8192,512,ok,")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    # With 16K in the run the span would end at token 16384: pin --end to ask for the same cell.
    table = cli("eval", "ppl", "--presets", "native", "--lengths", "512,16k", "--end", "512", "--text", text,
                    "--cached-only")
    assert table.returncode == 0, table.stderr
    assert table.stdout.split("\n")[1].split() == ["native", f"{fixed_ppl:.3f}", "n/a"]
    moved = cli("eval", "ppl", "--presets", "native", "--lengths", "512,1k", "--text", text, "--cached-only")
    assert moved.stdout.split("\n")[1].split() == ["native", "-", "-"]  # another span: not computed yet


def test_cli_passkey_table_and_heatmap(cli, tmp_path):
    png = tmp_path / "passkey.png"
    result = cli("eval", "passkey", "--presets", "native", "--lengths", "256", "--depths", "0.5",
                     "--plot", str(png))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["preset", "length", "d=0.5", "mean"] and lines[1].startswith("native")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_are_clean(cli, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short. " * 30)
    assert_clean_error(cli("eval", "ppl", "--presets", "native", "--lengths", "1k", "--text", str(short)),
                       "longer --text")
    assert_clean_error(cli("eval", "ppl", "--lengths", "2q"), "Bad length")
    assert_clean_error(cli("eval", "ppl", "--text", str(tmp_path / "missing.txt")), "not found")
    assert_clean_error(cli("eval", "passkey", "--presets", "nope", "--lengths", "1k"), "Unknown preset")


def test_cli_help_has_examples(cli):
    for args in (("eval",), ("eval", "ppl"), ("eval", "passkey")):
        result = cli(*args, "--help")
        assert result.returncode == 0 and "Example" in result.stdout


def test_default_text_is_the_shared_corpus():
    assert load_text(None).path.name == "pride_and_prejudice.txt"
