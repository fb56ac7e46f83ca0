"""The generation engine: exactness against a full forward, batching, stopping, sampling filters,
presence penalty and the thinking-budget controller (with a scripted stub model whose next token
we choose, and with a real micro model and tokenizer)."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3repro.chat import EMPTY_THINK, STOP_THINKING_DIRECTIVE
from qwen3repro.generate import (
    GREEDY,
    NON_THINKING_SAMPLING,
    THINKING_SAMPLING,
    DenseDecodeStep,
    SamplingParams,
    ThinkingBudget,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    generate,
)
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
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
    words += ["Considering", "the", "limited", "time", "by", "user", "solution", "thinking", "directly", "now", "\n\n"]
    corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)]
    return train_tokenizer(corpus, 400)


# ------------------------------------------------------------------------------- a stub model
class _StubCache:
    def __init__(self, batch_size: int):
        self.rows: list[list[int]] = [[] for _ in range(batch_size)]

    def reorder(self, index: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in index.tolist()]


class ScriptedModel(torch.nn.Module):
    """A model whose next token is `policy(history)` (history = the row's real tokens so far).

    It speaks the `Qwen3` interface `generate` uses: `new_kv_cache`, `forward(..., position_ids,
    attention_mask, kv_cache).logits`. The chosen token gets logit 0, every other token -30, unless
    `policy` returns a full logits list.
    """

    def __init__(self, policy, vocab: int = 64):
        super().__init__()
        self.policy, self.vocab = policy, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def new_kv_cache(self, batch_size, max_len, **_):
        return _StubCache(batch_size)

    def forward(self, input_ids, *, position_ids=None, attention_mask=None, kv_cache=None):
        b, s = input_ids.shape
        logits = torch.full((b, s, self.vocab), -30.0)
        for r in range(b):
            for j in range(s):
                if attention_mask is None or bool(attention_mask[r, j]):
                    kv_cache.rows[r].append(int(input_ids[r, j]))
            choice = self.policy(kv_cache.rows[r])
            if isinstance(choice, int):
                logits[r, -1, choice] = 0.0
            else:
                logits[r, -1] = torch.tensor(choice, dtype=torch.float32)
        return type("Out", (), {"logits": logits})()


START, END, EOS, THINK, ANSWER = 60, 61, 62, 5, 7
DIRECTIVE = (10, 11, 12, END, 13, 14)
EMPTY = (20, END, 20)


def _budget(b: int) -> ThinkingBudget:
    return ThinkingBudget(budget=b, think_start_id=START, think_end_id=END, directive_ids=DIRECTIVE, empty_ids=EMPTY)


def thinker(k: int | None, answer_len: int = 3):
    """Opens <think>, thinks k tokens (forever if None), closes, answers `answer_len` tokens, stops."""

    def policy(history):
        gen = history[history.index(99) + 1:] if 99 in history else []
        if END in gen:
            answered = gen[gen.index(END) + 1:].count(ANSWER)
            return ANSWER if answered < answer_len else EOS
        if START not in gen:
            return START
        thought = len(gen) - 1 - gen.index(START)
        return END if k is not None and thought >= k else THINK

    return policy


def _count_sub(seq, sub) -> int:
    sub = list(sub)
    return sum(seq[i: i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


# --------------------------------------------------------------------------- thinking budget
@settings(max_examples=25)
@given(budget=st.integers(1, 12), k=st.one_of(st.none(), st.integers(0, 15)))
def test_budget_properties(budget, k):
    model = ScriptedModel(thinker(k))
    gen = generate(model, [[1, 2, 99]], GREEDY, max_new_tokens=60, stop_token_ids=[EOS],
                   thinking_budget=_budget(budget))[0]
    toks = gen.token_ids
    assert gen.thinking_tokens <= budget
    hit = k is None or k >= budget
    assert gen.budget_hit == hit
    assert _count_sub(toks, DIRECTIVE) == (1 if hit else 0)
    if hit:
        # The thinking part holds exactly `budget` sampled tokens, then the directive, then the answer.
        d = toks.index(DIRECTIVE[0])
        assert toks[1:d] == [THINK] * budget
        assert toks[d: d + len(DIRECTIVE)] == list(DIRECTIVE)
        assert toks[d + len(DIRECTIVE):] == [ANSWER] * 3 + [EOS]
        assert gen.forced == [False] * d + [True] * len(DIRECTIVE) + [False] * 4
    else:
        assert toks == [START] + [THINK] * k + [END] + [ANSWER] * 3 + [EOS]
        assert not any(gen.forced)
    assert gen.finish_reason == "stop"


def test_budget_zero_gives_the_empty_think_block():
    gen = generate(ScriptedModel(thinker(None)), [[1, 99]], GREEDY, max_new_tokens=20, stop_token_ids=[EOS],
                   thinking_budget=_budget(0))[0]
    assert gen.token_ids == [START, *EMPTY, ANSWER, ANSWER, ANSWER, EOS]
    assert gen.thinking_tokens == 0 and gen.budget_hit


def test_budget_is_per_row_in_a_batch():
    policies = {3: thinker(2), 4: thinker(None), 5: thinker(10)}
    model = ScriptedModel(lambda h: policies[h[0]](h))
    gens = generate(model, [[3, 99], [4, 99], [5, 1, 1, 99]], GREEDY, max_new_tokens=40, stop_token_ids=[EOS],
                    thinking_budget=_budget(5))
    assert [g.budget_hit for g in gens] == [False, True, True]
    assert [g.thinking_tokens for g in gens] == [2, 5, 5]
    assert [_count_sub(g.token_ids, DIRECTIVE) for g in gens] == [0, 1, 1]


def test_budget_rows_survive_batch_compaction():
    # Rows finish at very different times, so finished rows are dropped mid-way; each row must
    # come out exactly as when generated alone.
    ks = {3: 0, 4: 1, 5: None, 6: 2, 8: 30, 9: 3, 10: None, 11: 6}
    model = ScriptedModel(lambda h: thinker(ks[h[0]], answer_len=h[0] % 3)(h))
    prompts = [[n, 99] for n in ks]
    batched = generate(model, prompts, GREEDY, max_new_tokens=45, stop_token_ids=[EOS], thinking_budget=_budget(4))
    for p, g in zip(prompts, batched):
        alone = generate(model, [p], GREEDY, max_new_tokens=45, stop_token_ids=[EOS], thinking_budget=_budget(4))[0]
        assert (g.token_ids, g.forced, g.thinking_tokens, g.budget_hit, g.finish_reason) == (
            alone.token_ids, alone.forced, alone.thinking_tokens, alone.budget_hit, alone.finish_reason)
        assert g.thinking_tokens <= 4


def test_prompt_ending_inside_think_starts_counting():
    # An assistant prefill "<think>" in the prompt: the thinking part is already open.
    model = ScriptedModel(lambda h: THINK if END not in h else EOS)
    gen = generate(model, [[1, START]], GREEDY, max_new_tokens=30, stop_token_ids=[EOS],
                   thinking_budget=_budget(4))[0]
    assert gen.token_ids == [THINK] * 4 + list(DIRECTIVE) + [EOS]


def test_budget_with_real_model_and_tokenizer(micro, tok):
    directive = tok.encode(STOP_THINKING_DIRECTIVE)
    prompt = tok.encode("<|im_start|>user\nabc<|im_end|>\n<|im_start|>assistant\n<think>\n")
    for budget in (0, 3, 9):
        gens = generate(micro, [prompt] * 4, SamplingParams(temperature=1.0), max_new_tokens=100, tokenizer=tok,
                        thinking_budget=budget, seed=budget, stop_token_ids=[])
        for g in gens:
            assert g.thinking_tokens <= budget
            text = tok.decode(g.token_ids)
            if g.budget_hit:
                forced = [t for t, f in zip(g.token_ids, g.forced) if f]
                assert forced == (directive if budget else tok.encode(EMPTY_THINK)[1:])
                if budget:
                    assert text.count(STOP_THINKING_DIRECTIVE) == 1
            else:
                assert STOP_THINKING_DIRECTIVE not in text and tok.think_end_id in g.token_ids
    # Budget 0 right after a generated <think>: the empty think block, exactly.
    model = ScriptedModel(lambda h: tok.think_start_id if tok.think_start_id not in h else 5, vocab=tok.vocab_size)
    g = generate(model, [[1]], GREEDY, max_new_tokens=len(tok.encode(EMPTY_THINK)), tokenizer=tok,
                 thinking_budget=0)[0]
    assert tok.decode(g.token_ids) == EMPTY_THINK


# --------------------------------------------------------------------------- exactness (real)
def _prompts():
    return [[3, 14, 15, 92, 65, 35], [8, 97], [93, 23, 84, 62, 64, 33, 83, 27, 95], [2]]


@pytest.mark.parametrize("kernels", ["1", "0"])  # compiled decode kernels, or PyTorch operations only
@pytest.mark.parametrize("name", ["micro", "micro-moe"])
def test_logprobs_match_full_forward(micro, name, kernels, monkeypatch):
    monkeypatch.setenv("QWEN3REPRO_KERNELS", kernels)
    if name == "micro-moe":  # MoE layers decode through model.forward (no fast step)
        torch.manual_seed(0)
        micro = Qwen3(get_model_config(name)).eval()
    assert DenseDecodeStep.supports(micro) == (name == "micro")
    prompts = _prompts()
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=5), GREEDY):
        gens = generate(micro, prompts, params, max_new_tokens=12, return_logprobs=True, seed=1)
        t = params.temperature or 1.0
        for p, g in zip(prompts, gens):
            ids = torch.tensor([p + g.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(micro(ids).logits[0].float() / t, dim=-1)
            ref = logp[len(p) - 1: -1].gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(g.logprobs), ref, atol=2e-5, rtol=0)


def _assert_logprobs_match(model, prompts, gens, t=1.0):
    for p, g in zip(prompts, gens):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + g.token_ids])).logits[0].float() / t, dim=-1)
        ref = logp[len(p) - 1: -1].gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(g.logprobs), ref, atol=2e-5, rtol=0)


def test_logprobs_match_full_forward_across_prefill_chunks(micro):
    # Enough padded prompts that the fast path prefills them a few rows at a time.
    rng = random.Random(0)
    prompts = [[rng.randrange(500) for _ in range(rng.randint(1, 40))] for _ in range(20)]
    gens = generate(micro, prompts, SamplingParams(temperature=0.9, top_k=8), max_new_tokens=6,
                    return_logprobs=True, seed=2)
    _assert_logprobs_match(micro, prompts, gens, t=0.9)


def test_prepared_weights_follow_the_model():
    # The fast path keeps its prepared weights across calls; an in-place update (an optimizer step),
    # a replaced parameter or reassigned `.data` must still be decoded as the model is now.
    torch.manual_seed(0)
    model = Qwen3(get_model_config("micro")).eval()
    prompts = _prompts()
    before = generate(model, prompts, GREEDY, max_new_tokens=8, return_logprobs=True)
    assert generate(model, prompts, GREEDY, max_new_tokens=8, return_logprobs=True) == before  # cached
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.mlp.down_proj.weight.add_(torch.randn_like(layer.mlp.down_proj.weight))  # in place
    changes = [
        lambda: None,
        lambda: setattr(layer.self_attn, "q_proj", torch.nn.Linear(*reversed(layer.self_attn.q_proj.weight.shape),
                                                                   bias=False)),
        lambda: setattr(model.model.norm.weight, "data", torch.rand_like(model.model.norm.weight) + 0.5),
    ]
    for change in changes:
        change()
        gens = generate(model, prompts, GREEDY, max_new_tokens=8, return_logprobs=True)
        _assert_logprobs_match(model, prompts, gens)
        assert [g.logprobs for g in gens] != [g.logprobs for g in before]
        before = gens


def test_greedy_batched_equals_unbatched(micro):
    prompts = _prompts()
    batched = generate(micro, prompts, GREEDY, max_new_tokens=10)
    for p, g in zip(prompts, batched):
        assert g.token_ids == generate(micro, [p], GREEDY, max_new_tokens=10)[0].token_ids
        assert g.finish_reason == "length" and len(g) == 10


def test_seeded_sampling_is_reproducible(micro):
    a = generate(micro, _prompts(), THINKING_SAMPLING, max_new_tokens=8, seed=3)
    b = generate(micro, _prompts(), THINKING_SAMPLING, max_new_tokens=8, seed=3)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_top_k_one_equals_greedy(micro):
    greedy = generate(micro, _prompts(), GREEDY, max_new_tokens=8)
    top1 = generate(micro, _prompts(), SamplingParams(temperature=1.3, top_k=1), max_new_tokens=8, seed=0)
    assert [g.token_ids for g in greedy] == [g.token_ids for g in top1]


def test_stop_tokens_end_each_row(micro):
    prompts = _prompts()
    free = generate(micro, prompts, SamplingParams(temperature=1.0), max_new_tokens=12, seed=5)
    stop = free[0].token_ids[4]
    stopped = generate(micro, prompts, SamplingParams(temperature=1.0), max_new_tokens=12, seed=5,
                       stop_token_ids=[stop])
    for f, s in zip(free, stopped):
        if stop in f.token_ids:
            i = f.token_ids.index(stop)
            assert s.token_ids == f.token_ids[: i + 1] and s.finish_reason == "stop"
        else:
            assert s.finish_reason == "length"
    assert stopped[0].token_ids[-1] == stop and len(stopped[0]) <= 5


def test_rows_stop_independently_with_compaction():
    # Rows stop after different lengths; finished rows are dropped from the batch mid-way.
    def policy(h):
        n = h[0]
        return EOS if len(h) - 1 >= n else 30 + n

    model = ScriptedModel(policy)
    lengths = [1, 2, 3, 10, 20, 4, 5, 6]
    gens = generate(model, [[n] for n in lengths], GREEDY, max_new_tokens=15, stop_token_ids=[EOS],
                    return_logprobs=True)
    for n, g in zip(lengths, gens):
        if n + 1 <= 15:
            assert g.token_ids == [30 + n] * n + [EOS] and g.finish_reason == "stop"
        else:
            assert g.token_ids == [30 + n] * 15 and g.finish_reason == "length"
        assert len(g.logprobs) == len(g.token_ids)


def test_tokenizer_limits_the_vocabulary(micro, tok):
    # micro has 512 rows, the tokenizer 400 tokens: padded rows are never sampled.
    gens = generate(micro, _prompts(), SamplingParams(temperature=5.0), max_new_tokens=30, tokenizer=tok, seed=0,
                    stop_token_ids=[])
    assert max(max(g.token_ids) for g in gens) < tok.vocab_size


def test_pinned_report_settings():
    assert (THINKING_SAMPLING.temperature, THINKING_SAMPLING.top_p, THINKING_SAMPLING.top_k) == (0.6, 0.95, 20)
    assert (NON_THINKING_SAMPLING.temperature, NON_THINKING_SAMPLING.top_p, NON_THINKING_SAMPLING.top_k,
            NON_THINKING_SAMPLING.presence_penalty) == (0.7, 0.8, 20, 1.5)
    with pytest.raises(Exception):
        THINKING_SAMPLING.temperature = 1.0  # frozen
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)


def test_bad_input():
    with pytest.raises(ValueError):
        generate(ScriptedModel(thinker(1)), [[]], GREEDY, max_new_tokens=3)
    assert generate(ScriptedModel(thinker(1)), [], GREEDY) == []
    with pytest.raises(ValueError):
        generate(ScriptedModel(thinker(1)), [[1]], GREEDY, thinking_budget=3)  # int budget needs a tokenizer


# ------------------------------------------------------------------------- sampling behaviour
def test_presence_penalty_discourages_repeats():
    # Token 3 is slightly preferred over token 4; greedy repeats it unless penalised.
    logits = [-30.0] * 64
    logits[3], logits[4] = 1.0, 0.5
    model = ScriptedModel(lambda h: logits)
    plain = generate(model, [[1]], GREEDY, max_new_tokens=3)[0].token_ids
    penalised = generate(model, [[1]], GREEDY, presence_penalty=1.5, max_new_tokens=3)[0].token_ids
    assert plain == [3, 3, 3]
    assert penalised[:2] == [3, 4]
    # Only generated tokens count, not the prompt.
    assert generate(model, [[3, 3]], GREEDY, presence_penalty=1.5, max_new_tokens=1)[0].token_ids == [3]


def test_sampling_frequencies_match_the_filtered_distribution():
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5] + [-30.0] * 58)
    model = ScriptedModel(lambda h: base.tolist())
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.9)
    n = 3000
    gens = generate(model, [[1]] * n, params, max_new_tokens=1, seed=0)
    counts = torch.bincount(torch.tensor([g.token_ids[0] for g in gens]), minlength=64).float() / n
    x = apply_top_p(apply_top_k(base / 0.8, 4), 0.9)
    expected = torch.softmax(x, -1)
    assert counts[expected == 0].sum() == 0
    assert torch.allclose(counts, expected, atol=0.03)


logit_rows = st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=2, max_size=40)


@st.composite
def logit_matrices(draw):
    vocab = draw(st.integers(2, 40))
    row = st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=vocab, max_size=vocab)
    return torch.tensor(draw(st.lists(row, min_size=1, max_size=3)))


@given(logits=logit_matrices(), p=st.floats(0.05, 0.999))
def test_top_p_keeps_the_smallest_nucleus(logits, p):
    out = apply_top_p(logits, p)
    probs = torch.softmax(logits, -1)
    for r in range(logits.shape[0]):
        kept = torch.isfinite(out[r])
        assert probs[r][kept].max() == probs[r].max()  # a most likely token is kept (ties: any of them)
        assert torch.equal(out[r][kept], logits[r][kept])
        mass = probs[r][kept].sum().item()
        assert mass >= p - 1e-5 or bool(kept.all())
        # Every kept token is at least as likely as every dropped one, and dropping the least likely
        # kept token would fall short of p.
        if (~kept).any():
            assert probs[r][kept].min() >= probs[r][~kept].max() - 1e-7
        assert mass - probs[r][kept].min().item() < p + 1e-5


@given(row=logit_rows, min_p=st.floats(0.0, 1.0))
def test_min_p_threshold(row, min_p):
    logits = torch.tensor([row])
    out = apply_min_p(logits, min_p)
    probs = torch.softmax(logits, -1)[0]
    kept = torch.isfinite(out[0])
    assert kept[probs.argmax()]
    threshold = min_p * probs.max()
    margin = 1e-5 * probs.max()
    assert bool((probs[kept] >= threshold - margin).all())
    assert bool((probs[~kept] < threshold + margin).all())


@given(row=logit_rows, k=st.integers(0, 50))
def test_top_k_keeps_k(row, k):
    logits = torch.tensor([row])
    out = apply_top_k(logits, k)
    kept = torch.isfinite(out[0])
    assert int(kept.sum()) == (len(row) if k == 0 or k >= len(row) else k)
    if (~kept).any():
        assert logits[0][kept].min() >= logits[0][~kept].max()


# ------------------------------------------------------------------------------------ chat CLI
def test_chat_command(micro, tok, tmp_path):
    from click.testing import CliRunner

    from qwen3repro.chat_cli import ChatSession, chat_command

    micro.save_pretrained(tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt")
    runner = CliRunner()
    result = runner.invoke(chat_command, [str(tmp_path / "ckpt"), "--prompt", "abc /no_think", "--max-new-tokens", "6",
                                          "--seed", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(chat_command, [str(tmp_path / "ckpt"), "--budget", "2", "--max-new-tokens", "4",
                                          "--temperature", "0"], input="/no_think\nhello\n/reset\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "thinking off" in result.output and "conversation cleared" in result.output
    assert "--budget" in runner.invoke(chat_command, ["--help"]).output

    # Soft switches and the hard switch decide the mode through the template.
    session = ChatSession(micro, tok, max_new_tokens=3, seed=0)
    assert session.reply("abc /no_think")["thinking"] is False
    assert session.reply("abc /think")["thinking"] is True
    assert session.reply("again")["thinking"] is True  # the last flag in the chat wins
    assert len(session.messages) == 6
    hard = ChatSession(micro, tok, think=False, max_new_tokens=3, seed=0)
    assert hard.reply("abc /think")["thinking"] is False
