"""The core commands as a user runs them, with the real default model: in-process through Click's
runner, and in real processes where the process itself is under test."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import click
import pytest

from conftest import REPO, assert_clean_error
from gguf_factory import write_model


def test_every_command_has_help_with_example():
    from localctx.cli import cli
    from localctx.commands import register

    register(cli)

    def walk(group: click.Group, prefix: str = ""):
        for name, cmd in group.commands.items():
            yield prefix + name, cmd
            if isinstance(cmd, click.Group):
                yield from walk(cmd, prefix + name + " ")

    commands = dict(walk(cli))
    assert {"inspect", "presets list", "presets show", "models", "doctor", "generate", "chat"} <= set(commands)
    for name, cmd in commands.items():
        assert cmd.help and "Example" in cmd.help, f"`localctx {name} --help` needs an example"


def test_python_dash_m_and_version(run_cli):
    result = run_cli("--version")
    assert result.returncode == 0 and "localctx" in result.stdout


def test_inspect_default_model_json(cli):
    result = cli("inspect", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["architecture"] == "llama" and report["positions"] == "rope"
    assert report["trained_context"] == 8192 and report["rope_freq_base"] == 100000.0
    assert report["rope_dimension_count"] == 64 and report["head_dim"] == 64
    assert report["kv_cache_bytes"]["32768"]["f16"] == 32768 * 23040
    assert report["presets"]["yarn-32k"]["applies"] is True


def test_inspect_text(cli):
    result = cli("inspect")
    assert result.returncode == 0
    assert re.search(r"trained context\s+8,192 tokens", result.stdout)
    assert "yarn-32k" in result.stdout and "720.0 MiB" in result.stdout


def test_inspect_synthetic_models(cli, tmp_path):
    bloom = json.loads(cli("inspect", str(write_model(tmp_path / "b.gguf", "bloom", rope_base=None)), "--json").stdout)
    assert bloom["positions"] == "alibi" and bloom["presets"]["yarn-32k"]["applies"] is False
    assert bloom["presets"]["extrapolate-32k"]["applies"] is True
    gpt2 = json.loads(cli("inspect", str(write_model(tmp_path / "g.gguf", "gpt2", rope_base=None,
                                                          learned_positions=True, context=1024)), "--json").stdout)
    assert gpt2["positions"] == "learned" and gpt2["presets"]["extrapolate-16k"]["applies"] is False
    baked = json.loads(cli("inspect", str(write_model(tmp_path / "y.gguf", context=32768,
                                                           scaling=("yarn", 4.0, 8192))), "--json").stdout)
    assert baked["rope_scaling"] == {"type": "yarn", "factor": 4.0, "original_context": 8192}
    assert baked["trained_context"] == 8192 and baked["context_length"] == 32768


@pytest.mark.parametrize("make, fragment", [
    (lambda d: d / "missing.gguf", "not found"),
    (lambda d: (d / "notes.gguf").write_text("hello, not a model") and d / "notes.gguf", "not a GGUF file"),
])
def test_inspect_bad_files(cli, tmp_path, make, fragment):
    assert_clean_error(cli("inspect", str(make(tmp_path))), fragment)


def test_inspect_truncated(cli, tmp_path, model_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(model_path.read_bytes()[:5000])
    assert_clean_error(cli("inspect", str(path)), "truncated")


def test_unknown_preset(cli):
    assert_clean_error(cli("presets", "show", "yarn-31k"), "Unknown preset", "yarn-32k")
    assert_clean_error(cli("generate", "--preset", "nope", "hi"), "Unknown preset")


def test_presets_list_and_show(cli):
    listed = json.loads(cli("presets", "list", "--json").stdout)
    assert {"native", "yarn-32k", "auto"} <= {p["name"] for p in listed}
    shown = json.loads(cli("presets", "show", "yarn-32k", "--json").stdout)
    assert shown["params"]["rope_freq_scale"] == 0.25 and shown["params"]["yarn_orig_ctx"] == 8192
    assert "--rope-scaling yarn" in shown["llama_server"]
    text = cli("presets", "show", "ntk-32k").stdout
    assert "--rope-freq-base 418293.659" in text


def test_models_lists_default_and_user_models(cli, isolated_home, tmp_path):
    (isolated_home / "models").mkdir()
    write_model(isolated_home / "models" / "tiny.gguf")
    rows = json.loads(cli("models", "--json").stdout)
    assert rows[0]["default"] and rows[0]["trained_context"] == 8192
    assert any(r["path"].endswith("tiny.gguf") for r in rows)


def test_doctor(cli):
    result = cli("doctor", "--json")
    info = json.loads(result.stdout)
    assert "CPU" in info["backends"] and info["llama-cpp-python"]


def test_gpu_request_on_cpu_build_fails_with_rebuild_command(cli):
    result = cli("generate", "--device", "cuda", "hi")
    assert_clean_error(result, "-DGGML_CUDA=on")
    assert_clean_error(cli("generate", "--gpu-layers", "all", "hi"), "GPU offload")


def test_memory_refusal_names_what_fits(cli):
    # yarn-32k is refused and q8_0 and yarn-16k fit whether generate is planned for a whole batch
    # of logits (1.2 GiB) or for one row (950 MiB; issue 23).
    env = {"LOCALCTX_MEMORY_LIMIT": "900M"}
    result = cli("generate", "--preset", "yarn-32k", "hi", env=env)
    assert_clean_error(result, "Not enough memory", "--cache-type q8_0", "--preset yarn-16k", "--force")
    forced = cli("generate", "--preset", "yarn-32k", "--force", "--max-tokens", "4", "hi", env=env)
    assert forced.returncode == 0, forced.stderr


def test_memory_estimate_covers_measured_peaks(facts):
    """The estimate behind the refusal above against what a full window really took: every
    default-model row of benchmarks/results/memory.json (peak RSS of a process whose window was
    filled and then asked for a whole batch of logits, per window, attention and KV-cache type)
    against the estimate for those parameters: never below, at most 15 % above."""
    from localctx.memory import estimate
    from localctx.params import RuntimeParams

    rows = [r for r in json.loads((REPO / "benchmarks/results/memory.json").read_text())["configs"].values()
            if r["config"].get("model") is None]
    assert {(r["n_ctx"], r["params"]["flash_attn"], r["params"]["type_k"]) for r in rows} >= {
        (8192, True, "f16"), (8192, True, "q8_0"), (8192, False, "f16"),
        (32768, True, "f16"), (32768, True, "q8_0"), (32768, False, "f16")}
    for row in rows:
        params = RuntimeParams(**{**row["params"], "notes": tuple(row["params"]["notes"])})
        est = estimate(facts, params).total
        assert row["peak_rss"] <= est <= 1.15 * row["peak_rss"], (row["config"]["name"], est >> 20,
                                                                  row["peak_rss"] >> 20)


def test_generate_paris(run_cli):
    result = run_cli("generate", "The capital of France is", "--max-tokens", "12", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "llama" not in result.stdout.lower()  # llama.cpp's log stays out of stdout
    assert result.stderr == ""  # ... and out of stderr unless --verbose
    verbose = run_cli("generate", "hi", "--max-tokens", "2", "--verbose", "--preset", "yarn-16k")
    assert "llama_context" in verbose.stderr


def test_generate_json_and_stdin(cli):
    result = cli("generate", "--json", "--max-tokens", "8", input="The capital of France is")
    data = json.loads(result.stdout)
    assert "Paris" in data["text"] and data["timings"]["generated_tokens"] <= 8
    assert data["params"]["preset"] == "native" and data["params"]["n_ctx"] == 8192


def test_generate_overflow_fails_with_counts_and_a_preset(cli, corpus, tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text((corpus / "alice.txt").read_text()[:40000])
    result = cli("generate", "--file", str(doc), "Summarize.")
    assert_clean_error(result, "tokens", "window of 8,192", "--preset yarn-16k", "Nothing was truncated")


def test_chat_two_turns_and_stats(cli):
    result = cli("chat", "--temperature", "0", "--max-tokens", "40",
                     input="What is the capital of France?\nAnd of Italy?\n/stats\n")
    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2
    match = re.search(r"context: ([\d,]+) / 8,192 tokens used", result.stderr)
    assert match and int(match.group(1).replace(",", "")) > 40
    assert "2 turns" in result.stderr


def test_chat_read_save_load(cli, tmp_path):
    doc = tmp_path / "note.txt"
    doc.write_text("The secret word is pineapple.")
    saved = tmp_path / "conv.json"
    script = f"/read {doc}\nWhat is the secret word?\n/save {saved}\n/exit\n"
    result = cli("chat", "--temperature", "0", "--max-tokens", "20", input=script)
    assert result.returncode == 0, result.stderr
    data = json.loads(saved.read_text())
    assert any("pineapple" in m["content"] and m["pinned"] for m in data["messages"])
    again = cli("chat", input=f"/load {saved}\n/stats\n")
    assert "Loaded 4 messages" in again.stderr


def test_chat_overflow_is_never_silent(cli):
    long_message = "word " * 380
    script = f"Say hi.\nSay hello.\n{long_message}\n"
    result = cli("chat", "--preset", "auto", "--ctx", "512", "--max-tokens", "48", "--temperature", "0", input=script)
    assert result.returncode == 0, result.stderr
    assert "but the window is 512" in result.stderr and "nothing was dropped" in result.stderr
    alone = cli("chat", "--preset", "auto", "--ctx", "256", "--max-tokens", "16", input="word " * 400 + "\n")
    assert "Dropping old turns would not help" in alone.stderr


# Runs a command line in a fresh interpreter, then prints where libllama (llama_cpp.llama_cpp) and
# numpy entered sys.modules, whose insertion order is import order (-1: never loaded).
LOAD_ORDER = """
import runpy, sys
target, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module("localctx", run_name="__main__") if target == "localctx" else runpy.run_path(target, run_name="__main__")
except SystemExit:
    pass
