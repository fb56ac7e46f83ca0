"""Long-CoT cold-start data pipeline (Qwen3 report §4.1): pool, reasoner, filters, counts."""
import io
import json
from dataclasses import replace

import pytest
import torch

from qwen3repro.coldstart import filters as F
from qwen3repro.coldstart.pipeline import (ColdStartConfig, build_coldstart_dataset, counts_add_up, evaluate_outputs,
                                           heldout_queries, read_jsonl, REPORT_FILE)
from qwen3repro.coldstart.pool import build_pool
from qwen3repro.coldstart.reasoner import (CONCLUSION, DEFECTS, DefectRates, ModelGenerator, OpenAICompatibleGenerator,
                                           SyntheticReasoner, assemble, summary_text)
from qwen3repro.config import ConfigError
from qwen3repro.data import tasks
from qwen3repro.data.queries import NO_VERIFIER, Query
from qwen3repro.data.world import build_world



WORLD = build_world(0)
ITEM = tasks.generate("add", 3, 4)  # a 4-digit addition: 4-5 digit steps + the result line
VAL = tasks.generate("expr", 11, 3)


def clean(item=ITEM, lines=None, think_answer=None, summary_answer=None):
    lines = list(item.trace_steps) if lines is None else lines
    conclusion = CONCLUSION + (think_answer or item.answer)
    return assemble(lines + [conclusion], summary_text(item, summary_answer or item.answer))


@pytest.fixture(scope="module")
def detectors():
    return F.ResponseFilter(validation=[VAL], world=WORLD)


def only(flags, kind=None):
    return [k for k, v in flags.items() if v] == ([kind] if kind else [])


# ----------------------------------------------------------------------------- detectors on hand-made text
@pytest.mark.parametrize("family,seed,difficulty", [("add", 3, 4), ("mul", 1, 5), ("expr", 2, 3), ("code", 5, 3),
                                                    ("order", 7, 5)])
def test_clean_responses_pass_every_detector(detectors, family, seed, difficulty):
    item = tasks.generate(family, seed, difficulty)
    assert only(detectors.detect(clean(item), Query.from_task(item)))


def test_wrong_final_answer_is_caught(detectors):
    wrong = str(int(ITEM.answer) + 1)
    lines = list(ITEM.trace_steps[:-1]) + [ITEM.trace_steps[-1][: -len(ITEM.answer)] + wrong]
    assert only(detectors.detect(clean(lines=lines, think_answer=wrong, summary_answer=wrong), Query.from_task(ITEM)),
                "wrong_answer")


def test_substantial_repetition_is_caught(detectors):
    steps = list(ITEM.trace_steps)
    looped = steps[:2] + steps[1:3] * 6 + steps[3:]
    assert only(detectors.detect(clean(lines=looped), Query.from_task(ITEM)), "repetition")


def test_guesswork_is_caught(detectors):
    text = clean(lines=["this looks like roughly " + ITEM.answer])
    assert only(detectors.detect(text, Query.from_task(ITEM)), "guesswork")
    # A trace with half its steps missing is still too little reasoning for the difficulty.
    assert detectors.detect(clean(lines=[ITEM.trace_steps[-1]]), Query.from_task(ITEM))["guesswork"]


def test_thinking_summary_inconsistency_is_caught(detectors):
    other = str(int(ITEM.answer) + 10)
    assert only(detectors.detect(clean(think_answer=other), Query.from_task(ITEM)), "inconsistency")
    flags = detectors.detect(clean(summary_answer=other), Query.from_task(ITEM))
    assert flags["inconsistency"] and flags["wrong_answer"]


def test_language_mixing_is_caught(detectors):
    import random

    sentence = WORLD.render("Dorsk", WORLD.random_frame(random.Random(1)))
    lines = list(ITEM.trace_steps)
    lines.insert(2, sentence)
    assert only(detectors.detect(clean(lines=lines), Query.from_task(ITEM)), "language_mixing")
    # A query in that language licenses the language in the answer.
    q = replace(Query.from_task(ITEM), uid="x", question=sentence + "\n" + ITEM.question)
    assert not detectors.detect(clean(lines=lines), q)["language_mixing"]


def test_copy_of_a_validation_item_is_caught(detectors):
    lines = [f"this is like {VAL.question}", *VAL.trace_steps, f"which gives {VAL.answer}", *ITEM.trace_steps]
    assert only(detectors.detect(clean(lines=lines), Query.from_task(ITEM)), "validation_copy")


