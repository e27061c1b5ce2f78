"""Hostile GGUF headers: every malformed variant goes through `inspect`, `presets show` and
`generate`, and each must end in a clean refusal (exit 1 or 2, an `Error:` line naming the bad key,
no traceback) well before llama.cpp could assert on it. A few valid files are controls, so the
validation is shown not to be over-strict.

`inspect` and `presets show` run in-process (CliRunner). `generate` runs in a real process, because
a variant that slipped through could abort the interpreter inside llama.cpp: one driver process
runs every file in turn through the CLI's `main` and reports each as a JSON line. A file that kills
it (an abort, or a hang stopped by the driver's per-file alarm) is recorded against that file, and
the driver restarts on the files after it, so one crash fails one variant, not the module.
"""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType as T, Keys

from conftest import REPO, Result, assert_clean_error, invoke
from gguf_factory import V, write_gguf
from localctx.gguf_meta import (
    PROV_METHOD, PROV_ORIG_BASE, PROV_ORIG_CTX, PROV_ORIG_SCALING, PROV_PRESET, PROV_SOURCE, PROV_TOOL, PROV_VERSION,
    arch_key, read_header,
)
from localctx.paths import USER_DIR_ENV, default_model_path

HANG_SECONDS = 5  # per hostile file: a refusal takes milliseconds
LOAD_SECONDS = 300  # per valid file, which llama.cpp loads: a hang guard only
N_EMBD, N_LAYERS = 64, 2


def arr(item: T, values: list[Any]) -> V:
    return V(T.ARRAY, values, item)


def keys(arch: str) -> dict[str, str]:
    k = lambda template: arch_key(template, arch)  # noqa: E731
    return {
        "ctx": k(Keys.LLM.CONTEXT_LENGTH), "embd": k(Keys.LLM.EMBEDDING_LENGTH), "blocks": k(Keys.LLM.BLOCK_COUNT),
        "heads": k(Keys.Attention.HEAD_COUNT), "heads_kv": k(Keys.Attention.HEAD_COUNT_KV),
        "key_len": k(Keys.Attention.KEY_LENGTH), "value_len": k(Keys.Attention.VALUE_LENGTH),
        "base": k(Keys.Rope.FREQ_BASE), "dims": k(Keys.Rope.DIMENSION_COUNT), "stype": k(Keys.Rope.SCALING_TYPE),
        "sfactor": k(Keys.Rope.SCALING_FACTOR), "sorig": k(Keys.Rope.SCALING_ORIG_CTX_LEN),
        "experts": k(Keys.LLM.EXPERT_COUNT), "experts_used": k(Keys.LLM.EXPERT_USED_COUNT),
        "groups": k(Keys.LLM.EXPERT_GROUP_COUNT), "nextn": k(Keys.LLM.NEXTN_PREDICT_LAYERS),
    }


K = keys("llama")
ARCH, NAME, FILE_TYPE, ALIGN = (Keys.General.ARCHITECTURE, Keys.General.NAME, Keys.General.FILE_TYPE,
                                Keys.General.ALIGNMENT)
TOKENS, TEMPLATE = Keys.Tokenizer.LIST, Keys.Tokenizer.CHAT_TEMPLATE


def base_kvs(arch: str = "llama") -> dict[str, V]:
    """A header-complete model: 2 layers of 4 heads (2 KV heads) of 16 dimensions."""
    k = keys(arch)
    return {
        ARCH: V(T.STRING, arch), NAME: V(T.STRING, f"hostile-{arch}"), FILE_TYPE: V(T.UINT32, 0),
        k["ctx"]: V(T.UINT32, 4096), k["embd"]: V(T.UINT32, N_EMBD), k["blocks"]: V(T.UINT32, N_LAYERS),
        k["heads"]: V(T.UINT32, 4), k["heads_kv"]: V(T.UINT32, 2), k["base"]: V(T.FLOAT32, 10000.0),
        k["dims"]: V(T.UINT32, 16), TOKENS: arr(T.STRING, ["<s>", "a", "b", "c"]),
        TEMPLATE: V(T.STRING, "{{ messages }}"),
    }


