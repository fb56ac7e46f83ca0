"""The Qwen3 chat template: render vs transformers + our jinja, parse, soft switches, loss masks."""
import json
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qwen3repro import chat_template
from qwen3repro.chat import (
    CHAT_TEMPLATE,
    STOP_THINKING_DIRECTIVE,
    export_jinja,
    parse,
    render,
    render_jinja,
    render_pieces,
    thinking_flag,
    tokenize_conversation,
    tools_system_content,
    wants_thinking,
)
from qwen3repro.tokenizer import Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")


# -- fixtures ----------------------------------------------------------------------------------


def make_corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 8))) for _ in range(400)]
    words += ["name", "arguments", '{"', '":', "},", "\n\n", "你好", "é", "/think", "/no_think"]
    return [" ".join(rng.choice(words) for _ in range(50)) for _ in range(300)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(make_corpus(), 600)


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    from transformers import AutoTokenizer

    directory = tok.save(tmp_path_factory.mktemp("tok"))
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def hf_render(hf_tok, messages, tools=None, add_generation_prompt=False, enable_thinking=True):
    return hf_tok.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
    )


# -- strategies --------------------------------------------------------------------------------

FRAGMENTS = ["<think>", "</think>", "\n", "\n\n", " ", "<tool_response>", "</tool_response>", "<tool_call>",
             "/think", "/no_think", "你好", "é", '"', "\\", "&<>", "{}", "\t"]
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=5).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
arguments = st.one_of(
    st.dictionaries(texts, json_values, max_size=3),
    st.dictionaries(texts, json_values, max_size=3).map(lambda d: json.dumps(d, ensure_ascii=False)),
    texts,
)


@st.composite
def tool_calls(draw):
    call = {"name": draw(st.sampled_from(["get_weather", "search", "f", "你好"])), "arguments": draw(arguments)}
    if draw(st.booleans()):
        return {"type": "function", "function": call}
    return call


@st.composite
def assistant_messages(draw):
    form = draw(st.sampled_from(["plain", "think", "field", "alias", "none"]))
    message = {"role": "assistant", "content": draw(texts)}
    if form == "think":
        message["content"] = (draw(st.sampled_from(["", "<think>", "<think>\n"])) + draw(texts)
                              + draw(st.sampled_from(["</think>", "\n</think>\n\n"])) + draw(texts))
    elif form == "field":
        message["reasoning_content"] = draw(texts)
    elif form == "alias":
        message[draw(st.sampled_from(["thinking", "reasoning"]))] = draw(texts)
    elif form == "none":
        message["content"] = None
    if form == "none" or draw(st.integers(0, 3)) == 0:
        message["tool_calls"] = draw(st.lists(tool_calls(), min_size=1 if form == "none" else 0, max_size=3))
    return message


@st.composite
def conversations(draw, allow_none=True):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(texts)})
    for _ in range(draw(st.integers(1, 3))):
        user = draw(texts)
        if draw(st.integers(0, 6)) == 0:
            user = "<tool_response>" + user + "</tool_response>"
        messages.append({"role": "user", "content": user})
        for _ in range(draw(st.integers(0, 2))):
            message = draw(assistant_messages())
            if not allow_none and message["content"] is None:
                message["content"] = ""
            messages.append(message)
            for _ in range(draw(st.integers(0, 3)) if message.get("tool_calls") else 0):
                messages.append({"role": "tool", "content": draw(texts)})
        if draw(st.integers(0, 8)) == 0:
            messages.append({"role": "system", "content": draw(texts)})
    tools = None
    if draw(st.booleans()):
        tools = draw(st.lists(
            st.builds(lambda n, d, p: {"type": "function", "function": {"name": n, "description": d, "parameters": p}},
                      texts, texts, json_values),
            max_size=3,
        ))
    return messages, tools


# -- the released template's output for three small chats, written out literally ---------------


def test_reference_rendered_checks(hf_tok):
    hi = [{"role": "user", "content": "Hi"}]
    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render(hi, add_generation_prompt=True) == expected
    assert render(hi, add_generation_prompt=True, enable_thinking=False) == expected + "<think>\n\n</think>\n\n"

    chat3 = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello"}]
    assert render(chat3) == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                             "<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n")

    chat4 = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nR1\n</think>\n\nA1"},
             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "<think>\nR2\n</think>\n\nA2"}]
    assert render(chat4) == ("<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
                             "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\nR2\n</think>\n\nA2<|im_end|>\n")

    for messages, kwargs in [(hi, {"add_generation_prompt": True}),
                             (hi, {"add_generation_prompt": True, "enable_thinking": False}),
                             (chat3, {}), (chat4, {})]:
        assert hf_render(hf_tok, messages, **kwargs) == render(messages, **kwargs) == render_jinja(messages, **kwargs)


