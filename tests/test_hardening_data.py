"""Hostile input must not lose data (issue 11): summarize writes only inside --out whatever the
input path, batches sharing --out keep each other's lines of summaries.jsonl, a bad --out fails
before any model work, and a failing chat command keeps the session.

The summarize tests pre-fill the summarizer's store with finished documents (the keys the real
batch computes), so they exercise the real naming and writing without running the model."""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO, assert_clean_error, invoke
from localctx.chat import ChatSession, Console, Message, run_repl
from localctx.fsutil import atomic_write
from localctx.runtime import RunSpec, resolve_spec
from localctx.summarize import (SummarizeOptions, document_key, expand_inputs, fingerprint, output_paths,
                                store_dir, summarize_batch)
from localctx.summary_store import Store, read_jsonl, sha256_text, write_jsonl

# --- Helpers -----------------------------------------------------------------------------------


def prefill(*texts: str, options: SummarizeOptions = SummarizeOptions()) -> None:
    """Record each text as summarized by the default model and preset, as a finished batch would."""
    resolved = resolve_spec(RunSpec())
    fp = fingerprint(resolved.facts, resolved.ladder, options)
    store = Store(store_dir())
    for text in texts:
        sha = sha256_text(text)
        store.put_document(document_key(fp, options, sha), {
            "path": "elsewhere.txt", "sha256": sha, "model": resolved.facts.path.name,
            "preset": resolved.params.preset, "status": "ok", "strategy": "stuff", "tokens": 9, "chunks": 1,
            "model_calls": 1, "seconds": 0.1, "summary": f"Summary of: {text}", "error": None})


def model_calls_run() -> int:
    return sum(1 for e in Store(store_dir()).events() if e["event"] == "call")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_inside(out: Path, files: list[Path]) -> None:
    root = out.resolve()
    for f in files:
        assert root in f.resolve().parents, f"{f} is outside {out}"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- Output names stay inside --out --------------------------------------------------------------


