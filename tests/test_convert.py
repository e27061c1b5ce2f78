"""localctx convert: metadata, byte-identical tensors, refusals, interrupts, and logit equivalence
of the converted default model (no runtime flags) with the original run under the preset."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType, Keys

from localctx.convert import convert, plan_conversion, verify_conversion, write_converted
from localctx.convert.plan import PROV_ORIG_FILE_CTX
from localctx.convert.write import TEMP_MARKER, check_space
from localctx.errors import ConversionError, ModelFileError
from localctx.gguf_meta import PROV_PRESET, PROV_TOOL, PROVENANCE_PREFIX, read_header
from localctx.presets import load_preset, resolve

from conftest import REPO, Result, assert_clean_error, run_localctx
from gguf_factory import V, write_gguf, write_model

CTX, BASE = Keys.LLM.CONTEXT_LENGTH.format(arch="llama"), Keys.Rope.FREQ_BASE.format(arch="llama")
STYPE, SFACTOR = Keys.Rope.SCALING_TYPE.format(arch="llama"), Keys.Rope.SCALING_FACTOR.format(arch="llama")
SORIG = Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch="llama")
SHORT_TOKENS = 300  # a prompt for logit comparisons within the trained window


def sha256(path: Path, start: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(start)
        while chunk := fh.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def data_hash(path: Path) -> str:
    return sha256(path, read_header(path).data_offset)


def metadata(path: Path) -> dict[str, tuple[GGUFValueType, object]]:
    return {k: (kv.type, kv.value if kv.value is not None else kv.count) for k, kv in read_header(path).kvs.items()}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if TEMP_MARKER in p.name)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> dict[str, Path]:
    """The default model converted once per preset (the library call the CLI makes)."""
    out = tmp_path_factory.mktemp("converted")
    files = {}
    for preset in ("yarn-32k", "linear-32k", "ntk-32k"):
        files[preset] = out / f"smol-{preset}.gguf"
        convert(model_path, files[preset], preset)
    return files


@pytest.fixture
def small(tmp_path: Path) -> Path:
    return write_model(tmp_path / "small.gguf", context=4096)


# --- Metadata ----------------------------------------------------------------------------------


def test_yarn_metadata_and_every_other_key_kept(converted: dict[str, Path], model_path: Path) -> None:
    before, after = metadata(model_path), metadata(converted["yarn-32k"])
    assert after[CTX] == (GGUFValueType.UINT32, 32768)
    assert after[STYPE] == (GGUFValueType.STRING, "yarn")
    assert after[SFACTOR] == (GGUFValueType.FLOAT32, 4.0)
    assert after[SORIG][1] == 8192
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed - {CTX, STYPE, SFACTOR, SORIG} == {k for k in after if k.startswith(PROVENANCE_PREFIX)}
    assert set(before) <= set(after)


def test_tensor_infos_and_data_bytes_identical(converted: dict[str, Path], model_path: Path) -> None:
    a, b = read_header(model_path), read_header(converted["yarn-32k"])
    assert a.tensors == b.tensors and a.alignment == b.alignment
    assert b.data_offset % b.alignment == 0
    assert b.file_size - b.data_offset == a.file_size - a.data_offset
    assert data_hash(converted["yarn-32k"]) == data_hash(model_path)


def test_buffered_copy_without_copy_file_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS has no copy_file_range (and Linux refuses it across some filesystems): the fallback
    copies through one bounded buffer, in several steps, to the same bytes."""
    src = write_model(tmp_path / "src.gguf", tensor_bytes=20 * 2**20)  # > 2 buffer steps
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    convert(src, tmp_path / "out.gguf", "yarn-32k")
    assert data_hash(tmp_path / "out.gguf") == data_hash(src)
    assert read_header(tmp_path / "out.gguf").tensors == read_header(src).tensors


def test_linear_and_ntk_metadata(converted: dict[str, Path], facts) -> None:
    lin = metadata(converted["linear-32k"])
    assert lin[STYPE][1] == "linear" and lin[SFACTOR][1] == 4.0 and lin[CTX][1] == 32768 and SORIG not in lin
    ntk = metadata(converted["ntk-32k"])
    expected = struct.unpack("<f", struct.pack("<f", 100000.0 * 4 ** (64 / 62)))[0]
    assert ntk[BASE] == (GGUFValueType.FLOAT32, expected)
    assert STYPE not in ntk and SFACTOR not in ntk and ntk[CTX][1] == 32768


