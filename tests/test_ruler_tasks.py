"""RULER-style synthetic tasks (evaluate/tasks.py over evaluate/haystack.py): each task's scorer on
hand-made answers, its generator with the real tokenizer (exact lengths, needles at the asked depth
in tokens, reproducible seeds, real distractors), the haystack pieces, and clean refusals."""
from __future__ import annotations

import random
import re
from collections import Counter
from itertools import accumulate

import pytest

from localctx.errors import InputError
from localctx.evaluate.haystack import MIN_HAYSTACK, NOISE, TooShort, essay_units, fill, haystack, nearest, place, sentences
from localctx.evaluate.answers import (exact_match, first_line, normalize_answer, string_match_all, string_match_part,
                                       token_f1)
from localctx.evaluate.tasks import FACTS, RETRIEVAL, TASKS, Build, Frame, parse_tasks, sample_rng, vocabulary

BOS = [1]  # a control token: tokenizing text never yields it, so a frame's tokens are easy to find
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QA_AFTER = ("\n\nAnswer the question based on the given documents. Only give me the answer and do not output any "
            "other words.\n\nQuestion: {question}")


@pytest.fixture(scope="module")
def tok(native_engine):
    return lambda s: native_engine.tokenize(s, add_bos=False)


@pytest.fixture(scope="module")
def detok(native_engine):
    return native_engine.detokenize