PROVENANCE = {
    PROV_TOOL: V(T.STRING, "localctx"), PROV_VERSION: V(T.STRING, "0.1"), PROV_PRESET: V(T.STRING, "yarn-16k"),
    PROV_METHOD: V(T.STRING, "yarn"), PROV_SOURCE: V(T.STRING, "source.gguf"), PROV_ORIG_CTX: V(T.UINT32, 4096),
    PROV_ORIG_BASE: V(T.FLOAT32, 10000.0), PROV_ORIG_SCALING: V(T.STRING, "none"),
}


def write_layers(path: Path, kvs: dict[str, V | None], layers: int = N_LAYERS) -> Path:
    """Write exactly these key-values (None: left out) and tiny f32 tensors for `layers` blocks."""
    tensors = {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight": np.ones((4, N_EMBD), np.float32)}
    for i in range(layers):
        tensors[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_NORM].format(bid=i) + ".weight"] = np.ones(N_EMBD, np.float32)
    return write_gguf(path, kvs, tensors)


def patched_default_model(path: Path, key: str, value: int | float) -> Path:
    """The default model's header with one value rewritten in place, over sparse (zero) weights:
    the exact file layout of a real model at no disk cost."""
    src = default_model_path()
    header = read_header(src)
    kv = header.kvs[key]
    fmt = {T.UINT32: "<I", T.FLOAT32: "<f"}[kv.type]
    with open(src, "rb") as f:
        head = bytearray(f.read(header.data_offset))
    struct.pack_into(fmt, head, kv.span[1] - struct.calcsize(fmt), value)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(header.file_size)
    return path


@dataclass(frozen=True)
class Variant:
    id: str
    kvs: dict[str, V | None] = field(default_factory=dict)  # changes to base_kvs()
    expect: str = ""  # a fragment the refusal must contain: the key, unless given
    layers: int = N_LAYERS
    real: tuple[str, int | float] | None = None  # a patched copy of the default model instead

    def write(self, path: Path) -> Path:
        if self.real:
            return patched_default_model(path, *self.real)
        return write_layers(path, {**base_kvs(), **self.kvs}, self.layers)

    @property
    def fragment(self) -> str:
        return self.expect or next(iter(self.kvs))


def short(key: str) -> str:
    return key.removeprefix("llama.").removeprefix("general.localctx.")


def wrong_types(key: str, integer: bool = True, context: dict[str, V] | None = None) -> list[Variant]:
    """A string, a bool and an array of strings where a number belongs (and a float for integers)."""
    bad = {"string": V(T.STRING, "12"), "bool": V(T.BOOL, True), "array": arr(T.STRING, ["1", "2"])}
    if integer:
        bad["float"] = V(T.FLOAT32, 4.0)
    return [Variant(f"{short(key)}-{name}", {**(context or {}), key: v}, expect=key) for name, v in bad.items()]


def bad_floats(key: str, context: dict[str, V] | None = None) -> list[Variant]:
    values = {"nan": V(T.FLOAT32, math.nan), "inf": V(T.FLOAT32, math.inf), "-inf": V(T.FLOAT32, -math.inf),
              "zero": V(T.FLOAT32, 0.0), "negative": V(T.FLOAT32, -5.0), "past-float32": V(T.FLOAT64, 1e39)}
    return [Variant(f"{short(key)}-{name}", {**(context or {}), key: v}, expect=key) for name, v in values.items()]


def ints(key: str, **values: V) -> list[Variant]:
    return [Variant(f"{short(key)}-{name.replace('_', '-')}", {key: v}) for name, v in values.items()]


SCALED = {K["stype"]: V(T.STRING, "yarn"), K["sfactor"]: V(T.FLOAT32, 4.0), K["sorig"]: V(T.UINT32, 1024)}
NEG, HUGE = (lambda n: V(T.INT32, n)), V(T.UINT64, 2**40)


