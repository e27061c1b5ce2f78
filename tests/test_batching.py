"""Many sequences at once (localctx.engine.sequences): each request gets its own answer, the same
one it gets alone where results are promised (exact engines: summarize, eval, Ray), whatever ran
beside it and whatever the thread count; and the server batches concurrent clients."""
from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import replace
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from conftest import SHORT_TRAINED, assert_clean_error
from localctx.errors import Cancelled
from localctx.memory import Workload
from localctx.runtime import RunSpec, open_engine
from localctx.summarize import SummarizeOptions, summarize_batch
from test_serve import Server, start_server

EXACT4 = Workload("generate", 4, exact=True)
SE_PRESET = 'method = "self-extend"\ntarget_ctx = 2500\n[self_extend]\ngroup = 4\nwindow = 512\n'


@pytest.fixture(scope="module")
def text(corpus: Path) -> str:
    return (corpus / "alice.txt").read_text(encoding="utf-8")


def alone(spec: RunSpec, requests: list[dict], threads: int | None = None) -> list[str]:
    with open_engine(spec, workload=Workload("generate", 1, exact=True)) as e:
        return [e.complete(**r).text for r in requests]


def test_parallel_sequences_answer_as_each_does_alone(text: str, tmp_path: Path, monkeypatch) -> None:
    """Prompts of different lengths (past 512 cells: where llama.cpp's flash attention changes
    kernels), one restoring a snapshot another sequence saved, one cancelled mid-way."""
    monkeypatch.setenv("LOCALCTX_KV_CACHE_MIN_TOKENS", "64")
    spec = RunSpec(preset="native", ctx=2048, threads=2)
    with open_engine(spec, workload=EXACT4) as e:
        doc = e.tokenize(text[:2400])
        question = e.tokenize("\n\nWho is in the story?", add_bos=False)
        requests = [dict(tokens=e.tokenize(text[i * 3000 : i * 3000 + n]), max_tokens=24)
                    for i, n in enumerate((300, 2600))]
        requests.append(dict(tokens=doc + question, max_tokens=24, document_end=len(doc)))
        saved = e.generate_many([requests[2]])[0]  # the document's snapshot, saved from sequence 0
        assert saved.timings.saved_tokens == len(doc)
        e.reset_cache()
        steps = {"n": 0}
        doomed = e.start(tokens=e.tokenize(text[6000:7200]), max_tokens=24, should_stop=lambda: steps["n"] >= 5)
        runs = [e.start(**r) for r in requests]  # the snapshot is restored into sequence 3
        while e.scheduler.active:
            e.step()
            steps["n"] += 1
        assert runs[2].gen.timings.restored_tokens == len(doc) and runs[2].slot.seq == 3
        assert isinstance(doomed.error, Cancelled) and 0 < doomed.gen.timings.generated_tokens < 24
        batched = [r.gen.text for r in runs]
        assert not e.scheduler.runs and len(e.free_slots()) == 4  # every sequence is free again
    assert batched == alone(spec, requests)
    assert len(set(batched)) == 3 and all(batched)


def test_five_requests_on_four_sequences_queue_in_order(text: str) -> None:
    spec = RunSpec(preset="native", ctx=1024, threads=2, kv_cache=False)
    with open_engine(spec, workload=EXACT4) as e:
        requests = [dict(tokens=e.tokenize(text[i * 500 : i * 500 + 400]), max_tokens=8) for i in range(5)]
        texts = [g.text for g in e.generate_many(requests)]
        with pytest.raises(Exception, match=r"Every sequence of the 1,024-token window is busy \(4 of 4\)"):
            for r in requests:
                e.start(**r)
        for run in e.scheduler.runs:
            run.end(flush=False)
        e.scheduler.runs = []
    assert texts == alone(spec, requests)


def test_self_extend_groups_each_sequence_on_its_own(short_model: Path, text: str, tmp_path: Path) -> None:
    preset = tmp_path / "se.toml"
    preset.write_text(SE_PRESET)
    spec = RunSpec(model=str(short_model), preset=str(preset), threads=2, kv_cache=False)
    with open_engine(spec, workload=Workload("generate", 2, exact=True)) as e:
        long, short = e.tokenize(text[:9000])[:2000], e.tokenize(text[20000:21000])[:200]
        requests = [dict(tokens=long, max_tokens=16), dict(tokens=short, max_tokens=16)]
        runs = [e.start(**r) for r in requests]
        while e.scheduler.active:
            e.step()
        grouped = [r.slot.positions.grouped for r in runs]
        assert grouped[0] > 0 and grouped[1] == 0  # only the long one left the trained window
        assert e.max_position(runs[0].slot.seq) < SHORT_TRAINED <= len(long)
        batched = [r.gen.text for r in runs]
    assert batched == alone(spec, requests)