loaded = list(sys.modules)
print(*(loaded.index(name) if name in loaded else -1 for name in ("llama_cpp.llama_cpp", "numpy")))
"""
SCRIPT = str(REPO / "scripts" / "convert_gguf.py")


@pytest.mark.parametrize("argv, loads_llama", [
    (["localctx", "generate", "--help"], True), (["localctx", "eval", "ppl", "--help"], True),
    (["localctx", "doctor", "--json"], True), (["localctx", "convert", "--verify", "--help"], True),
    ([SCRIPT, "missing.gguf", "out.gguf", "--preset", "yarn-32k", "--verify"], True),
    (["localctx", "presets", "list"], False), (["localctx", "inspect", "--json"], False),
    (["localctx", "convert", "--help"], False),
])
def test_model_commands_load_llama_cpp_before_numpy(argv, loads_llama, isolated_home):
    """A CUDA build under a PyTorch venv segfaulted in llama.cpp's tokenizer when numpy was loaded
    first (benchmarks/RESULTS.md); commands that run llama.cpp load it first, the others never load it."""
    out = subprocess.run([sys.executable, "-c", LOAD_ORDER, *argv], capture_output=True, text=True, check=True)
    llama, numpy = map(int, out.stdout.split()[-2:])
    if loads_llama:
        assert llama >= 0 and (numpy == -1 or llama < numpy)
    else:
        assert llama == -1


# Runs a localctx command line in a fresh interpreter, then prints its exit status and whether Ray
# and the Ray side were imported.
IMPORTS_RAY = """
import runpy, sys
sys.argv = ["localctx", *sys.argv[1:]]
try:
    runpy.run_module("localctx", run_name="__main__")
    status = 0
except SystemExit as exit:
    status = exit.code or 0
print(status, "ray" in sys.modules, "localctx.distributed" in sys.modules)
"""


def test_a_batch_without_workers_never_imports_ray(isolated_home, tmp_path):
    """Without --workers / --ray a batch runs in this process: neither Ray nor localctx.distributed is imported."""
    doc = tmp_path / "note.txt"
    doc.write_text("The meeting moved to Tuesday because the room was booked.", encoding="utf-8")
    out = subprocess.run([sys.executable, "-c", IMPORTS_RAY, "summarize", str(doc), "--max-summary-tokens", "16"],
                         capture_output=True, text=True, check=True)
    *summary, status, ray, distributed = out.stdout.split()
    assert (status, ray, distributed) == ("0", "False", "False"), out.stderr
    assert summary  # it did summarize, in this process
