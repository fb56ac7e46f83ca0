"""`qwen3repro chat CHECKPOINT`: talk to a checkpoint through the Qwen3 chat template.

Interactive by default (a REPL); `--prompt TEXT` answers one message and exits (for scripts and
tests). Modes, as in Qwen3:

* `--think/--no-think` is the hard switch (the template's `enable_thinking`): with `--no-think`
  the template pre-fills the empty think block and the model answers directly, whatever the
  messages say.
* `/think` and `/no_think` written in a message are the soft switches: the last one in the chat
  wins (`chat.wants_thinking`). They stay in the message text (the model was trained to read them)
  and are also honoured through the template: a turn that should not think gets the pre-filled
  empty think block. A line that is only `/think` or `/no_think` switches the default mode for
  the following turns.
* Sampling uses the report's pinned settings of the mode (`generate.THINKING_SAMPLING` /
  `NON_THINKING_SAMPLING`); `--temperature` overrides the temperature (0 = greedy).
* `--budget N` caps thinking at N tokens (`generate`'s thinking budget: the report's stop-thinking
  sentence and `</think>` are inserted, then the model answers).

REPL commands: `/think`, `/no_think`, `/reset` (forget the conversation), `/exit` (or end of input).

The checkpoint is a Hugging Face layout directory (`config.json` + safetensors); the tokenizer is
read from `--tokenizer`, else from the checkpoint directory or one of its two parents.
"""
from __future__ import annotations

from pathlib import Path

import click

from .chat import parse, render, wants_thinking
from .generate import NON_THINKING_SAMPLING, THINKING_SAMPLING, generate
from .models.qwen3 import Qwen3
from .tokenizer import Tokenizer

__all__ = ["chat_command", "complete_chat", "find_tokenizer", "load_checkpoint", "ChatSession"]


def find_tokenizer(checkpoint: Path, explicit: str | None = None) -> Path:
    """The directory holding `tokenizer.json`: `explicit`, else the checkpoint or its two parents."""
    if explicit:
        return Path(explicit)
    for candidate in (checkpoint, *list(checkpoint.resolve().parents)[:2]):
        if (candidate / "tokenizer.json").is_file():
            return candidate
        if (candidate / "tokenizer" / "tokenizer.json").is_file():
            return candidate / "tokenizer"
    raise click.UsageError(f"no tokenizer.json in {checkpoint} or its parents; pass --tokenizer DIR")


def complete_chat(model, tokenizer, messages: list[dict], *, thinking: bool, budget: int | None = None,
                  temperature: float | None = None, top_p: float | None = None, max_new_tokens: int = 512,
                  seed: int | None = None) -> dict:
    """The assistant's next turn after `messages`: render, generate, parse.

    `thinking` is the mode already decided (`chat.wants_thinking`): it picks the template's
    `enable_thinking` and the mode's pinned sampling, which `temperature` and `top_p` override; the
    thinking budget applies only in thinking mode. Returns `chat.parse` of the completion plus
    "thinking", "finish_reason", "budget_hit", "thinking_tokens", "prompt_tokens" and
    "completion_tokens". A malformed message raises the template's ValueError.
    """
    prompt_ids = tokenizer.encode(render(messages, add_generation_prompt=True, enable_thinking=thinking))
    params = THINKING_SAMPLING if thinking else NON_THINKING_SAMPLING
    gen = generate(
        model, [prompt_ids], params, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        tokenizer=tokenizer, thinking_budget=budget if thinking and budget is not None else None, seed=seed,
    )[0]
    completion = tokenizer.decode(gen.token_ids)
    # Without thinking the template pre-fills the empty think block, so the completion is the answer alone.
    prefix = "" if thinking else "<think>\n\n</think>\n\n"
    parsed = parse(prefix + completion)
    parsed.update(thinking=thinking, finish_reason=gen.finish_reason, budget_hit=gen.budget_hit,
                  thinking_tokens=gen.thinking_tokens, prompt_tokens=len(prompt_ids),
                  completion_tokens=len(gen.token_ids))
    return parsed