def variants() -> list[Variant]:
    vs: list[Variant] = []
    for key in (K["ctx"], K["embd"], K["blocks"], K["heads"], K["heads_kv"], K["key_len"], K["value_len"],
                K["dims"], K["sorig"], K["experts"], FILE_TYPE, ALIGN):
        vs += wrong_types(key)
    for key in (K["base"], K["sfactor"]):
        vs += wrong_types(key, integer=False, context=SCALED if key == K["sfactor"] else None)
        vs += bad_floats(key, context=SCALED if key == K["sfactor"] else None)
    vs += ints(K["blocks"], zero=V(T.UINT32, 0), over_llama_limit=V(T.UINT32, 513), thousand=V(T.UINT32, 1000),
               negative=NEG(-1), huge=HUGE, fewer_than_tensors=V(T.UINT32, 1), more_than_tensors=V(T.UINT32, 3))
    vs.append(Variant("blocks-2-tensors-for-5", {}, expect=K["blocks"], layers=5))
    vs += ints(K["ctx"], negative=NEG(-1), huge=HUGE)
    vs += ints(K["embd"], zero=V(T.UINT32, 0), negative=NEG(-64), huge=HUGE, not_multiple_of_heads=V(T.UINT32, 62))
    vs += ints(K["heads"], zero=V(T.UINT32, 0), negative=NEG(-4), huge=HUGE, not_dividing_embd=V(T.UINT32, 3))
    vs += [Variant("head_count-array-wrong-length", {K["heads"]: arr(T.UINT32, [4, 4, 4])}),
           Variant("head_count-array-negative-item", {K["heads"]: arr(T.INT32, [4, -4])}),
           Variant("head_count-array-floats", {K["heads"]: arr(T.FLOAT32, [4.0, 4.0])}),
           Variant("head_count_kv-array-not-dividing", {K["heads_kv"]: arr(T.UINT32, [2, 3])})]
    vs += ints(K["heads_kv"], zero=V(T.UINT32, 0), negative=NEG(-2), not_dividing=V(T.UINT32, 3),
               more_than_heads=V(T.UINT32, 8))
    vs += ints(K["key_len"], zero=V(T.UINT32, 0), negative=NEG(-16))
    vs += ints(K["value_len"], zero=V(T.UINT32, 0))
    vs += ints(K["dims"], zero=V(T.UINT32, 0), one=V(T.UINT32, 1), odd=V(T.UINT32, 3), two=V(T.UINT32, 2),
               over_head_size=V(T.UINT32, 32), negative=NEG(-2))
    vs += [Variant("scaling.type-unknown", {**SCALED, K["stype"]: V(T.STRING, "yarnish")}),
           Variant("scaling.type-number", {**SCALED, K["stype"]: V(T.UINT32, 2)}),
           Variant("scaling.type-array", {**SCALED, K["stype"]: arr(T.STRING, ["yarn"])})]
    vs += ints(K["sorig"], negative=NEG(-1), huge=HUGE)
    vs += ints(FILE_TYPE, negative=NEG(-1))
    vs += ints(ALIGN, zero=V(T.UINT32, 0), not_power_of_two=V(T.UINT32, 3))
    vs += [  # what llama.cpp asserts on although localctx does not use it
        Variant("experts-over-llama-limit", {K["experts"]: V(T.UINT32, 2000), K["experts_used"]: V(T.UINT32, 2)}),
        Variant("experts-used-without-experts", {K["experts_used"]: V(T.UINT32, 2)}),
        Variant("experts-none-used", {K["experts"]: V(T.UINT32, 8), K["experts_used"]: V(T.UINT32, 0)}),
        Variant("experts-used-over-count", {K["experts"]: V(T.UINT32, 8), K["experts_used"]: V(T.UINT32, 16)}),
        Variant("expert-groups-not-dividing", {K["groups"]: V(T.UINT32, 3), K["experts"]: V(T.UINT32, 8),
                                               K["experts_used"]: V(T.UINT32, 2)}),
        Variant("expert-groups-without-used", {K["groups"]: V(T.UINT32, 2), K["experts"]: V(T.UINT32, 8),
                                               K["experts_used"]: V(T.UINT32, 2)}, expect="group_used_count"),
        Variant("nextn-over-layers", {K["nextn"]: V(T.UINT32, 3)}),
    ]
    vs += [Variant("architecture-number", {ARCH: V(T.UINT32, 7)}),
           Variant("name-number", {NAME: V(T.UINT32, 5)}),
           Variant("chat_template-number", {TEMPLATE: V(T.UINT32, 5)}),
           Variant("tokens-string", {TOKENS: V(T.STRING, "abc")}),
           Variant("block_count-missing", {K["blocks"]: None}, expect=K["blocks"]),
           Variant("embedding_length-missing", {K["embd"]: None}, expect=K["embd"])]
    for key in (PROV_TOOL, PROV_VERSION, PROV_PRESET, PROV_METHOD, PROV_SOURCE):
        vs.append(Variant(f"{short(key)}-number", {**PROVENANCE, key: V(T.UINT32, 1)}, expect=key))
    vs += [Variant(v.id, {**PROVENANCE, **v.kvs}, expect=PROV_ORIG_CTX) for v in wrong_types(PROV_ORIG_CTX)]
    vs += [Variant(v.id, {**PROVENANCE, **v.kvs}, expect=PROV_ORIG_BASE)
           for v in wrong_types(PROV_ORIG_BASE, integer=False) + bad_floats(PROV_ORIG_BASE)]
    vs += [Variant(f"{short(PROV_ORIG_CTX)}-{name}", {**PROVENANCE, PROV_ORIG_CTX: v}, expect=PROV_ORIG_CTX)
           for name, v in {"zero": V(T.UINT32, 0), "negative": NEG(-1), "missing": None}.items()]
    vs += [Variant(f"{short(PROV_ORIG_SCALING)}-{name}", {**PROVENANCE, PROV_ORIG_SCALING: v}, expect=PROV_ORIG_SCALING)
           for name, v in {"garbage": V(T.STRING, "garbage"), "nan-factor": V(T.STRING, "yarn:nan:8192"),
                           "unknown-type": V(T.STRING, "yarnish:4.0:8192"), "negative-ctx": V(T.STRING, "yarn:4.0:-1"),
                           "number": V(T.UINT32, 5)}.items()]
    # The default model's own file with one value broken: block_count 1000 aborted llama.cpp
    # (exit 134), a NaN base ran silently.
    vs += [Variant("real-block_count-1000", real=(K["blocks"], 1000), expect=K["blocks"]),
           Variant("real-block_count-31", real=(K["blocks"], 31), expect=K["blocks"]),
           Variant("real-freq_base-nan", real=(K["base"], math.nan), expect=K["base"]),
           Variant("real-head_count_kv-2", real=(K["heads_kv"], 2), expect=K["heads_kv"])]
    ids = [v.id for v in vs]
    assert len(ids) == len(set(ids)), "variant ids must be unique"
    return vs


