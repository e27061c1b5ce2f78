"""`eval ruler` and `eval report`: every task run for real on the default model at a short length,
through the API and the CLI; the cache; parallel sequences; the summary's effective length on
hand-made cells. (The tasks' generators and scorers: test_ruler_tasks.py.)"""
from __future__ import annotations

import json
from typing import Any

import pytest

import localctx
from localctx.engine import Engine
from localctx.evaluate import CellCache, EvalResult, RulerRequest, TASKS, load_text, run_ruler, summarize
from localctx.evaluate.summary import effective_length, report_table, ruler_table
from localctx.runtime import Resolved

from conftest import assert_clean_error

EXACT = [t for t in TASKS if t not in ("cwe", "fwe")]  # the tasks whose prompts fill the length exactly


class Counting:
    """The shared real engine, counting the generations asked of it."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.generated = engine, 0

    def generate_many(self, requests: Any, **kwargs: Any) -> Any:
        self.generated += len(requests)
        return self.engine.generate_many(requests, **kwargs)

    def close(self) -> None:  # the shared engine outlives each run
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


@pytest.fixture
def factory(native_engine: Engine):
    made: list[Counting] = []

    def make(resolved: Resolved) -> Counting:
        made.append(Counting(native_engine))
        return made[-1]

    make.made = made  # type: ignore[attr-defined]
    return make


@pytest.fixture(scope="module")
def every_task(tmp_path_factory: pytest.TempPathFactory) -> tuple[EvalResult, Any]:
    """Every task once at 1,024 tokens on the default model, through the public API."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCALCTX_CACHE_DIR", str(tmp_path_factory.mktemp("ruler-cache")))
        return localctx.evaluate_ruler(["native"], ["1k"], samples=1)


def test_every_task_runs_on_the_default_model_through_the_api(every_task):
    result, summary = every_task
    assert [c["task"] for c in result.cells] == list(TASKS) and result.computed == len(TASKS)
    for cell in result.cells:
        assert cell["status"] == "ok" and 0.0 <= cell["score"] <= 1.0, cell
        assert cell["answers"] and isinstance(cell["answer"], str)
        room = cell["length"] - TASKS[cell["task"]].gen_tokens
        assert cell["prompt_tokens"] == room if cell["task"] in EXACT else room - 60 < cell["prompt_tokens"] <= room
        assert (cell["depth"] is None) == (not TASKS[cell["task"]].uses_depth)
    # The needle tasks at 1K are within this model's reach: it finds the single needles.
    single = [c["score"] for c in result.cells if c["task"].startswith("niah_single")]
    assert sum(single) >= 2, single
    assert summary.baseline is not None and summary.presets[0].effective == 1024


def test_a_cached_cell_is_never_recomputed(factory, corpus):
    request = RulerRequest(["native"], [512], load_text(corpus / "alice.txt"), ["niah_single_1", "qa"], samples=2)
    first = run_ruler(request, engine_factory=factory)
    assert first.computed == 4 and factory.made[0].generated == 4
    again = run_ruler(request, engine_factory=factory)
    assert again.computed == 0 and len(factory.made) == 1  # no engine even opened
    assert [c["answer"] for c in again.cells] == [c["answer"] for c in first.cells]
    more = run_ruler(RulerRequest(["native"], [512], request.text, ["niah_single_1", "qa"], samples=3),
                     engine_factory=factory)
    assert more.computed == 2 and factory.made[1].generated == 2  # only the new samples
    past = run_ruler(RulerRequest(["native"], [16384], request.text, ["qa"], samples=1), engine_factory=factory)
    assert past.cells[0]["status"] == "n/a" and len(factory.made) == 2


def test_presets_that_share_a_cell_compute_it_once(factory, corpus):
    """auto's first step is the native model: in one run, its cells are native's, computed once."""
    request = RulerRequest(["native", "auto"], [512], load_text(corpus / "alice.txt"), ["niah_single_1"], samples=2)
    result = run_ruler(request, engine_factory=factory)
    assert result.computed == 2 and sum(e.generated for e in factory.made) == 2
    native, auto = ([c["answer"] for c in result.cells if c["preset"] == p] for p in ("native", "auto"))
    assert len(auto) == 2 and auto == native


