"""Summarize and evaluate on a real local Ray runtime with 2 workers (one runtime for the module):
the same outputs as one process, a worker SIGKILLed mid-batch, Ctrl-C, a finished batch re-run
without starting a worker, an evaluation grid filling the same cache cells, and clean errors; and at
--parallel 2, batches inside a worker: two tasks in one actor call on a 2-sequence engine, the same
results as one process at --parallel 2, a failing task failing alone, a killed batch requeued."""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy, as the CLI does

import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray

from conftest import assert_clean_error, invoke
from localctx.cluster import Cluster
from localctx.distributed import (CellTask, Done, EvaluateJob, Failed, PlanTask, RayExecutor, RequestTask,
                                  SummarizeJob, running_pool)
from localctx.errors import InputError, Interrupted
from localctx.evaluate import (CellCache, PasskeyRequest, PplRequest, RulerRequest, load_text, run_passkey, run_ppl,
                               run_ruler)
from localctx.evaluate.passkey import Passkey
from localctx.identity import model_identity
from localctx.paths import USER_DIR_ENV
from localctx.runtime import RunSpec, resolve_spec
from localctx.summarize import (Reporter, SummarizeOptions, expand_inputs, fingerprint, read_documents,
                                summarize_batch, summary_flow)
from localctx.tune import TuneRequest, tune

# A 512-token window: three short documents fit it (one pass), the fourth is map-reduced.
SPEC = RunSpec(preset="native", ctx=512, threads=1)  # llama.cpp's results depend on the thread count
OPTIONS = SummarizeOptions(max_summary_tokens=24)
TWO = RayExecutor(Cluster(workers=2))
PARALLEL = replace(OPTIONS, parallel=2)  # two calls at once, as parallel sequences
ONE = RayExecutor(Cluster(workers=1))


@pytest.fixture(scope="module", autouse=True)
def runtime():
    """One local Ray runtime for the module: each batch starts its 2 workers in it (as a batch
    started from a notebook that called ray.init would) and stops them at its end."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> list[str]:
    root = tmp_path_factory.mktemp("docs")
    text = (corpus / "alice.txt").read_text(encoding="utf-8")
    start = text.index("Alice was beginning")
    pieces = [text[start:start + 500], text[start + 2000:start + 2600], text[start + 5000:start + 5400],
              text[start + 8000:start + 10800]]
    paths = []
    for i, piece in enumerate(pieces):
        path = root / f"doc{i}.txt"
        path.write_text(piece, encoding="utf-8")
        paths.append(str(path))
    return paths


def summaries(result: Any) -> list[tuple[str, str, int, str]]:
    return [(r["path"], r["strategy"], r["chunks"], r["summary"]) for r in result.records]


@pytest.fixture(scope="module")
def single(documents: list[str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The batch in this process (the reference)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCALCTX_HOME", str(tmp_path_factory.mktemp("single-home")))
        return summarize_batch(documents, SPEC, OPTIONS)


@pytest.fixture(scope="module")
def single_parallel(documents: list[str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The two short documents in this process at --parallel 2: their calls run as two sequences."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCALCTX_HOME", str(tmp_path_factory.mktemp("parallel-home")))
        return summarize_batch(documents[:2], SPEC, PARALLEL)


@pytest.mark.slow
def test_two_workers_give_the_same_summaries_and_a_rerun_starts_none(single, documents, tmp_path):
    assert [r["strategy"] for r in single.records] == ["stuff", "stuff", "stuff", "map-reduce"]
    out = tmp_path / "out"
    result = summarize_batch(documents, SPEC, OPTIONS, executor=TWO, out=out)
    assert summaries(result) == summaries(single)
    assert result.stats.workers == 2 and result.stats.summarized == 4 and result.stats.failed == 0
    assert result.stats.model_calls == single.stats.model_calls and result.stats.model_loaded
    lines = [json.loads(line) for line in (out / "summaries.jsonl").read_text().splitlines()]
    assert [line["summary"] for line in lines] == [s[3] for s in summaries(single)]
    assert len(result.out_files) == 4 and all(f.is_file() for f in result.out_files)
    # A finished batch: every record from the store, no runtime joined, no worker started.
    again = summarize_batch(documents, SPEC, OPTIONS, executor=TWO, out=out)
    assert again.stats.cached == 4 and again.stats.model_calls == 0
    assert not again.stats.model_loaded and again.stats.workers == 0
    assert summaries(again) == summaries(single)


class KillAWorkerMidTask(Reporter):
    """When the first model call comes back, SIGKILL the other worker while it runs a task."""

    def __init__(self) -> None:
        self.killed: int | None = None

    def call_done(self, info: dict[str, Any], doc_tokens_done: int) -> None:
        if self.killed is not None or "pid" not in info:
            return
        for proc in psutil.process_iter(["pid", "cmdline"]):
            title = " ".join(proc.info["cmdline"] or [])
            if proc.info["pid"] != info["pid"] and title.startswith("ray::Worker.execute"):
                os.kill(proc.info["pid"], signal.SIGKILL)
                self.killed = proc.info["pid"]
                return


@pytest.mark.slow
def test_worker_killed_mid_batch_loses_only_its_task(single, documents):
    reporter = KillAWorkerMidTask()
    result = summarize_batch(documents, SPEC, OPTIONS, executor=TWO, reporter=reporter)
    assert reporter.killed is not None, "no worker was running a task when the first call came back"
    assert result.stats.retried >= 1 and result.stats.failed == 0
    assert summaries(result) == summaries(single)


@pytest.mark.slow
def test_a_worker_killed_mid_batch_requeues_each_of_its_tasks(documents):
    """At --parallel 2 two workers take two calls each: the one killed loses both, and every
    document is still summarized."""
    reporter = KillAWorkerMidTask()
    result = summarize_batch(documents, SPEC, PARALLEL, executor=TWO, reporter=reporter)
    assert reporter.killed is not None, "no worker was running a task when a call came back"
    assert result.stats.retried >= 1 and result.stats.failed == 0
    assert [r["status"] for r in result.records] == ["ok"] * 4


class InterruptAfterFirstCall(Reporter):
    def call_done(self, info: dict[str, Any], doc_tokens_done: int) -> None:
        if not info["cached"]:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_and_a_rerun_resumes(single, documents):
    with pytest.raises(Interrupted):
        summarize_batch(documents, SPEC, OPTIONS, executor=TWO, reporter=InterruptAfterFirstCall())
    deadline = time.monotonic() + 15
    while worker_processes() and time.monotonic() < deadline:  # ray.kill is asynchronous
        time.sleep(0.2)
    assert not worker_processes()
    # The call that came back is stored: the re-run does every other call only.
    again = summarize_batch(documents, SPEC, OPTIONS, executor=TWO)
    assert again.stats.model_calls == single.stats.model_calls - 1
    assert summaries(again) == summaries(single)


def worker_processes() -> list[int]:
    return [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if " ".join(p.info["cmdline"] or []).startswith("ray::Worker")]


def _cells(directory: Path) -> dict[str, dict]:
    """Each cache file's key and result, less what a clock measures."""
    cells = {}
    for path in directory.glob("*.json"):
        data = json.loads(path.read_text())
        data["result"] = {k: v for k, v in data["result"].items() if k not in ("seconds", "tokens_per_second")}
        cells[path.name] = data
    return cells


