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

* `--tools` offers the built-in tools (`tools.default_tools`: calculator, lookup, search over the
  synthetic world) in the system prompt; the model's calls run through the tool environment, each
  call and its result is shown, and the model continues after the results, under the environment's
  caps (`tools.ToolLimits`: turns, calls, tokens of one result). The turns are built by
  `tools.tool_rollouts`, as an RL rollout is.

REPL commands: `/think`, `/no_think`, `/reset` (forget the conversation), `/exit` (or end of input).

The checkpoint is a Hugging Face layout directory (`config.json` + safetensors); the tokenizer is
read from `--tokenizer`, else from the checkpoint directory or one of its two parents.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import torch

from .chat import END_OF_TURN_TOKENS, parse, render, wants_thinking
from .generate import NON_THINKING_SAMPLING, THINKING_SAMPLING, generate
from .models.qwen3 import Qwen3
from .tokenizer import Tokenizer
from .tools import ToolEnvironment, default_tools, tool_rollouts

__all__ = ["chat_command", "complete_chat", "complete_chat_with_tools", "find_tokenizer", "load_checkpoint",
           "ChatSession"]


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


def complete_chat_with_tools(model, tokenizer, messages: list[dict], env: ToolEnvironment, *, thinking: bool,
                             temperature: float | None = None, top_p: float | None = None,
                             max_new_tokens: int = 512, seed: int | None = None) -> dict:
    """The assistant's turns after `messages` with `env`'s tools offered: one `tool_rollouts`
    trajectory (calls answered, caps applied). Returns `chat.parse` of the last turn plus "thinking",
    "finish_reason", "steps" (per earlier turn: its parse and its `(call, result text)` pairs) and
    "messages" (the assistant and tool messages to append to the chat)."""
    prompt_ids = tokenizer.encode(render(messages, tools=env.schemas(), add_generation_prompt=True,
                                         enable_thinking=thinking))
    params = THINKING_SAMPLING if thinking else NON_THINKING_SAMPLING
    overrides = {k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None}
    generator = torch.Generator(device=next(model.parameters()).device)
    if seed is not None:
        generator.manual_seed(int(seed))
    else:
        generator.seed()
    trajectory = tool_rollouts(model, tokenizer, [prompt_ids], env, sampling=dataclasses.replace(params, **overrides),
                               max_new_tokens=max_new_tokens, generator=generator, enable_thinking=thinking)[0]
    steps, new_messages, calls = [], [], iter(trajectory.calls)
    for index, turn in enumerate(trajectory.turns):
        text = turn
        for token in END_OF_TURN_TOKENS:
            text = text.split(token)[0]
        new_messages.append({"role": "assistant", "content": text})
        if index < len(trajectory.responses):
            contents = trajectory.responses[index]
            new_messages += [{"role": "tool", "content": content} for content in contents]
            steps.append({"parsed": parse(turn), "calls": [(next(calls), content) for content in contents]})
    parsed = parse(trajectory.final_text)
    parsed.update(thinking=thinking, finish_reason=trajectory.finish_reason, steps=steps, messages=new_messages)
    return parsed


def load_checkpoint(checkpoint: Path, tokenizer_dir: str | None = None, device: str = "cpu") -> tuple[Qwen3, Tokenizer]:
    """The model of CHECKPOINT in eval mode and its tokenizer (`find_tokenizer`)."""
    tokenizer = Tokenizer.load(find_tokenizer(checkpoint, tokenizer_dir))
    return Qwen3.from_pretrained(checkpoint, device=device).eval(), tokenizer


class ChatSession:
    """A conversation with a model: `reply(text)` renders the chat, generates, and remembers the turn."""

    def __init__(self, model, tokenizer, *, think: bool = True, budget: int | None = None,
                 temperature: float | None = None, max_new_tokens: int = 512, seed: int | None = None,
                 tools: ToolEnvironment | None = None) -> None:
        if tools is not None and budget is not None:
            raise ValueError("a thinking budget does not apply to tool turns; pass budget=None with tools")
        self.model, self.tokenizer, self.tools = model, tokenizer, tools
        self.think, self.budget, self.temperature = think, budget, temperature
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.messages: list[dict] = []
        self.default_flag: str | None = None  # set by a bare /think or /no_think line

    def reply(self, text: str) -> dict:
        """Generate the assistant's answer to `text`; returns `complete_chat`'s answer."""
        self.messages.append({"role": "user", "content": text})
        flag_messages = ([{"role": "user", "content": "/" + self.default_flag}] if self.default_flag else [])
        thinking = wants_thinking(flag_messages + self.messages, enable_thinking=self.think)
        if self.tools is not None:
            parsed = complete_chat_with_tools(self.model, self.tokenizer, self.messages, self.tools, thinking=thinking,
                                              temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                                              seed=self.seed)
            self.messages.extend(parsed["messages"])
            return parsed
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


_CAP_NOTES = {
    "length": "[cut at --max-new-tokens]",
    "turn_cap": "[stopped: the limit of assistant turns with tools]",
    "call_cap": "[stopped: the limit of tool calls]",
    "token_cap": "[stopped: the token limit]",
}


def _show(parsed: dict, show_thinking: bool) -> None:
    for step in parsed.get("steps", ()):
        _show_turn(step["parsed"], show_thinking)
        for call, result in step["calls"]:
            arguments = "" if call["arguments"] is None else json.dumps(call["arguments"], ensure_ascii=False)
            click.secho(f"[tool call] {call['name']}({arguments}) -> {call['outcome']}", fg="cyan")
            click.secho(result, dim=True)
    _show_turn(parsed, show_thinking)
    if parsed["finish_reason"] in _CAP_NOTES:
        click.secho(_CAP_NOTES[parsed["finish_reason"]], fg="yellow", err=True)


def _show_turn(parsed: dict, show_thinking: bool) -> None:
    if show_thinking and parsed["reasoning_content"]:
        click.secho("<think>\n" + parsed["reasoning_content"] + "\n</think>", dim=True)
    click.echo(parsed["content"])
    for error in parsed["errors"]:
        click.secho(f"[{error['error']}]", fg="red", err=True)


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
@click.option("--tools", "use_tools", is_flag=True, default=False,
              help="Offer the built-in tools (calculator, lookup, search) and run the model's calls.")
def chat_command(checkpoint: Path, think: bool, budget: int | None, temperature: float | None, max_new_tokens: int,
                 tokenizer_dir: str | None, prompt: str | None, seed: int | None, show_thinking: bool,
                 device: str, use_tools: bool) -> None:
    """Chat with CHECKPOINT (/think and /no_think switch modes, /reset, /exit)."""
    if use_tools and budget is not None:
        raise click.UsageError("--budget does not apply with --tools")
    model, tokenizer = load_checkpoint(checkpoint, tokenizer_dir, device)
    session = ChatSession(model, tokenizer, think=think, budget=budget, temperature=temperature,
                          max_new_tokens=max_new_tokens, seed=seed,
                          tools=ToolEnvironment(default_tools()) if use_tools else None)
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