def test_auto_runs_two_steps_at_once_each_in_a_lane_of_its_own(short_model: Path, text: str) -> None:
    """auto with 2 sequences on the 1K-trained model: a short request (the 1,024-token step) and a
    long one (2,048) run in the same steps, each in a context of its own step over the same weights,
    each answering as it does alone. The lanes take no more memory than was planned (2 sequences and
    the spare stream at 4,096: 295 MiB; the 1,024 and 2,048 lanes 83 + 154): a 4,096 request (201 MiB
    for one sequence) does not fit beside both, so the idle 2,048 lane is freed and it gets the one
    sequence that fits beside the busy 1,024 lane; a second one waits."""
    spec = RunSpec(model=str(short_model), preset="auto", threads=2, kv_cache=False)
    with open_engine(spec, workload=Workload("generate", 2, exact=True)) as e:
        tokens = e.tokenize(text[:12000], add_bos=False)
        requests = [dict(tokens=tokens[:300], max_tokens=12), dict(tokens=tokens[300:1400], max_tokens=12)]
        runs = [e.start(**r) for r in requests]
        assert [r.gen.window for r in runs] == [1024, 2048]
        assert runs[0].slot.ctx is not runs[1].slot.ctx and runs[0].slot.ctx.model is runs[1].slot.ctx.model
        e.step()  # one step of the engine is one of each lane: both runs moved
        assert runs[0].first is not None and 0 < len(runs[1].slot.tokens) < 1100
        while e.running:
            e.step()
        batched = [r.gen.text for r in runs]
        assert e.windows.in_use() == [{"window": 1024, "sequences": 2, "running": 0},
                                      {"window": 2048, "sequences": 2, "running": 0}]
        stop = {"now": False}
        short = e.start(tokens=tokens[:300], max_tokens=200, should_stop=lambda: stop["now"])  # the 1,024 lane busy
        top = dict(tokens=tokens[:2100], max_tokens=16, should_stop=lambda: stop["now"])
        assert e.can_start(2100, 16)
        first = e.start(**top)  # the idle 2,048 lane is freed; 4,096 gets the cells left: one sequence
        assert (first.gen.window, first.slot.ctx.n_seq) == (4096, 1) and short.slot.ctx.n_seq == 2
        assert [w["window"] for w in e.windows.in_use()] == [1024, 4096] and not e.can_start(2100, 16)
        with pytest.raises(Exception, match=r"4,096-token window is busy \(1 of 1\)"):
            e.start(**top)
        stop["now"] = True
        e.step()
        assert not e.running and e.can_start(2100, 16)
    assert batched == alone(spec, requests) and all(batched)


def test_auto_lanes_serve_clients_of_two_windows_at_once(short_model: Path, tmp_path: Path, text: str) -> None:
    srv = start_server(tmp_path, "--model", str(short_model), "--preset", "auto", "--ctx", "4096", "--parallel", "2")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=300)
        short = client.completions.create(model="m", prompt="1, 2, 3, 4, 5, 6,", max_tokens=900, stream=True,
                                          temperature=0)  # the 1,024-token window
        next(iter(short))
        long = client.completions.create(model="m", prompt=text[:4800], max_tokens=8, stream=True,
                                         temperature=0)  # past 1,024 tokens: the 2,048 window
        next(iter(long))
        # A stream may begin before its request runs (its document evaluated, pinged meanwhile).
        deadline = time.monotonic() + 120
        while True:
            health = json.loads(urllib.request.urlopen(srv.url + "/health", timeout=30).read())
            if health["running"] == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert health["running"] == 2 and health["windows"] == [{"window": 1024, "sequences": 2, "running": 1},
                                                                {"window": 2048, "sequences": 2, "running": 1}]
        short.response.close()
        assert "".join(c.choices[0].text for c in long if c.choices)
    finally:
        srv.stop()


