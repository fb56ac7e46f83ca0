"""A reward from a judge model: an LLM scores the response against a reference answer.

For tasks a rule cannot check, the Qwen3 report's general RL scores a response with a judge model
that reads the problem, a reference answer and the response. The judge is any OpenAI-compatible chat
server (`vllm serve ...` at full scale, `qwen3repro serve` at tiny scale), reached by `JudgeClient`:

    judge = JudgeClient(JudgeSettings(base_url="http://127.0.0.1:8000/v1", model="judge"))
    judge.score(question, reference, completion)          # -> RewardResult
    judge.score_many([(question, reference, completion), ...])
    judge.stats.counts()                                   # {"scored": ..., "timeout": ..., ...}

The prompt (`judge_prompt`) holds `[Problem]`, `[Reference answer]` and `[Response]` (the answer
alone: the think block is stripped first, so the judge grades what the user reads) and asks the judge
to end with `Score: X`, X an integer from 0 to `max_score`. The score is read after the LAST `Score:`
label of the judge's answer (a judge may quote the format or revise itself; its final word counts),
and X / max_score is the reward in [0, 1].

Failures are "no reward" (`RewardResult(None, reason)`), never a silent 0 or 1, and each is counted
in `JudgeStats` under its outcome, so a trainer can drop them from the group and log how many there
were. Timeouts, refused or dropped connections, and HTTP 429 and 5xx answers are retried with
exponential backoff; other HTTP errors, a body that is not a chat completion, and an answer without a
readable score are not (the judge runs at temperature 0, so asking again gives the same answer). An
empty answer is the policy's fault and scores 0.0 without a call, as in the other rewards.

`concurrency` bounds the requests in flight from one client however it is called (a semaphore), and
`score_many` runs that many at a time in a thread pool. `timeout` applies to each socket operation
(connecting, and each read of the reply), as `urllib` applies it.

The reward is registered as "judge": `judge_reward(completion, question=..., reference=..., judge=client)`,
or without `judge` when a default client was set with `configure_judge`.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from .registry import RewardResult, answer_text, register

__all__ = ["JUDGE_PROMPT", "JudgeSettings", "JudgeStats", "JudgeClient", "OUTCOMES", "judge_prompt",
           "parse_score", "configure_judge", "judge_reward"]

JUDGE_PROMPT = """\
You are grading a response to a problem. Compare it with the reference answer, which is correct.

[Problem]
{question}

[Reference answer]
{reference}

[Response]
{response}

Decide whether the response's final answer agrees with the reference answer (equivalent forms count \
as agreeing) and whether it answers the problem as asked. Explain briefly, then end with a last line \
of the form "Score: X", where X is an integer from 0 (wrong) to {max_score} (fully correct)."""

OUTCOMES = ("scored", "empty_answer", "no_score", "timeout", "connection_error", "http_error", "bad_response")
"""Every outcome `JudgeStats` counts: "scored" and "empty_answer" give a reward, the others give none."""

RETRIED_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

_SCORE_LABEL = re.compile(r"score\**\s*:\s*\**", re.IGNORECASE)
_SCORE_VALUE = re.compile(r"\s*([+-]?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?")


def judge_prompt(question: str, reference: str, completion: str, max_score: int = 10) -> str:
    """The judge's user message: the problem, the reference answer and the completion's answer."""
    return JUDGE_PROMPT.format(question=question, reference=reference, response=answer_text(completion),
                               max_score=max_score)


