"""localctx convert writing rope_freqs.weight: per-dimension factors from a [rope_freqs] preset, and
YaRN with tuned betas or factors baked as such factors. The tensor read back with gguf's own reader,
every other tensor byte kept, alignment, replacement of a file's own factors, the round trip to
native, the refusals, and the logits of the default model."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, Keys

from localctx.convert import convert, plan_conversion, verify_conversion, write_converted
from localctx.convert.verify import NOISE_MULTIPLE
from localctx.convert.write import TEMP_MARKER
from localctx.errors import ConversionError, PresetError
from localctx.gguf_meta import PROV_ORIG_ATTN_FACTOR, PROV_ORIG_ROPE_FREQS, read_header
from localctx.presets import load_preset, resolve

from conftest import assert_clean_error
from gguf_factory import write_model

ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
ATTN = Keys.Rope.SCALING_ATTN_FACTOR.format(arch="llama")
STYPE, SFACTOR = Keys.Rope.SCALING_TYPE.format(arch="llama"), Keys.Rope.SCALING_FACTOR.format(arch="llama")
SORIG, CTX = Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch="llama"), Keys.LLM.CONTEXT_LENGTH.format(arch="llama")
PAIRS = 8  # write_model's default head: 64 / 4 = 16 rotary dimensions
FACTORS = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 1.1]
SHORT_TOKENS = 300  # as in test_convert: a prompt that keeps a logit comparison to seconds
TUNED_YARN = "method = \"yarn\"\ntarget_ctx = 32768\n[yarn]\nbeta_fast = 16\nbeta_slow = 2\nattn_factor = 1.1\n"


def f32(values: list[float]) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float32)]


def preset(home: Path, name: str, body: str) -> str:
    (home / "presets").mkdir(parents=True, exist_ok=True)
    (home / "presets" / f"{name}.toml").write_text(body)
    return name


def factors_preset(home: Path, name: str, factors: list[float], *, method: str = "extrapolate",
                   target: int = 8192, extra: str = "") -> str:
    return preset(home, name, f'method = "{method}"\ntarget_ctx = {target}\n[rope_freqs]\n'
                              f"factors = {json.dumps(factors)}\n{extra}")


def tensors(path: Path) -> dict[str, tuple[list[int], int, bytes, int]]:
    """name → (shape, type, data bytes, absolute data offset), as gguf-py's reader sees them."""
    return {t.name: ([int(n) for n in t.shape], int(t.tensor_type), t.data.tobytes(), int(t.data_offset))
            for t in gguf.GGUFReader(path).tensors}


def field(path: Path, key: str) -> object:
    f = gguf.GGUFReader(path).fields.get(key)
    return None if f is None else f.contents()


# --- Writing the tensor ------------------------------------------------------------------------


def test_tensor_added_read_back_others_unchanged_aligned(tmp_path: Path, isolated_home: Path) -> None:
    src = write_model(tmp_path / "in.gguf", alignment=64, tensor_bytes=4096 + 12)
    out = tmp_path / "out.gguf"
    convert(src, out, factors_preset(isolated_home, "freqs", FACTORS, extra="attn_factor = 1.25\n"))
    before, after = tensors(src), tensors(out)
    shape, ggml_type, data, offset = after.pop(ROPE_FREQS)
    assert shape == [PAIRS] and ggml_type == GGMLQuantizationType.F32
    assert np.frombuffer(data, dtype="<f4").tolist() == f32(FACTORS)
    assert {k: v[:3] for k, v in after.items()} == {k: v[:3] for k, v in before.items()}  # every other byte
    header = read_header(out)
    assert header.alignment == 64 and header.data_offset % 64 == 0 and offset % 64 == 0
    assert all(t.offset % 64 == 0 for t in header.tensors)
    assert header.file_size % 64 == 0  # padded after the new tensor, as gguf writers pad each tensor
    assert field(out, ATTN) == pytest.approx(1.25) and field(out, PROV_ORIG_ROPE_FREQS) == []
    assert field(out, PROV_ORIG_ATTN_FACTOR) is None and field(out, CTX) == 8192


def test_native_removes_an_added_tensor_byte_for_byte(tmp_path: Path, isolated_home: Path) -> None:
    src = write_model(tmp_path / "in.gguf")
    baked, back = tmp_path / "baked.gguf", tmp_path / "back.gguf"
    convert(src, baked, factors_preset(isolated_home, "freqs", FACTORS, extra="attn_factor = 1.25\n"))
    convert(baked, back, "native")
    assert back.read_bytes() == src.read_bytes()