def load_checkpoint(checkpoint: Path, tokenizer_dir: str | None = None, device: str = "cpu") -> tuple[Qwen3, Tokenizer]:
    """The model of CHECKPOINT in eval mode and its tokenizer (`find_tokenizer`)."""
    tokenizer = Tokenizer.load(find_tokenizer(checkpoint, tokenizer_dir))
    return Qwen3.from_pretrained(checkpoint, device=device).eval(), tokenizer


class ChatSession:
    """A conversation with a model: `reply(text)` renders the chat, generates, and remembers the turn."""

    def __init__(self, model, tokenizer, *, think: bool = True, budget: int | None = None,
                 temperature: float | None = None, max_new_tokens: int = 512, seed: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.think, self.budget, self.temperature = think, budget, temperature
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.messages: list[dict] = []
        self.default_flag: str | None = None  # set by a bare /think or /no_think line

    def reply(self, text: str) -> dict:
        """Generate the assistant's answer to `text`; returns `complete_chat`'s answer."""
        self.messages.append({"role": "user", "content": text})
        flag_messages = ([{"role": "user", "content": "/" + self.default_flag}] if self.default_flag else [])
        thinking = wants_thinking(flag_messages + self.messages, enable_thinking=self.think)
        parsed = complete_chat(self.model, self.tokenizer, self.messages, thinking=thinking, budget=self.budget,
                               temperature=self.temperature, max_new_tokens=self.max_new_tokens, seed=self.seed)
        content = parsed["reasoning_content"], parsed["content"]
        self.messages.append({"role": "assistant", "content": f"<think>\n{content[0]}\n</think>\n\n{content[1]}"})
        return parsed

    def command(self, line: str) -> str | None:
        """Handle a REPL command line; returns a message to show, or None if `line` is not a command."""
        word = line.strip()
        if word in ("/think", "/no_think"):
            self.default_flag = word[1:]
            return f"(thinking {'on' if word == '/think' else 'off'} for the next turns)"
        if word == "/reset":
            self.messages.clear()
            return "(conversation cleared)"
        return None


def _show(parsed: dict, show_thinking: bool) -> None:
    if show_thinking and parsed["reasoning_content"]:
        click.secho("<think>\n" + parsed["reasoning_content"] + "\n</think>", dim=True)
    click.echo(parsed["content"])
    for error in parsed["errors"]:
        click.secho(f"[{error['error']}]", fg="red", err=True)
    if parsed["finish_reason"] == "length":
        click.secho("[cut at --max-new-tokens]", fg="yellow", err=True)


@click.command("chat")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--think/--no-think", default=True, show_default=True,
              help="Hard switch: --no-think pre-fills the empty think block (enable_thinking=False).")
@click.option("--budget", type=click.IntRange(min=0), default=None, help="Thinking budget in tokens.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=None,
              help="Override the mode's pinned temperature (0 = greedy).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Most tokens per reply (thinking, forced directive and answer).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Directory with tokenizer.json (default: the checkpoint or its parents).")
@click.option("--prompt", default=None, help="Answer this one message and exit (non-interactive).")
@click.option("--seed", type=int, default=None, help="Sampling seed (default: random).")
@click.option("--show-thinking/--hide-thinking", default=True, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def chat_command(checkpoint: Path, think: bool, budget: int | None, temperature: float | None, max_new_tokens: int,
                 tokenizer_dir: str | None, prompt: str | None, seed: int | None, show_thinking: bool,
                 device: str) -> None:
    """Chat with CHECKPOINT (/think and /no_think switch modes, /reset, /exit)."""
    model, tokenizer = load_checkpoint(checkpoint, tokenizer_dir, device)
    session = ChatSession(model, tokenizer, think=think, budget=budget, temperature=temperature,
                          max_new_tokens=max_new_tokens, seed=seed)
    if prompt is not None:
        _show(session.reply(prompt), show_thinking)
        return
    click.echo("Type a message (/think, /no_think, /reset, /exit).")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if not line.strip():
            continue
        note = session.command(line)
        if note is not None:
            click.echo(note)
            continue
        _show(session.reply(line), show_thinking)