def test_exact_results_do_not_depend_on_threads(text: str) -> None:
    """llama.cpp's flash attention splits a lone query row's cells across threads (past 512
    cells); an exact engine never decodes a lone row. Without it the thread count shows."""
    found = {}
    for exact in (True, False):
        for threads in (1, 2):
            spec = RunSpec(preset="native", ctx=2048, threads=threads, kv_cache=False)
            with open_engine(spec, workload=Workload("generate", 1, exact=exact)) as e:
                g = e.complete(e.tokenize(text[:3000]), max_tokens=24)
                found[exact, threads] = (g.text, e.last_logits())
    assert found[True, 1][0] == found[True, 2][0]
    assert np.array_equal(found[True, 1][1], found[True, 2][1])
    assert not np.array_equal(found[False, 1][1], found[False, 2][1])  # the effect is real


def test_parallel_summaries_are_stored_and_reused(tmp_path: Path, text: str, monkeypatch) -> None:
    """parallel=3 summarizes every document as sequences of one batch, each summary the one it
    gets one at a time; a re-run does no model work."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(text[i * 4000 : i * 4000 + 1500])
    spec = RunSpec(preset="native", ctx=2048)
    options = SummarizeOptions(max_summary_tokens=48, parallel=3)
    first = summarize_batch([str(docs)], spec, options, out=tmp_path / "out")
    assert first.stats.model_loaded and first.stats.model_calls == 3
    assert len({r["summary"] for r in first.records}) == 3 and all(r["status"] == "ok" for r in first.records)
    again = summarize_batch([str(docs)], spec, options, out=tmp_path / "out")
    assert not again.stats.model_loaded and [r["summary"] for r in again.records] == [r["summary"] for r in first.records]
    monkeypatch.setenv("LOCALCTX_CACHE_DIR", str(tmp_path / "other-store"))
    single = summarize_batch([str(docs)], spec, replace(options, parallel=1), out=tmp_path / "out1")
    assert [r["summary"] for r in single.records] == [r["summary"] for r in first.records]


def test_parallel_option_is_validated(cli) -> None:
    assert_clean_error(cli("serve", "--parallel", "0"), "--parallel")
    assert_clean_error(cli("summarize", "x.txt", "--parallel", "257"), "--parallel")


# --- the server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("pserve"), "--parallel", "2")
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.stop()


def test_server_runs_clients_together_and_frees_a_disconnected_one(pserver: Server) -> None:
    client = openai.OpenAI(base_url=pserver.url + "/v1", api_key="none", max_retries=0, timeout=300)
    health = lambda: json.loads(urllib.request.urlopen(pserver.url + "/health", timeout=30).read())  # noqa: E731
    assert health()["parallel"] == 2
    first = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell a long story."}],
                                           max_tokens=200, stream=True, temperature=0)
    second = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Count to fifty."}],
                                            max_tokens=200, stream=True, temperature=0)
    next(iter(first)), next(iter(second))
    assert health()["running"] == 2  # both stream at once
    second.response.close()  # the client goes away: its sequence is freed at the next step
    third = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say hi."}],
                                           max_tokens=4, temperature=0)
    assert third.choices[0].message.content and third.usage.completion_tokens <= 4
    rest = "".join(c.choices[0].delta.content or "" for c in first if c.choices)
    assert rest  # the first went on beside them
    assert health()["running"] == 0


def test_a_shared_batch_gives_each_row_the_logits_it_gets_alone(text: str) -> None:
    """In an exact context a generated row's logits depend neither on its neighbours (in the next
    stream or a farther one, shorter or longer: padded to 512 or 768 cells) nor on the thread count:
    a sequence with one row gets a companion in its own stream (backend.Context). In a plain context
    they do: a lone row against 512 cells takes llama.cpp's thread-split kernel, a row beside
    another stream's does not."""
    from localctx.engine.backend import Context

    with open_engine(RunSpec(preset="native", ctx=2048, threads=2, kv_cache=False)) as e:
        model, params = e.model, e.params
        prompts = [e.tokenize(text[i * 3000 : i * 3000 + 2900])[: (470, 480, 530)[i]] for i in range(3)]
        extra = e.tokenize(" the cat sat on the mat", add_bos=False)

        def row_logits(streams: dict[int, int], n_seq: int, threads: int, exact: bool = True) -> list[np.ndarray]:
            ctx = Context(model, params, n_seq=n_seq, threads=threads, exact=exact)
            try:
                for seq, i in streams.items():
                    for at in range(0, len(prompts[i]), 512):
                        ctx.batch.clear()
                        for j, t in enumerate(prompts[i][at : at + 512]):
                            ctx.batch.add(t, at + j, seq, False)
                        ctx.decode(ctx.batch)
                pos, out = {s: len(prompts[i]) for s, i in streams.items()}, []
                for t in extra:
                    ctx.batch.clear()
                    rows = {s: ctx.batch.add(t, pos[s], s, True) for s in streams}
                    pos = {s: n + 1 for s, n in pos.items()}
                    ctx.decode(ctx.batch)
                    out.append(np.ctypeslib.as_array(ctx.logits(rows[0]), shape=(model.n_vocab,)).copy())
                return out
            finally:
                ctx.close()

        def moved(a: list[np.ndarray], b: list[np.ndarray]) -> float:
            return max(float(np.abs(x - y).max()) for x, y in zip(a, b))

        alone = row_logits({0: 0}, 1, 1)
        exact = {"alone of 4, 2 threads": row_logits({0: 0}, 4, 2), "next, 2 threads": row_logits({0: 0, 1: 1}, 4, 2),
                 "farther and longer, 1 thread": row_logits({0: 0, 2: 1, 3: 2}, 4, 1)}
        plain = moved(row_logits({0: 0}, 4, 2, exact=False), row_logits({0: 0, 1: 1}, 4, 2, exact=False))
    assert {name: moved(alone, rows) for name, rows in exact.items()} == dict.fromkeys(exact, 0.0)
    assert plain > 0.0  # the effect is real