def test_dotdot_input_never_writes_outside_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reported case: in work/, `summarize .. ../notes --out out` overwrote work/notes/a.md."""
    root = tmp_path / "root"
    write(root / "notes" / "a.md", "Alice follows the white rabbit.")
    write(root / "work" / "notes" / "a.md", "The user's own notes in work/, not an output.")
    prefill("Alice follows the white rabbit.", "The user's own notes in work/, not an output.")
    monkeypatch.chdir(root / "work")
    before = snapshot(root)

    result = invoke("summarize", "..", "../notes", "--out", "out", "--quiet")

    assert result.returncode == 0, result.stderr
    after = snapshot(root)
    changed = {name for name in after if before.get(name) != after[name]}
    assert before.keys() <= after.keys(), "an input was deleted"
    assert changed and all(name.startswith("work/out/") for name in changed), changed
    outputs = [root / name for name in after if name.startswith("work/out/") and name.endswith(".md")]
    assert len(outputs) == 2
    assert_inside(root / "work" / "out", outputs)
    assert model_calls_run() == 0
    lines = read_jsonl(root / "work" / "out" / "summaries.jsonl")
    assert sorted(r["path"] for r in lines) == ["../notes/a.md", "../work/notes/a.md"]


@pytest.mark.parametrize("arg", ["..", "../notes", "../notes/a.md", "../notes/../notes", "sub/..", ".", "./sub/x.md",
                                 "ABS_DIR", "ABS_FILE", "ABS_DOTDOT"])
def test_every_output_name_is_inside_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arg: str) -> None:
    """One proof for every kind of input path: the name has only plain parts and lands under OUT."""
    root = tmp_path / "root"
    write(root / "notes" / "a.md", "a")
    write(root / "work" / "sub" / "x.md", "x")
    monkeypatch.chdir(root / "work")
    arg = {"ABS_DIR": str(root / "notes"), "ABS_FILE": str(root / "notes" / "a.md"),
           "ABS_DOTDOT": f"{root}/work/.."}.get(arg, arg)
    out = Path("out")
    sources = expand_inputs([arg], exclude=out)
    targets = output_paths(out, sources)
    assert len(set(targets.values())) == len(sources)
    for source in sources:
        assert not source.out_name.is_absolute() and ".." not in source.out_name.parts, source.out_name
    assert_inside(out, list(targets.values()))


def test_absolute_inputs_are_named_inside_out(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    write(docs / "a.txt", "Absolute file.")
    write(docs / "deep" / "b.txt", "Absolute directory.")
    prefill("Absolute file.", "Absolute directory.")
    out = tmp_path / "elsewhere" / "out"

    result = summarize_batch([str(docs / "a.txt"), str(docs / "deep")], RunSpec(), SummarizeOptions(), out=out)

    assert not result.stats.model_loaded
    assert sorted(str(p.relative_to(out)) for p in result.out_files) == ["a.md", "deep/b.md"]
    assert_inside(out, result.out_files)
    assert (docs / "a.txt").read_text() == "Absolute file."


def test_symlinked_input_is_named_by_the_link_and_its_target_is_untouched(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    outside = write(tmp_path / "outside" / "secret.md", "A document outside the working directory.")
    work = tmp_path / "work"
    (work / "docs").mkdir(parents=True)
    (work / "docs" / "link.md").symlink_to(outside)
    (work / "up").symlink_to(tmp_path / "outside")  # a link to a directory, given as the input itself
    prefill("A document outside the working directory.")
    monkeypatch.chdir(work)

    result = summarize_batch(["docs", "up", "docs/link.md"], RunSpec(), SummarizeOptions(), out=Path("out"))

    assert sorted(str(p) for p in result.out_files) == ["out/docs/link.md", "out/up/secret.md"]
    assert_inside(Path("out"), result.out_files)
    assert outside.read_text() == "A document outside the working directory."
    assert sorted(p.name for p in outside.parent.iterdir()) == ["secret.md"]


def test_a_link_inside_out_that_leads_outside_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "work" / "docs" / "a.md", "Alice again.")
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "work" / "out").mkdir()
    (tmp_path / "work" / "out" / "docs").symlink_to(victim)  # OUT/docs/a.md would land in victim/
    prefill("Alice again.")
    monkeypatch.chdir(tmp_path / "work")

    result = invoke("summarize", "docs", "--out", "out")

    assert_clean_error(result, "Error: Refusing to write out/docs/a.md", "symbolic link", code=1)
    assert list(victim.iterdir()) == []


def test_same_basename_from_two_directories_gets_two_outputs(tmp_path: Path) -> None:
    one = write(tmp_path / "x" / "notes" / "a.md", "First notes.")
    two = write(tmp_path / "y" / "notes" / "a.md", "Second notes.")
    prefill("First notes.", "Second notes.")
    for out, inputs in ((tmp_path / "files", [one, two]), (tmp_path / "dirs", [one.parent, two.parent])):
        result = summarize_batch([str(p) for p in inputs], RunSpec(), SummarizeOptions(), out=out)

        assert len(result.out_files) == len(set(result.out_files)) == 2
        assert_inside(out, result.out_files)
        first, second = (p.read_text() for p in result.out_files)
        assert "Summary of: First notes." in first and "Summary of: Second notes." in second


def test_output_never_replaces_an_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "a.md", "Input in the output directory.")
    write(tmp_path / "b.txt", "Another input.")
    write(tmp_path / "b.md", "A third input, where b.txt's summary would go.")
    prefill("Input in the output directory.", "Another input.", "A third input, where b.txt's summary would go.")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)

    result = summarize_batch(["a.md", "b.txt", "b.md"], RunSpec(), SummarizeOptions(), out=Path("."))

    assert all(snapshot(tmp_path)[name] == data for name, data in before.items())
    assert len(set(result.out_files)) == 3
    assert not {p.resolve() for p in result.out_files} & {tmp_path / n for n in before}


def test_file_name_that_is_not_utf8_is_written_everywhere(tmp_path: Path) -> None:
    """Python holds such a name as lone surrogates, which UTF-8 cannot encode: the store, the
    Markdown and summaries.jsonl must still be written, and the JSON must give the name back."""
    name = os.fsdecode(b"caf\xe9.txt")
    write(tmp_path / name, "Alice went to the cafe.")
    prefill("Alice went to the cafe.")
    out = tmp_path / "out"

    result = summarize_batch([str(tmp_path / name)], RunSpec(), SummarizeOptions(), out=out)

    assert [p.name for p in result.out_files] == [os.fsdecode(b"caf\xe9.md")]
    assert result.out_files[0].read_bytes().startswith(b"# " + os.fsencode(tmp_path) + b"/caf\xe9.txt\n")
    [row] = read_jsonl(out / "summaries.jsonl")
    assert row["path"] == str(tmp_path / name) and row["status"] == "ok"
    (out / "summaries.jsonl").read_bytes().decode("utf-8")  # valid UTF-8 throughout


# --- summaries.jsonl: a lock, a merge by path, foreign lines kept ---------------------------------


FOREIGN = b'{"note": "written by hand, no path"}\n'


def test_concurrent_writers_keep_every_line(tmp_path: Path) -> None:
    """Six processes each add 20 one-document batches at once; none may lose another's line."""
    (tmp_path / "summaries.jsonl").write_bytes(FOREIGN + b'{"path": "old.txt", "summary": "earlier batch"}\n')
    jobs = [(tmp_path, [{"path": f"p{i}-{k}.txt", "summary": f"{i}/{k}"}]) for k in range(20) for i in range(6)]
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        pool.starmap(write_jsonl, jobs, chunksize=1)
    data = (tmp_path / "summaries.jsonl").read_bytes()
    rows = [json.loads(line) for line in data.splitlines()]  # every line whole
    assert data.startswith(FOREIGN)
    assert sorted(r["path"] for r in rows if "path" in r) == sorted(
        ["old.txt"] + [f"p{i}-{k}.txt" for i in range(6) for k in range(20)])


