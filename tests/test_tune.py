"""`localctx tune`: a tiny real search (the default model under a 1,024-token header, target 2K),
its preset, resuming, and the clean errors."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from localctx.convert import convert
from localctx.errors import ConversionError, InputError
from localctx.evaluate import CellCache, PplRequest, load_text, run_ppl
from localctx.paths import cache_dir, user_presets_dir
from localctx.runtime import RunSpec, resolve_spec
from localctx.rope_freqs import yarn_factors
from localctx.tune import DEFAULTS, Study, TuneRequest, _trial_preset, curve, tune, yarn_curve

from conftest import assert_clean_error
from gguf_factory import write_model


def _request(corpus: Path, trials: int, **kw) -> TuneRequest:
    return TuneRequest(2048, load_text(corpus / "alice.txt"), trials=trials, name="t", span=32,
                       retrieval=("niah_single_2",), samples=1, **kw)


def test_a_tiny_search_writes_a_preset_and_resumes(short_model, corpus):
    spec = RunSpec(model=str(short_model))
    first = tune(_request(corpus, 2), spec)
    assert [t.number for t in first.trials] == [0, 1] and first.trials[0].values == DEFAULTS
    assert first.default.ppl is not None and first.best.ppl <= first.default.ppl
    assert first.best.feasible and first.best.retrieval >= first.default.retrieval
    assert first.computed == 2 * 2  # a perplexity and a retrieval cell per trial
    preset = user_presets_dir() / "tuned-t.toml"
    assert first.preset_path == preset
    text = preset.read_text()
    assert "# tuned by localctx tune: method yarn, target 2048, model trained on 1024" in text
    assert f"sha256 {load_text(corpus / 'alice.txt').sha}" in text and "2 trials" in text
    assert "# retrieval (niah_single_2, 1 sample each): " in text
    data = tomllib.loads(text)
    assert data["method"] == "yarn" and data["yarn"]["beta_fast"] == pytest.approx(first.best.values["beta_fast"], rel=1e-5)
    sidecar = json.loads(preset.with_suffix(".json").read_text())
    assert [t["number"] for t in sidecar["trials"]] == [0, 1]
    # Usable as any preset: resolved by its name.
    params = resolve_spec(RunSpec(model=str(short_model), preset="tuned-t")).params
    assert params.method == "yarn" and params.n_ctx >= 2048
    assert params.yarn_beta_fast == pytest.approx(first.best.values["beta_fast"], rel=1e-5)
    # A rerun computes nothing; one more trial computes only its own cells.
    again = tune(_request(corpus, 2), spec)
    assert again.computed == 0 and again.best.values == first.best.values
    more = tune(_request(corpus, 3), spec)
    assert len(more.trials) == 3 and more.computed == 2


def test_the_tuned_yarn_preset_bakes_and_verifies(short_model, corpus, tmp_path):
    """The winner converts like any preset, and the file alone gives the preset's logits."""
    tune(_request(corpus, 2), RunSpec(model=str(short_model)))
    result = convert(short_model, tmp_path / "tuned.gguf", "tuned-t", verify=True)
    assert result.verify is not None and result.verify.passed


def test_a_rope_freqs_search_writes_factors_that_bake_to_the_trials_model(short_model, corpus, tmp_path):
    """Per-dimension factors: each trial a converted copy; the winner's preset, baked again, scores
    the perplexity its trial scored (recomputed, not from the cache)."""
    spec = RunSpec(model=str(short_model))
    result = tune(_request(corpus, 1, method="rope-freqs"), spec)
    assert result.default.number == -1 and result.default.values == DEFAULTS  # the default YaRN, run as usual
    assert result.best.number == 0 and set(result.best.values) == {"lambda_max", "start", "width", "power",
                                                                     "attn_factor"}
    # The first trial is the curve nearest the default YaRN, and scores near it (this model really
    # saw 8K, so the curve's slightly smaller factors mid-ramp score a little better than YaRN's).
    default = resolve_spec(RunSpec(model=str(short_model), preset=result.default.preset)).params
    assert result.best.values == yarn_curve(default, 32)
    assert result.best.ppl == pytest.approx(result.default.ppl, rel=0.1)
    data = tomllib.loads(result.preset_path.read_text())
    factors = data["rope_freqs"]["factors"]
    assert len(factors) == 32 and factors == sorted(factors) and factors[0] == 1.0  # head dim 64: 32 pairs
    assert not list((cache_dir() / "tune" / "t").glob("*.gguf"))  # trial copies are not kept
    out = tmp_path / "tuned.gguf"
    convert(short_model, out, "tuned-t")
    again = run_ppl(PplRequest(["native"], [2048], load_text(corpus / "alice.txt"), span=32),
                    RunSpec(model=str(out), ctx=2048), cache=CellCache(enabled=False))
    assert again.cells[0]["ppl"] == result.best.ppl