def test_a_failed_decode_ends_its_runs_and_keeps_what_the_cells_hold(text: str, monkeypatch) -> None:
    """llama.cpp refusing a batch (no free cells, say): the runs in it end with the error, the
    others go on, and a sequence's tokens are still those its cells hold, so a later request
    reuses only a real prefix."""
    from localctx.engine import backend
    from localctx.errors import ResourceError

    spec = RunSpec(preset="native", ctx=1024, threads=2, kv_cache=False)
    with open_engine(spec, workload=Workload("generate", 2, exact=True)) as e:
        prompt = e.tokenize(text[:600])
        expected = e.complete(prompt, max_tokens=8).text
        real = backend.Context.decode

        def refuse(ctx, batch):
            raise ResourceError("llama.cpp found no free KV cells for this batch")

        monkeypatch.setattr(backend.Context, "decode", refuse)
        run = e.start(prompt + e.tokenize(" More text.", add_bos=False), max_tokens=8, seq=0, mixed=True)
        e.step()
        assert isinstance(run.error, ResourceError) and e.slot(0).tokens == prompt  # the cut kept the prompt
        monkeypatch.setattr(backend.Context, "decode", real)
        e.reset_cache()
        assert e.complete(prompt, max_tokens=8).text == expected


def test_windows_scored_together_get_the_logits_each_gets_alone(text: str) -> None:
    """Engine.logits_many: three windows as parallel sequences sharing batches, every row's logits
    bit-identical to the window scored alone. The lengths reach each of llama.cpp's flash-attention
    kernels (engine.scoring): a lone chunk of 200 rows cut in two (tiled), a tail of 18 rows (one row
    at a time), and a last token alone, in a sequence not next to the spare stream (split-KV unless
    it has a companion)."""
    spec = RunSpec(preset="native", ctx=1024, threads=2, kv_cache=False)
    with open_engine(spec, workload=Workload("score", 1, exact=True)) as e:
        tokens = e.tokenize(text[:9000])
        requests = [(tokens[i * 600 : i * 600 + n], list(range(n))) for i, n in enumerate((200, 513, 530))]
        alone = [e.logits_at(t, p) for t, p in requests]
    with open_engine(spec, workload=Workload("score", 3, exact=True)) as e:
        together = e.logits_many(requests)
        assert [s.tokens for s in e.lane.slots] == [t for t, _ in requests]  # left for reuse, as logits_at
    for a, b in zip(alone, together):
        assert np.array_equal(a, b), float(np.abs(a - b).max())