# -- specific behaviours -----------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Wetter in <Stadt> & Ort",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_tools_block_and_tool_calls(hf_tok):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Zürich and Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
            {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        ]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Sunny in Zürich, rain in Paris."},
    ]
    expected = (
        "<|im_start|>system\nYou are helpful.\n\n# Tools\n\nYou may call one or more functions to assist with the "
        "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Wetter in <Stadt> & Ort", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Zürich and Paris?<|im_end|>\n"
        "<|im_start|>assistant\n"  # not the last turn and no reasoning: no think block
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nSunny in Zürich, rain in Paris.<|im_end|>\n"
    )
    tools = [WEATHER]
    assert render(messages, tools=tools) == expected
    assert hf_render(hf_tok, messages, tools) == expected
    assert render_jinja(messages, tools=tools) == expected


def test_content_before_tool_calls_gets_a_newline():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [{"name": "f", "arguments": {}}]}]
    assert render(messages).endswith(
        'Let me check.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>\n')


def test_system_without_tools_and_later_system_turns():
    messages = [{"role": "user", "content": "a"}, {"role": "system", "content": "S2"}]
    assert render(messages) == "<|im_start|>user\na<|im_end|>\n<|im_start|>system\nS2<|im_end|>\n"
    only_tools = render([{"role": "user", "content": "a"}], tools=[WEATHER])
    assert only_tools.startswith("<|im_start|>system\n# Tools\n")


def test_reasoning_kept_after_the_last_real_query_only():
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "", "reasoning_content": "R2", "tool_calls": [{"name": "f", "arguments": {}}]},
        {"role": "user", "content": "<tool_response>\nok\n</tool_response>"},  # not a real query
        {"role": "assistant", "content": "mid", "reasoning_content": ""},  # not last, no reasoning
        {"role": "tool", "content": "x"},
        {"role": "assistant", "content": "A2", "reasoning_content": "\nR3\n"},
    ]
    text = render(messages)
    assert "R1" not in text and "<|im_start|>assistant\nA1<|im_end|>" in text
    assert "<|im_start|>assistant\n<think>\nR2\n</think>\n\n<tool_call>" in text
    assert "<|im_start|>assistant\nmid<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\nR3\n</think>\n\nA2<|im_end|>\n")


def test_reasoning_field_wins_over_think_in_content():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "<think>x</think>y", "reasoning_content": "r"}]
    assert render(messages).endswith("<think>\nr\n</think>\n\n<think>x</think>y<|im_end|>\n")


def test_without_user_query_no_think_block():
    # The template's last_query_index defaults to the last message, so no assistant turn is after it.
    messages = [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]
    assert render(messages) == "<|im_start|>system\ns<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"


def test_none_content_renders_empty(hf_tok):
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {"a": 1}}]}]
    expected = ('<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n'
                '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call><|im_end|>\n')
    assert render(messages) == hf_render(hf_tok, messages) == render_jinja(messages) == expected


@pytest.mark.parametrize("messages, match", [
    ([], "at least one message"),
    ([{"role": "assitant", "content": "x"}], "unknown role"),
    ([{"role": "user", "content": ["a"]}], "content must be a string"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}],
     "tool call"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "reasoning_content": 3}],
     "reasoning_content must be a string"),
])
def test_bad_input_is_a_clear_error(messages, match):
    with pytest.raises(ValueError, match=match):
        render(messages)
    if messages:
        with pytest.raises(Exception):
            render_jinja(messages)


def test_enable_thinking_must_be_bool():
    with pytest.raises(ValueError):
        render([{"role": "user", "content": "q"}], add_generation_prompt=True, enable_thinking=None)


def test_export_jinja(tmp_path):
    path = export_jinja(tmp_path / "sub" / "chat_template.jinja")
    assert path.read_text(encoding="utf-8") == CHAT_TEMPLATE
    assert "<|im_start|>" in CHAT_TEMPLATE and not CHAT_TEMPLATE.endswith("\n\n")