def test_concurrent_cli_runs_into_one_out_keep_all_lines(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "summaries.jsonl").write_bytes(FOREIGN)
    docs = [write(tmp_path / f"d{i}" / f"doc{i}.txt", f"Document number {i}.") for i in range(6)]
    prefill(*(d.read_text() for d in docs))
    procs = [subprocess.Popen([sys.executable, "-m", "localctx", "summarize", str(d), "--out", str(out), "--quiet"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in docs]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()

    assert all(rc == 0 for rc, _ in results), results
    data = (out / "summaries.jsonl").read_bytes()
    assert data.startswith(FOREIGN)
    assert sorted(r["path"] for r in read_jsonl(out / "summaries.jsonl") if "path" in r) == sorted(map(str, docs))
    assert sorted(p.name for p in out.glob("*.md")) == [f"doc{i}.md" for i in range(6)]
    assert model_calls_run() == 0


def test_rewrite_keeps_foreign_lines_and_drops_only_torn_and_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "summaries.jsonl"
    existing = [b"# a comment someone added", FOREIGN.strip(), b'{"path": ["not", "a", "string"]}',
                b'{"path": "old.txt", "v": 1}', b"", b'{"path": "old.txt", "v": 2}', b"\xff\xfe not UTF-8",
                b'{"path": "a.txt", "v": "stale"}', b'{"path": "b.tx']
    path.write_bytes(b"\n".join(existing))

    write_jsonl(tmp_path, [{"path": "a.txt", "v": "new"}])

    assert path.read_bytes().split(b"\n") == [
        b"# a comment someone added", FOREIGN.strip(), b'{"path": ["not", "a", "string"]}',
        b'{"path": "old.txt", "v": 1}', b"\xff\xfe not UTF-8", b'{"path": "a.txt", "v": "new"}', b""]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failed_atomic_write_leaves_the_previous_file(tmp_path: Path) -> None:
    path = write(tmp_path / "conv.json", "previous")
    with pytest.raises(UnicodeEncodeError):
        atomic_write(path, "a lone surrogate \udcff cannot be UTF-8")
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["conv.json"]


# --- A bad --out fails before any work -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "under-a-file", "dev-null", "proc"])
def test_bad_out_is_a_clean_error_before_model_work(tmp_path: Path, kind: str) -> None:
    doc = write(tmp_path / "doc.txt", "Nothing summarized this yet, so a model would have to run.")
    a_file = write(tmp_path / "a_file.txt", "not a directory")
    out = {"file": str(a_file), "under-a-file": str(a_file / "out"), "dev-null": "/dev/null",
           "proc": "/proc/version/out"}[kind]

    result = invoke("summarize", str(doc), "--out", out)

    assert_clean_error(result, "not a directory", code=1)
    assert result.stderr.startswith("Error: --out "), result.stderr
    assert not store_dir().exists(), "model work started before the output was checked"
    assert a_file.read_text() == "not a directory"


def test_bad_out_in_a_real_process(tmp_path: Path, run_cli) -> None:
    doc = write(tmp_path / "doc.txt", "A document.")
    result = run_cli("summarize", str(doc), "--out", "/dev/null", timeout=60)
    assert_clean_error(result, code=1)
    assert result.stderr.startswith("Error: --out /dev/null exists and is not a directory"), result.stderr


def test_output_blocked_mid_batch_is_a_clean_error(tmp_path: Path) -> None:
    write(tmp_path / "docs" / "a.txt", "Blocked output.")
    prefill("Blocked output.")
    out = tmp_path / "out"
    (out / "a.md").mkdir(parents=True)  # a directory where the Markdown goes
    result = invoke("summarize", str(tmp_path / "docs" / "a.txt"), "--out", str(out))
    assert_clean_error(result, f"Error: Cannot write {out / 'a.md'}: Is a directory", code=1)
    (out / "a.md").rmdir()
    (out / "summaries.jsonl").mkdir()
    result = invoke("summarize", str(tmp_path / "docs" / "a.txt"), "--out", str(out))
    assert_clean_error(result, f"Error: Cannot write {out / 'summaries.jsonl'}: Is a directory", code=1)


# --- Chat: a failing command keeps the session -----------------------------------------------------


def scripted(lines: list[str]) -> tuple[Console, io.StringIO, io.StringIO]:
    feed = iter(lines)
    out, err = io.StringIO(), io.StringIO()
    return Console(lambda prompt: next(feed, None), out, err, interactive=False), out, err


def test_failed_save_keeps_the_session_and_the_conversation(small_engine, tmp_path: Path) -> None:
    a_file = write(tmp_path / "somefile.txt", "a file, not a directory")
    good = tmp_path / "conv.json"
    session = ChatSession(small_engine, system="Be brief.", max_tokens=8, temperature=0)
    console, out, err = scripted([
        "Say hi.", f"/save {a_file}/conv.json", "/save /proc/version/conv.json", f"/save {tmp_path}",
        f"/save {tmp_path}/missing_dir/conv.json", "/save ~no_such_user_here/conv.json",
        "Say hello.", f"/save {good}"])

    run_repl(session, console)

    log = err.getvalue()
    assert log.count("Error: Cannot save to") == 4 and "Error: ~no_such_user_here/conv.json" in log, log
    assert "Traceback" not in log and f"Saved to {good}." in log
    assert not (tmp_path / "missing_dir").exists()
    saved = json.loads(good.read_text())
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == ["Say hi.", "Say hello."]
    assert len(saved["messages"]) == 5  # system + two turns: the conversation survived every failure


def test_save_keeps_undecodable_input_and_load_round_trips(small_engine, tmp_path: Path) -> None:
    session = ChatSession(small_engine, max_tokens=8, temperature=0)
    session.messages = [Message("user", "bytes \udcff from a non-UTF-8 terminal"), Message("assistant", "ok")]
    path = tmp_path / "conv.json"
    session.save(path)
    again = ChatSession(small_engine)
    again.load(path)
    assert [m.content for m in again.messages] == [m.content for m in session.messages]


def test_failed_load_keeps_the_session(small_engine, tmp_path: Path) -> None:
    garbage = {"not-json": b"\x00\xffgarbage", "not-utf8": b'{"messages": "\xff"}', "list": b"[1, 2]",
               "bad-message": b'{"messages": [1]}', "bad-role": b'{"messages": [{"role": 7, "content": "x"}]}',
               "deep": b"[" * 100_000}
    files = [write(tmp_path / name, "") for name in garbage]
    for f in files:
        f.write_bytes(garbage[f.name])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would block forever; should it be read, a writer hands it a conversation
    stop = threading.Event()
    threading.Thread(target=feed_fifo, args=(fifo, stop), daemon=True).start()
    session = ChatSession(small_engine, system="Be brief.", max_tokens=8, temperature=0)
    session.messages.append(Message("user", "remember me"))
    kept = list(session.messages)
    console, out, err = scripted([f"/load {tmp_path / 'missing.json'}", f"/load {tmp_path}", f"/load {fifo}",
                                  *(f"/load {f}" for f in files), "/load bad\x00path", "/stats"])

    run_repl(session, console)

    log = err.getvalue()
    assert sum(line.startswith("Error: ") for line in log.splitlines()) == 4 + len(files), log
    assert "Traceback" not in log and "context:" in log  # /stats ran: the session went on
    stop.set()
    assert session.messages == kept


def feed_fifo(fifo: Path, stop: threading.Event) -> None:
    """If anyone opens `fifo` to read, write it a valid conversation: a regression then shows as a
    changed session instead of a test that hangs."""
    while not stop.wait(0.05):
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while nobody reads
        except OSError:
            continue
        os.write(fd, b'{"messages": [{"role": "user", "content": "from the fifo"}]}')
        os.close(fd)
        return


@pytest.mark.parametrize("argv", [["summarize", "DOC", "--max-summary-tokens", "16"],
                                  ["eval", "passkey", "--presets", "native", "--lengths", "256", "--depths", "0.5"]])
def test_unwritable_cache_is_a_clean_error_before_any_work(tmp_path: Path, argv: list[str]) -> None:

    doc, blocker = tmp_path / "doc.txt", tmp_path / "a-file"
    doc.write_text("A note about the budget.\n")
    blocker.write_text("")
    result = invoke(*[str(doc) if a == "DOC" else a for a in argv], env={"LOCALCTX_CACHE_DIR": str(blocker / "cache")})
    assert_clean_error(result, "Cannot write the", "LOCALCTX_CACHE_DIR", code=1)
    assert "computed" not in result.stderr
