"""verl data and reward (qwen3repro.verl.data, qwen3repro.verl.reward), in the main environment.

* `compute_score` equals our reward registry on a corpus of responses: every data-source kind, thinking and
  non-thinking, right, wrong, malformed and wrong-mode answers, tool trajectories (well-formed and malformed
  calls), as written (special tokens in) and as verl decodes them (special tokens skipped). The reference is
  what our stages compute: `rl.rollout.verifier_score` for reasoning RL and distillation, and general RL's
  `Scorer.score` on the same trajectory (format gate, malformed-call penalty, valid-call bonus).
* a tool response that holds the right answer earns nothing; the final turn does.
* the parquet round-trips through pyarrow and datasets, and each row's messages render with our chat template to
  the very prompt tokens our stages feed the model.
"""
from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qwen3repro.chat import EMPTY_THINK, render
from qwen3repro.data import general_tasks
from qwen3repro.data.queries import Query
from qwen3repro.data.world import build_world
from qwen3repro.rewards import judge as judge_module
from qwen3repro.rl.rollout import verifier_score
from qwen3repro.stages import general_rl
from qwen3repro.tools.rollout import Trajectory, tool_response_text
from qwen3repro.verl import data as verl_data
from qwen3repro.verl import reward as verl_reward
from qwen3repro.verl.reward import FIELDS, RewardConfigError, compute_score

SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
MODEL_TASKS = ("write_person", "write_city")


def decoded(text: str) -> str:
    """`text` as verl's reward managers decode its tokens (skip_special_tokens=True)."""
    for token in SPECIALS:
        text = text.replace(token, "")
    return text


def query_of(row: dict) -> Query:
    truth = json.loads(row["reward_model"]["ground_truth"])
    return Query(row["extra_info"]["uid"], row["prompt"][-1]["content"], row["extra_info"]["task"],
                 verifier=truth["reward"], reference=truth["reference"], tools=tuple(truth.get("tools", ())))


def turn_body(message: dict) -> str:
    """One assistant message as the model writes it (the template's rendering, ending with <|im_end|>)."""
    text = render([{"role": "user", "content": "q"}, message])
    return text.split("<|im_start|>assistant\n", 1)[1].rstrip("\n")