def test_parallel_sequences_give_the_same_answers(corpus, tmp_path):
    text = load_text(corpus / "alice.txt")
    tasks = ["niah_multivalue", "qa", "vt"]
    one = run_ruler(RulerRequest(["native"], [768], text, tasks, samples=1), cache=CellCache(tmp_path / "one"))
    two = run_ruler(RulerRequest(["native"], [768], text, tasks, samples=1, parallel=3),
                    cache=CellCache(tmp_path / "two"))
    assert two.computed == 3
    assert [(c["answer"], c["score"]) for c in two.cells] == [(c["answer"], c["score"]) for c in one.cells]


def test_cli_ruler_table_json_csv_plot_and_report(cli, corpus, tmp_path):
    grid = ("--presets", "native,yarn-16k", "--lengths", "512", "--tasks", "niah_single_2,qa", "--samples", "1",
            "--depths", "0.5", "--text", str(corpus / "alice.txt"))
    png = tmp_path / "ruler.png"
    table = cli("eval", "ruler", *grid, "--summary", "--plot", str(png))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["preset", "length", "single", "qa", "mean"]
    assert [line.split()[0] for line in lines[1:3]] == ["native", "yarn-16k"]
    assert any(line.startswith("effective length (mean >= 0.85 x native's") for line in lines)
    assert any(line.split()[:1] == ["preset"] and "retrieval" in line for line in lines)  # the --summary table
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "4 cell(s) computed" in table.stderr
    as_json = cli("eval", "ruler", *grid, "--json")
    assert as_json.returncode == 0 and "0 cell(s) computed" in as_json.stderr and "loading" not in as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["kind"] == "ruler" and len(data["cells"]) == 4
    assert [p["preset"] for p in data["summary"]["presets"]] == ["native", "yarn-16k"]
    as_csv = cli("eval", "ruler", *grid, "--csv")
    assert as_csv.stdout.splitlines()[0].startswith("preset,method,window,length,task,depth,sample,status,score")
    report = cli("eval", "report", *grid)
    assert report.returncode == 0, report.stderr
    rows = report.stdout.splitlines()
    assert rows[0].split()[:3] == ["preset", "retrieval", "QA"] and rows[1].split()[0] == "native"
    assert "4 of 4 cell(s) cached" in report.stderr
    longer = cli("eval", "report", *grid[:2], "--lengths", "512,1k", *grid[4:])
    assert "4 of 8 cell(s) cached" in longer.stderr  # 1K not run: reported, not computed


def test_cli_ruler_errors_are_clean(cli):
    assert_clean_error(cli("eval", "ruler", "--presets", "native", "--lengths", "1k", "--tasks", "nope"), "Unknown task")
    assert_clean_error(cli("eval", "ruler", "--presets", "native", "--lengths", "1k", "--depths", "2"), "Bad depth")
    assert_clean_error(cli("eval", "ruler", "--presets", "native", "--lengths", "64", "--tasks", "vt"),
                       "needs a length of at least")
    assert_clean_error(cli("eval", "report", "--presets", "nope"), "Unknown preset")


def test_cli_ruler_help_has_examples(cli):
    for args in (("eval", "ruler"), ("eval", "report")):
        result = cli(*args, "--help")
        assert result.returncode == 0 and "Example" in result.stdout


# --- the summary, on hand-made cells --------------------------------------------------------------

def _result(scores: dict[tuple[str, int], list[float | None]], tasks: list[str]) -> EvalResult:
    presets = list(dict.fromkeys(p for p, _ in scores))
    lengths = sorted({n for _, n in scores})
    cells = []
    for (preset, n), per_task in scores.items():
        for task, score in zip(tasks, per_task):
            status = "ok" if score is not None else "n/a"
            cells.append({"preset": preset, "length": n, "task": task, "status": status, "score": score})
    return EvalResult("ruler", "m.gguf", {"presets": presets, "lengths": lengths, "tasks": tasks}, cells)


