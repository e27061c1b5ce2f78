"""Values that must be refused before they reach a C integer, a float or a division: context sizes,
thread and layer counts, the memory limit, files without a trained context, NTK on two rotary
dimensions, and one bad file among the user's models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import Keys

from localctx import resolve_preset
from localctx.errors import PresetError, ResourceError
from localctx.gguf_meta import arch_key, read_facts
from localctx.memory import MEMORY_LIMIT_ENV, parse_size
from localctx.params import MAX_CTX, MIN_CTX
from localctx.presets import load_preset, preset_files, resolve, suggest_preset
from localctx.params import C_INT_MAX
from localctx.runtime import RunSpec

from conftest import assert_clean_error, invoke
from gguf_factory import write_model


# --- Context sizes: one bound for the CLI, RunSpec and resolution ------------------------------


@pytest.mark.parametrize("command", [["generate", "--force", "hi"], ["presets", "show", "native"]])
@pytest.mark.parametrize("ctx", [str(2**32 + 512), str(MAX_CTX + 1), str(MIN_CTX - 1)])
def test_cli_ctx_out_of_range_is_a_usage_error(command, ctx):
    # 4294967808 used to reach llama.cpp's uint32 n_ctx as 512 while --json reported 4,294,967,808.
    assert_clean_error(invoke(*command, "--ctx", ctx), "--ctx", f"{MIN_CTX}<=x<={MAX_CTX}", code=2)


@pytest.mark.parametrize("ctx", [2**32 + 512, MAX_CTX + 1, MIN_CTX - 1, 0, -4096, True, "4096", 4096.0])
def test_runspec_refuses_ctx_out_of_range(ctx):
    with pytest.raises(PresetError, match=f"from {MIN_CTX} to {MAX_CTX:,}"):
        RunSpec(ctx=ctx)
    with pytest.raises(PresetError, match=f"from {MIN_CTX} to {MAX_CTX:,}"):
        resolve_preset("native", ctx=ctx)  # the library API goes through the same check


def test_ctx_bounds_themselves_are_accepted():
    assert RunSpec(ctx=MIN_CTX).ctx == MIN_CTX and RunSpec(ctx=MAX_CTX).ctx == MAX_CTX
    assert resolve_preset("auto", ctx=MAX_CTX).n_ctx == MAX_CTX


def test_window_read_from_a_file_is_bounded_too(tmp_path):
    # A native preset takes its window from the file: one past the bound is refused, not loaded.
    path = str(write_model(tmp_path / "wide.gguf", context=MAX_CTX * 2))
    assert invoke("inspect", path).returncode == 0
    assert_clean_error(invoke("presets", "show", "native", "--model", path), f"{MAX_CTX:,}", code=1)
    with pytest.raises(PresetError, match="--ctx"):
        resolve(load_preset("native"), read_facts(path))
    assert resolve(load_preset("native"), read_facts(path), ctx=32768).n_ctx == 32768


@pytest.mark.parametrize("field,value", [("threads", 0), ("threads", C_INT_MAX + 1), ("threads", True),
                                         ("gpu_layers", -1), ("gpu_layers", C_INT_MAX + 1), ("gpu_layers", 1.5)])
def test_runspec_refuses_c_int_overflow(field, value):
    with pytest.raises(ResourceError, match=field):
        RunSpec(**{field: value})


@pytest.mark.parametrize("option,value,code,fragments", [
    ("--gpu-layers", str(C_INT_MAX + 1), 2, ("--gpu-layers", str(C_INT_MAX))),
    ("--gpu-layers", "-1", 2, ("--gpu-layers",)),
    ("--threads", str(C_INT_MAX + 1), 1, ("threads", f"{C_INT_MAX:,}")),  # refused by RunSpec
])
def test_cli_refuses_c_int_overflow(option, value, code, fragments):
    assert_clean_error(invoke("generate", option, value, "hi"), *fragments, code=code)


# --- LOCALCTX_MEMORY_LIMIT --------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["inf", "infG", "1e400G", "-5G", "nan", "nanM", "abc", "0", "-1", "1e9", "5X", "G",
                                   " "])
def test_bad_memory_limit_is_a_clean_error(limit):
    with pytest.raises(ResourceError, match=MEMORY_LIMIT_ENV):
        parse_size(limit)
    result = invoke("generate", "--device", "cpu", "hi", env={MEMORY_LIMIT_ENV: limit})
    assert_clean_error(result, f"{MEMORY_LIMIT_ENV}=", "8G", code=1)


@pytest.mark.parametrize("text,size", [("850M", 850 * 2**20), ("1.5GiB", 3 * 2**29), ("8g", 8 * 2**30),
                                       ("512", 512), ("2 kb", 2048), (".5T", 2**39)])
def test_memory_limit_sizes_still_parse(text, size):
    assert parse_size(text) == size


# --- A file that records no trained context ----------------------------------------------------


def test_no_trained_context_suggests_what_works(tmp_path):
    path = str(write_model(tmp_path / "ctx0.gguf", context=0))
    refused = invoke("presets", "show", "native", "--model", path)
    assert_clean_error(refused, "--ctx", code=1)
    # Every preset the message names exists (it used to name 'extrapolate', which does not)...
    words = refused.stderr.split()
    named = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--preset"]
    assert named and set(named) <= set(preset_files()), named
    # ...and doing what it says works: the named window, unscaled.
    shown = invoke("presets", "show", named[0], "--ctx", "4096", "--model", path, "--json")
    assert shown.returncode == 0, shown.stderr
    params = json.loads(shown.stdout)["params"]
    assert (params["n_ctx"], params["rope_scaling_type"], params["rope_freq_scale"]) == (4096, "none", 1.0)
    # A scaling preset has nothing to scale from, even with --ctx.
    assert_clean_error(invoke("presets", "show", "yarn-32k", "--ctx", "32768", "--model", path), "--ctx", code=1)


def test_overflow_hint_on_a_file_without_trained_context_resolves(tmp_path):
    facts = read_facts(write_model(tmp_path / "ctx0.gguf", context=0))
    hint = suggest_preset(facts, 10000).split()
    preset, ctx = hint[hint.index("--preset") + 1], int(hint[hint.index("--ctx") + 1])
    assert resolve(load_preset(preset), facts, ctx=ctx).n_ctx >= 10000


def test_overflow_hint_never_suggests_an_impossible_window(facts):
    assert "--ctx" not in suggest_preset(facts, MAX_CTX + 1)
    assert suggest_preset(facts, MAX_CTX - 100) == f"--preset auto --ctx {MAX_CTX}"


# --- NTK ----------------------------------------------------------------------------------------


def test_ntk_on_two_rotary_dimensions_is_refused(tmp_path):
    # 4 heads of 2 dimensions: a valid file (RoPE rotates its single pair), but NTK's exponent
    # d/(d-2) divided by zero.
    path = str(write_model(tmp_path / "d2.gguf", n_embd=8, n_head=4))
    assert read_facts(path).rope_dims == 2
    assert_clean_error(invoke("presets", "show", "ntk-16k", "--model", path), "NTK", "2 rotary dimensions", code=1)
    assert invoke("presets", "show", "yarn-16k", "--model", path).returncode == 0
    report = json.loads(invoke("inspect", path, "--json").stdout)
    assert not report["presets"]["ntk-16k"]["applies"] and report["presets"]["yarn-16k"]["applies"]


def test_ntk_base_past_float32_is_refused(tmp_path):
    # Base 1e38 scaled by 4^(4/2) = 16 would be inf as llama.cpp's float.
    path = str(write_model(tmp_path / "big-base.gguf", n_embd=16, n_head=4, rope_base=1e38))
    with pytest.raises(PresetError, match="NTK"):
        resolve(load_preset("ntk-16k"), read_facts(path))


# --- models with one bad file -----------------------------------------------------------------


def test_models_lists_a_bad_file_with_its_error_and_goes_on(isolated_home):
    base_key, layers_key = arch_key(Keys.Rope.FREQ_BASE, "llama"), arch_key(Keys.LLM.BLOCK_COUNT, "llama")
    models = isolated_home / "models"
    models.mkdir()
    write_model(models / "good.gguf")
    write_model(models / "bad-base.gguf", rope_base=None, extra_kv={base_key: "fast"})  # a string: a traceback once
    write_model(models / "bad-layers.gguf", n_layer=1000)
    result = invoke("models")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("good.gguf" in line and "synthetic-llama" in line for line in lines), result.stdout
    assert any("bad-base.gguf" in line and base_key in line for line in lines), result.stdout
    assert any("bad-layers.gguf" in line and layers_key in line for line in lines), result.stdout
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(invoke("models", "--json").stdout) if r["path"]}
    assert "error" not in rows["good.gguf"] and rows["good.gguf"]["trained_context"] == 4096
    assert base_key in rows["bad-base.gguf"]["error"] and layers_key in rows["bad-layers.gguf"]["error"]


def test_seed_is_bounded_to_llama_cpps_uint32(cli) -> None:
    result = cli("generate", "--seed", str(2**32), "hi")
    assert_clean_error(result, "4294967295", code=2)
    import localctx

    with pytest.raises(localctx.InputError, match="seed"):
        localctx.open_model(seed=-1)


@pytest.mark.parametrize("value", ["nan", "inf", "-1.0"])
def test_yarn_overrides_must_be_finite(isolated_home: Path, value: str) -> None:
    from localctx.errors import PresetError
    from localctx.presets import load_preset

    (isolated_home / "presets").mkdir(exist_ok=True)
    (isolated_home / "presets" / "odd.toml").write_text(f"method = 'yarn'\ntarget_ctx = 16384\n[yarn]\nbeta_fast = {value}\n")
    with pytest.raises(PresetError, match="yarn.beta_fast must be a finite number"):
        load_preset("odd")