# ----------------------------------------------------------------------------- malformed output
@pytest.mark.parametrize("text", [
    "<think>\n1+2+0=3, write 3 carry 0\nso the answer is",  # cut before </think>
    "<think>\nok\n</think>\n\n<tool_call>\n{\"name\": \"calc\", \"arguments\": {broken\n</tool_call>\n"
    f"Answer: {ITEM.answer}",  # broken tool-call JSON before a right answer
    "<think>\nsteps\n</think>\n\nAnswer: ",  # empty answer
    "<think>\n</think>\n\n",
    "",
    ITEM.answer,  # no think block at all
])
def test_malformed_output_scores_wrong_without_crashing(detectors, text):
    q = Query.from_task(ITEM)
    assert F.score_response(text, q).score == 0.0
    assert detectors.detect(text, q)["wrong_answer"]
    assert evaluate_outputs([text], [q], detectors)["accuracy"] == 0.0


def test_a_correct_summary_answer_scores_one():
    assert F.score_response(clean(), Query.from_task(ITEM)).score == 1.0
    assert F.final_answer("In short: x.\nAnswer: 12") == "12" and F.final_answer("just 7\n") == "just 7"


# ----------------------------------------------------------------------------- query filter
def test_query_filter_rejects_with_counted_reasons():
    t = F.FilterThresholds()
    easy = Query.from_task(tasks.generate("add", 0, 2))
    hard = Query.from_task(ITEM)
    no_verifier = Query("n", "Write a poem about a dog.", "open_ended")
    multi = Query("m", "12+34=\nAlso answer this: 5*6=", "multi_question", verifier="task",
                  reference={"item": easy.item.to_dict()})
    near = Query.from_task(VAL)
    detectors = F.ResponseFilter(t, validation=[VAL], world=WORLD)
    solver = F.BoundedMentalSolver(max_steps=len(easy.item.trace_steps))
    kept, rejected = F.filter_queries([easy, hard, no_verifier, multi, near], solver, t, detectors)
    assert kept == [hard]
    assert rejected == {NO_VERIFIER: 1, "multiple_subquestions": 1, "near_validation": 1, "answered_without_cot": 1}


def test_subquestion_count():
    assert F.count_subquestions(ITEM.question) == 1
    assert F.count_subquestions(tasks.generate("code", 1, 4).question) == 1
    assert F.count_subquestions(tasks.generate("order", 1, 4).question) == 1
    assert F.count_subquestions("1+2=\nAlso answer this: 3*4=") == 2


# ----------------------------------------------------------------------------- precision / recall
def test_detector_metrics_by_hand():
    flags = [{"repetition": True}, {"repetition": True}, {"repetition": False}, {"repetition": False}, {}]
    labels = [{"repetition"}, set(), {"repetition"}, set(), {"repetition"}]
    m = F.detector_metrics(flags, labels, kinds=["repetition"])["repetition"]
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 2, 1)
    assert m["precision"] == pytest.approx(1 / 2) and m["recall"] == pytest.approx(1 / 3)
    assert F.detector_metrics([{}], [set()], kinds=["guesswork"])["guesswork"]["precision"] is None


# ----------------------------------------------------------------------------- reasoner and pipeline
def test_reasoner_labels_match_the_rates_and_clean_candidates_verify():
    pool = build_pool(n_queries=150, n_validation=10, distractor_rate=0.0, seed=1)
    rates = DefectRates(hard_query=0.0)
    cands = [c for cs in SyntheticReasoner(rates, validation=pool.validation).generate(pool.queries, 4) for c in cs]
    share = {d: sum(d in c.labels for c in cands) / len(cands) for d in DEFECTS}
    assert abs(share["repetition"] - rates.repetition) < 0.05
    queries = {q.uid: q for q in pool.queries}
    for c in cands:
        if not c.labels:
            assert F.score_response(c.text, queries[c.query_uid]).score == 1.0


def test_pipeline_counts_add_up_and_filtered_set_is_clean(tmp_path):
    cfg = ColdStartConfig(n_queries=120, n_validation=20, n_candidates=3, distractor_rate=0.2, seed=3)
    filtered, unfiltered, report = build_coldstart_dataset(cfg, out_dir=tmp_path)
    assert report["counts_add_up"] and counts_add_up(report)
    qf, rf = report["query_filter"], report["response_filter"]
    assert qf["input"] == 120 == qf["kept"] + sum(qf["rejected"].values())
    assert qf["rejected"][NO_VERIFIER] > 0 and qf["rejected"]["multiple_subquestions"] > 0
    assert report["generation"]["candidates"] == 3 * qf["kept"]
    assert rf["input"] == rf["removed"] + rf["clean"]
    assert len(filtered) == report["selection"]["filtered"] and len(unfiltered) == qf["kept"]
    rates = report["injected_defect_rates"]
    assert sum(rates["filtered"].values()) < sum(rates["unfiltered"].values())
    for det in report["detectors"].values():
        assert det["tp"] + det["fp"] + det["fn"] + det["tn"] == report["labelled_candidates"]
    on_disk = json.loads((tmp_path / REPORT_FILE).read_text())
    assert on_disk["selection"] == report["selection"]
    assert read_jsonl(tmp_path / "coldstart_filtered.jsonl") == filtered
    user, assistant = filtered[0]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert assistant["content"].startswith("<think>\n") and "\n</think>\n\n" in assistant["content"]