VARIANTS = variants()


@dataclass(frozen=True)
class Control:
    id: str
    kvs: dict[str, V | None]
    arch: str = "llama"


CONTROLS = [
    Control("valid-base", {}),
    # Per-layer head arrays, explicit head sizes, a YaRN scaling in the file, localctx provenance
    # and a valid mixture-of-experts header: all accepted.
    Control("valid-arrays-scaled-converted", {K["heads"]: arr(T.UINT32, [4, 4]), K["heads_kv"]: arr(T.UINT32, [2, 1]),
                                              K["key_len"]: V(T.UINT32, 16), K["value_len"]: V(T.UINT32, 16),
                                              **SCALED, **PROVENANCE, K["experts"]: V(T.UINT32, 8),
                                              K["experts_used"]: V(T.UINT32, 2), ALIGN: V(T.UINT32, 32)}),
    # Partial rotary embeddings are valid outside llama's architecture family.
    Control("valid-partial-rotary", {keys("phi2")["dims"]: V(T.UINT32, 8)}, arch="phi2"),
]
CONTROL_IDS = [c.id for c in CONTROLS] + ["default-model"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    out = {v.id: v.write(root / f"{v.id}.gguf") for v in VARIANTS}
    for c in CONTROLS:
        kvs = {**base_kvs(c.arch), **c.kvs}
        out[c.id] = write_layers(root / f"{c.id}.gguf", kvs)
    out["default-model"] = default_model_path()
    return out


DRIVER = """
import contextlib, io, json, signal, sys, traceback
import localctx.engine  # llama.cpp (and its import time) before the first file's clock starts
from localctx.cli import main
for path, seconds in json.loads(sys.argv[1]):
    print(json.dumps({"start": path}), flush=True)
    out, err = io.StringIO(), io.StringIO()
    signal.alarm(seconds)  # default action: the process dies with this file named as started
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(["generate", "--model", path, "hi", "--max-tokens", "1", "--device", "cpu"])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        code = -1
        err.write(traceback.format_exc())
    signal.alarm(0)
    print(json.dumps({"path": path, "code": code, "stderr": err.getvalue()}), flush=True)
"""


@pytest.fixture(scope="module")
def generated(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    """`localctx generate` on every file, in driver processes (see the module docstring)."""
    env = {**os.environ, USER_DIR_ENV: str(tmp_path_factory.mktemp("home"))}
    # A refusal must come within HANG_SECONDS; a valid file reaches llama.cpp, which loads the
    # default model in seconds, or many more on a busy machine.
    pending = [(str(path), LOAD_SECONDS if name in CONTROL_IDS else HANG_SECONDS) for name, path in files.items()]
    results: dict[str, Result] = {}
    while pending:
        proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(pending)], capture_output=True, text=True,
                              cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                              timeout=sum(seconds for _, seconds in pending) + 120)
        started = None
        for line in proc.stdout.splitlines():
            msg = json.loads(line)
            if "start" in msg:
                started = msg["start"]
            else:
                results[msg["path"]] = Result(msg["code"], "", msg["stderr"])
                started = None
        if started is None:
            assert proc.returncode == 0 and len(results) == len(files), proc.stderr[-3000:]
            break
        results[started] = Result(proc.returncode, "", f"the process died (exit {proc.returncode}) on this file:\n"
                                                       f"{proc.stderr[-3000:]}")
        pending = pending[[path for path, _ in pending].index(started) + 1:]
    by_id = {str(path): name for name, path in files.items()}
    return {by_id[path]: outcome for path, outcome in results.items()}