def parse_score(text: str, max_score: int = 10) -> tuple[float | None, str]:
    """The score after the last `Score:` label of `text`, mapped to [0, 1], and why.

    `Score: 7` gives 0.7 on a 0-10 scale; `Score: 7/10` reads its own denominator; markdown bold
    (`**Score:** 7`) is accepted. No label, no number after the last label, or a value outside
    [0, max] gives (None, reason).
    """
    labels = list(_SCORE_LABEL.finditer(text)) if isinstance(text, str) else []
    if not labels:
        return None, "no 'Score:' in the judge's answer"
    tail = text[labels[-1].end():]
    match = _SCORE_VALUE.match(tail)
    if match is None:
        return None, f"no number after the last 'Score:' ({tail[:40]!r})"
    value = float(match.group(1))
    scale = float(match.group(2)) if match.group(2) else float(max_score)
    if scale <= 0 or not 0.0 <= value <= scale:
        return None, f"score {match.group(0).strip()} is outside 0..{scale:g}"
    return value / scale, f"score {value:g}/{scale:g}"


@dataclass(frozen=True)
class JudgeSettings:
    """Where the judge is and how to call it.

    `base_url` ends before `/chat/completions` (e.g. `http://127.0.0.1:8000/v1`); `api_key_env` names
    the environment variable holding a bearer token (None: send none). `retries` counts the attempts
    after the first; the wait before retry k (1, 2, ...) is `backoff` × 2^(k-1) seconds.
    `enable_thinking`, when set, is sent as `chat_template_kwargs.enable_thinking`.
    """

    base_url: str
    model: str
    api_key_env: str | None = None
    temperature: float = 0.0
    max_tokens: int = 512
    timeout: float = 60.0
    retries: int = 2
    backoff: float = 0.5
    concurrency: int = 8
    max_score: int = 10
    enable_thinking: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge base_url must be an http(s) URL, got {self.base_url!r}")
        for key, low in (("max_tokens", 1), ("concurrency", 1), ("max_score", 1), ("retries", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"judge {key} must be an integer >= {low}, got {value!r}")
        for key in ("temperature", "timeout", "backoff"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (key == "timeout"
                                                                                             and value == 0):
                raise ValueError(f"judge {key} must be a number {'> 0' if key == 'timeout' else '>= 0'}, "
                                 f"got {value!r}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


class JudgeStats:
    """Thread-safe counts of the judge's outcomes (`OUTCOMES`) and of its retried attempts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, outcome: str) -> None:
        if outcome not in OUTCOMES and outcome != "retries":
            raise ValueError(f"unknown judge outcome {outcome!r}")
        with self._lock:
            self._counts[outcome] += 1

    def counts(self) -> dict[str, int]:
        """Every outcome's count (zeros included) and "retries"."""
        with self._lock:
            return {name: self._counts[name] for name in (*OUTCOMES, "retries")}

    def restore(self, counts: Mapping[str, int]) -> None:
        """Start from `counts` (what `counts()` returned when a cut run saved its state)."""
        unknown = set(counts) - {*OUTCOMES, "retries"}
        if unknown:
            raise ValueError(f"unknown judge outcome(s) {sorted(unknown)}")
        with self._lock:
            self._counts = Counter({name: int(n) for name, n in counts.items()})

    @property
    def no_reward(self) -> int:
        counts = self.counts()
        return sum(counts[name] for name in OUTCOMES if name not in ("scored", "empty_answer"))


class _Failure(Exception):
    """One attempt's failure: the outcome it counts as, and whether another attempt may succeed."""

    def __init__(self, outcome: str, reason: str, retry: bool) -> None:
        super().__init__(reason)
        self.outcome, self.reason, self.retry = outcome, reason, retry


class JudgeClient:
    """An OpenAI-compatible chat client that turns a judge's answer into a reward (module docstring)."""

    def __init__(self, settings: JudgeSettings, stats: JudgeStats | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self.stats = stats if stats is not None else JudgeStats()
        self._sleep = sleep
        self._in_flight = threading.BoundedSemaphore(settings.concurrency)

    def score(self, question: str, reference: str, completion: str) -> RewardResult:
        """The judge's reward for `completion` (a policy output, think block and all)."""
        if not answer_text(completion):
            self.stats.add("empty_answer")
            return RewardResult(0.0, "judge: empty answer")
        prompt = judge_prompt(question, reference, completion, self.settings.max_score)
        try:
            answer = self.chat([{"role": "user", "content": prompt}])
        except _Failure as failure:
            self.stats.add(failure.outcome)
            return RewardResult(None, f"judge: {failure.outcome}: {failure.reason}")
        value, why = parse_score(answer_text(answer), self.settings.max_score)
        if value is None:
            self.stats.add("no_score")
            return RewardResult(None, f"judge: no_score: {why}")
        self.stats.add("scored")
        return RewardResult(value, f"judge: scored ({why})")

    def score_many(self, items: Iterable[tuple[str, str, str]]) -> list[RewardResult]:
        """`score` of each (question, reference, completion), `concurrency` at a time, in order."""
        items = list(items)
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.settings.concurrency, len(items))) as pool:
            return list(pool.map(lambda item: self.score(*item), items))

    def chat(self, messages: list[dict]) -> str:
        """The judge's answer (`choices[0].message.content`) to `messages`, retrying what may pass;
        raises `_Failure` after the last attempt."""
        s = self.settings
        body = {"model": s.model, "messages": messages, "temperature": s.temperature, "max_tokens": s.max_tokens}
        if s.enable_thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": s.enable_thinking}
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if s.api_key_env:
            key = os.environ.get(s.api_key_env)
            if not key:
                raise _Failure("connection_error", f"environment variable {s.api_key_env} is not set", False)
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(s.retries + 1):
            if attempt:
                self.stats.add("retries")
                self._sleep(s.backoff * 2 ** (attempt - 1))
            try:
                with self._in_flight:
                    raw = self._post(data, headers)
                return _content(raw)
            except _Failure as failure:
                if not failure.retry or attempt == s.retries:
                    if failure.retry:
                        failure.reason += f" (after {attempt + 1} attempts)"
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _post(self, data: bytes, headers: dict) -> bytes:
        request = urllib.request.Request(self.settings.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            detail = e.read(300).decode("utf-8", "replace") if e.fp is not None else ""
            raise _Failure("http_error", f"HTTP {e.code} from {self.settings.url}: {detail}",
                           e.code in RETRIED_HTTP_STATUSES) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Failure("timeout", f"no answer from {self.settings.url} within {self.settings.timeout:g} s",
                               True) from None
            raise _Failure("connection_error", f"{self.settings.url}: {e.reason}", True) from None
        except (TimeoutError, socket.timeout):
            raise _Failure("timeout", f"no answer from {self.settings.url} within {self.settings.timeout:g} s",
                           True) from None
        except OSError as e:  # reset, dropped or half-read connections (http.client errors included)
            raise _Failure("connection_error", f"{self.settings.url}: {type(e).__name__}: {e}", True) from None
        except ValueError as e:  # http.client's malformed status line or headers
            raise _Failure("bad_response", f"{self.settings.url}: {type(e).__name__}: {e}", False) from None


def _content(raw: bytes) -> str:
    """`choices[0].message.content` of a chat-completion body; `_Failure("bad_response")` otherwise."""
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        raise _Failure("bad_response", f"not a chat completion: {raw[:120]!r}", False) from None
    if not isinstance(content, str):
        raise _Failure("bad_response", f"message content is {type(content).__name__}, not a string", False)
    return content


_default_judge: JudgeClient | None = None


def configure_judge(client: JudgeClient | None) -> None:
    """Set (None: unset) the client `judge_reward` uses when the call passes none."""
    global _default_judge
    _default_judge = client


@register("judge")
def judge_reward(completion: str, question: str, reference: str, judge: JudgeClient | None = None) -> RewardResult:
    """The judge's score of `completion` against the reference answer; no judge configured is no reward."""
    client = judge if judge is not None else _default_judge
    if client is None:
        return RewardResult(None, "judge: no judge client (pass judge= or call configure_judge)")
    return client.score(question, reference, completion)
