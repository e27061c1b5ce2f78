"""The public Python API: what `import localctx` offers, docs/python-api.md's example (run, so it
cannot drift), and each entry point on the real default model at small sizes."""
from __future__ import annotations

import contextlib
import io
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import pytest

import localctx
from conftest import REPO
from gguf_factory import write_model

API_PAGE = REPO / "docs" / "python-api.md"


def api_page_example() -> tuple[str, str]:
    """The Python API page's first code block and the output block shown after it."""
    page = API_PAGE.read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", page, re.S)
    shown = re.search(r"```text\n(.*?)```", page, re.S)
    assert code and shown, "docs/python-api.md needs a python block and its output"
    return code.group(1), shown.group(1)


def test_api_page_example_runs_and_prints_what_the_page_shows() -> None:
    code, shown = api_page_example()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(API_PAGE), "exec"), {"__name__": "api_page_example"})
    assert out.getvalue() == shown


def test_help_lists_the_api() -> None:
    text = pydoc.render_doc(localctx, renderer=pydoc.plaintext)
    for name in ("open_model", "generate_text", "start_chat", "read_model_facts", "resolve_preset", "convert_model",
                 "summarize_files", "evaluate_perplexity", "evaluate_passkey", "LocalctxError", "ContextOverflowError"):
        assert name in text
    assert set(localctx.__all__) <= set(dir(localctx))
    for name in localctx.__all__:
        obj = getattr(localctx, name)
        assert obj.__doc__, f"localctx.{name} needs a docstring"


def test_import_is_light_and_loads_llama_cpp_before_numpy() -> None:
    """`import localctx` loads nothing heavy; the first API name loads llama.cpp, then numpy."""
    probe = ("import sys, localctx; before = set(sys.modules); localctx.read_model_facts; "
             "order = list(sys.modules); print('numpy' in before, 'llama_cpp' in before, "
             "order.index('llama_cpp.llama_cpp') < order.index('numpy'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "True"]


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        localctx.nope  # noqa: B018


def test_facts_presets_and_memory_without_loading(model_path: Path, tmp_path: Path) -> None:
    facts = localctx.read_model_facts(model_path)
    assert (facts.architecture, facts.trained_context, facts.rope_freq_base) == ("llama", 8192, 100000.0)
    ntk = localctx.resolve_preset("ntk-32k", model_path)
    assert ntk.method == "ntk" and ntk.rope_freq_base > 400_000
    assert localctx.resolve_preset("auto", ctx=4096).method == "none"  # fits the trained window
    small = localctx.estimate_memory("yarn-32k", cache_type="q8_0")
    assert small.kv_bytes < localctx.estimate_memory("yarn-32k").kv_bytes
    with pytest.raises(localctx.PresetError, match="Unknown preset"):
        localctx.resolve_preset("yarn-31k")
    with pytest.raises(localctx.ModelFileError):
        localctx.read_model_facts(tmp_path / "missing.gguf")
    alibi = write_model(tmp_path / "bloom.gguf", "bloom", rope_base=None)
    with pytest.raises(localctx.PresetError, match="ALiBi"):
        localctx.resolve_preset("yarn-32k", alibi)


def test_run_options_are_validated_in_the_users_words() -> None:
    with pytest.raises(localctx.LocalctxError, match="gpu_layers"):
        localctx.open_model(gpu_layers="some")  # type: ignore[arg-type]
    with pytest.raises(localctx.LocalctxError, match="device"):
        localctx.open_model(device="tpu")
    with pytest.raises(localctx.ResourceError, match="-DGGML_CUDA=on"):
        localctx.open_model(device="cuda")  # this build is CPU-only: refused, never a silent fallback


def test_generate_stream_and_chat(small_engine: localctx.Engine) -> None:
    gen = localctx.generate_text(small_engine, "The capital of France is", max_tokens=6, stream=True)
    chunks = list(gen)
    assert "".join(chunks) == gen.text and gen.timings.generated_tokens <= 6 and gen.finish_reason
    chat = localctx.start_chat(small_engine, temperature=0, max_tokens=16)
    assert chat.ask("Say hello.").strip() and len(chat.messages) == 2


def test_summarize_and_evaluate_through_the_api(small_engine: localctx.Engine, corpus: Path, tmp_path: Path) -> None:
    note = tmp_path / "note.txt"
    note.write_text("The meeting moved to Thursday. Bring the budget draft.\n")
    batch = localctx.summarize_files([note], engine=small_engine, out=tmp_path / "out",
                                     options=localctx.SummarizeOptions(max_summary_tokens=24))
    assert batch.records[0]["status"] == "ok" and (tmp_path / "out" / "summaries.jsonl").is_file()
    ppl = localctx.evaluate_perplexity(["native"], ["300"], text=corpus / "alice.txt", span=32, use_cache=False)
    [cell] = ppl.cells
    assert cell["status"] == "ok" and 1 < cell["ppl"] < 1000 and cell["params"]["preset"] == "native"
    keys = localctx.evaluate_passkey(["native"], [200], [0.5], use_cache=False)
    assert keys.cells[0]["prompt_tokens"] == 192 and isinstance(keys.cells[0]["correct"], bool)
    with pytest.raises(localctx.InputError, match="depths are fractions"):
        localctx.evaluate_passkey(["native"], [200], [1.5])