def test_own_factors_multiplied_in_place_and_restored(tmp_path: Path, isolated_home: Path) -> None:
    """A file with its own rope_freqs.weight (Llama 3.1's kind): the preset's factors multiply it,
    the tensor keeps its place, the plan says so, and native restores it exactly."""
    own = [1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 8.0, 8.0]
    src = write_model(tmp_path / "in.gguf", extra_tensors={ROPE_FREQS: np.array(own, dtype=np.float32)},
                      extra_kv={ATTN: 0.5})
    out, back = tmp_path / "out.gguf", tmp_path / "back.gguf"
    name = factors_preset(isolated_home, "freqs", [2.0] * PAIRS, extra="attn_factor = 3.0\n")
    plan = plan_conversion(src, name)
    assert plan.tensor is not None and plan.tensor.old == tuple(own)
    assert any("its own rope_freqs.weight" in note for note in plan.notes)
    convert(src, out, name)
    before, after = tensors(src), tensors(out)
    assert np.frombuffer(after[ROPE_FREQS][2], dtype="<f4").tolist() == [2 * v for v in own]
    assert read_header(out).tensors == read_header(src).tensors  # same entries, same offsets
    assert {k: v[2] for k, v in after.items() if k != ROPE_FREQS} == {k: v[2] for k, v in before.items() if k != ROPE_FREQS}
    assert field(out, ATTN) == pytest.approx(1.5)
    assert field(out, PROV_ORIG_ROPE_FREQS) == own and field(out, PROV_ORIG_ATTN_FACTOR) == pytest.approx(0.5)
    convert(out, back, "native")
    assert back.read_bytes() == src.read_bytes()


def test_reconverting_starts_from_the_original_factors(tmp_path: Path, isolated_home: Path) -> None:
    src = write_model(tmp_path / "in.gguf")
    baked, again = tmp_path / "baked.gguf", tmp_path / "again.gguf"
    convert(src, baked, factors_preset(isolated_home, "freqs", FACTORS))
    convert(baked, again, factors_preset(isolated_home, "twice", [2.0] * PAIRS))
    assert np.frombuffer(tensors(again)[ROPE_FREQS][2], dtype="<f4").tolist() == [2.0] * PAIRS  # not 2 x FACTORS
    standard = tmp_path / "standard.gguf"
    convert(baked, standard, "yarn-32k")
    assert ROPE_FREQS not in tensors(standard) and field(standard, STYPE) == "yarn"
    assert field(standard, PROV_ORIG_ROPE_FREQS) is None