@pytest.mark.parametrize("target", [16384, 32768])
def test_a_rope_freqs_search_starts_at_the_curve_nearest_yarn(target, tmp_path):
    """The default model at 2x and 4x: 1 for the fastest pairs, the scale for the slowest, every
    pair's factor within 10 % of YaRN's (the curve's power bends the ramp as YaRN's angle mixing
    does)."""
    params = resolve_spec(RunSpec(preset=str(_trial_preset(tmp_path, DEFAULTS, target)))).params
    values = yarn_curve(params, 32)
    assert values["lambda_max"] == pytest.approx(target / 8192) and 1.0 < values["attn_factor"] < 1.3
    got, want = curve(values, 32), yarn_factors(params, 64)
    assert got[:10] == [1.0] * 10 and got[-10:] == [target / 8192] * 10 and got == sorted(got)
    assert all(abs(g / w - 1) < 0.1 for g, w in zip(got, want)), list(zip(got, want))


def test_a_trial_cut_short_is_asked_again(short_model, corpus):
    """A run killed mid-trial leaves it running in the journal: the next run fails it and goes on."""
    spec = RunSpec(model=str(short_model))
    request = _request(corpus, 1)
    study = Study(request, "t", cache_dir() / "tune" / "t")
    study.ask(1)  # the default, asked and never told
    result = tune(request, spec)
    assert [t.values for t in result.trials] == [DEFAULTS]


def test_bad_inputs_are_clean_errors(short_model, corpus, tmp_path, cli):
    spec = RunSpec(model=str(short_model))
    with pytest.raises(InputError, match="not beyond the model's trained context of 1,024"):
        tune(TuneRequest(1024, load_text(corpus / "alice.txt")), spec)
    with pytest.raises(InputError, match="Unknown method 'rope'"):
        tune(TuneRequest(2048, load_text(corpus / "alice.txt"), method="rope"), spec)
    with pytest.raises(InputError, match="needle tasks"):
        tune(TuneRequest(2048, load_text(corpus / "alice.txt"), retrieval=("cwe",)), spec)
    phi = write_model(tmp_path / "phi.gguf", arch="phi2")
    with pytest.raises(ConversionError, match="phi2's llama.cpp loader ignores rope_freqs.weight"):
        tune(TuneRequest(4096, load_text(corpus / "alice.txt"), method="rope-freqs"), RunSpec(model=str(phi)))
    short = tmp_path / "short.txt"
    short.write_text("A short text. " * 40)
    assert_clean_error(cli("tune", "--model", str(short_model), "--target", "2k", "--trials", "1",
                           "--text", str(short)), "longer --text")
    assert_clean_error(cli("tune", "--model", str(short_model), "--target", "512"), "not beyond")
    bad = cli("tune", "--target", "32k", "--method", "nope")
    assert bad.returncode == 2 and "Invalid value for '--method'" in bad.stderr


def test_cli_tune_help_has_examples(cli):
    result = cli("tune", "--help")
    assert result.returncode == 0 and "Example" in result.stdout


@pytest.mark.parametrize(("trials", "startup"), [(2, 3), (8, 3), (12, 4), (24, 8), (60, 8)])
def test_tpe_takes_over_after_a_third_of_the_trials(corpus, tmp_path, trials, startup):
    """Random draws for a third of the trials (3 to 8), then TPE: a search of 8 trials gets 5 that
    TPE chose (with 8 random startup trials it got none)."""
    study = Study(_request(corpus, trials), "t", tmp_path)
    assert study._sampler(0)._n_startup_trials == startup
