"""The synthetic retrieval task: exact lengths, reproducible from the seed, the needle and question in place,
scoring by exact match; the accuracy benchmark's smoke mode writes JSON with provenance."""

from __future__ import annotations


import numpy as np
import pytest

from kascade_lite.data import load_tokenizer
from kascade_lite.model import dense_attention
from kascade_lite.models import smollm2_or_tiny
from kascade_lite.files import load_results
from kascade_lite.tasks import (KEYS, WORDINGS, RetrievalMethod, answer_case, extract_answer, make_case, make_cases,
                                value_span, wikitext_paragraphs)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.mark.parametrize("length", [300, 1024])
def test_cases_have_exact_length_and_hold_the_needle(length, tok) -> None:
    cases = make_cases(length, 3, seed=1, tokenizer=tok)
    for case in cases:
        assert case.ids.shape == (length,) and case.ids.dtype == np.int32
        text = tok.decode(case.ids.tolist())
        assert f"The special magic number for {case.key} is {case.answer}." in text
        assert text.rstrip().endswith(f"The special magic number for {case.key} is")
        assert text.count(case.answer) == 1 and 0 <= case.depth <= 1
        assert text.startswith("<|im_start|>system")
        start, end = case.needle
        assert tok.decode(case.ids[start:end].tolist()).strip() == f"The special magic number for {case.key} is {case.answer}."


@pytest.mark.parametrize("haystack, wording", [("noise", "fixed"), ("wikitext-test", "varied")])
def test_value_span_holds_the_answer_inside_the_needle(haystack, wording, tok) -> None:
    for case in make_cases(512, 3, seed=1, tokenizer=tok, haystack=haystack, wording=wording):
        start, end = value_span(case, tok)
        assert case.needle[0] < start < end < case.needle[1]
        assert tok.decode(case.ids[start:end].tolist()).strip() == case.answer


def test_cases_are_reproducible(tok) -> None:
    a, b = make_cases(400, 2, seed=3, tokenizer=tok), make_cases(400, 2, seed=3, tokenizer=tok)
    c = make_cases(400, 2, seed=4, tokenizer=tok)
    assert all(np.array_equal(x.ids, y.ids) for x, y in zip(a, b))
    assert not np.array_equal(a[0].ids, c[0].ids)


def test_distractors_use_other_keys(tok) -> None:
    case = make_case(600, np.random.default_rng(0), num_distractors=3, tokenizer=tok)
    text = tok.decode(case.ids.tolist())
    assert text.count("The special magic number for") == 4 + 1            # 4 needles + the answer prefix
    assert sum(text.count(f"number for {k} is") for k in KEYS if k != case.key) == 3


def test_the_published_filler_cases_are_regenerated_exactly(tok) -> None:
    """The default task (filler haystack, fixed wording) draws the same cases as the ones the shipped table
    answered: same answers and needle depths for the first cases at 2k."""
    shipped = next(r for r in load_results("accuracy_retrieval.json")["results"]
                   if r["length"] == 2048 and r["method"] == "dense")
    first = sorted(shipped["cases"], key=lambda c: c["index"])[:3]
    cases = make_cases(2048, 3, seed=0, tokenizer=tok)
    assert [(c["answer"], c["depth"]) for c in first] == [(c.answer, round(c.depth, 4)) for c in cases]


@pytest.mark.parametrize("haystack", ["wikitext-test", "wikitext-valid"])
def test_natural_text_cases_hold_one_needle_in_wikitext(haystack, tok) -> None:
    cases = make_cases(1024, 4, seed=1, tokenizer=tok, haystack=haystack, wording="varied")
    paragraphs = wikitext_paragraphs("test" if haystack == "wikitext-test" else "validation", tok)
    for case in cases:
        w = WORDINGS[case.wording]
        assert case.ids.shape == (1024,)
        text = tok.decode(case.ids.tolist())
        needle = w.needle.format(key=case.key, value=case.answer).strip()
        assert tok.decode(case.ids[case.needle[0]:case.needle[1]].tolist()).strip() == needle
        assert text.count(case.answer) == 1 and text.rstrip().endswith(w.answer.format(key=case.key))
        assert w.question.format(key=case.key) in text
        start, end = case.needle  # 20 haystack tokens on the longer side of the needle come from WikiText
        run = case.ids[end:end + 20] if case.depth < 0.5 else case.ids[start - 20:start]
        assert any(_contains(chunk, run.tolist()) for chunk in _windows(paragraphs)), "haystack is not WikiText"
    assert len({c.wording for c in cases}) > 1  # varied wording draws more than one template
    assert not any("<unk>" in tok.decode(c.ids.tolist()) for c in cases)


