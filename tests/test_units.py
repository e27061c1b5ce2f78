"""Pure helpers, without the model: stop strings in a stream, sizes, the preset search behind
every suggestion, how map-reduce groups partial summaries, and the one home of each concept several
modules share (which parameters key a result, atomic writes, the writable probe, the file opener)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from localctx.engine import _split_stop
from localctx.errors import ResourceError
from localctx.files import NotRegularFile, open_regular_file
from localctx.fsutil import atomic_write, name_max, probe_writable
from localctx.gguf_meta import read_facts
from localctx.memory import human, parse_size
from localctx.params import KV_FIELDS, kv_params, result_params
from localctx.presets import best_preset, load_preset, resolve, suggest_preset
from localctx.runtime import RunSpec, resolve_spec
from localctx.summarize import SummarizeOptions, _join_parts, fingerprint, group_parts
from gguf_factory import write_model


@pytest.mark.parametrize("text, stops, expected", [
    ("hello", [], ("hello", "", False)),
    ("hello<|im_end|>more", ["<|im_end|>"], ("hello", "", True)),
    ("hello<|im", ["<|im_end|>"], ("hello", "<|im", False)),  # may be the start of a stop: held back
    ("hello<|x", ["<|im_end|>"], ("hello<|x", "", False)),  # cannot be: released
    ("a\nuser:", ["\nuser:", "<|im_end|>"], ("a", "", True)),
    ("ab\n", ["\nuser:", "b\nq"], ("a", "b\n", False)),  # the longest possible start is held
    ("<|im_end|>", ["<|im_end|>"], ("", "", True)),
])
def test_split_stop(text: str, stops: list[str], expected: tuple[str, str, bool]) -> None:
    assert _split_stop(text, stops) == expected


def test_split_stop_streamed_piecewise_equals_whole() -> None:
    stream, held, out = ["The ans", "wer<|im", "_e", "nd|> ignored"], "", ""
    for piece in stream:
        emit, held, stopped = _split_stop(held + piece, ["<|im_end|>"])
        out += emit
        if stopped:
            break
    assert out == "The answer" and stopped


@pytest.mark.parametrize("text, expected", [
    ("8G", 8 * 2**30), ("512M", 512 * 2**20), ("1.5g", int(1.5 * 2**30)), ("2GiB", 2 * 2**30),
    ("8gb", 8 * 2**30), ("100", 100), (" 64k ", 64 * 2**10), ("1T", 2**40),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "", "G", "8X", "inf", "nan", "-5G", "0"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ResourceError, match="is not a memory size"):
        parse_size(text)


def test_human_sizes() -> None:
    assert [human(n) for n in (512, 2048, 720 * 2**20, 3 * 2**30)] == ["512 B", "2.0 KiB", "720.0 MiB", "3.0 GiB"]


def test_suggest_preset_is_the_smallest_window_that_keeps_quality(facts) -> None:
    assert suggest_preset(facts, 100) == "--preset native"
    assert suggest_preset(facts, 9000) == "--preset yarn-16k"  # not extrapolate-16k: RoPE does not extrapolate
    assert suggest_preset(facts, 40_000) == "--preset yarn-64k"
    assert suggest_preset(facts, 200_000) == "--preset auto --ctx 200704"  # nothing shipped is that large


def test_suggest_preset_on_alibi_extrapolates(tmp_path: Path) -> None:
    alibi = read_facts(write_model(tmp_path / "b.gguf", "bloom", rope_base=None, context=2048))
    assert suggest_preset(alibi, 9000) == "--preset extrapolate-16k"  # ALiBi extrapolates; YaRN is refused


def test_best_preset_ranks_and_breaks_ties_by_order(facts) -> None:
    largest = best_preset(facts, lambda p, r: r.n_ctx <= 32768, lambda p, r: r.n_ctx)
    assert largest in {"extrapolate-32k", "linear-32k", "ntk-32k", "yarn-32k"}
    same_method = best_preset(facts, lambda p, r: r.n_ctx < 32768, lambda p, r: (r.n_ctx, r.method == "ntk"))
    assert same_method == "ntk-16k"
    assert best_preset(facts, lambda p, r: False, lambda p, r: 0) is None


def test_group_parts_fills_each_reduce_call() -> None:
    parts = ["a" * 40, "b" * 40, "c" * 40, "d" * 40, "e" * 200]
    size = len(_join_parts(parts[:2]))  # exactly two of the short parts fit
    groups = group_parts(parts, len, size)
    assert groups == [parts[0:2], parts[2:4], [parts[4]]]  # order kept; an oversized part alone
    assert group_parts(parts[:1], len, 1) == [parts[:1]]
    assert [p for g in group_parts(parts, len, 10_000) for p in g] == parts


# --- One home per shared concept ------------------------------------------------------------------


def test_result_params_leave_out_only_the_preset_name_and_notes(facts) -> None:
    yarn = resolve(load_preset("yarn-32k"), facts).with_ctx_settings(notes=("prose",))
    assert result_params(yarn) == {k: v for k, v in yarn.to_dict().items() if k not in ("preset", "notes")}
    renamed = yarn.with_ctx_settings(preset="my-yarn", notes=("other prose",))
    assert result_params(renamed) == result_params(yarn)  # same values, same cached results
    assert result_params(yarn.with_ctx_settings(type_k="q8_0")) != result_params(yarn)


def test_kv_params_are_result_params_that_do_not_depend_on_the_window(facts) -> None:
    yarn = resolve(load_preset("yarn-32k"), facts)
    assert set(KV_FIELDS) <= set(result_params(yarn))
    assert kv_params(yarn.with_ctx_settings(n_ctx=16384, n_batch=256)) == kv_params(yarn)
    assert kv_params(yarn.with_ctx_settings(rope_freq_scale=0.5)) != kv_params(yarn)


def test_summaries_survive_a_renamed_model_but_not_another_model(model_path: Path, short_model: Path,
                                                                  tmp_path: Path) -> None:
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(model_path, copy)
    options = SummarizeOptions()

    def fp(path: Path) -> str:
        resolved = resolve_spec(RunSpec(model=str(path)))
        return fingerprint(resolved.facts, resolved.ladder, options)

    assert fp(copy) == fp(model_path) != fp(short_model)


def test_atomic_write_joins_its_parts_and_takes_the_longest_name(tmp_path: Path) -> None:
    path = tmp_path / ("n" * name_max(tmp_path))  # no room left for a `.NAME.` temp prefix
    atomic_write(path, "text ", b"bytes ", memoryview(b"view"))
    atomic_write(path, b"replaced", durable=False)
    assert path.read_bytes() == b"replaced" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_probe_writable_leaves_nothing_and_raises_what_a_write_would(tmp_path: Path) -> None:
    probe_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        probe_writable(tmp_path / "file")


def test_open_regular_file_refuses_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    start = time.monotonic()
    with pytest.raises(NotRegularFile, match="not a regular file but a named pipe"):
        open_regular_file(tmp_path / "fifo")
    assert time.monotonic() - start < 5
    with pytest.raises(FileNotFoundError):  # a miss stays an OSError its caller tells apart
        open_regular_file(tmp_path / "missing")
