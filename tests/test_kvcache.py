"""KV snapshots of long documents: saved after the document is evaluated, restored by a later
prompt that starts with the same tokens under the same model and KV-relevant parameters, and
never restored otherwise. Real model, real files: corrupt ones are corrupted on disk, a full disk
is the kernel refusing writes (RLIMIT_FSIZE), concurrent writers are real processes.

The threshold is lowered to MIN tokens here (LOCALCTX_KV_CACHE_MIN_TOKENS) so that documents of a
few hundred tokens, seconds to evaluate, exercise every path; one test checks the default."""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy

import json
import multiprocessing
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SHORT_TRAINED, assert_clean_error, run_localctx
from test_hardening_inputs import HANG_GUARD
from localctx import generate_text, start_chat
from localctx.engine import Engine
from localctx.generate import GenerateRequest, build_prompt
from localctx.errors import LocalctxError
from localctx.identity import model_identity
from localctx.kvcache import MAGIC, MAX_ENV, MIN_ENV, KVStore, SnapshotKey, read_header, size_limit, snapshot_threshold
from localctx.params import RuntimeParams
from localctx.runtime import RunSpec, open_engine
from localctx.summarize import Reporter, SummarizeOptions, summarize_batch

MIN = 128
Q1, Q2 = "Who is the main character?", "What does the White Rabbit take out of its pocket?"


@pytest.fixture(autouse=True)
def low_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MIN_ENV, str(MIN))