class _Judge(BaseHTTPRequestHandler):
    """A judge that scores 8/10, or answers without a score when the response says "unscorable"."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        verdict = "I cannot tell." if "unscorable" in body["messages"][0]["content"] else "Agrees.\nScore: 8"
        out = json.dumps({"choices": [{"message": {"content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def general_rows():
    # One held-out row of every task of the mixture (the validation split holds each task).
    return verl_data.stage_rows("general-rl", n=4, n_val=1)["val"]


@pytest.fixture(scope="module")
def world():
    return build_world(0)


def general_cases(row: dict, world) -> list[tuple[str, Trajectory]]:
    """(response text, the trajectory our rollouts would hold for it) for one general-RL row."""
    query = query_of(row)
    task = general_tasks.GENERAL_TASKS[row["extra_info"]["task"]]
    thinking = row["extra_info"]["thinking"]
    demo = task.demonstrate(query, world)
    if thinking and "thinking" not in query.reference:
        demo = general_tasks.thinking_demonstration(query, demo)
    wrong_mode = EMPTY_THINK if thinking else "<think>\nI think first.\n</think>\n\n"
    head = "<think>\nSo.\n</think>\n\n" if thinking else EMPTY_THINK
    replies = [m for m in demo if m["role"] in ("assistant", "tool")]
    final = turn_body(replies[-1])
    answer = final.split("</think>", 1)[1].lstrip("\n").removesuffix("<|im_end|>")
    finals = [final, head + "something else entirely<|im_end|>", "<think>\nnever closed " + answer,
              wrong_mode + answer + "<|im_end|>", head + answer + "\n\nAnswer: " + answer + "<|im_end|>"]
    cases = []
    if len(replies) == 1:
        cases += [(text, Trajectory(prompt=[], turns=[text])) for text in finals]
    else:
        call_turn, tool_message = turn_body(replies[0]), replies[1]
        span = tool_response_text([tool_message["content"]])
        for text in finals:
            cases.append((call_turn + span + text, Trajectory(prompt=[], turns=[call_turn, text],
                                                              calls=[{"outcome": "ok"}])))
        # A malformed call, answered as our environment answers it, then the right answer.
        bad_turn = head + '<tool_call>\n{"name": "lookup", "arguments": \n</tool_call><|im_end|>'
        error = "Error: invalid tool call (invalid JSON). Write a JSON object."
        cases.append((bad_turn + tool_response_text([error]) + final,
                      Trajectory(prompt=[], turns=[bad_turn, final], calls=[{"outcome": "invalid_call"}])))
        # A call the tool could not answer, then the right answer: no bonus.
        failed = "Error: lookup: missing required argument(s) 'name'."
        cases.append((call_turn + tool_response_text([failed]) + final,
                      Trajectory(prompt=[], turns=[call_turn, final], calls=[{"outcome": "bad_arguments"}])))
    return cases


def assert_same(got: dict, expected: float | None, where) -> None:
    assert set(got) == set(FIELDS), where
    if expected is None or (isinstance(expected, float) and math.isnan(expected)):
        assert got["score"] == 0.0 and got["no_reward"] == 1.0, (where, got)
    else:
        assert got["score"] == pytest.approx(expected, abs=1e-12), (where, got)
        assert got["no_reward"] == 0.0, (where, got)


def test_general_rl_scores_equal_the_stage_scorer(general_rows, world, judge_url, monkeypatch):
    monkeypatch.setenv(verl_reward.JUDGE_URL_ENV, judge_url)
    cfg = general_rl.GeneralRLConfig.from_dict(verl_data.split_recipe(verl_data.load_recipe("general-rl"))[1])
    scorer = general_rl.Scorer(cfg)
    judge_module.configure_judge(judge_module.JudgeClient(judge_module.JudgeSettings(base_url=judge_url,
                                                                                     model="judge")))
    tasks_seen, modes_seen, scores_seen = set(), set(), set()
    try:
        for row in general_rows:
            task = row["extra_info"]["task"]
            if task in MODEL_TASKS:
                continue
            query = query_of(row)
            prompt = general_rl.Prompt(query, tuple(row["prompt"]), row["extra_info"]["mode"], ())
            cases = general_cases(row, world)
            if task == "code_write":
                cases = cases[:2]  # each code reward runs two sandboxes: a right and a wrong answer suffice
            for text, trajectory in cases:
                expected, _ = scorer.score(prompt, trajectory)
                for form in (text, decoded(text)):
                    got = compute_score(row["data_source"], form, row["reward_model"]["ground_truth"],
                                        row["extra_info"])
                    assert_same(got, expected, (task, form))
                scores_seen.add(round(expected, 3) if not math.isnan(expected) else None)
            tasks_seen.add(task)
            modes_seen.add(row["extra_info"]["thinking"])
    finally:
        judge_module.configure_judge(None)
    assert tasks_seen == set(general_tasks.GENERAL_TASKS) - set(MODEL_TASKS)
    assert modes_seen == {True, False}
    # The corpus reaches the shaping: the bonus (1.2), a penalty (0.95), the gate and plain rewards.
    assert {0.0, 1.0, 1.2, 0.95} <= scores_seen, scores_seen


@pytest.mark.parametrize("stage", ["reasoning-rl", "distill-online"])
def test_task_scores_equal_the_verifier(stage):
    rows = verl_data.stage_rows(stage, n=12, n_val=2)
    for row in rows["train"] + rows["val"]:
        query = query_of(row)
        answer = query.reference["item"]["answer"]
        trace = "\n".join(query.reference["item"]["trace_steps"])
        responses = [f"<think>\n{trace}\n</think>\n\n{answer}<|im_end|>", f"{EMPTY_THINK}{answer}",
                     f"<think>\n{trace}\n</think>\n\n{answer}0", f"<think>\n{trace}", "", "</think>",
                     f"<think>\na\n</think>\n\n<think>\nb\n</think>\n\n{answer}",
                     f"{EMPTY_THINK}<tool_call>\n{{bad\n</tool_call>"]
        for text in responses:
            expected = verifier_score(query, text, []).score
            for form in (text, decoded(text)):
                got = compute_score(row["data_source"], form, row["reward_model"]["ground_truth"], row["extra_info"])
                assert_same(got, expected, (row["data_source"], form))
                assert got["acc"] == float((expected or 0.0) >= 0.5)


def test_tool_response_holding_the_answer_earns_nothing(general_rows, world):
    for row in general_rows:
        truth = json.loads(row["reward_model"]["ground_truth"])
        if not truth["tools"]:
            continue
        answer = truth["reference"]["answer"]
        call = turn_body(general_tasks.GENERAL_TASKS[row["extra_info"]["task"]].demonstrate(query_of(row), world)[1])
        head = "<think>\nSo.\n</think>\n\n" if row["extra_info"]["thinking"] else EMPTY_THINK
        leaks = [
            call + tool_response_text([answer]),  # the trajectory ends with the tool's answer
            call + tool_response_text([answer]) + head + "I do not know.<|im_end|>",
            call + tool_response_text([f"The answer is {answer}."]) + head + "<|im_end|>",
            call + "\n<|im_start|>user\n<tool_response>\n" + answer,  # cut inside the tool response
        ]
        for text in leaks:
            for form in (text, decoded(text)):
                got = compute_score(row["data_source"], form, row["reward_model"]["ground_truth"], row["extra_info"])
                assert got["task_score"] == 0.0, (form, got)
                assert got["score"] <= truth["shaping"]["valid_call_bonus"], (form, got)
        right = call + tool_response_text([answer]) + head + answer + "<|im_end|>"
        assert compute_score(row["data_source"], decoded(right), row["reward_model"]["ground_truth"],
                             row["extra_info"])["task_score"] == 1.0


def test_model_turns_split_at_tool_turns():
    call = '<think>\n\n</think>\n\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call><|im_end|>'
    two = tool_response_text(["one", "two"])  # two calls answered in one user turn
    text = call + two + "<think>\n\n</think>\n\nfinal<|im_end|>"
    for form in (text, decoded(text)):
        assert verl_reward.tool_responses(form) == ["one", "two"]
        turns = verl_reward.model_turns(form)
        assert len(turns) == 2 and turns[1].startswith("<think>") and "final" in turns[1]
        assert "<tool_response>" not in "".join(turns)


def test_no_reward_is_zero_flagged_and_counted(general_rows, judge_url, monkeypatch):
    monkeypatch.setenv(verl_reward.JUDGE_URL_ENV, judge_url)
    row = next(r for r in general_rows if r["extra_info"]["task"] == "judge_profile")
    head = "<think>\nSo.\n</think>\n\n" if row["extra_info"]["thinking"] else EMPTY_THINK
    verl_reward.reset_no_reward_counts()
    got = compute_score(row["data_source"], head + "unscorable", row["reward_model"]["ground_truth"], row["extra_info"])
    assert got["score"] == 0.0 and got["no_reward"] == 1.0 and "no_score" in got["reason"]
    assert sum(verl_reward.no_reward_counts().values()) == 1
    assert any(c["no_score"] == 1 for c in verl_reward.judge_stats().values())
    scored = compute_score(row["data_source"], head + "A baker.", row["reward_model"]["ground_truth"], row["extra_info"])
    assert scored["task_score"] == pytest.approx(0.8) and scored["no_reward"] == 0.0
    # The server can come from verl's reward_kwargs instead of the environment.
    monkeypatch.delenv(verl_reward.JUDGE_URL_ENV)
    by_kwargs = compute_score(row["data_source"], head + "A baker.", row["reward_model"]["ground_truth"],
                              row["extra_info"], judge_base_url=judge_url, judge_model="judge")
    assert by_kwargs["task_score"] == pytest.approx(0.8)


def test_model_rewards_without_their_server_are_configuration_errors(general_rows, monkeypatch):
    monkeypatch.delenv(verl_reward.JUDGE_URL_ENV, raising=False)
    monkeypatch.delenv(verl_reward.REWARD_MODEL_DIR_ENV, raising=False)
    for task in ("judge_compare_ages", "write_city"):
        row = next(r for r in general_rows if r["extra_info"]["task"] == task)
        assert row["reward_model"]["style"] == "model"
        with pytest.raises(RewardConfigError, match="QWEN3REPRO_"):
            compute_score(row["data_source"], EMPTY_THINK + "x", row["reward_model"]["ground_truth"], row["extra_info"])


def test_ifeval_rows_report_strict_and_loose(general_rows):
    row = next(r for r in general_rows if r["extra_info"]["task"] == "if_combined")
    got = compute_score(row["data_source"], "<think>\nok\n</think>\n\nhello", row["reward_model"]["ground_truth"],
                        row["extra_info"])
    assert 0.0 <= got["ifeval_loose"] <= 1.0 and got["ifeval_loose"] >= got["task_score"]
    other = next(r for r in general_rows if r["extra_info"]["task"] == "add")
    assert compute_score(other["data_source"], "x", other["reward_model"]["ground_truth"])["ifeval_loose"] is None


def test_foreign_rows_are_refused():
    with pytest.raises(ValueError, match="not one of ours"):
        compute_score("openai/gsm8k", "42", "42")
    with pytest.raises(ValueError, match="ground_truth is not ours"):
        compute_score("qwen3repro/reasoning/add", "42", "42")


# ----------------------------------------------------------------------------- parquet
@pytest.fixture(scope="module")
def tokenizer():
    from qwen3repro.tokenizer import train_tokenizer

    texts = [q.question for _, q in general_tasks.sample_task_queries(general_tasks.default_weights(), 120, seed=1,
                                                                      heldout=False)]
    return train_tokenizer(texts * 2, 700)


@pytest.mark.parametrize("stage", ["reasoning-rl", "general-rl", "distill-online"])
def test_parquet_round_trips_and_renders_the_stage_prompts(stage, tmp_path, tokenizer, world):
    import datasets
    import pyarrow.parquet as pq

    from qwen3repro.rl import rollout
    from qwen3repro.stages import onpolicy_distill

    meta = verl_data.write_stage(stage, tmp_path, n=20, n_val=1)
    rows = verl_data.stage_rows(stage, n=20, n_val=1)
    env = general_tasks.tool_environment(world)
    for split in ("train", "val"):
        table = pq.read_table(tmp_path / f"{split}.parquet")
        assert {"data_source", "prompt", "ability", "reward_model", "extra_info", "agent_name"} <= set(table.column_names)
        assert str(table.schema.field("prompt").type) == "list<element: struct<role: string, content: string>>"
        assert str(table.schema.field("reward_model").type) == "struct<style: string, ground_truth: string>"
        back = datasets.load_dataset("parquet", data_files=str(tmp_path / f"{split}.parquet"))["train"]
        assert len(back) == len(rows[split]) == meta["files"][f"{split}.parquet"]["rows"]
        for original, row in zip(rows[split], back):
            assert row == original  # every value survives, nested dicts and lists included
            query = query_of(row)
            mode = row["extra_info"]["mode"]
            if stage == "reasoning-rl":
                expected = rollout.prompt_ids(tokenizer, query)
            elif stage == "distill-online":
                expected = onpolicy_distill.prompt_ids(tokenizer, stage_query(query, row), mode) \
                    if mode != "unflagged" else rollout.prompt_ids(tokenizer, query)
            else:
                in_system = row["prompt"][0]["role"] == "system"
                source = stage_query(query, row, general=True)
                expected = list(general_rl.build_prompt(source, mode, in_system, tokenizer, env).ids)
            schemas = env.schemas(list(query.tools)) if query.tools else None
            assert tokenizer.encode(verl_data.prompt_text(row, schemas)) == expected, row["prompt"]


def stage_query(query: Query, row: dict, general: bool = False) -> Query:
    """The query as the stage holds it: the user turn without the flag the row appended to it (a general-RL
    format task's question carries its own flags, and a flag in a system message is not in the user turn)."""
    import dataclasses

    question = row["prompt"][-1]["content"]
    appended = not general or (row["prompt"][0]["role"] != "system" and "thinking" not in query.reference
                               and row["extra_info"]["mode"] != "unflagged")
    return dataclasses.replace(query, question=question.rsplit(" ", 1)[0] if appended else question)


def test_cli_writes_the_files(tmp_path, capsys):
    assert verl_data.main(["--stage", "distill-online", "--out", str(tmp_path), "--n", "3", "--n-val", "2"]) == 0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["files"]["train.parquet"]["rows"] == 6 and meta["files"]["val.parquet"]["rows"] == 2
    assert "train.parquet" in capsys.readouterr().out