def assert_refused(result: Result, fragment: str) -> None:
    assert result.returncode in (1, 2), f"exit {result.returncode}\n{result.stderr}"
    assert_clean_error(result, fragment)
    # Refused by localctx's header check, not left to llama.cpp:
    assert "llama.cpp could not load" not in result.stderr, result.stderr


IDS = [v.id for v in VARIANTS]


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_inspect_refuses(variant: Variant, files: dict[str, Path]) -> None:
    assert_refused(invoke("inspect", str(files[variant.id])), variant.fragment)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_presets_show_refuses(variant: Variant, files: dict[str, Path]) -> None:
    assert_refused(invoke("presets", "show", "ntk-16k", "--model", str(files[variant.id])), variant.fragment)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_generate_refuses(variant: Variant, generated: dict[str, Result]) -> None:
    assert_refused(generated[variant.id], variant.fragment)


# --- Controls: valid files are still accepted ----------------------------------------------------


@pytest.mark.parametrize("name", CONTROL_IDS)
def test_valid_file_is_inspected_and_resolved(name: str, files: dict[str, Path]) -> None:
    inspected = invoke("inspect", str(files[name]), "--json")
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["layers"] > 0 and report["kv_cache_bytes_per_token"]["f16"] > 0
    shown = invoke("presets", "show", "ntk-16k", "--model", str(files[name]), "--json")
    assert shown.returncode == 0, shown.stderr
    assert math.isfinite(json.loads(shown.stdout)["params"]["rope_freq_base"])


@pytest.mark.parametrize("name", CONTROL_IDS)
def test_valid_file_reaches_llama_cpp(name: str, generated: dict[str, Result]) -> None:
    outcome = generated[name]
    if name == "default-model":
        assert outcome.returncode == 0, outcome.stderr
    else:  # synthetic headers have no weights: llama.cpp itself refuses them, cleanly
        assert outcome.returncode == 1 and "llama.cpp could not load" in outcome.stderr, outcome.stderr