@pytest.mark.slow
def test_eval_grid_over_two_workers_fills_the_same_cells(corpus, tmp_path):
    text = load_text(corpus / "alice.txt")
    ppl = PplRequest(["native", "yarn-16k"], [256, 384], text, span=32)  # two presets: a worker switches engines
    passkey = PasskeyRequest(["native"], [256], [0.0, 1.0])
    here, there = tmp_path / "here", tmp_path / "there"
    spec = RunSpec(threads=1)
    for directory, executor in ((here, None), (there, TWO)):
        run_ppl(ppl, spec, cache=CellCache(directory), executor=executor)
        run_passkey(passkey, spec, cache=CellCache(directory), executor=executor)
    assert len(_cells(here)) == 4 + 2
    assert _cells(there) == _cells(here)


@pytest.mark.slow
def test_ruler_grid_over_two_workers_fills_the_same_cells(corpus, tmp_path):
    """RULER-style cells (a needle task with a depth, one without) on two workers: the same cache
    files as one process, and a rerun over the workers computes nothing."""
    request = RulerRequest(["native"], [512], load_text(corpus / "alice.txt"), ["niah_single_2", "vt"], samples=2)
    here, there = tmp_path / "here", tmp_path / "there"
    spec = RunSpec(threads=1)
    for directory, executor in ((here, None), (there, TWO)):
        run_ruler(request, spec, cache=CellCache(directory), executor=executor)
    assert len(_cells(here)) == 4
    assert _cells(there) == _cells(here)
    assert run_ruler(request, spec, cache=CellCache(there), executor=TWO).computed == 0


@pytest.mark.slow
def test_tune_evaluates_a_batch_of_trials_on_two_workers(short_model, corpus, tmp_path, monkeypatch):
    """Two trials asked at once, their cells on two workers: the same trials, perplexities and
    retrieval as in one process."""
    request = TuneRequest(2048, load_text(corpus / "alice.txt"), trials=2, name="w", span=32,
                          retrieval=("niah_single_2",), samples=1, batch=2)
    spec = RunSpec(model=str(short_model), threads=1)
    found = []
    for home, executor in (("here", None), ("there", TWO)):
        monkeypatch.setenv(USER_DIR_ENV, str(tmp_path / home))
        result = tune(request, spec, executor=executor)
        found.append([(t.values, t.ppl, t.retrieval) for t in result.trials])
    assert len(found[0]) == 2 and found[1] == found[0]


class Calls(Reporter):
    def __init__(self) -> None:
        self.infos: list[dict[str, Any]] = []

    def call_done(self, info: dict[str, Any], doc_tokens_done: int) -> None:
        self.infos.append(info)