def test_heldout_queries_are_disjoint_from_the_pool():
    pool = build_pool(n_queries=100, n_validation=10, distractor_rate=0.0)
    held = heldout_queries(n_per_cell=1)
    used = {q.uid for q in pool.queries} | {v.uid for v in pool.validation}
    assert held and not ({q.uid for q in held} & used)


def test_config_is_strict():
    with pytest.raises(ConfigError, match="bogus"):
        ColdStartConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="wrong_anser"):
        ColdStartConfig.from_dict({"defect_rates": {"wrong_anser": 0.1}})
    with pytest.raises(ConfigError, match="repetition_ratio"):
        ColdStartConfig.from_dict({"thresholds": {"repetition_ratio": 0.1}})
    with pytest.raises(ConfigError, match="sum"):
        DefectRates(wrong_answer=0.6, repetition=0.6)


# ----------------------------------------------------------------------------- pluggable generators
def test_model_generator_on_a_micro_model():
    from qwen3repro.models.qwen3 import Qwen3
    from qwen3repro.models.registry import get_model_config
    from qwen3repro.tokenizer import train_tokenizer

    texts = [clean(tasks.generate(f, s, 3)) for f in ("add", "mul", "code", "order") for s in range(20)]
    tok = train_tokenizer(texts, 300)
    torch.manual_seed(0)
    model = Qwen3(get_model_config("micro").replace(eos_token_id=tok.endoftext_id, bos_token_id=None))
    q = Query.from_task(ITEM)
    gen = ModelGenerator(model, tok, max_new_tokens=6)
    (cands,) = gen.generate([q], 2, seed=0)
    assert len(cands) == 2 and all(c.labels is None for c in cands)
    for c in cands:  # untrained output is malformed: parsed, scored wrong, no crash
        assert F.score_response(c.text, q).score == 0.0
    reference = ModelGenerator(model, tok, max_new_tokens=4, enable_thinking=False)
    assert reference.answer(q).startswith("<think>\n\n</think>\n\n")
    assert F.reject_reason(q, reference.answer, F.FilterThresholds()) is None


def test_openai_compatible_generator_builds_the_request_without_network():
    gen = OpenAICompatibleGenerator("http://localhost:8000/v1/", "qwq-32b", api_key_env="COLDSTART_TEST_KEY")
    req = gen.build_request(Query.from_task(ITEM), 4, seed=7)
    body = json.loads(req.data)
    assert req.full_url == "http://localhost:8000/v1/chat/completions" and req.get_method() == "POST"
    assert body["n"] == 4 and body["model"] == "qwq-32b" and body["messages"][0]["content"] == ITEM.question

    class FakeResponse(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    payload = {"choices": [{"message": {"reasoning_content": "1+1=2", "content": "Answer: 2"}},
                           {"message": {"content": "<think>\nx\n</think>\n\n3"}}]}
    gen.opener = lambda request, timeout: FakeResponse(json.dumps(payload).encode())
    (cands,) = gen.generate([Query.from_task(ITEM)], 2)
    assert cands[0].text == "<think>\n1+1=2\n</think>\n\nAnswer: 2" and cands[1].text.endswith("3")


def test_bare_answer_summaries_pass_the_task_reward_and_the_filters(detectors):
    from qwen3repro.rewards import get_reward

    cfg = ColdStartConfig(n_queries=40, n_validation=5, n_candidates=2, summary_style="answer")
    filtered, _, report = build_coldstart_dataset(cfg)
    assert report["counts_add_up"] and filtered
    text = clean().rsplit("\n\n", 1)[0] + "\n\n" + ITEM.answer
    assert only(detectors.detect(text, Query.from_task(ITEM)))
    assert get_reward("task")(text, item=ITEM).score == 1.0
    with pytest.raises(ConfigError, match="summary_style"):
        ColdStartConfig(summary_style="essay")
