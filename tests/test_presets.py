"""Preset files and their resolution against model facts, checked against the formulas."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from localctx.errors import PresetError
from localctx.gguf_meta import read_facts
from localctx.presets import load_preset, load_preset_file, preset_files, resolve
from localctx.paths import shipped_presets_dir

from gguf_factory import write_model

REPO_PRESETS = sorted((Path(__file__).resolve().parent.parent / "presets").glob("*.toml"))
REQUIRED = {"native", "extrapolate-16k", "extrapolate-32k", "linear-16k", "linear-32k", "ntk-16k", "ntk-32k",
            "yarn-16k", "yarn-32k", "yarn-64k", "yarn-128k", "auto"}


def test_required_presets_ship():
    assert REQUIRED <= {p.stem for p in REPO_PRESETS}
    assert REQUIRED <= set(preset_files())
    assert shipped_presets_dir().is_dir()


@pytest.mark.parametrize("path", REPO_PRESETS, ids=lambda p: p.stem)
def test_every_repo_preset_is_valid(path: Path, facts):
    preset = load_preset_file(path)
    assert preset.name == path.stem
    assert preset.description
    params = resolve(preset, facts, ctx=32768 if preset.method == "auto" else None)
    assert params.n_ctx >= 256


def test_yarn_32k_on_default_model(facts):
    p = resolve(load_preset("yarn-32k"), facts)
    assert (p.n_ctx, p.rope_scaling_type, p.rope_freq_scale, p.yarn_orig_ctx) == (32768, "yarn", 0.25, 8192)
    assert (p.yarn_beta_fast, p.yarn_beta_slow, p.rope_freq_base) == (32.0, 1.0, 100000.0)


def test_ntk_32k_on_default_model(facts):
    p = resolve(load_preset("ntk-32k"), facts)
    assert p.n_ctx == 32768 and p.rope_scaling_type == "none" and p.rope_freq_scale == 1.0
    assert p.rope_freq_base == pytest.approx(100000 * 4 ** (64 / 62))
    assert round(p.rope_freq_base, -2) == 418300


def test_linear_16k_on_default_model(facts):
    p = resolve(load_preset("linear-16k"), facts)
    assert (p.n_ctx, p.rope_scaling_type, p.rope_freq_scale, p.rope_freq_base) == (16384, "linear", 0.5, 100000.0)


def test_extrapolate_grows_window_without_scaling(facts):
    p = resolve(load_preset("extrapolate-32k"), facts)
    assert (p.n_ctx, p.rope_scaling_type, p.rope_freq_scale, p.rope_freq_base) == (32768, "none", 1.0, 100000.0)


def test_auto_below_and_above_trained(facts):
    auto = load_preset("auto")
    small = resolve(auto, facts, ctx=4096)
    assert (small.method, small.n_ctx, small.rope_scaling_type, small.rope_freq_scale) == ("none", 4096, "none", 1.0)
    big = resolve(auto, facts, ctx=20000)
    assert big.method == "yarn" and big.rope_freq_scale == pytest.approx(8192 / 20000) and big.yarn_orig_ctx == 8192
    default = resolve(auto, facts)  # no --ctx: 4x the trained context
    assert (default.method, default.n_ctx, default.scale) == ("yarn", 32768, 4.0)


def test_target_within_trained_context_applies_no_scaling(facts):
    p = resolve(load_preset("yarn-32k"), facts, ctx=8192)
    assert p.method == "none" and p.rope_freq_scale == 1.0 and p.scale == 1.0
    assert p.notes


def test_native_is_trained_context(facts):
    p = resolve(load_preset("native"), facts)
    assert (p.n_ctx, p.method, p.scale) == (8192, "none", 1.0)


def test_already_scaled_file_is_never_scaled_twice(tmp_path):
    # A llama model trained at 4096 whose file already says yarn ×4 with a 16384 window.
    path = write_model(tmp_path / "baked.gguf", context=16384, scaling=("yarn", 4.0, 4096), n_embd=256, n_head=2)
    facts = read_facts(path)
    assert facts.trained_context == 4096
    p = resolve(load_preset("yarn-32k"), facts)
    assert p.rope_freq_scale == pytest.approx(4096 / 32768) and p.yarn_orig_ctx == 4096
    native = resolve(load_preset("native"), facts)
    assert (native.n_ctx, native.rope_scaling_type, native.rope_freq_scale) == (4096, "none", 1.0)


def test_alibi_refuses_rope_presets_but_grows_window(tmp_path):
    facts = read_facts(write_model(tmp_path / "bloom.gguf", "bloom", rope_base=None, context=2048))
    assert facts.positions == "alibi"
    with pytest.raises(PresetError, match="ALiBi"):
        resolve(load_preset("yarn-32k"), facts)
    grown = resolve(load_preset("extrapolate-32k"), facts)
    assert grown.n_ctx == 32768 and grown.rope_scaling_type is None
    assert resolve(load_preset("auto"), facts, ctx=16384).n_ctx == 16384


def test_learned_positions_refuse_any_extension(tmp_path):
    facts = read_facts(write_model(tmp_path / "gpt2.gguf", "gpt2", rope_base=None, context=1024, learned_positions=True))
    assert facts.positions == "learned"
    for name in ("yarn-32k", "extrapolate-16k", "linear-16k"):
        with pytest.raises(PresetError, match="position embedding"):
            resolve(load_preset(name), facts)
    assert resolve(load_preset("native"), facts).n_ctx == 1024


def test_user_preset_overrides_shipped(isolated_home, facts):
    user = isolated_home / "presets"
    user.mkdir()
    (user / "yarn-32k.toml").write_text('description = "mine"\nmethod = "yarn"\ntarget_ctx = 24576\n')
    preset = load_preset("yarn-32k")
    assert preset.description == "mine" and str(user) in preset.source
    assert resolve(preset, facts).n_ctx == 24576


@pytest.mark.parametrize("body, field", [
    ('method = "yarm"\ntarget_ctx = 32768\n', "method"),
    ('method = "yarn"\n', "target_ctx"),
    ('method = "yarn"\ntarget_ctx = "big"\n', "target_ctx"),
    ('method = "yarn"\ntarget_ctx = 32768\ncolour = 1\n', "colour"),
    ('method = "yarn"\ntarget_ctx = 32768\n[context]\ntype_k = "q5"\n', "context.type_k"),
    ('method = "yarn"\ntarget_ctx = 32768\n[yarn]\nbeta_fast = "x"\n', "yarn.beta_fast"),
    ('method = "yarn"\ntarget_ctx = 32768\n[context]\nn_batch = true\n', "context.n_batch"),
    ('method = "yarn"\ntarget_ctx = = 3\n', "TOML"),
])
def test_malformed_user_preset_names_file_and_field(isolated_home, body, field):
    user = isolated_home / "presets"
    user.mkdir()
    path = user / "broken.toml"
    path.write_text(body)
    with pytest.raises(PresetError) as err:
        load_preset("broken")
    assert str(path) in str(err.value) and field in str(err.value)


def test_unknown_preset_suggests_names():
    with pytest.raises(PresetError, match="yarn-32k"):
        load_preset("yarn-32")


def test_llama_flags_for_yarn(facts):
    flags = " ".join(resolve(load_preset("yarn-32k"), facts).llama_flags())
    assert "-c 32768 --rope-scaling yarn" in flags and "--rope-scale 4 " in flags and "--yarn-orig-ctx 8192" in flags
    assert math.isclose(float(flags.split("--rope-freq-base ")[1].split()[0]), 100000)