def test_inspect_shows_context_scaling_and_provenance(converted: dict[str, Path], cli) -> None:
    r = cli("inspect", str(converted["yarn-32k"]), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["context_length"] == 32768 and report["trained_context"] == 8192
    assert report["rope_scaling"] == {"type": "yarn", "factor": 4.0, "original_context": 8192}
    prov = report["converted_by_localctx"]
    assert prov["preset"] == "yarn-32k" and prov["method"] == "yarn" and prov["tool"] == "localctx"
    assert prov["original_context"] == 8192 and prov["original_freq_base"] == 100000.0
    assert prov["source_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    text = cli("inspect", str(converted["yarn-32k"]))
    assert "converted by" in text.stdout and "yarn ×4 from 8,192" in text.stdout


def test_presets_show_resolves_the_same_on_converted(converted: dict[str, Path], model_path: Path, cli) -> None:
    for preset in ("yarn-32k", "ntk-32k"):
        on = {}
        for path in (model_path, converted[preset]):
            r = cli("presets", "show", preset, "--model", str(path), "--json")
            assert r.returncode == 0, r.stderr
            on[path] = json.loads(r.stdout)["params"]
        assert on[model_path] == on[converted[preset]]


def test_reconverting_never_compounds(converted: dict[str, Path], tmp_path: Path) -> None:
    again = tmp_path / "again.gguf"
    plan = plan_conversion(converted["yarn-32k"], "yarn-32k")
    assert plan.changes == ()  # already exactly yarn-32k: nothing to change
    convert(converted["ntk-32k"], again, "yarn-64k")
    m = metadata(again)
    assert m[CTX][1] == 65536 and m[SFACTOR][1] == 8.0 and m[SORIG][1] == 8192
    assert m[BASE][1] == 100000.0  # the NTK base of the input is not carried over
    assert m[PROV_PRESET][1] == "yarn-64k"


def test_native_restores_original_metadata(converted: dict[str, Path], model_path: Path, tmp_path: Path) -> None:
    for preset in ("yarn-32k", "ntk-32k"):
        back = tmp_path / f"native-{preset}.gguf"
        convert(converted[preset], back, "native")
        assert metadata(back) == metadata(model_path)
        assert list(read_header(back).kvs) == list(read_header(model_path).kvs)  # order too
        assert sha256(back) == sha256(model_path)  # in fact the very same bytes


def test_model_shipped_with_scaling_round_trips(tmp_path: Path) -> None:
    """A model whose file already extends itself (YaRN ×4 from 32K, like Qwen2.5): converting is
    relative to its trained 32K, and native restores its own scaling and 128K window."""
    src = write_model(tmp_path / "q.gguf", context=131072, scaling=("yarn", 4.0, 32768))
    out, back = tmp_path / "q64.gguf", tmp_path / "back.gguf"
    convert(src, out, "yarn-64k")
    m = metadata(out)
    assert m[CTX][1] == 65536 and m[SFACTOR][1] == 2.0 and m[SORIG][1] == 32768
    assert m[PROV_ORIG_FILE_CTX][1] == 131072
    convert(out, back, "native")
    assert metadata(back) == metadata(src)


def test_existing_key_types_are_kept(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "t.gguf", {
        CTX: V(GGUFValueType.UINT64, 4096), BASE: V(GGUFValueType.FLOAT64, 10000.0),
        Keys.LLM.BLOCK_COUNT.format(arch="llama"): V(GGUFValueType.UINT32, 1),
        Keys.LLM.EMBEDDING_LENGTH.format(arch="llama"): V(GGUFValueType.UINT32, 64),
        Keys.Attention.HEAD_COUNT.format(arch="llama"): V(GGUFValueType.UINT32, 4),
        Keys.Rope.DIMENSION_COUNT.format(arch="llama"): V(GGUFValueType.UINT32, 16),
    }, {"token_embd.weight": np.ones((8, 64), dtype=np.float32)})
    out = tmp_path / "t-ntk.gguf"
    convert(src, out, "ntk-32k")
    m = metadata(out)
    assert m[CTX] == (GGUFValueType.UINT64, 32768) and m[BASE][0] == GGUFValueType.FLOAT64
    assert m[BASE][1] == pytest.approx(10000.0 * 8 ** (16 / 14), rel=1e-12)


def test_dry_run_prints_diff_and_writes_nothing(model_path: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "dry.gguf"
    r = cli("convert", str(model_path), str(out), "--preset", "yarn-32k", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    changes = {c["key"]: (c["old"], c["new"]) for c in json.loads(r.stdout)["changes"]}
    assert changes[CTX] == (8192, 32768) and changes[STYPE] == (None, "yarn") and changes[PROV_TOOL] == (None, "localctx")
    text = cli("convert", str(model_path), str(out), "--preset", "yarn-32k", "--dry-run")
    assert "llama.context_length" in text.stdout and "32768" in text.stdout and "dry run" in text.stdout
    assert list(tmp_path.iterdir()) == []


def test_standalone_script(small: Path, tmp_path: Path) -> None:
    script = REPO / "scripts" / "convert_gguf.py"
    out = tmp_path / "s.gguf"
    r = subprocess.run([sys.executable, str(script), str(small), str(out), "--preset", "yarn-32k", "--json"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["written"] and metadata(out)[SFACTOR][1] == 8.0
    reader = gguf.GGUFReader(out)  # gguf-py's own reader agrees on the layout
    assert reader.fields[SFACTOR].contents() == 8.0
    assert [t.data.tobytes() for t in reader.tensors] == [t.data.tobytes() for t in gguf.GGUFReader(small).tensors]
    bad = subprocess.run([sys.executable, str(script), str(small), str(small), "--preset", "yarn-32k"],
                         capture_output=True, text=True)
    assert_clean_error(Result(bad.returncode, bad.stdout, bad.stderr), code=1)
    assert bad.stderr.startswith("Error:"), bad.stderr
    # The script is `localctx convert` itself: the same options, so the two cannot drift apart.
    usage = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True).stdout
    assert usage.startswith("Usage: convert_gguf.py convert [OPTIONS] IN OUT") and "--verify" in usage


def test_non_default_yarn_overrides_baked_not_as_keys(small: Path, tmp_path: Path, isolated_home: Path) -> None:
    """llama's loader ignores rope.scaling.yarn_* keys: tuned YaRN goes into rope_freqs.weight
    (test_convert_rope_freqs.py), and the file says no scaling."""
    (isolated_home / "presets").mkdir(parents=True, exist_ok=True)
    (isolated_home / "presets" / "yarn-odd.toml").write_text('method = "yarn"\ntarget_ctx = 16384\n[yarn]\nbeta_fast = 16\n')
    convert(small, tmp_path / "o.gguf", "yarn-odd")
    m = metadata(tmp_path / "o.gguf")
    assert m[STYPE][1] == "none" and SFACTOR not in m and SORIG not in m and m[CTX][1] == 16384
    assert "rope_freqs.weight" in [t.name for t in read_header(tmp_path / "o.gguf").tensors]


# --- Refusals --------------------------------------------------------------------------------


def _refused(cli, src: Path, out: Path, *fragments: str, extra: tuple[str, ...] = ()) -> None:
    before = sha256(src)
    existed = out.exists() or out.is_symlink()
    out_before = sha256(out) if existed and out.is_file() else None
    r = cli("convert", str(src), str(out), "--preset", "yarn-32k", *extra)
    assert_clean_error(r, *fragments)
    assert sha256(src) == before
    assert (out.exists() or out.is_symlink()) == existed
    if out_before is not None:
        assert sha256(out) == out_before
    assert leftovers(out.parent) == []


def test_refuses_output_equal_to_input(small: Path, tmp_path: Path, cli) -> None:
    _refused(cli, small, small, "is the input file itself", extra=("--force",))
    link = tmp_path / "link.gguf"
    link.symlink_to(small)
    _refused(cli, small, link, "is the input file itself", extra=("--force",))
    _refused(cli, link, small, "is the input file itself", extra=("--force",))
    hard = tmp_path / "hard.gguf"
    os.link(small, hard)
    _refused(cli, small, hard, "is the input file itself", extra=("--force",))


def test_refuses_existing_output_without_force(small: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"precious")
    _refused(cli, small, out, "already exists", "--force")
    r = cli("convert", str(small), str(out), "--preset", "yarn-32k", "--force")
    assert r.returncode == 0, r.stderr
    assert metadata(out)[STYPE][1] == "yarn" and leftovers(tmp_path) == []


def test_refuses_missing_output_directory(small: Path, tmp_path: Path, cli) -> None:
    r = cli("convert", str(small), str(tmp_path / "nope" / "o.gguf"), "--preset", "yarn-32k")
    assert_clean_error(r, "does not exist")


def _tiny(tmp_path: Path, name: str, body: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(body)
    return path


def _malformed(tmp_path: Path, small: Path) -> dict[str, tuple[Path, str]]:
    raw = small.read_bytes()
    s = struct.Struct
    header = b"GGUF" + s("<IQQ").pack(3, 0, 1)
    huge_string = header + s("<Q").pack(2**60) + b"key"
    huge_array = header + s("<Q").pack(1) + b"a" + s("<IIQ").pack(GGUFValueType.ARRAY, GGUFValueType.UINT32, 2**61)
    huge_count = b"GGUF" + s("<IQQ").pack(3, 0, 2**62)
    return {
        "magic": (_tiny(tmp_path, "magic.gguf", b"GGUX" + raw[4:]), "not a GGUF file"),
        "version": (_tiny(tmp_path, "version.gguf", raw[:4] + s("<I").pack(7) + raw[8:]), "unsupported GGUF version 7"),
        "truncated header": (_tiny(tmp_path, "trunc.gguf", raw[:200]), "not a valid GGUF file"),
        "huge string": (_tiny(tmp_path, "hstr.gguf", huge_string + b"\0" * 64), "file ends first"),
        "huge array": (_tiny(tmp_path, "harr.gguf", huge_array + b"\0" * 64), "file ends first"),
        "huge count": (_tiny(tmp_path, "hcount.gguf", huge_count + b"\0" * 64), "file ends first"),
        "data beyond EOF": (_tiny(tmp_path, "eof.gguf", raw[:-64]), "truncated or corrupt"),
        "tiny": (_tiny(tmp_path, "tiny.gguf", b"GGUF"), "only 4 bytes"),
    }


def test_malformed_inputs_refused_cleanly(small: Path, tmp_path: Path, cli) -> None:
    outdir = tmp_path / "out"
    outdir.mkdir()
    for what, (path, fragment) in _malformed(tmp_path, small).items():
        before = sha256(path)
        with pytest.raises(ModelFileError, match=fragment):
            convert(path, outdir / "o.gguf", "yarn-32k")
        r = cli("convert", str(path), str(outdir / "o.gguf"), "--preset", "yarn-32k")
        assert_clean_error(r, fragment)
        assert sha256(path) == before, what
        assert list(outdir.iterdir()) == [], what


def test_not_enough_space_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="Not enough free space"):
        check_space(tmp_path, 2**62)


def _limit_file_size() -> None:
    """In the child: writes past 1 MiB fail with EFBIG, as they would on a full disk."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))


def test_write_failure_mid_copy_leaves_nothing(tmp_path: Path) -> None:
    src = write_model(tmp_path / "src.gguf", tensor_bytes=8 * 2**20)
    digest, out = sha256(src), tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    proc = run_localctx("convert", str(src), str(out), "--preset", "yarn-32k", preexec_fn=_limit_file_size)
    assert_clean_error(proc, "nothing was written to the output", code=1)
    assert list(out.parent.iterdir()) == []  # no OUT, no temp file
    assert sha256(src) == digest


def test_failed_publish_check_leaves_nothing(small: Path, tmp_path: Path) -> None:
    """A failing --verify (or any error after the copy) removes the temp file; OUT never appears."""
    plan = plan_conversion(small, "yarn-32k")
    seen = []

    def fail(tmp: Path) -> None:
        seen.append(tmp.exists() and TEMP_MARKER in tmp.name)
        raise ConversionError("verification failed")

    with pytest.raises(ConversionError):
        write_converted(plan, tmp_path / "o.gguf", before_publish=fail)
    assert seen == [True] and sorted(p.name for p in tmp_path.iterdir()) == ["small.gguf"]


# --- Interrupts --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = write_model(tmp_path_factory.mktemp("big") / "big.gguf", tensor_bytes=768 * 2**20)
    return path, sha256(path)


def _start_and_wait_for_temp(src: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    # A test run started in the background (`pytest &`) inherits SIGINT ignored, and Python then
    # never turns it into KeyboardInterrupt: give the child the default disposition.
    proc = subprocess.Popen([sys.executable, "-m", "localctx", "convert", str(src), str(out), "--preset", "yarn-32k"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # The writability probe (`...-probe`) shares the prefix and vanishes at once: skip it, and
        # tolerate any candidate disappearing between the listing and the stat.
        temps = [p for p in out.parent.iterdir()
                 if p.name.startswith(f".{out.name}{TEMP_MARKER}") and not p.name.endswith("-probe")]
        for temp in temps:
            try:
                if temp.stat().st_size > 0:
                    return proc, temp
            except FileNotFoundError:
                pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("the conversion never created its temp file")


def test_sigkill_leaves_no_output_and_next_run_cleans_up(big: tuple[Path, str], tmp_path: Path) -> None:
    src, digest = big
    out = tmp_path / "out.gguf"
    proc, temp = _start_and_wait_for_temp(src, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the conversion finished before it could be killed"
    assert temp.exists()  # SIGKILL cannot be caught: the recognisable temp file stays...
    assert sha256(src) == digest
    convert(src, out, "yarn-32k")  # ...until the next conversion to the same OUT
    assert leftovers(tmp_path) == [] and out.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_removes_temp(big: tuple[Path, str], tmp_path: Path, sig: int) -> None:
    src, digest = big
    out = tmp_path / "out.gguf"
    proc, _ = _start_and_wait_for_temp(src, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and not out.exists()
    assert "Traceback" not in err, err
    assert leftovers(tmp_path) == []
    assert sha256(src) == digest


# --- Logits: the file alone reproduces the preset ----------------------------------------------


# The same logits past the trained window, on the default model, are checked in
# test_long_context.py (one shared evaluation). Here a short prompt checks every scaling type's
# parameters: any difference in them changes every position's rotation, and so the logits.


def test_verify_cli_yarn(model_path: Path, corpus: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "smol-yarn.gguf"
    r = cli("convert", str(model_path), str(out), "--preset", "yarn-32k", "--verify", "--json",
            "--verify-text", str(corpus / "alice.txt"), "--verify-tokens", str(SHORT_TOKENS))
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["verify"]
    assert v["tokens"] == SHORT_TOKENS and max(v["positions"]) == SHORT_TOKENS - 1
    assert v["passed"] and v["max_abs_diff"] <= 1e-4, v
    assert metadata(out)[STYPE][1] == "yarn"


@pytest.mark.parametrize("preset", ["linear-32k", "ntk-32k"])
def test_converted_file_alone_matches_preset(preset: str, converted: dict[str, Path], model_path: Path,
                                             facts, corpus: Path) -> None:
    params = resolve(load_preset(preset), facts)
    assert params.n_ctx == 32768
    text = (corpus / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    result = verify_conversion(model_path, converted[preset], params, text=text, n_tokens=SHORT_TOKENS)
    assert result.tokens == SHORT_TOKENS and result.positions[-1] == SHORT_TOKENS - 1
    assert result.max_abs_diff <= 1e-4, result


def test_verify_detects_a_mismatch(converted: dict[str, Path], model_path: Path, facts, corpus: Path) -> None:
    """The comparison can fail: the linear file against the original run with YaRN differs at once."""
    params = resolve(load_preset("yarn-32k"), facts)
    text = (corpus / "alice.txt").read_text(encoding="utf-8")
    result = verify_conversion(model_path, converted["linear-32k"], params, text=text, n_tokens=SHORT_TOKENS)
    assert not result.passed and result.max_abs_diff > 0.1
