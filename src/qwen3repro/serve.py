"""`qwen3repro serve CHECKPOINT`: an OpenAI-compatible chat server over the generation engine.

Endpoints (the subset of OpenAI's API, as vLLM serves it, that a judge or an evaluation client uses):

    POST /v1/chat/completions   one assistant turn for `messages`
    GET  /v1/models             the one served model
    GET  /health                200 while the server runs

A request's fields: `messages` (required), `model` (optional; another name than the served one is a
404, as in vLLM, so a client pointed at the wrong server finds out), `max_tokens` (or
`max_completion_tokens`; default and ceiling `--max-tokens`), `temperature`, `top_p` (default: the
mode's pinned sampling, `generate.THINKING_SAMPLING` / `NON_THINKING_SAMPLING`), `seed`, `stop` (a
string or a list of strings) and `chat_template_kwargs.enable_thinking` (the template's hard switch;
the `/think` and `/no_think` soft switches in the messages work as in `qwen3repro chat`). `n` must be
1 and `stream` false.

The turn is computed by `chat_cli.complete_chat`, the code path of `qwen3repro chat`, and returned in
OpenAI's shape: `choices[0].message` holds `content` (the answer) and `reasoning_content` (the think
block; null without thinking), with `finish_reason` ("stop" or "length") and token `usage`. The
engine stops on tokens, not strings: a `stop` string cuts the answer after generation (the reasoning
is returned whole) and makes the finish reason "stop"; `usage.completion_tokens` counts every token
generated.

Requests are served one generation at a time: the HTTP server is threaded (a slow client never
blocks the others' reading and writing), and one lock runs the model. Batching concurrent requests
would need one sampling setting per row, which the engine's batches do not have; a judge on CPU is
limited by the model's arithmetic anyway.

A bad request (malformed JSON, a missing or malformed field) is a 4xx with OpenAI's error body,
`{"error": {"message", "type", "param", "code"}}`; an unexpected failure while serving a request is
a 500 with that body, and its traceback goes to stderr. Neither stops the server.
"""
from __future__ import annotations

import json
import sys
import threading
import time
import traceback
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click

from .chat import render, wants_thinking
from .chat_cli import complete_chat, load_checkpoint

__all__ = ["ChatCompletions", "RequestError", "make_server", "serve_command"]

MAX_BODY_BYTES = 8 << 20
"""Largest request body read; a larger one is refused (413) before it is read."""


class RequestError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(HTTPStatus.BAD_REQUEST, message, param)