@pytest.fixture(scope="module")
def doc(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 330 tokens of Alice in Wonderland."""
    path = tmp_path_factory.mktemp("doc") / "alice-start.txt"
    text = (corpus / "alice.txt").read_text()
    start = text.index("Alice was beginning")
    path.write_text(text[start:start + 1500])
    return path


def snapshots(home: Path) -> list[Path]:
    return sorted((home / "cache" / "kv").glob("*/*.kvs"))


def leftovers(home: Path) -> list[Path]:
    return sorted((home / "cache" / "kv").glob("*/.*.tmp"))


def ask(engine: Engine, doc: Path, question: str, max_tokens: int = 12):
    engine.reset_cache()  # every question as a new process would ask it
    return generate_text(engine, question, document=doc, chat=True, max_tokens=max_tokens)


def without_snapshots(engine: Engine, doc: Path, question: str, max_tokens: int = 12):
    store, engine.kv_store = engine.kv_store, None
    try:
        return ask(engine, doc, question, max_tokens)
    finally:
        engine.kv_store = store


def first_logits(engine: Engine, doc: Path, question: str) -> np.ndarray:
    engine.reset_cache()
    prompt = build_prompt(engine, GenerateRequest(question, doc, chat=True))
    engine.generate(prompt.tokens, max_tokens=1, document_end=prompt.document_end).finish()
    return engine.last_logits()


# --- Hit --------------------------------------------------------------------------------------


def test_second_question_restores_and_answers_as_a_fresh_evaluation(native_engine: Engine, doc: Path,
                                                                    isolated_home: Path) -> None:
    first = ask(native_engine, doc, Q1)
    end = build_prompt(native_engine, GenerateRequest(Q2, doc, chat=True)).document_end
    assert end is not None and end > MIN
    assert first.timings.saved_tokens == end and first.timings.restored_tokens == 0
    assert len(snapshots(isolated_home)) == 1 and leftovers(isolated_home) == []

    second = ask(native_engine, doc, Q2)
    assert second.timings.restored_tokens == end and second.timings.saved_tokens == 0
    fresh = without_snapshots(native_engine, doc, Q2)
    assert fresh.timings.restored_tokens == 0 and fresh.text == second.text

    restored = first_logits(native_engine, doc, Q2)
    assert native_engine.kv_store is not None
    native_engine.kv_store, store = None, native_engine.kv_store
    try:
        recomputed = first_logits(native_engine, doc, Q2)
    finally:
        native_engine.kv_store = store
    assert float(np.abs(restored - recomputed).max()) <= 1e-4


def test_a_prompt_without_the_document_or_below_the_threshold_saves_nothing(native_engine: Engine, doc: Path,
                                                                          isolated_home: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    native_engine.reset_cache()
    generate_text(native_engine, "Alice was beginning to get very tired", max_tokens=4)
    monkeypatch.delenv(MIN_ENV)  # the default, 2,048 tokens: this document is far below it
    gen = ask(native_engine, doc, Q1)
    assert gen.timings.saved_tokens == 0 and snapshots(isolated_home) == []


# --- Misses on every key component ---------------------------------------------------------------


@pytest.mark.parametrize("variant", ["preset", "kv type", "flash attention", "model", "one token"])
def test_any_key_component_changed_is_a_miss(variant: str, native_engine: Engine, doc: Path, short_model: Path,
                                             isolated_home: Path, tmp_path: Path) -> None:
    ask(native_engine, doc, Q1)
    assert len(snapshots(isolated_home)) == 1
    other_doc = doc
    spec = RunSpec(preset="native")
    if variant == "preset":
        spec = RunSpec(preset="yarn-16k")
    elif variant == "kv type":
        spec = RunSpec(preset="native", cache_type="q8_0")
    elif variant == "flash attention":
        spec = RunSpec(preset="native", flash_attn=False)
    elif variant == "model":
        spec = RunSpec(model=str(short_model), preset="native")
    else:
        other_doc = tmp_path / doc.name
        other_doc.write_text(doc.read_text().replace("sister", "brother", 1))
    with open_engine(spec) as engine:
        gen = ask(engine, other_doc, Q1)
    assert gen.timings.restored_tokens == 0 and gen.timings.saved_tokens > MIN
    assert len(snapshots(isolated_home)) == 2


@pytest.mark.slow
def test_the_auto_step_in_use_is_part_of_the_key(short_model: Path, doc: Path, isolated_home: Path) -> None:
    """Under auto the same document is a different KV cache at each step of the ladder."""
    long_doc = isolated_home / "long.txt"
    long_doc.write_text(doc.read_text() * 3)  # ~1,000 tokens: past nothing alone, past 1,024 with the budget
    with open_engine(RunSpec(model=str(short_model), preset="auto", ctx=4 * SHORT_TRAINED)) as engine:
        small = ask(engine, long_doc, Q1, max_tokens=200)
        assert engine.params.scale == 2 and small.timings.saved_tokens > 0
        big = ask(engine, long_doc, Q1, max_tokens=1200)  # needs the 4,096 step: s = 4
        assert engine.params.scale == 4 and big.timings.restored_tokens == 0 and big.timings.saved_tokens > 0
        again = ask(engine, long_doc, Q2, max_tokens=200)
        assert engine.params.scale == 2 and again.timings.restored_tokens == small.timings.saved_tokens
    assert len(snapshots(isolated_home)) == 2


def test_model_identity_follows_content_not_name(model_path: Path, short_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(model_path.read_bytes())
    assert model_identity(copy) == model_identity(model_path) != model_identity(short_model)


# --- Damaged files ----------------------------------------------------------------------------


def _damage(path: Path, how: str, home: Path) -> None:
    data = bytearray(path.read_bytes())
    if how == "flipped byte":
        data[-1000] ^= 0x55  # inside the KV payload: llama.cpp would take it and answer wrongly
    elif how == "truncated":
        del data[len(data) // 2:]
    elif how == "foreign":
        data = bytearray(os.urandom(len(data)))
    elif how == "huge claim":  # a header that claims a petabyte payload must not be allocated
        with path.open("rb") as f:
            header = read_header(f)
            rest = f.read()
        header["payload_bytes"] = 2**50
        head = json.dumps(header).encode()
        data = bytearray(MAGIC + struct.pack("<I", len(head)) + head + rest)
    elif how == "other key":  # a whole, valid file, but computed under other parameters
        params = RuntimeParams("x", "yarn", 16384, 8192, 2.0, "yarn", 0.0, 0.5)
        other = KVStore(home / "other").save(SnapshotKey.of("other-model", params, "0"), _tokens_of(path),
                                            b"\0" * 1000, {})
        assert other is not None
        data = bytearray(other.read_bytes())
    path.write_bytes(bytes(data))


def _tokens_of(path: Path) -> list[int]:
    with path.open("rb") as f:
        n = read_header(f)["tokens"]
        return list(np.frombuffer(f.read(4 * n), dtype="<i4"))


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "foreign", "other key", "huge claim"])
def test_a_damaged_snapshot_is_ignored_with_one_line_and_recomputed(how: str, native_engine: Engine, doc: Path,
                                                                    isolated_home: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    expected = ask(native_engine, doc, Q2).text  # saves the snapshot
    [path] = snapshots(isolated_home)
    _damage(path, how, isolated_home)
    capsys.readouterr()
    gen = ask(native_engine, doc, Q2)
    err = capsys.readouterr().err
    assert gen.timings.restored_tokens == 0 and gen.text == expected
    assert err.count("warning: ignoring KV snapshot") == 1 and "Traceback" not in err, err
    assert gen.timings.saved_tokens > 0  # replaced by a good one...
    assert ask(native_engine, doc, Q2).timings.restored_tokens == gen.timings.saved_tokens  # ...which restores


def test_a_fifo_where_a_snapshot_should_be_is_skipped_not_waited_on(doc: Path, isolated_home: Path, cli) -> None:
    first = cli("generate", "--file", str(doc), Q1, "--max-tokens", "8")
    [path] = snapshots(isolated_home)
    path.unlink()
    os.mkfifo(path)
    # In subprocesses: a hang fails at HANG_GUARD, not in CI's timeout.
    listing = run_localctx("cache", "list", timeout=HANG_GUARD)
    assert listing.returncode == 0 and "unreadable: not a regular file" in listing.stdout, listing.stdout
    proc = run_localctx("generate", "--file", str(doc), Q1, "--max-tokens", "8", timeout=HANG_GUARD)
    assert proc.returncode == 0 and proc.stdout == first.stdout
    assert "ignoring KV snapshot" in proc.stderr and "not a regular file" in proc.stderr, proc.stderr
    assert path.is_file()  # replaced by a good snapshot


# --- The directory: limit, read-only, full disk, concurrent writers ------------------------------------


def _key(n: int) -> SnapshotKey:
    return SnapshotKey.of("model", RuntimeParams("native", "none", 8192, 8192, 1.0, None, 0.0, 0.0), f"build{n}")


def test_eviction_keeps_the_directory_under_the_limit_least_recently_used_first(tmp_path: Path) -> None:
    mib = 2**20
    store = KVStore(tmp_path, max_bytes=int(2.5 * mib))
    a = store.save(_key(0), [1, 2, 3], b"a" * mib, {})
    b = store.save(_key(0), [1, 2, 4], b"b" * mib, {})
    assert a and b
    os.utime(a, (1, 1)), os.utime(b, (2, 2))  # a older than b...
    assert store.find(_key(0), [1, 2, 3]) is not None  # ...until a is used
    c = store.save(_key(0), [1, 2, 5], b"c" * mib, {})
    assert c and a.exists() and not b.exists()
    assert sum(p.stat().st_size for p in tmp_path.glob("*/*.kvs")) <= 2.5 * mib


def test_a_snapshot_larger_than_the_limit_is_not_saved(tmp_path: Path) -> None:
    warnings: list[str] = []
    store = KVStore(tmp_path, max_bytes=1000, warn=warnings.append)
    assert store.save(_key(0), [1, 2, 3], b"x" * 5000, {}) is None
    assert "not saved" in warnings[0] and list(tmp_path.rglob("*.kvs")) == []


@pytest.mark.parametrize("value", ["lots", "-1", "4X"])
def test_a_malformed_size_limit_is_a_clean_error(value: str, cli, doc: Path) -> None:
    result = cli("generate", "--file", str(doc), Q1, env={"LOCALCTX_KV_CACHE_MAX": value})
    assert_clean_error(result, "LOCALCTX_KV_CACHE_MAX")


def test_size_limit_and_threshold_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MAX_ENV, raising=False)
    assert size_limit() == 4 * 2**30
    for value, expected in (("512MiB", 512 * 2**20), ("1.5g", int(1.5 * 2**30)), ("0", 0)):
        monkeypatch.setenv(MAX_ENV, value)
        assert size_limit() == expected
    monkeypatch.setenv(MIN_ENV, "many")
    with pytest.raises(LocalctxError, match=MIN_ENV):
        snapshot_threshold()


def test_an_unwritable_cache_directory_means_no_snapshot_and_the_answer(native_engine: Engine, doc: Path,
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Tests run as root, which permission bits do not stop: a file where the directory should be does.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    expected = without_snapshots(native_engine, doc, Q1).text
    monkeypatch.setenv("LOCALCTX_CACHE_DIR", str(blocker / "cache"))
    capsys.readouterr()
    gen = ask(native_engine, doc, Q1)
    err = capsys.readouterr().err
    assert gen.text == expected and gen.timings.saved_tokens == 0
    assert err.count("warning: no KV snapshot saved") == 1 and "LOCALCTX_CACHE_DIR" in err


def _full_disk() -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))  # the snapshot is ~8 MiB


def test_a_full_disk_means_no_snapshot_no_temp_file_and_the_answer(doc: Path, isolated_home: Path) -> None:
    args = ["generate", "--file", str(doc), Q1, "--max-tokens", "8"]
    full = run_localctx(*args, timeout=300, preexec_fn=_full_disk)
    assert full.returncode == 0 and "warning: no KV snapshot saved" in full.stderr, full.stderr
    assert snapshots(isolated_home) == [] and leftovers(isolated_home) == []
    roomy = run_localctx(*args, timeout=300)
    assert roomy.returncode == 0 and roomy.stdout == full.stdout and "[kv] saved" in roomy.stderr


def test_two_processes_on_the_same_document_both_finish_and_leave_one_whole_file(doc: Path,
                                                                                 isolated_home: Path) -> None:
    args = ["generate", "--file", str(doc), Q1, "--max-tokens", "8", "--threads", "1"]
    procs = [subprocess.Popen([sys.executable, "-m", "localctx", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]
    assert len(snapshots(isolated_home)) == 1 and leftovers(isolated_home) == []
    third = run_localctx(*args, timeout=300)
    assert "[kv] restored" in third.stderr and third.stdout == outs[0][0], third.stderr


def _writer(root: str, rounds: int) -> None:
    store = KVStore(Path(root))
    for i in range(rounds):
        store.save(_key(0), list(range(64)), bytes([i % 251]) * (8 * 2**20), {})


def test_concurrent_writers_and_readers_never_see_a_torn_file(tmp_path: Path) -> None:
    warnings: list[str] = []
    reader = KVStore(tmp_path, warn=warnings.append)
    fork = multiprocessing.get_context("fork")
    writers = [fork.Process(target=_writer, args=(str(tmp_path), 6)) for _ in range(3)]
    for w in writers:
        w.start()
    seen = 0
    while any(w.is_alive() for w in writers):
        found = reader.find(_key(0), list(range(64)))
        if found is not None:
            seen += 1
            assert len(set(found.payload)) == 1  # one writer's whole payload, never a mix
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert warnings == [] and seen > 0
    assert len(list(tmp_path.glob("*/*.kvs"))) == 1 and list(tmp_path.glob("*/.*.tmp")) == []


# --- Commands and the other callers -------------------------------------------------------------------


def test_cache_list_and_clear(cli, doc: Path, isolated_home: Path) -> None:
    assert "No KV snapshots" in cli("cache", "list").stdout
    first = cli("generate", "--file", str(doc), Q1, "--max-tokens", "8")
    assert first.returncode == 0 and "[kv] saved a snapshot" in first.stderr, first.stderr
    listing = cli("cache", "list")
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in listing.stdout and "native" in listing.stdout
    assert "unscaled / f16" in listing.stdout and "1 snapshot(s)" in listing.stdout
    [entry] = json.loads(cli("cache", "list", "--json").stdout)["snapshots"]
    assert entry["tokens"] > MIN and entry["preset"] == "native" and entry["bytes"] > 0
    second = cli("generate", "--file", str(doc), Q1, "--max-tokens", "8")
    assert f"[kv] restored {entry['tokens']:,} document tokens" in second.stderr and second.stdout == first.stdout
    cleared = cli("cache", "clear")
    assert cleared.returncode == 0 and "Deleted 1 KV snapshot" in cleared.stdout
    assert snapshots(isolated_home) == []


def test_no_kv_cache_neither_saves_nor_restores(cli, doc: Path, isolated_home: Path) -> None:
    result = cli("generate", "--file", str(doc), Q1, "--max-tokens", "8", "--no-kv-cache")
    assert result.returncode == 0 and "[kv]" not in result.stderr and snapshots(isolated_home) == []
    assert "--no-kv-cache" in cli("chat", "--help").stdout and "--no-kv-cache" in cli("summarize", "--help").stdout


def test_chat_read_in_a_new_session_restores_the_document(native_engine: Engine, doc: Path) -> None:
    notices: list[str] = []
    native_engine.reset_cache()
    first = start_chat(native_engine, temperature=0, max_tokens=16)
    first.notice = notices.append
    first.attach(doc)
    first.ask(Q1)
    assert any("[kv] saved" in n for n in notices)
    answers = []
    for store in (native_engine.kv_store, None):  # a new session: from the snapshot, then computed afresh
        native_engine.reset_cache()
        saved, native_engine.kv_store = native_engine.kv_store, store
        try:
            session = start_chat(native_engine, temperature=0, max_tokens=16)
            session.notice = notices.append
            session.attach(doc)
            answers.append(session.ask(Q2))
        finally:
            native_engine.kv_store = saved
        if store is not None:
            assert session.stats.last is not None and session.stats.last.restored_tokens > MIN
            assert "[kv] restored" in notices[-1]
    assert answers[0] == answers[1]


def test_chat_file_and_read_share_the_snapshot_across_sessions(cli, doc: Path) -> None:
    first = cli("chat", "--file", str(doc), "-t", "0", "--max-tokens", "8", input=f"{Q1}\n")
    second = cli("chat", "-t", "0", "--max-tokens", "8", input=f"/read {doc}\n{Q1}\n")
    assert first.returncode == second.returncode == 0
    assert "Attached" in first.stderr and "[kv] saved" in first.stderr, first.stderr
    assert "[kv] restored" in second.stderr and second.stdout == first.stdout, second.stderr


def test_summarize_one_pass_restores_the_document(doc: Path, isolated_home: Path) -> None:
    class Calls(Reporter):
        def __init__(self) -> None:
            self.infos: list[dict] = []

        def call_done(self, info: dict, doc_tokens_done: int) -> None:
            self.infos.append(info)

    runs = []
    for budget in (16, 24):  # another answer budget: the summary store misses, the document does not
        calls = Calls()
        summarize_batch([str(doc)], RunSpec(), SummarizeOptions(max_summary_tokens=budget), reporter=calls)
        runs.append(calls.infos)
    assert [len(r) for r in runs] == [1, 1] and not runs[1][0]["cached"]
    assert runs[0][0]["restored_tokens"] == 0 and runs[1][0]["restored_tokens"] > MIN
    assert len(snapshots(isolated_home)) == 1