# -- render == transformers(our jinja) == plain jinja on generated conversations ---------------


@settings(max_examples=300)
@given(conversations(), st.booleans(), st.booleans())
def test_render_matches_transformers(hf_tok, conversation, add_generation_prompt, enable_thinking):
    messages, tools = conversation
    ours = render(messages, tools, add_generation_prompt, enable_thinking)
    assert hf_render(hf_tok, messages, tools, add_generation_prompt, enable_thinking) == ours
    assert "".join(text for text, _ in render_pieces(messages, tools, add_generation_prompt, enable_thinking)) == ours


@settings(max_examples=200)
@given(conversations(allow_none=False), st.booleans(), st.booleans())
def test_render_matches_plain_jinja(conversation, add_generation_prompt, enable_thinking):
    messages, tools = conversation
    # render_jinja reads `reasoning_content` only, as the released template does.
    messages = [{("reasoning_content" if k in ("thinking", "reasoning") else k): v for k, v in m.items()}
                for m in messages]
    assert render_jinja(messages, tools, add_generation_prompt, enable_thinking) == render(
        messages, tools, add_generation_prompt, enable_thinking)


@st.composite
def conversations_with_answer(draw):
    """A conversation whose last message is an assistant answer to a new user or tool turn."""
    messages, tools = draw(conversations())
    if messages[-1]["role"] == "assistant":
        messages.append({"role": "user", "content": draw(texts)})
    messages.append(draw(assistant_messages()))
    return messages, tools


@settings(max_examples=200)
@given(conversations_with_answer(), st.booleans())
def test_generation_prompt_is_a_prefix_of_the_answer(conversation, enable_thinking):
    messages, tools = conversation
    assume(chat_template._last_query_index(messages) < len(messages) - 1)
    full = render(messages, tools)
    answer_body = [text for text, trained in render_pieces(messages, tools) if trained][-1]
    assert answer_body.startswith("<think>\n")
    if not enable_thinking:
        # The non-thinking prompt pre-fills an empty think block: a prefix of answers without reasoning.
        assume(answer_body.startswith("<think>\n\n</think>\n\n"))
    prompt = render(messages[:-1], tools, add_generation_prompt=True, enable_thinking=enable_thinking)
    prefill = "" if enable_thinking else "<think>\n\n</think>\n\n"
    assert full == prompt + answer_body[len(prefill):] + "\n"


# -- parse -------------------------------------------------------------------------------------

plain = st.text(max_size=20).filter(
    lambda s: not any(t in s for t in ("<think>", "</think>", "<tool_call>", "</tool_call>", "<|im_end|>", "<|endoftext|>")))
call_names = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)
call_arguments = st.dictionaries(plain, st.none() | st.booleans() | st.integers() | plain, max_size=3)


@settings(max_examples=300)
@given(plain, plain, st.lists(st.tuples(call_names, call_arguments, st.booleans()), max_size=3), st.booleans())
def test_parse_inverts_render(reasoning, content, calls, as_field):
    message = {"role": "assistant", "content": content}
    if as_field:
        message["reasoning_content"] = reasoning
    else:
        message["content"] = f"<think>\n{reasoning}\n</think>\n\n{content}"
    message["tool_calls"] = [{"name": n, "arguments": json.dumps(a) if as_str else a} for n, a, as_str in calls]
    text = render([{"role": "user", "content": "q"}, message])
    turn = text[text.rindex("<|im_start|>assistant\n"):]
    parsed = parse(turn)
    assert parsed["reasoning_content"] == reasoning.strip("\n")
    expected_content = content.lstrip("\n") if as_field else content.lstrip("\n")
    assert parsed["content"] == expected_content
    assert parsed["tool_calls"] == [{"name": n, "arguments": a} for n, a, _ in calls]
    assert parsed["errors"] == []