@pytest.fixture(scope="module")
def pride(corpus):
    text = (corpus / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    return sentences(text), vocabulary(text)


@pytest.fixture(scope="module")
def build(tok, pride):
    """build(task, length, ...) → a Sample over Pride and Prejudice, seeded as the evaluation seeds it."""
    def make(name, length, depth="auto", sample=0, frame=None, rng=None, words=None):
        task = TASKS[name]
        depth = (0.5 if task.uses_depth else None) if depth == "auto" else depth
        rng = rng or sample_rng(0, name, length, depth, sample)
        return task.build(Build(tok, frame or Frame(head=BOS), length, depth, rng, pride[0],
                                pride[1] if words is None else words))
    return make


# --- scorers on hand-made answers ----------------------------------------------------------------


def test_string_match_all_gives_partial_credit_case_insensitively():
    refs = ["1234567", "Blue-Teapot"]
    assert string_match_all("The numbers are 1234567 and blue-teapot.", refs) == 1.0
    assert string_match_all("Only 1234567.", refs) == 0.5
    assert string_match_all("I do not know.", refs) == 0.0
    assert string_match_all("BLUE-TEAPOT", ["blue-teapot", "a", "zz", "qq"]) == 0.5


def test_string_match_part_needs_any_one_reference():
    assert string_match_part("It is KOVENLI.", ["kovenli", "other"]) == 1.0
    assert string_match_part("It is Koven.", ["kovenli"]) == 0.0


@pytest.mark.parametrize("text, normal", [("The Blue, teapot!", "blue teapot"), ("  an  apple a day ", "apple day"),
                                          ("Theatre", "theatre"), ("1,234.", "1234")])
def test_normalize_answer_is_squads(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_ignores_case_articles_and_punctuation():
    assert exact_match("The blue teapot.", "blue Teapot") == 1.0
    assert exact_match("under the blue teapot", "blue teapot") == 0.0


@pytest.mark.parametrize("prediction, gold, f1", [
    ("under the blue teapot", "blue teapot", 0.8), ("The Blue teapot!", "blue teapot", 1.0),
    ("Teapot.", "blue teapot", 2 / 3), ("red kettle", "blue teapot", 0.0)])
def test_token_f1(prediction, gold, f1):
    assert token_f1(prediction, gold) == pytest.approx(f1)


def test_first_line_skips_blank_lines():
    assert first_line("\n  \n  Kovenli \nmore") == "Kovenli"
    assert first_line("   \n") == ""


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_scores_its_own_answers_1_and_a_refusal_0(build, name):
    sample = build(name, 1024)
    assert sample.answers and all(sample.answers)
    assert TASKS[name].score(" ".join(sample.answers), sample.answers)["score"] == 1.0
    assert TASKS[name].score("I do not know.", sample.answers)["score"] == 0.0


@pytest.mark.parametrize("name, given, total", [("niah_multivalue", 2, 4), ("niah_multiquery", 2, 4), ("cwe", 5, 10),
                                                ("fwe", 1, 3), ("vt", 2, 5)])
def test_multi_answer_tasks_give_partial_credit(build, name, given, total):
    sample = build(name, 1024)
    assert len(sample.answers) == total
    assert TASKS[name].score(", ".join(sample.answers[:given]), sample.answers)["score"] == pytest.approx(given / total)


def test_qa_scores_f1_of_the_first_line_and_records_exact_match():
    qa = TASKS["qa"]
    assert qa.score(" Blue teapot.\nIt was hidden there.", ["blue teapot"]) == {"score": 1.0, "em": 1.0, "match": 1.0}
    assert qa.score("under the blue teapot", ["blue teapot"]) == {"score": pytest.approx(0.8), "em": 0.0, "match": 1.0}
    assert qa.score("I do not know.\nblue teapot", ["blue teapot"]) == {"score": 0.0, "em": 0.0, "match": 1.0}
    assert qa.score("I do not know.", ["blue teapot"]) == {"score": 0.0, "em": 0.0, "match": 0.0}


# --- generators: seeds, exact lengths, frames ----------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_seeded_sample_is_reproducible(build, name):
    first, again, other = build(name, 1024), build(name, 1024), build(name, 1024, sample=1)
    assert (again.tokens, again.answers) == (first.tokens, first.answers)
    assert other.answers != first.answers and other.tokens != first.tokens


@pytest.mark.parametrize("length", [1024, 3000])
@pytest.mark.parametrize("name", list(TASKS))
def test_prompt_fills_the_length(build, name, length):
    """Prompt + generated tokens == length; the word lists fill it as closely as whole words allow."""
    sample = build(name, length)
    total = len(sample.tokens) + sample.gen_tokens
    if name in ("cwe", "fwe"):
        assert length - 40 <= total <= length
    else:
        assert total == length
    assert sample.tokens[:1] == BOS and 1 < sample.head_end < len(sample.tokens)


@pytest.mark.parametrize("name", list(TASKS))
def test_chat_frame_wraps_the_message_and_strips_the_prefix_space(build, tok, detok, name):
    """frame.head, the message, frame.tail, then the answer prefix: raw with its leading space,
    in a chat template without it (the template ends in a newline)."""
    head, tail = [1, 1], [2, 3]
    rng = lambda: random.Random(f"chat:{name}")  # noqa: E731  the same draws for both frames
    chat = build(name, 1024, frame=Frame(head, tail, chat=True), rng=rng())
    raw = build(name, 1024, frame=Frame(head, tail), rng=rng())
    prefixes = []
    for sample in (chat, raw):
        assert sample.tokens[:2] == head and sample.tokens.count(2) == sample.tokens.count(3) == 1
        at = len(sample.tokens) - sample.tokens[::-1].index(3)  # just after the tail
        assert sample.tokens[at - 2:at] == tail
        prefixes.append(sample.tokens[at:])
    assert detok(prefixes[1]).startswith(" ") and prefixes[0] == tok(detok(prefixes[1]).lstrip())
    if name not in ("cwe", "fwe"):
        assert len(chat.tokens) + chat.gen_tokens == 1024


# --- needles at the asked depth, in tokens -------------------------------------------------------


def _locate(sample, tok, detok, name):
    """The needle holding the first answer (its tokens) and the prompt's tokens after the context."""
    text, answer = detok(sample.tokens), sample.answers[0]
    if name == "qa":
        for fact, question, slot in FACTS:
            pattern = re.escape(fact.format(name="NAME", **{slot: answer})).replace("NAME", "([A-Z][a-z]+ [A-Z][a-z]+)")
            if found := re.findall(pattern, text):
                (who,) = found
                needle = " " + fact.format(name=who, **{slot: answer})
                return tok(needle), tok(QA_AFTER.format(question=question.format(name=who))) + tok(" Answer:")
        pytest.fail(f"no fact states {answer!r}")
    (key,) = re.findall(re.escape(NEEDLE).replace(r"\{key\}", r"(\S+)").replace(r"\{value\}", answer), text)
    sep = "\n" if name == "niah_single_1" else " "
    rest = (tok(f"\nWhat is the special magic number for {key} mentioned in the provided text?")
            + tok(f" The special magic number for {key} mentioned in the provided text is"))
    return tok(sep + NEEDLE.format(key=key, value=answer)), rest


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("name", ["niah_single_1", "niah_single_2", "qa"])
def test_first_needle_sits_at_the_asked_depth(build, tok, detok, name, depth):
    """The needle starts at the haystack's unit boundary nearest to depth × its tokens: the very
    start at 0, right before the question at 1, within half a unit elsewhere."""
    sample = build(name, 2048, depth=depth)
    needle, rest = _locate(sample, tok, detok, name)
    assert sample.tokens[len(sample.tokens) - len(rest):] == rest
    context = sample.tokens[sample.head_end:len(sample.tokens) - len(rest)]
    at = sample.needle_tokens[0] - sample.head_end
    assert context[at:at + len(needle)] == needle
    hay = context[:at] + context[at + len(needle):]
    n = len(hay)
    assert at / n == pytest.approx(sample.depths[0])
    if name == "niah_single_1":
        units = [tok("\n" + NOISE)] * (n // len(tok("\n" + NOISE)) + 1)
    else:  # the essay's sentences, re-read from the haystack's own text
        units = [tok(" " + s) for s in sentences(detok(hay))]
        assert detok(hay).startswith(" ")
    bounds = sorted({0, n, *(b for b in accumulate(len(u) for u in units) if b <= n)})
    assert at in bounds, "the needle splits a unit"
    assert abs(at - depth * n) <= max(len(u) for u in units) / 2
    assert at == nearest(bounds, depth * n)
    if depth == 0.0:
        assert at == 0
    if depth == 1.0:
        assert at == n


@pytest.mark.parametrize("name", ["niah_single_1", "niah_single_2", "niah_single_3", "niah_single_word", "qa"])
@pytest.mark.parametrize("sample", [0, 1, 2])
def test_single_answer_is_stated_exactly_once(build, detok, name, sample):
    s = build(name, 2048, sample=sample)
    (answer,) = s.answers
    assert detok(s.tokens).count(answer) == 1


# --- distractors and the word tasks --------------------------------------------------------------


def _needles(text):
    return re.findall(re.escape(NEEDLE).replace(r"\{key\}", r"(\S+)").replace(r"\{value\}", r"(\S+)"), text)


def test_multikey_1_hides_three_other_keys(build, detok):
    sample = build("niah_multikey_1", 2048)
    needles = _needles(detok(sample.tokens))
    assert len(sample.needle_tokens) == 4 and len(needles) == 4 and len({k for k, _ in needles}) == 4
    (answer,) = sample.answers
    (key,) = [k for k, v in needles if v == answer]
    assert f"special magic number for {key} mentioned" in detok(sample.tokens)


def test_multikey_2_haystack_is_made_of_distractor_needles(build, detok):
    sample = build("niah_multikey_2", 2048)
    needles = _needles(detok(sample.tokens[sample.head_end:]))
    assert len(needles) > 50 and len({v for _, v in needles}) == len(needles)
    assert [v for _, v in needles].count(sample.answers[0]) == 1


def test_multikey_2_distractors_never_reuse_the_asked_key(build, detok):
    """Sample 8 at 2,048 tokens (seed 0, depth 0.5): a distractor gives the asked key another value."""
    sample = build("niah_multikey_2", 2048, sample=8)
    text = detok(sample.tokens)
    (key,) = re.findall(r"What is the special magic number for (\S+) mentioned", text)
    assert [k for k, _ in _needles(text)].count(key) == 1


def test_multivalue_hides_four_values_of_the_asked_key(build, detok):
    sample = build("niah_multivalue", 2048)
    text = detok(sample.tokens)
    needles = _needles(text)
    assert len(sample.answers) == 4 and len(set(sample.answers)) == 4
    assert sorted(v for _, v in needles) == sorted(sample.answers) and len({k for k, _ in needles}) == 1
    assert f"special magic numbers for {needles[0][0]} mentioned" in text


def test_multiquery_asks_for_four_keys(build, detok):
    sample = build("niah_multiquery", 2048)
    text = detok(sample.tokens)
    values = dict(_needles(text))
    (query,) = re.findall(r"What are all the special magic numbers for (.+?) mentioned", text)
    keys = re.split(r", and |, ", query)
    assert len(keys) == 4 and len(set(keys)) == 4
    assert sample.answers == [values[k] for k in keys]


def test_vt_chain_is_in_order_and_the_answers_are_its_variables(build, detok):
    sample = build("vt", 2048)
    text = detok(sample.tokens).split("Memorize and track")[-1]  # past the worked example
    chain = re.findall(r"^VAR ([A-Z]+) = (.+)$", text, re.M)
    assert [name for name, _ in chain] == sample.answers and len(set(sample.answers)) == 5
    value = chain[0][1]
    assert re.fullmatch(r"\d{5}", value) and f"assigned the value {value} in the text above" in text
    assert [v for _, v in chain[1:]] == [f"VAR {name}" for name in sample.answers[:-1]]


@pytest.mark.parametrize("length", [1024, 4096])
def test_cwe_answers_are_the_most_common_words(build, detok, length):
    sample = build("cwe", length)
    listing = detok(sample.tokens).split("most often.\n")[-1].split("\nQuestion:")[0]
    items = re.findall(r"(\d+)\. (\w+)", listing)
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1)) and len(items) > 60
    counts = Counter(w for _, w in items)
    assert len(set(sample.answers)) == 10 and set(sample.answers) <= set(counts)
    others = [c for w, c in counts.items() if w not in sample.answers]
    assert others and min(counts[a] for a in sample.answers) > max(others)


@pytest.mark.parametrize("length", [1024, 3000])
def test_fwe_answers_are_the_second_to_fourth_most_frequent_words(build, detok, length):
    sample = build("fwe", length)
    coded = detok(sample.tokens).split("three most frequently appeared coded words. ")[1].split("\nQuestion:")[0]
    ranked = Counter(coded.split()).most_common()
    assert ranked[0][0] == "..." and ranked[0][1] > ranked[1][1]
    assert sorted(w for w, _ in ranked[1:4]) == sorted(sample.answers) and ranked[3][1] > ranked[4][1]


# --- the haystack pieces -------------------------------------------------------------------------


def test_fill_gives_exactly_the_budget_and_its_unit_boundaries():
    stream, bounds = fill(iter([[1, 2, 3], [4, 5], [6, 7, 8]]), 7)
    assert stream == [1, 2, 3, 4, 5, 6, 7] and bounds == [0, 3, 5, 7]
    stream, bounds = fill(iter([[1, 2], [3, 4]]), 4)
    assert stream == [1, 2, 3, 4] and bounds == [0, 2, 4]
    with pytest.raises(InputError, match="no tokens"):
        fill(iter([[1], []]), 5)


def test_place_keeps_order_at_one_boundary_and_maps_each_needle():
    stream = list(range(10))
    placed = place(stream, [0, 4, 7, 10], [(1.0, [90]), (0.5, [50, 51]), (0.45, [45])])
    assert placed.tokens == [0, 1, 2, 3, 50, 51, 45, 4, 5, 6, 7, 8, 9, 90]
    assert placed.starts == [13, 4, 6] and placed.depths == [1.0, 0.4, 0.4] and placed.haystack_tokens == 10


def test_nearest_takes_the_closer_boundary_and_the_lower_on_a_tie():
    assert nearest([0, 4, 10], 6) == 4 and nearest([0, 4, 10], 8) == 10 and nearest([0, 4, 10], 7) == 4
    assert nearest([0, 10], 5) == 0


def test_haystack_refuses_no_room_and_no_text(tok):
    with pytest.raises(TooShort, match="at least 17 tokens") as short:  # the needle and MIN_HAYSTACK
        haystack(iter([[1]] * 5), 0, [(0.5, [9])])
    assert short.value.needed == 1 + MIN_HAYSTACK
    with pytest.raises(InputError, match="no sentences"):
        next(essay_units(tok, [], random.Random(0)))


def test_sentences_split_at_ends_followed_by_a_capital():
    assert sentences("One.  Two!\n\nThree? four. 5 is\na number.") == ["One.", "Two!", "Three? four.", "5 is a number."]
    assert sentences('"Go." "Stay!" (He left.) Done') == ['"Go."', '"Stay!"', "(He left.)", "Done"]
    assert sentences("  \n ") == []


def test_sentences_do_not_split_after_a_title():
    assert sentences("It was Mr. Darcy. Mrs. Bennet sighed.") == ["It was Mr. Darcy.", "Mrs. Bennet sighed."]


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_too_short_length_is_a_clean_error(build, name):
    with pytest.raises(InputError, match=rf"Task {name} needs a length of at least [\d,]+ tokens; 64 is too short"):
        build(name, 64)


@pytest.mark.parametrize("name", list(TASKS))
def test_the_stated_minimum_length_builds(build, name):
    """The refusal's 'at least N tokens' is a length that works (for the same draws: ten tries)."""
    for seed in range(10):
        with pytest.raises(InputError) as refused:
            build(name, 64, rng=random.Random(seed))
        need = int(re.search(r"at least ([\d,]+)", str(refused.value)).group(1).replace(",", ""))
        sample = build(name, need, rng=random.Random(seed))
        assert len(sample.tokens) + sample.gen_tokens <= need


def test_parse_tasks():
    assert parse_tasks("all") == list(TASKS)
    assert parse_tasks("niah") == RETRIEVAL == [n for n in TASKS if n.startswith("niah_")] and len(RETRIEVAL) == 9
    assert parse_tasks(" vt, niah_single_1 ,vt,") == ["vt", "niah_single_1"]
    assert parse_tasks("qa,niah")[:2] == ["qa", "niah_single_1"]
    with pytest.raises(InputError, match="Unknown task 'nope'; choose from all, niah, niah_single_1"):
        parse_tasks("vt,nope")
    with pytest.raises(InputError, match="at least one task"):
        parse_tasks(" , ")


def test_cwe_refuses_a_text_with_too_few_distinct_words(build, pride):
    with pytest.raises(InputError, match="at least 51 distinct words; it has 39"):
        build("cwe", 1024, words=pride[1][:39])


@pytest.mark.parametrize("words", [40, 45, 50])
def test_cwe_never_builds_a_sample_without_ten_answers_and_distractors(build, detok, pride, words):
    try:
        sample = build("cwe", 1024, words=pride[1][:words])
    except InputError:
        return  # a clean refusal is fine
    assert len(sample.answers) == 10 and TASKS["cwe"].score("", sample.answers)["score"] == 0.0
    listing = detok(sample.tokens).split("most often.\n")[-1].split("\nQuestion:")[0]
    assert set(re.findall(r"\d+\. (\w+)", listing)) - set(sample.answers)  # some words are not answers
