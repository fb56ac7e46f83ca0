"""The judge's transport: `qwen3repro serve` (a real loopback HTTP server over a random micro model) and
the judge reward's client (against that server, and against a scripted fake judge for every outcome)."""
from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from qwen3repro import serve as serve_module
from qwen3repro.chat_cli import complete_chat
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
from qwen3repro.rewards import get_reward
from qwen3repro.rewards.judge import OUTCOMES, JudgeClient, JudgeSettings, JudgeStats, configure_judge, judge_prompt
from qwen3repro.serve import ChatCompletions, make_server
from qwen3repro.tokenizer import train_tokenizer


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return Qwen3(get_model_config("micro")).eval()


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 6))) for _ in range(200)]
    words += ["Score", ":", "Problem", "Reference", "answer", "Response", "\n\n"]
    corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)]
    return train_tokenizer(corpus, 400)


def _serve_in_thread(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def served(micro, tok):
    app = ChatCompletions(micro, tok, model_name="micro", max_tokens=8)
    server = make_server(app, "127.0.0.1", 0)
    yield _serve_in_thread(server)
    server.shutdown()
    server.server_close()


def call(url: str, body=None, *, raw: bytes | None = None, method: str | None = None, headers=None):
    """(status, parsed JSON body) of one request; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


MESSAGES = [{"role": "user", "content": "abc def"}]


# ------------------------------------------------------------------------------- the server
def test_chat_completion_has_openai_shape_and_matches_the_chat_code_path(served, micro, tok):
    body = {"model": "micro", "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "seed": 0,
            "chat_template_kwargs": {"enable_thinking": False}}
    status, out = call(served + "/v1/chat/completions", body)
    assert status == 200, out
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["model"] == "micro" and isinstance(out["created"], int)
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["role"] == "assistant" and choice["message"]["reasoning_content"] is None
    usage = out["usage"]
    assert 1 <= usage["completion_tokens"] <= 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # The server's answer is `qwen3 chat`'s answer for the same settings (greedy, so the same text).
    turn = complete_chat(micro, tok, MESSAGES, thinking=False, temperature=0.0, max_new_tokens=4)
    assert choice["message"]["content"] == turn["content"]
    assert usage["prompt_tokens"] == turn["prompt_tokens"]

    thinking = dict(body, chat_template_kwargs={"enable_thinking": True})
    status, out = call(served + "/v1/chat/completions", thinking)
    assert status == 200 and isinstance(out["choices"][0]["message"]["reasoning_content"], str)


def test_models_and_health(served):
    status, out = call(served + "/v1/models")
    assert status == 200 and [m["id"] for m in out["data"]] == ["micro"] and out["object"] == "list"
    assert call(served + "/health") == (200, {"status": "ok"})


@pytest.mark.parametrize("body, raw, status, param", [
    (None, b"{not json", 400, None),
    (None, b"\xff\xfe", 400, None),
    ([1, 2], None, 400, None),
    ({"max_tokens": 2}, None, 400, "messages"),
    ({"messages": []}, None, 400, "messages"),
    ({"messages": "hi"}, None, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, None, 400, "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, None, 400, "messages"),
    ({"messages": MESSAGES, "max_tokens": 10_000}, None, 400, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": True}, None, 400, "max_tokens"),
    ({"messages": MESSAGES, "temperature": "hot"}, None, 400, "temperature"),
    ({"messages": MESSAGES, "top_p": 0}, None, 400, "top_p"),
    ({"messages": MESSAGES, "stop": [1]}, None, 400, "stop"),
    ({"messages": MESSAGES, "n": 2}, None, 400, "n"),
    ({"messages": MESSAGES, "stream": True}, None, 400, "stream"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": "no"}}, None, 400, "chat_template_kwargs"),
    ({"messages": MESSAGES, "model": "gpt-4"}, None, 404, "model"),
])
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(served, body, raw, status, param):
    got, out = call(served + "/v1/chat/completions", body, raw=raw)
    assert got == status, out
    error = out["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    assert call(served + "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})[0] == 200


def test_unknown_route_and_oversized_body(served):
    assert call(served + "/v1/completions", {"prompt": "x"})[0] == 404
    assert call(served + "/nothing")[0] == 404
    too_long = {"Content-Length": str(serve_module.MAX_BODY_BYTES + 1)}
    request = urllib.request.Request(served + "/v1/chat/completions", data=b"{}", headers=too_long, method="POST")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 413


def test_a_failing_generation_is_a_500_and_the_server_goes_on(served, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the engine broke")

    monkeypatch.setattr(serve_module, "complete_chat", broken)
    status, out = call(served + "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
    assert status == 500 and out["error"]["type"] == "server_error" and "engine broke" in out["error"]["message"]
    monkeypatch.undo()
    assert call(served + "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})[0] == 200


def test_stop_strings_cut_the_answer(served, monkeypatch):
    def scripted(model, tokenizer, messages, **kwargs):
        return {"reasoning_content": "", "content": "one two STOP three", "finish_reason": "length",
                "prompt_tokens": 5, "completion_tokens": 8}

    monkeypatch.setattr(serve_module, "complete_chat", scripted)
    body = {"messages": MESSAGES, "stop": ["XYZ", "STOP"], "chat_template_kwargs": {"enable_thinking": False}}
    out = call(served + "/v1/chat/completions", body)[1]
    assert out["choices"][0]["message"]["content"] == "one two " and out["choices"][0]["finish_reason"] == "stop"
    out = call(served + "/v1/chat/completions", dict(body, stop="nowhere"))[1]
    assert out["choices"][0]["message"]["content"] == "one two STOP three"
    assert out["choices"][0]["finish_reason"] == "length"


def test_serve_command_prints_its_url_and_serves(micro, tok, tmp_path):
    from click.testing import CliRunner

    from qwen3repro.cli import main

    assert "--port" in CliRunner().invoke(main, ["serve", "--help"]).output
    micro.save_pretrained(tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt")
    process = subprocess.Popen([sys.executable, "-m", "qwen3repro.cli", "serve", str(tmp_path / "ckpt"), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        status, out = call(match.group(0) + "/models")
        assert status == 200 and out["data"][0]["id"] == "ckpt"
    finally:
        process.terminate()
        process.wait(timeout=30)


# ------------------------------------------------------------------------ the judge client, real server
def test_judge_client_against_the_served_micro_model(served):
    judge = JudgeClient(JudgeSettings(base_url=served + "/v1", model="micro", max_tokens=4, timeout=30, retries=0))
    result = judge.score("What is 2+2?", "4", "<think>\nadd\n</think>\n\n4")
    counts = judge.stats.counts()
    # A random model writes no score: the request went through and came back, and the answer is no reward.
    assert result.score is None and "no_score" in result.reason
    assert counts["no_score"] == 1 and sum(counts[o] for o in OUTCOMES) == 1


# ------------------------------------------------------------------------ the judge client, fake judge
class FakeJudge:
    """A scripted judge: the problem text of each request picks the reply."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.seen: dict[str, int] = {}
        self.in_flight = self.most_in_flight = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                problem = re.search(r"\[Problem\]\n(.*?)\n", prompt).group(1)
                with fake.lock:
                    fake.requests.append({"body": body, "prompt": prompt, "auth": self.headers.get("Authorization")})
                    fake.seen[problem] = fake.seen.get(problem, 0) + 1
                    attempt = fake.seen[problem]
                    fake.in_flight += 1
                    fake.most_in_flight = max(fake.most_in_flight, fake.in_flight)
                try:
                    status, payload = fake.reply(problem, attempt)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (the slow case)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = _serve_in_thread(self.server) + "/v1"

    @staticmethod
    def completion(text: str) -> bytes:
        return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()

    def reply(self, problem: str, attempt: int) -> tuple[int, bytes]:
        if problem == "good":
            return 200, self.completion("It matches the reference.\nScore: 7")
        if problem == "two":
            return 200, self.completion("Score: 2 at first sight, but on reflection it is right.\nScore: 9")
        if problem == "thinking":
            return 200, self.completion("<think>\nScore: 1\n</think>\n\nRight.\nScore: 8")
        if problem == "none":
            return 200, self.completion("I cannot tell.")
        if problem == "garbage":
            return 200, b"<html>certainly not json"
        if problem == "slow":
            time.sleep(1.0)
            return 200, self.completion("Score: 10")
        if problem == "flaky":
            return (500, b"overloaded") if attempt == 1 else (200, self.completion("Score: 10"))
        if problem == "down":
            return 503, b"unavailable"
        if problem == "forbidden":
            return 403, b"no"
        if problem.startswith("many"):
            time.sleep(0.05)
            return 200, self.completion("Score: 5")
        raise AssertionError(problem)


@pytest.fixture
def fake():
    judge = FakeJudge()
    yield judge
    judge.server.shutdown()
    judge.server.server_close()


def _client(base_url: str, **settings) -> tuple[JudgeClient, list[float]]:
    sleeps: list[float] = []
    fields = dict(base_url=base_url, model="judge", timeout=5.0, retries=2, backoff=0.01) | settings
    return JudgeClient(JudgeSettings(**fields), sleep=sleeps.append), sleeps


@pytest.mark.parametrize("problem, score, outcome, attempts", [
    ("good", 0.7, "scored", 1),
    ("two", 0.9, "scored", 1),       # the last Score: wins
    ("thinking", 0.8, "scored", 1),  # a judge's own think block is not read
    ("none", None, "no_score", 1),
    ("garbage", None, "bad_response", 1),
    ("flaky", 1.0, "scored", 2),     # a 500, then success
    ("down", None, "http_error", 3),  # 503 on every attempt
    ("forbidden", None, "http_error", 1),  # a 4xx is not retried
])
def test_each_judge_outcome_is_named_and_counted(fake, problem, score, outcome, attempts):
    client, sleeps = _client(fake.base_url)
    result = client.score(problem, "42", "<think>\nhmm\n</think>\n\nThe answer is 42.")
    assert result.score == (pytest.approx(score) if score is not None else None)
    assert outcome in result.reason
    counts = client.stats.counts()
    assert counts[outcome] == 1 and sum(counts[o] for o in OUTCOMES) == 1
    assert counts["retries"] == attempts - 1 == len(sleeps)
    assert sleeps == [0.01 * 2 ** k for k in range(attempts - 1)]  # exponential backoff
    assert fake.seen[problem] == attempts
    assert client.stats.no_reward == (score is None)


def test_a_slow_judge_times_out_after_its_retries(fake):
    client, sleeps = _client(fake.base_url, timeout=0.2, retries=1)
    result = client.score("slow", "42", "42")
    assert result.score is None and "timeout" in result.reason and "2 attempts" in result.reason
    assert client.stats.counts()["timeout"] == 1 and client.stats.counts()["retries"] == 1


def test_a_closed_port_is_a_connection_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client, sleeps = _client(f"http://127.0.0.1:{port}/v1", retries=1)
    result = client.score("good", "42", "42")
    assert result.score is None and "connection_error" in result.reason
    assert client.stats.counts()["connection_error"] == 1 and len(sleeps) == 1


def test_the_judge_reads_the_answer_without_the_think_block(fake, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "secret-key")
    client, _ = _client(fake.base_url, api_key_env="JUDGE_TEST_KEY", enable_thinking=False)
    client.score("good", "42", "<think>\nprivate reasoning\n</think>\n\nThe answer is 42.")
    request = fake.requests[-1]
    assert "The answer is 42." in request["prompt"] and "private reasoning" not in request["prompt"]
    assert "[Reference answer]\n42\n" in request["prompt"] and "Score: X" in request["prompt"]
    assert request["prompt"] == judge_prompt("good", "42", "<think>\nx\n</think>\n\nThe answer is 42.")
    assert request["auth"] == "Bearer secret-key"
    assert request["body"]["temperature"] == 0.0 and request["body"]["model"] == "judge"
    assert request["body"]["chat_template_kwargs"] == {"enable_thinking": False}


def test_an_empty_answer_scores_zero_without_asking(fake):
    client, _ = _client(fake.base_url)
    result = client.score("good", "42", "<think>\nnever finished")
    assert result.score == 0.0 and client.stats.counts()["empty_answer"] == 1 and not fake.requests


def test_parallel_judge_calls_all_complete_within_the_bound(fake):
    client, _ = _client(fake.base_url, concurrency=4)
    items = [(f"many{i}", "42", "42") for i in range(16)]
    results = client.score_many(items)
    assert [r.score for r in results] == [0.5] * 16
    assert client.stats.counts()["scored"] == 16 and len(fake.requests) == 16
    assert fake.most_in_flight <= 4


def test_registered_judge_reward(fake):
    reward = get_reward("judge")
    client, _ = _client(fake.base_url)
    assert reward("The answer is 42.", question="good", reference="42", judge=client).score == pytest.approx(0.7)
    assert reward("42", question="good", reference="42").score is None  # no judge: no reward
    configure_judge(client)
    try:
        assert reward("42", question="good", reference="42").score == pytest.approx(0.7)
    finally:
        configure_judge(None)


@pytest.mark.parametrize("field, value", [("base_url", "ftp://x"), ("timeout", 0), ("retries", -1),
                                          ("concurrency", 0), ("max_tokens", 1.5)])
def test_bad_judge_settings_are_one_clear_error(field, value):
    fields = dict(base_url="http://127.0.0.1:1/v1", model="judge") | {field: value}
    with pytest.raises(ValueError, match=field):
        JudgeSettings(**fields)


def test_judge_stats_restore_what_a_cut_run_saved():
    stats = JudgeStats()
    for outcome in ("scored", "scored", "timeout", "retries"):
        stats.add(outcome)
    again = JudgeStats()
    again.restore(stats.counts())
    again.add("no_score")
    assert again.counts() == {**stats.counts(), "no_score": 1}
    with pytest.raises(ValueError, match="unknown judge outcome"):
        again.restore({"maybe": 1})