def _windows(paragraphs: list[list[int]]) -> list[list[int]]:
    """The paragraph stream in overlapping chunks (so a 20-token run that crosses a paragraph end is found)."""
    flat = [t for p in paragraphs for t in p]
    return [flat[i:i + 4096] for i in range(0, len(flat), 4000)]


def _contains(seq: list[int], run: list[int]) -> bool:
    n = len(run)
    return any(seq[i:i + n] == run for i in range(len(seq) - n + 1) if seq[i] == run[0])


def test_natural_text_cases_are_reproducible_and_differ_between_splits(tok) -> None:
    a = make_cases(512, 2, seed=3, tokenizer=tok, haystack="wikitext-test")
    b = make_cases(512, 2, seed=3, tokenizer=tok, haystack="wikitext-test")
    c = make_cases(512, 2, seed=3, tokenizer=tok, haystack="wikitext-valid")
    assert all(np.array_equal(x.ids, y.ids) for x, y in zip(a, b))
    assert not np.array_equal(a[0].ids, c[0].ids)
    assert all(case.wording == 0 for case in a)  # fixed wording: the first template


def test_unknown_haystack_or_wording_raises(tok) -> None:
    with pytest.raises(ValueError, match="unknown haystack"):
        make_case(512, np.random.default_rng(0), tokenizer=tok, haystack="books")
    with pytest.raises(ValueError, match="wording"):
        make_case(512, np.random.default_rng(0), tokenizer=tok, wording="random")


def test_too_short_raises(tok) -> None:
    with pytest.raises(ValueError, match="too short"):
        make_case(60, np.random.default_rng(0), tokenizer=tok)


def test_extract_answer() -> None:
    assert extract_answer(" 1234567.") == "1234567"
    assert extract_answer(" 12345678") is None
    assert extract_answer("It is 7654321, I think") == "7654321"
    assert extract_answer("no number") is None


def test_answer_case_scores_every_method(tok) -> None:
    """A tiny random model will not find the needle, but every case is answered and scored."""
    model = smollm2_or_tiny(smoke=True)
    dense = RetrievalMethod(dense_attention, dense_attention)
    res = [answer_case(model, case, {"dense": dense}, tokenizer=tok) for case in make_cases(200, 2, tokenizer=tok)]
    assert [sorted(r["dense"]) for r in res] == [["correct", "output", "seconds"]] * 2


def test_wilson_interval() -> None:
    from kascade_lite.tasks import wilson_interval

    low, high = wilson_interval(50, 100)
    assert low < 0.5 < high and abs((0.5 - low) - (high - 0.5)) < 1e-12 and 0.09 < high - low < 0.2
    assert wilson_interval(0, 10)[0] == 0.0 and 0.2 < wilson_interval(0, 10)[1] < 0.35
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] > 0.6
    with pytest.raises(ValueError, match="correct"):
        wilson_interval(3, 2)


def test_paired_outcomes_compare_only_the_shared_cases() -> None:
    from kascade_lite.tasks import paired_outcomes

    a = [dict(index=i, correct=ok) for i, ok in enumerate([True, True, False, False, True])]
    b = [dict(index=i, correct=ok) for i, ok in [(0, True), (1, False), (2, True), (3, False), (9, False)]]
    assert paired_outcomes(a, b) == (1, 1, 1, 1)   # case 4 (only in a) and case 9 (only in b) are not paired
    assert paired_outcomes(b, a) == (1, 1, 1, 1)
    assert paired_outcomes(a, a) == (3, 0, 0, 2)


def test_mcnemar_p_is_the_exact_binomial_test() -> None:
    from scipy import stats  # a dependency of jax

    from kascade_lite.tasks import mcnemar_p

    for only_a, only_b in [(0, 5), (5, 0), (1, 7), (7, 1), (3, 3), (10, 2), (0, 1)]:
        expected = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert mcnemar_p(only_a, only_b) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_p(0, 0) == 1.0
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_p(-1, 2)