def test_effective_length_is_the_longest_length_before_the_first_failure():
    assert effective_length({1: 0.9, 2: 0.8, 4: 0.5, 8: 0.9}, 0.7) == 2  # 8 passes again: too late
    assert effective_length({1: 0.6, 2: 0.9}, 0.7) is None
    assert effective_length({1: 0.9, 2: None, 4: 0.9}, 0.7) == 1  # not measured: not proven
    assert effective_length({1: 0.9}, None) is None


def test_summary_baseline_short_text_and_winners():
    tasks = ["niah_single_1", "qa"]
    result = _result({("native", 2048): [1.0, 0.6], ("native", 8192): [0.8, 0.4], ("native", 16384): [None, None],
                      ("yarn-32k", 2048): [1.0, 0.4], ("yarn-32k", 8192): [0.6, 0.2],
                      ("yarn-32k", 16384): [0.6, 0.0]}, tasks)
    summary = summarize(result, 0.85)
    native, yarn = summary.presets
    assert summary.baseline == pytest.approx(0.8) and summary.bar == pytest.approx(0.68)
    assert native.effective == 2048 and native.scores[8192] == pytest.approx(0.6)  # 0.6 < 0.68 at 8K
    assert yarn.effective == 2048  # 0.70 at 2K, 0.40 at 8K
    assert yarn.short_delta == pytest.approx(-0.1) and native.short_delta == pytest.approx(0.0)
    assert native.retrieval == (8192, 0.8) and yarn.retrieval == (16384, 0.6) and yarn.qa == (16384, 0.0)
    assert summary.winners() == {2048: ["native"], 8192: ["native"], 16384: ["yarn-32k"]}
    text = report_table(summary)
    assert "0.80 @ 8K" in text and "(-0.100)" in text and "best at each length: 2K native" in text
    assert ruler_table(result).splitlines()[0].split() == ["preset", "length", "single", "qa", "mean"]


def test_a_preset_not_measured_has_no_effective_length_yet():
    tasks = ["niah_single_1", "qa"]
    result = _result({("native", 2048): [1.0, 0.6], ("yarn-32k", 2048): [None, None]}, tasks)
    for cell in result.cells:
        if cell["preset"] == "yarn-32k":
            cell["status"] = "not run"
    text = report_table(summarize(result))
    assert "yarn-32k below" not in text and "yarn-32k -" in text
    row = next(line for line in text.splitlines() if line.startswith("yarn-32k"))
    assert row.split()[4] == "-"  # effective: not measured, not "<2K"


def test_effective_length_is_a_lower_bound_while_the_next_length_is_not_run():
    """A preset that passes at the longest length run so far may reach further: '>=4K', not '4K';
    a length it cannot run at all (n/a: past its window) ends it for certain."""
    tasks = ["niah_single_1", "qa"]
    result = _result({("native", 2048): [1.0, 0.6], ("native", 4096): [0.8, 0.6], ("native", 8192): [None, None],
                      ("yarn-32k", 2048): [1.0, 0.6], ("yarn-32k", 4096): [0.8, 0.6],
                      ("yarn-32k", 8192): [None, None]}, tasks)
    for cell in result.cells:
        if cell["preset"] == "yarn-32k" and cell["length"] == 8192:
            cell["status"] = "not run"
    summary = summarize(result)
    native, yarn = summary.presets
    assert native.effective == yarn.effective == 4096
    assert not native.at_least and yarn.at_least  # native's 8K is n/a here; yarn's is to run
    assert yarn.to_dict()["effective_length_at_least"] is True
    assert "native 4K, yarn-32k >=4K" in report_table(summary)
    row = next(line for line in report_table(summary).splitlines() if line.startswith("yarn-32k"))
    assert row.split()[-2] == ">=4K"  # the effective column, before fine-tuning


def test_summary_without_native_says_what_is_missing():
    result = _result({("yarn-32k", 2048): [1.0, 0.5]}, ["niah_single_1", "qa"])
    assert summarize(result).baseline is None
    assert "add native to --presets" in ruler_table(result)