def test_parse_cases():
    assert parse("Just an answer.<|im_end|>") == {
        "reasoning_content": "", "content": "Just an answer.", "tool_calls": [], "errors": []}
    # Truncated thinking (budget or length limit): all reasoning, no content.
    assert parse("<think>\nstep 1\nstep 2") == {
        "reasoning_content": "step 1\nstep 2", "content": "", "tool_calls": [], "errors": []}
    # The prompt already ended with "<think>\n": the output starts with the reasoning.
    out = parse("step 1\n</think>\n\nThe answer is 4.<|im_end|><|endoftext|>")
    assert (out["reasoning_content"], out["content"]) == ("step 1", "The answer is 4.")
    # Empty think block of non-thinking mode, trailing end-of-text.
    out = parse("<think>\n\n</think>\n\nHi!<|endoftext|>")
    assert (out["reasoning_content"], out["content"]) == ("", "Hi!")
    # Whatever follows the end of the turn is dropped.
    assert parse("a<|im_end|>\n<|im_start|>user\nb")["content"] == "a"


def test_parse_malformed_tool_calls():
    text = ('<think>\nr\n</think>\n\nOK\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "g", "arguments": {broken\n</tool_call>\n'
            '<tool_call>\n["not", "an", "object"]\n</tool_call>\n'
            '<tool_call>\n{"name": "h"}\n</tool_call>\n'
            '<tool_call>\n{"name": "k", "argu')
    out = parse(text)
    assert out["reasoning_content"] == "r"
    assert out["content"] == "OK"
    assert out["tool_calls"] == [{"name": "f", "arguments": {"x": 1}}]
    assert len(out["errors"]) == 4
    assert "invalid JSON" in out["errors"][0]["error"] and "broken" in out["errors"][0]["text"]
    assert "never closed" in out["errors"][-1]["error"]
    deep = parse("<tool_call>" + "[" * 100_000 + "</tool_call>")
    assert deep["tool_calls"] == [] and len(deep["errors"]) == 1


@settings(max_examples=300)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS + ["</tool_call>", "<|im_end|>", '{"name": "f", "arguments": {}}']),
                          st.text(max_size=6)), max_size=12).map("".join))
def test_parse_never_crashes(text):
    out = parse(text)
    assert set(out) == {"reasoning_content", "content", "tool_calls", "errors"}
    assert isinstance(out["content"], str) and isinstance(out["reasoning_content"], str)


def test_stop_thinking_directive():
    assert STOP_THINKING_DIRECTIVE == (
        "Considering the limited time by the user, I have to give the solution based on the thinking "
        "directly now.\n</think>.\n\n")
    out = parse("<think>\nlong reasoning\n\n" + STOP_THINKING_DIRECTIVE + "x = 2")
    assert out["reasoning_content"].endswith("based on the thinking directly now.")
    assert out["content"] == ".\n\nx = 2"


# -- soft switches -----------------------------------------------------------------------------


def test_thinking_flags():
    u = lambda text: {"role": "user", "content": text}
    s = lambda text: {"role": "system", "content": text}
    a = lambda text: {"role": "assistant", "content": text}
    assert thinking_flag([u("hi")]) is None
    assert wants_thinking([u("hi")]) is True
    assert thinking_flag([u("How many r's in strawberries? /think")]) == "think"
    assert thinking_flag([u("q /think"), a("x"), u("q2 /no_think")]) == "no_think"
    assert thinking_flag([u("q /no_think"), a("x"), u("q2")]) == "no_think"  # the flag persists
    assert thinking_flag([s("/no_think"), u("q")]) == "no_think"
    assert thinking_flag([s("/no_think"), u("q /think")]) == "think"
    assert thinking_flag([u("/think then /no_think")]) == "no_think"  # last occurrence in a message
    assert thinking_flag([u("/no_think then /think.")]) == "think"
    assert thinking_flag([u("q"), a("/no_think")]) is None  # assistant text is not a switch
    assert thinking_flag([{"role": "tool", "content": "/no_think"}]) is None
    assert thinking_flag([u("/thinking a/think //think")]) is None  # not standalone flags
    assert wants_thinking([u("q /no_think")]) is False
    assert wants_thinking([u("q /think")], enable_thinking=False) is False  # the hard switch wins
    assert wants_thinking([u("q /no_think"), u("again /think")]) is True


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(["user", "system", "assistant", "tool"]),
                          st.lists(st.sampled_from(["/think", "/no_think", "text", "x", "\n"]), max_size=4)),
                min_size=1, max_size=6))
def test_last_flag_wins(turns):
    messages = [{"role": role, "content": " ".join(words)} for role, words in turns]
    expected = None
    for role, words in turns:
        if role in ("user", "system"):
            for word in words:
                if word in ("/think", "/no_think"):
                    expected = word[1:]
    assert thinking_flag(messages) == expected
    assert wants_thinking(messages) == (expected != "no_think")
    assert wants_thinking(messages, enable_thinking=False) is False