def _number(body: dict, key: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{key} must be a number, got {value!r}", key)
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise _bad(f"{key} must be in {bracket}{low}, {high}], got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{key} must be an integer, got {value!r}", key)
    if value < low or (high is not None and value > high):
        raise _bad(f"{key} must be in [{low}, {high if high is not None else 'inf'}], got {value}", key)
    return value


def _stop_strings(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad(f"stop must be a string or a list of strings, got {value!r}", "stop")
    return [s for s in value if s]


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class ChatCompletions:
    """The served model: validates a request body and computes its response (no HTTP here)."""

    def __init__(self, model, tokenizer, *, model_name: str, max_tokens: int = 512, budget: int | None = None) -> None:
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.max_tokens, self.budget = max_tokens, budget
        self.context_length = int(model.config.max_position_embeddings)
        self._lock = threading.Lock()  # one generation at a time: the model is not shared between threads

    def models(self) -> dict:
        return {"object": "list",
                "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "qwen3repro"}]}

    def complete(self, body) -> dict:
        """The response to one chat-completions request body (parsed JSON); RequestError if it is refused."""
        if not isinstance(body, dict):
            raise _bad(f"the request body must be a JSON object, got {type(body).__name__}")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages must be a non-empty list of messages", "messages")
        name = body.get("model")
        if name is not None and name != self.model_name:
            raise RequestError(HTTPStatus.NOT_FOUND, f"the model {name!r} does not exist; this server serves "
                               f"{self.model_name!r}", "model", "model_not_found")
        if body.get("n", 1) != 1:
            raise _bad(f"n must be 1, got {body.get('n')!r}", "n")
        if body.get("stream", False) is not False:
            raise _bad("stream is not supported", "stream")
        key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
        max_tokens = _integer(body, key, 1, self.max_tokens) or self.max_tokens
        temperature = _number(body, "temperature", 0.0, 2.0)
        top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
        seed = _integer(body, "seed", 0)
        stops = _stop_strings(body.get("stop"))
        template_kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(template_kwargs, dict):
            raise _bad("chat_template_kwargs must be an object", "chat_template_kwargs")
        enable_thinking = template_kwargs.get("enable_thinking", True)
        if not isinstance(enable_thinking, bool):
            raise _bad(f"chat_template_kwargs.enable_thinking must be a bool, got {enable_thinking!r}",
                       "chat_template_kwargs")
        try:
            thinking = wants_thinking(messages, enable_thinking=enable_thinking)
            prompt = render(messages, add_generation_prompt=True, enable_thinking=thinking)
        except (ValueError, TypeError) as e:
            raise _bad(str(e), "messages") from None
        prompt_tokens = len(self.tokenizer.encode(prompt))
        if prompt_tokens + max_tokens > self.context_length:
            raise _bad(f"the prompt's {prompt_tokens} tokens plus max_tokens {max_tokens} exceed the model's "
                       f"context of {self.context_length} tokens", "messages")

        with self._lock:
            turn = complete_chat(self.model, self.tokenizer, messages, thinking=thinking, budget=self.budget,
                                 temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, seed=seed)
        content, stopped = _cut_at_stop(turn["content"], stops)
        finish_reason = "stop" if stopped else turn["finish_reason"]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content,
                            "reasoning_content": turn["reasoning_content"] if thinking else None},
                "finish_reason": finish_reason,
            }],
            "usage": {"prompt_tokens": turn["prompt_tokens"], "completion_tokens": turn["completion_tokens"],
                      "total_tokens": turn["prompt_tokens"] + turn["completion_tokens"]},
        }


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"  # keep-alive: a client's pool reuses its connections

    def do_GET(self) -> None:  # noqa: N802 (the http.server hook's name)
        self._answer(lambda: self._get())

    def do_POST(self) -> None:  # noqa: N802
        self._answer(lambda: self._post())

    def _get(self) -> dict:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            return self.server.app.models()
        if path == "/health":
            return {"status": "ok"}
        raise RequestError(HTTPStatus.NOT_FOUND, f"no GET route {path!r}")

    def _post(self) -> dict:
        path = self.path.split("?")[0].rstrip("/")
        if path != "/v1/chat/completions":
            raise RequestError(HTTPStatus.NOT_FOUND, f"no POST route {path!r}")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "the request needs a Content-Length header") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the request body of {length} bytes exceeds {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError too
            raise _bad(f"the request body is not valid JSON: {e}") from None
        return self.server.app.complete(body)

    def _answer(self, compute) -> None:
        try:
            status, payload = HTTPStatus.OK, compute()
        except RequestError as e:
            status, payload = e.status, e.body()
        except Exception as e:  # a bug or a failed generation: this request fails, the server goes on
            traceback.print_exc(file=sys.stderr)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, RequestError(500, f"{type(e).__name__}: {e}").body()
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away; nothing to tell it
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the http.server hook's signature)
        if self.server.log_requests:
            super().log_message(format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a connection left open never keeps the process alive

    def __init__(self, address, app: ChatCompletions, log_requests: bool) -> None:
        self.app, self.log_requests = app, log_requests
        super().__init__(address, _Handler)


def make_server(app: ChatCompletions, host: str = "127.0.0.1", port: int = 0, *,
                log_requests: bool = False) -> ThreadingHTTPServer:
    """An HTTP server for `app`, bound (port 0 = a free port, read back from `server_address`), not yet
    serving: call `serve_forever()` (in a thread, for tests) and `shutdown()`."""
    return _Server((host, port), app, log_requests)


@click.command("serve")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), required=True, help="TCP port (0 = a free one).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; the server has no authentication, so keep it on loopback unless shielded.")
@click.option("--model-name", default=None, help="The name clients send as `model` (default: the checkpoint "
              "directory's name).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Default and ceiling of a request's max_tokens.")
@click.option("--budget", type=click.IntRange(min=0), default=None, help="Thinking budget in tokens.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Directory with tokenizer.json (default: the checkpoint or its parents).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--log-requests", is_flag=True, help="Log each request line to stderr.")
def serve_command(checkpoint: Path, port: int, host: str, model_name: str | None, max_tokens: int,
                  budget: int | None, tokenizer_dir: str | None, device: str, log_requests: bool) -> None:
    """Serve CHECKPOINT over an OpenAI-compatible API: POST /v1/chat/completions, GET /v1/models.

    One generation at a time; `chat_template_kwargs.enable_thinking` is the hard thinking switch.
    """
    model, tokenizer = load_checkpoint(checkpoint, tokenizer_dir, device)
    app = ChatCompletions(model, tokenizer, model_name=model_name or checkpoint.resolve().name,
                          max_tokens=max_tokens, budget=budget)
    server = make_server(app, host, port, log_requests=log_requests)
    bound_host, bound_port = server.server_address[:2]
    click.echo(f"serving {app.model_name!r} at http://{bound_host}:{bound_port}/v1 (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