def test_failed_check_before_publish_leaves_nothing(tmp_path: Path, isolated_home: Path) -> None:
    src = write_model(tmp_path / "in.gguf")
    plan = plan_conversion(src, factors_preset(isolated_home, "freqs", FACTORS))

    def fail(tmp: Path) -> None:
        assert ROPE_FREQS in tensors(tmp)  # the complete file was there to check
        raise ConversionError("check failed")

    with pytest.raises(ConversionError):
        write_converted(plan, tmp_path / "out.gguf", before_publish=fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.gguf"]
    assert not any(TEMP_MARKER in p.name for p in tmp_path.iterdir())


# --- Presets and refusals ----------------------------------------------------------------------


def test_factors_must_match_the_rotary_pairs(tmp_path: Path, isolated_home: Path) -> None:
    src = write_model(tmp_path / "in.gguf")
    name = factors_preset(isolated_home, "short", [1.0, 2.0, 3.0])
    with pytest.raises(PresetError, match=r"has 3 factors.*16 dimensions per head, that is 8 pairs"):
        convert(src, tmp_path / "out.gguf", name)
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("body, fragment", [
    ('method = "yarn"\ntarget_ctx = 16384\n[rope_freqs]\nfactors = [1.0]\n', "goes with method"),
    ('method = "extrapolate"\ntarget_ctx = 16384\n[rope_freqs]\nfactors = [1.0, -2.0]\n', "above 0"),
    ('method = "extrapolate"\ntarget_ctx = 16384\n[rope_freqs]\nattn_factor = 1.1\n', "needs factors"),
    ('method = "extrapolate"\ntarget_ctx = 16384\n[rope_freqs]\nfactors = [1.0]\nattn_factor = 0\n', "attn_factor"),
])
def test_malformed_rope_freqs_section(isolated_home: Path, body: str, fragment: str) -> None:
    with pytest.raises(PresetError, match=fragment):
        load_preset(preset(isolated_home, "bad", body))


def test_damaged_rope_freqs_refused(tmp_path: Path) -> None:
    """llama.cpp refuses a rope_freqs.weight that is not one F32 factor per rotary pair; so does convert."""
    src = write_model(tmp_path / "in.gguf", extra_tensors={ROPE_FREQS: np.ones(3, dtype=np.float32)})
    with pytest.raises(ConversionError, match=r"shape \[3\] and type F32; llama.cpp needs one F32 factor per rotary pair \(8\)"):
        convert(src, tmp_path / "out.gguf", "yarn-32k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.gguf"]


def test_rope_freqs_preset_is_refused_at_runtime(isolated_home: Path, model_path: Path, cli) -> None:
    name = factors_preset(isolated_home, "freqs32", [1.0] * 32, target=16384)
    r = cli("generate", "Hello", "--preset", name, "--max-tokens", "1")
    assert_clean_error(r, "[rope_freqs]", f"localctx convert {model_path.name} OUT.gguf --preset {name}")
    shown = cli("presets", "show", name)  # resolving it is fine: it is what convert bakes
    assert shown.returncode == 0, shown.stderr
    assert "no llama.cpp flag" in shown.stdout


def test_architecture_that_ignores_rope_freqs_is_refused(tmp_path: Path, isolated_home: Path) -> None:
    src = write_model(tmp_path / "phi.gguf", arch="phi2")
    for name in (preset(isolated_home, "tuned", TUNED_YARN), factors_preset(isolated_home, "freqs", FACTORS)):
        with pytest.raises(ConversionError, match="phi2's llama.cpp loader ignores rope_freqs.weight"):
            convert(src, tmp_path / "out.gguf", name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phi.gguf"]
    convert(src, tmp_path / "out.gguf", "yarn-32k")  # default YaRN keeps the standard keys, anywhere
    assert field(tmp_path / "out.gguf", Keys.Rope.SCALING_TYPE.format(arch="phi2")) == "yarn"


def test_verify_refused_for_factors_without_a_runtime_setting(tmp_path: Path, isolated_home: Path) -> None:
    src = write_model(tmp_path / "in.gguf")
    with pytest.raises(ConversionError, match="--verify compares"):
        convert(src, tmp_path / "out.gguf", factors_preset(isolated_home, "freqs", FACTORS), verify=True)
    assert not (tmp_path / "out.gguf").exists()


# --- The default model: tuned YaRN baked and verified --------------------------------------------


@pytest.fixture(scope="module")
def tuned_bake(tmp_path_factory: pytest.TempPathFactory, model_path: Path, corpus: Path) -> tuple[Path, dict]:
    """The default model with beta_fast 16, beta_slow 2, attn_factor 1.1 baked and --verify'd."""
    from conftest import invoke

    home = tmp_path_factory.mktemp("home")
    name = preset(home, "yarn-tuned", TUNED_YARN)
    out = tmp_path_factory.mktemp("tuned") / "smol-tuned.gguf"
    r = invoke("convert", str(model_path), str(out), "--preset", str(home / "presets" / f"{name}.toml"), "--verify",
               "--json", "--verify-text", str(corpus / "alice.txt"), "--verify-tokens", str(SHORT_TOKENS))
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_tuned_yarn_baked_as_factors_and_verified(tuned_bake: tuple[Path, dict]) -> None:
    out, report = tuned_bake
    v = report["verify"]
    assert v["passed"] and v["tokens"] == SHORT_TOKENS and v["noise_floor"] is not None
    assert v["max_abs_diff"] <= v["threshold"] == max(1e-3, NOISE_MULTIPLE * v["noise_floor"])
    meta = read_header(out)  # gguf-py's reader takes seconds on the vocabulary of a real model
    assert meta.get(STYPE) == "none" and meta.get(SFACTOR) is None and meta.get(SORIG) is None
    assert meta.get(CTX) == 32768
    # llama.cpp replaces attn_factor 1.1 by 1 + 0.1 ln 4 while ext_factor is 1 (llama-context.cpp)
    assert meta.get(ATTN) == pytest.approx(1 + 0.1 * math.log(4), rel=1e-6)
    assert any("ignores YaRN's attn_factor" in note for note in report["notes"])
    factors = np.frombuffer(tensors(out)[ROPE_FREQS][2], dtype="<f4").tolist()
    assert len(factors) == 32 and factors[0] == 1.0 and factors[-1] == 4.0  # extrapolated .. interpolated
    assert factors == sorted(factors) and 1.0 < factors[16] < 4.0  # the ramp between


def test_tuned_yarn_attention_factor_bake_is_exact(model_path: Path, isolated_home: Path, tmp_path: Path,
                                                    corpus: Path) -> None:
    """With ext_factor 0 (llama.cpp then uses attn_factor as given) the bake computes the very same
    float operations as the runtime: identical logits, attention factor included."""
    name = preset(isolated_home, "yarn-flat", 'method = "yarn"\ntarget_ctx = 32768\n[yarn]\next_factor = 0\n'
                                              "attn_factor = 1.1\n")
    out = tmp_path / "flat.gguf"
    text = (corpus / "alice.txt").read_text(encoding="utf-8")
    result = convert(model_path, out, name, verify=True, verify_text=text, verify_tokens=SHORT_TOKENS).verify
    assert result is not None and result.max_abs_diff == 0.0
    meta = read_header(out)
    assert meta.get(ATTN) == pytest.approx(1.1) and [t.shape for t in meta.tensors if t.name == ROPE_FREQS] == [(32,)]


def test_noise_floor_check_fails_a_file_without_the_preset(model_path: Path, facts, isolated_home: Path,
                                                           tmp_path: Path, corpus: Path) -> None:
    """The check against the noise floor can fail: the model converted with linear-32k (same scale,
    no ramp, no attention factor) is not the tuned YaRN."""
    linear = tmp_path / "linear.gguf"
    convert(model_path, linear, "linear-32k")
    params = resolve(load_preset(preset(isolated_home, "yarn-tuned", TUNED_YARN)), facts)
    text = (corpus / "alice.txt").read_text(encoding="utf-8")
    result = verify_conversion(model_path, linear, params, text=text, n_tokens=SHORT_TOKENS, noise_probe=True)
    assert result.noise_floor is not None and not result.passed, result


def test_inspect_shows_baked_factors(tuned_bake: tuple[Path, dict], model_path: Path, cli) -> None:
    """No rope.scaling key says the file is rescaled (its scaling type is none): inspect must show
    the factors themselves."""
    out, _ = tuned_bake
    r = cli("inspect", str(out))
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("rope factors in file"))
    assert "rope_freqs.weight: 32 per-dimension factors, 1 to 4, attention factor 1.13" in line
    report = json.loads(cli("inspect", str(out), "--json").stdout)["rope_freqs"]
    assert report["count"] == 32 and report["factors"][0] == 1.0 and report["factors"][-1] == 4.0
    original = cli("inspect", str(model_path), "--json")
    assert json.loads(original.stdout)["rope_freqs"] is None
    assert "rope factors in file" not in cli("inspect", str(model_path)).stdout


def test_overflow_on_a_baked_file_suggests_a_window_not_a_preset(tuned_bake: tuple[Path, dict], cli) -> None:
    """RoPE presets (auto's YaRN steps too) are refused on this file: the hint is native, with a
    larger window when the file's own (32K) does not hold the prompt."""
    out, _ = tuned_bake
    r = cli("generate", "word " * 700, "--model", str(out), "--preset", "native", "--ctx", "512", "--max-tokens", "8")
    assert_clean_error(r, "A preset that fits: --preset native\n")
    r = cli("generate", "word " * 33_000, "--model", str(out), "--preset", "native", "--ctx", "512", "--max-tokens", "8")
    assert_clean_error(r, "A preset that fits: --preset native --ctx 33792")


def test_baked_file_refuses_rescaling_on_top(tuned_bake: tuple[Path, dict], cli) -> None:
    out, _ = tuned_bake
    r = cli("generate", "Hello", "--model", str(out), "--preset", "yarn-32k", "--max-tokens", "1")
    assert_clean_error(r, "per-dimension RoPE factors baked in", "--preset native")
    with pytest.raises(ConversionError, match="cannot stand for the original model"):
        convert(out, out.parent / "again.gguf", "yarn-32k", verify=True)


# --- The default model: [rope_freqs] factors ---------------------------------------------------


def test_factors_of_one_are_exact_and_others_change_logits(model_path: Path, facts, isolated_home: Path,
                                                           tmp_path: Path, corpus: Path) -> None:
    """Factors all 1.0 leave every angle as it was: the same logits as the original run unscaled at
    the same window; factors that slow the low frequencies change them."""
    text = (corpus / "alice.txt").read_text(encoding="utf-8")
    ramp = [1.0 + 3.0 * i / 31 for i in range(32)]
    results = {}
    for name, factors in (("ones", [1.0] * 32), ("ramp", ramp)):
        factors_preset(isolated_home, name, factors, target=16384)
        out = tmp_path / f"{name}.gguf"
        convert(model_path, out, name)
        params = resolve(load_preset(name), facts)
        unscaled = replace(params, rope_freqs=())  # the same run without the factors
        results[name] = verify_conversion(model_path, out, unscaled, text=text, n_tokens=SHORT_TOKENS)
    assert results["ones"].max_abs_diff == 0.0
    assert results["ramp"].max_abs_diff > 1.0 and not results["ramp"].passed