# -- assistant-only loss mask ------------------------------------------------------------------


def test_loss_mask_example(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello", "reasoning_content": "think"},
                {"role": "user", "content": "More"}, {"role": "assistant", "content": "Sure"}]
    ids, mask = tokenize_conversation(tok, messages)
    assert ids == tok.encode(render(messages))
    trained = [i for i, m in zip(ids, mask) if m]
    # Turn 1 lost its reasoning (before the last query); turn 2 has the empty think block.
    assert tok.decode(trained) == "Hello<|im_end|><think>\n\n</think>\n\nSure<|im_end|>"
    assert mask[-1] == 0 and ids[-1] == tok.encode("\n")[0]
    im_end = tok.im_end_id
    ends = [m for i, m in zip(ids, mask) if i == im_end]
    assert ends == [0, 0, 1, 0, 1]  # system, user, assistant, user, assistant
    assert all(m == 0 for i, m in zip(ids, mask) if i == tok.im_start_id)


def test_loss_mask_accepts_a_transformers_tokenizer(tok, hf_tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tokenize_conversation(hf_tok, messages) == tokenize_conversation(tok, messages)


@settings(max_examples=150)
@given(conversations())
def test_loss_mask_properties(tok, conversation):
    messages, tools = conversation
    ids, mask = tokenize_conversation(tok, messages, tools)
    assert ids == tok.encode(render(messages, tools))
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    pieces = render_pieces(messages, tools)
    bodies = [text for text, trained in pieces if trained]
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    assert len(bodies) == n_assistant
    # Each assistant turn's <|im_end|> is trained; every other <|im_end|> and every <|im_start|> is not.
    im_end_masks = [m for i, m in zip(ids, mask) if i == tok.im_end_id]
    assert sum(im_end_masks) == n_assistant
    assert all(m == 0 for i, m in zip(ids, mask) if i == tok.im_start_id)
    # Tokenizing piece by piece gives the same ids and labels whenever no body starts with
    # whitespace (all other piece boundaries sit next to special tokens).
    if all(not body[:1].isspace() for body in bodies):
        piece_ids, piece_mask = [], []
        merged: list[tuple[str, bool]] = []
        for text, trained in pieces:
            if merged and merged[-1][1] == trained:
                merged[-1] = (merged[-1][0] + text, trained)
            else:
                merged.append((text, trained))
        for text, trained in merged:
            encoded = tok.encode(text)
            piece_ids += encoded
            piece_mask += [int(trained)] * len(encoded)
        assert piece_ids == ids
        assert piece_mask == mask


@settings(max_examples=100)
@given(conversations_with_answer())
def test_generation_prompt_tokens_are_a_prefix(tok, conversation):
    messages, tools = conversation
    assume(chat_template._last_query_index(messages) < len(messages) - 1)
    prompt_ids = tok.encode(render(messages[:-1], tools, add_generation_prompt=True))
    ids, mask = tokenize_conversation(tok, messages, tools)
    assert ids[: len(prompt_ids)] == prompt_ids
    # What the model must produce after the prompt is exactly the trained part of the last turn.
    assert all(m == 1 for m in mask[len(prompt_ids): -1]) and mask[-1] == 0


def test_tools_system_content_renders_as_the_tools_argument():
    """A chat opening with a system message whose content is `tools_system_content(tools)` renders exactly as
    the chat rendered with `tools` (with and without a system message of its own), and as the Jinja template."""
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Look up a person.",
                                               "parameters": {"type": "object", "properties": {
                                                   "name": {"type": "string"}}, "required": ["name"]}}}]
    turns = [{"role": "user", "content": "Where does Tamor live?"},
             {"role": "assistant", "content": "", "tool_calls": [{"name": "lookup", "arguments": {"name": "Tamor"}}]},
             {"role": "tool", "content": "Tamor lives in Belka."},
             {"role": "assistant", "content": "<think>\n\n</think>\n\nBelka"}]
    for system in (None, "Be brief."):
        head = [{"role": "system", "content": system}] if system is not None else []
        expected = render(head + turns, tools=tools)
        assert render([{"role": "system", "content": tools_system_content(tools, system)}] + turns) == expected
        assert render_jinja(head + turns, tools=tools) == expected