@pytest.mark.slow
def test_one_worker_at_parallel_2_runs_two_calls_as_one_batch(single_parallel, documents):
    """The same batch composition as one process at --parallel 2 (both one-pass calls at once):
    the same summaries, and both calls came back from one actor call on a 2-sequence engine."""
    calls = Calls()
    result = summarize_batch(documents[:2], SPEC, PARALLEL, executor=ONE, reporter=calls)
    assert [r["strategy"] for r in result.records] == ["stuff", "stuff"]
    assert summaries(result) == summaries(single_parallel)
    assert [(c["batch"], c["n_seq"]) for c in calls.infos] == [(2, 2), (2, 2)]
    assert len({c["pid"] for c in calls.infos}) == 1


@pytest.mark.slow
def test_a_worker_answers_each_request_of_a_batch_and_a_failing_one_fails_alone(single_parallel, documents):
    """Four one-pass calls on one worker at --parallel 2: two actor calls of two. The third
    document does not fit the window: its call fails alone, beside the fourth's answer."""
    options = replace(PARALLEL, strategy="stuff")  # the long document too: its call is refused
    resolved = resolve_spec(SPEC)
    job = SummarizeJob(resolved, options, fingerprint(resolved.facts, resolved.ladder, options))
    docs, _ = read_documents(expand_inputs([documents[i] for i in (0, 1, 3, 2)]), None, print)
    with running_pool(Cluster(workers=1), 1, job) as pool:
        pool.ready()
        for i, doc in enumerate(docs):
            pool.submit(PlanTask(i, doc))
        plans = {tag.doc: outcome.value for tag, outcome in drain(pool)}
        for i in range(len(docs)):
            [call] = next(summary_flow(plans[i]))
            pool.submit(RequestTask(i, 0, call))
        outcomes = {tag.doc: outcome for tag, outcome in drain(pool)}
    assert all(isinstance(o, Done) and (o.batch, o.n_seq) == (2, 2) for i, o in outcomes.items() if i != 2)
    assert [outcomes[i].value["summary"] for i in (0, 1)] == [r["summary"] for r in single_parallel.records]
    assert isinstance(outcomes[2], Failed) and outcomes[2].error == "ContextOverflowError"
    assert "--strategy stuff" in outcomes[2].message
    assert outcomes[3].value["summary"] and outcomes[3].value["generated_tokens"] > 0


def drain(pool: Any) -> list[tuple[Any, Any]]:
    done = []
    while pool.busy:
        done += pool.results()
    return done


@pytest.mark.slow
def test_passkey_at_parallel_2_on_one_worker(tmp_path):
    """Two cells of one window: one actor call on a 2-sequence engine, and the same cells as one
    process at --parallel 2, also through run_passkey."""
    request = PasskeyRequest(["native"], [256], [0.0, 1.0], parallel=2)
    spec = RunSpec(threads=1)
    here, there = tmp_path / "here", tmp_path / "there"
    for directory, executor in ((here, None), (there, ONE)):
        run_passkey(request, spec, cache=CellCache(directory), executor=executor)
    assert len(_cells(here)) == 2
    assert _cells(there) == _cells(here)
    evaluation, resolved = Passkey(request), resolve_spec(spec).with_preset("native")
    model = model_identity(resolved.facts.path)
    cells = [({"preset": "native", **cell}, key) for cell, key in evaluation.cells(resolved, model)]
    with running_pool(Cluster(workers=1), 1, EvaluateJob(evaluation, 2)) as pool:
        for i, (cell, key) in enumerate(cells):
            pool.submit(CellTask(i, 0, resolved, cell, key))
        outcomes = [outcome for _, outcome in sorted(drain(pool), key=lambda d: d[0].index)]
    assert all(isinstance(o, Done) and (o.batch, o.n_seq) == (2, 2) for o in outcomes)
    cached = {c["key"]["depth"]: c["result"] for c in _cells(here).values()}
    assert [outcomes[i].value["answer"] for i in (0, 1)] == [cached[0.0]["answer"], cached[1.0]["answer"]]


def test_cli_eval_ppl_with_workers(cli, corpus):
    args = ("eval", "ppl", "--presets", "native", "--lengths", "256", "--span", "32", "--text",
            str(corpus / "alice.txt"), "--json", "--workers", "2")
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert "on Ray workers" in result.stderr
    assert json.loads(result.stdout)["cells"][0]["status"] == "ok"


def test_cluster_settings_are_validated():
    with pytest.raises(InputError, match="workers must be"):
        Cluster(workers=0)
    with pytest.raises(InputError, match="empty"):
        Cluster(address=" ")
    assert Cluster.of(None, None) is None


def test_cli_rejects_bad_cluster_options_cleanly(run_cli, documents, tmp_path):
    home = {"LOCALCTX_HOME": str(tmp_path / "home")}
    assert_clean_error(run_cli("summarize", documents[0], "--ray", "127.0.0.1:9", env=home, timeout=120),
                       "Cannot reach a Ray cluster at 127.0.0.1:9")
    env = {**home, "RAY_ADDRESS": ""}
    assert_clean_error(run_cli("summarize", documents[0], "--ray", "auto", env=env, timeout=120), "RAY_ADDRESS")
    assert_clean_error(invoke("summarize", documents[0], "--workers", "0"), "--workers", code=2)
