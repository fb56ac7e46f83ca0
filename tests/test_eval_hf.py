"""eval-hf: our evaluation suites on a Hugging Face checkpoint, through transformers and through our engine.

Nothing is downloaded. The checkpoints are tiny local transformers `Qwen3ForCausalLM`s saved with a
tokenizer of ours (its tokenizer_config.json carries the Qwen3 chat template, which transformers
renders): a random one, and a "scripted" one whose replies are known. The scripted model is a
bigram machine (attention and MLP outputs zeroed, so each position's logits depend on its own token
only): after the generation prompt's "\\n" it opens <think>, then thinks "x" forever; after "\\n\\n"
(the end of a closed think block) it answers "7" and ends the turn.
"""
from __future__ import annotations

import importlib.util
import json
import random
import shutil

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

from qwen3repro.chat import STOP_THINKING_DIRECTIVE, TEMPLATE_STOP_THINKING, render  # noqa: E402
from qwen3repro.cli import main  # noqa: E402
from qwen3repro.config import ConfigError  # noqa: E402
from qwen3repro.data import synthetic, tasks  # noqa: E402
from qwen3repro.evals import hf_checkpoint as hf  # noqa: E402
from qwen3repro.evals.backends import EngineBackend, TransformersBackend  # noqa: E402
from qwen3repro.evals.thinking import follow_conversations  # noqa: E402
from qwen3repro.generate import GREEDY, SamplingParams  # noqa: E402
from qwen3repro.models.errors import CheckpointError  # noqa: E402
from qwen3repro.models.qwen3 import Qwen3  # noqa: E402
from qwen3repro.tokenizer import train_tokenizer  # noqa: E402

TRAINED = 160
SMALL = hf.HFEvalSettings(n=4, k=2, max_new_tokens=16, answer_tokens=8, budgets=(0, 4), trained_length=TRAINED,
                          lengths=(128, 320), variants=("passkey",), batch_size=8)


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def tok():
    """A tokenizer of ours trained on the suites' chats and long-context documents."""
    rng = random.Random(0)
    chats = []
    for it in (tasks.sample_item(rng, heldout=False) for _ in range(200)):
        chats.append(render([
            {"role": "user", "content": it.question + hf.BOXED_INSTRUCTION + " /think"},
            {"role": "assistant", "content": f"<think>\n{tasks.render_trace(it)}\n</think>\n\n\\boxed{{{it.answer}}}"},
        ]) + TEMPLATE_STOP_THINKING)
    return train_tokenizer(chats + list(synthetic.tokenizer_training_texts(seq_len=256, n_docs=100)), 600)


def _config(tok, **changes):
    base = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, bos_token_id=None,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return transformers.Qwen3Config(**{**base, **changes})


@pytest.fixture(scope="module")
def random_ckpt(tok, tmp_path_factory):
    """A random checkpoint; weights at std 0.2 so the top logits are far apart (greedy is not decided by
    rounding differences between two implementations). Its embedding has 64 rows beyond the tokenizer,
    as Qwen3's has 151,936 for 151,669 tokens: no backend may generate them."""
    d = tmp_path_factory.mktemp("random")
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(_config(tok, initializer_range=0.2, vocab_size=len(tok) + 64)).save_pretrained(d)
    tok.save(d)
    return d


def _single_tokens(tok) -> dict[str, int]:
    one = {text: tok.encode(text) for text in ("\n", "\n\n", "x", "7")}
    assert all(len(ids) == 1 for ids in one.values()), f"the test tokenizer must hold these as single tokens: {one}"
    return {text: ids[0] for text, ids in one.items()}


def _bigram_checkpoint(tok, directory, successors: dict[int, dict[int, float]]):
    """A checkpoint whose next-token logits depend on the current token only: `successors[t]` gives
    the logits (x 4, the final norm's scale at hidden size 16) of what follows t; every other token
    is followed by the end of the turn. Attention and MLP outputs are zeroed, so each position's
    residual stream is its own token's embedding, a one-hot "state"."""
    hidden = 16
    model = transformers.Qwen3ForCausalLM(_config(tok, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    embed = torch.zeros(len(tok), hidden)
    embed[:, 0] = 1.0  # state 0, every other token: end the turn
    head = torch.zeros(len(tok), hidden)
    head[tok.eos_token_id, 0] = 10.0
    for state, (token, logits) in enumerate(successors.items(), start=1):
        embed[token] = 0.0
        embed[token, state] = 1.0
        for nxt, logit in logits.items():
            head[nxt, state] = logit
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(embed)
        model.lm_head.weight.copy_(head)
    model.save_pretrained(directory)
    tok.save(directory)
    return directory


@pytest.fixture(scope="module")
def scripted_ckpt(tok, tmp_path_factory):
    """The bigram machine of the module docstring."""
    t = _single_tokens(tok)
    return _bigram_checkpoint(tok, tmp_path_factory.mktemp("scripted"), {
        t["\n"]: {tok.think_start_id: 10.0}, tok.think_start_id: {t["x"]: 10.0}, t["x"]: {t["x"]: 10.0},
        t["\n\n"]: {t["7"]: 10.0}, t["7"]: {tok.eos_token_id: 10.0}})


@pytest.fixture(scope="module")
def backends(random_ckpt, tok):
    return {"ours": EngineBackend(Qwen3.from_pretrained(random_ckpt), tok),
            "transformers": TransformersBackend(random_ckpt, batch_size=4)}


@pytest.fixture(scope="module")
def tf_run(random_ckpt, tmp_path_factory):
    """Every suite through the transformers backend, once, on the random checkpoint."""
    out = tmp_path_factory.mktemp("tf_out")
    return hf.run_hf_eval(str(random_ckpt), out, SMALL, backend="transformers", log=None), out


# ----------------------------------------------------------------------------- prompts
def test_transformers_prompts_are_chat_render_token_for_token(backends, tok):
    """The checkpoint's own template through apply_chat_template gives exactly the tokens of
    chat.render, for every chat the suites send, in thinking and non-thinking mode."""
    chats = [c["messages"] for c in follow_conversations(16, families=("add", "mul", "order"))]
    chats += [[{"role": "user", "content": it.question + hf.BOXED_INSTRUCTION}] for it in hf.balanced_items(6)]
    for messages in chats:
        for enable_thinking in (True, False):
            expected = tok.encode(render(messages, add_generation_prompt=True, enable_thinking=enable_thinking))
            assert backends["transformers"].prompt_ids(messages, enable_thinking) == expected
            assert backends["ours"].prompt_ids(messages, enable_thinking) == expected
    assert backends["transformers"].render(chats[0], False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_auto_takes_our_engine_where_our_model_loads_the_checkpoint(random_ckpt):
    ckpt = hf.resolve_checkpoint(str(random_ckpt), download=False)
    problem, template = hf.ours_support(ckpt)
    assert problem is None and template["matches"] and template["matching"] == template["probes"] > 0
    assert hf.choose_backend("auto", ckpt, "cpu")[0] == "ours"
    assert hf.choose_backend("transformers", ckpt, "cpu")[0] == "transformers"


def test_a_different_chat_template_keeps_our_engine_out(random_ckpt, tmp_path):
    """A checkpoint whose template renders otherwise (here: a default system prompt) is evaluated with
    its own template: auto takes transformers, and --backend ours is refused."""
    d = tmp_path / "other_template"
    shutil.copytree(random_ckpt, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = "<|im_start|>system\nBe brief.<|im_end|>\n" + config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    ckpt = hf.resolve_checkpoint(str(d), download=False)
    problem, template = hf.ours_support(ckpt)
    assert "renders the suites' chats differently" in problem and not template["matches"]
    assert hf.choose_backend("auto", ckpt, "cpu")[0] == "transformers"
    with pytest.raises(CheckpointError, match="--backend ours"):
        hf.choose_backend("ours", ckpt, "cpu")


# ----------------------------------------------------------------------------- generation
def test_greedy_replies_agree_between_our_engine_and_transformers(backends):
    chats = [messages for messages, _ in hf.probe_chats()]
    chats += [[{"role": "user", "content": it.question + hf.BOXED_INSTRUCTION}] for it in hf.balanced_items(6)]
    for enable_thinking in (True, False):
        for budget in (None, 0, 3):
            ours, theirs = (backends[b].generate(chats, enable_thinking=enable_thinking, max_new_tokens=20,
                                                 sampling=GREEDY, seed=0, thinking_budget=budget)
                            for b in ("ours", "transformers"))
            assert [(s.token_ids, s.forced) for s, in ours] == [(s.token_ids, s.forced) for s, in theirs]
            assert [s.text for s, in ours] == [s.text for s, in theirs]
            assert max(t for s, in ours for t in s.token_ids) < len(backends["ours"].tokenizer)  # no padded row


def test_a_think_block_opened_late_is_budgeted_as_the_engine_budgets_it(tok, tmp_path):
    """A machine that answers "7" first and opens its think block after: the budget counts from
    wherever the block opens, in the phases as in the engine."""
    t = _single_tokens(tok)
    d = _bigram_checkpoint(tok, tmp_path / "late", {
        t["\n"]: {t["7"]: 10.0}, t["7"]: {tok.think_start_id: 10.0}, tok.think_start_id: {t["x"]: 10.0},
        t["x"]: {t["x"]: 10.0}, t["\n\n"]: {tok.eos_token_id: 10.0}})
    ours, theirs = EngineBackend(Qwen3.from_pretrained(d), tok), TransformersBackend(d)
    chats = [[{"role": "user", "content": "12+5="}]]
    for budget in (0, 3):
        (a,), = ours.generate(chats, max_new_tokens=40, sampling=GREEDY, seed=0, thinking_budget=budget)
        (b,), = theirs.generate(chats, max_new_tokens=40, sampling=GREEDY, seed=0, thinking_budget=budget)
        assert (a.token_ids, a.forced) == (b.token_ids, b.forced)
        assert a.text.startswith("7<think>" + "x" * budget) and a.budget_hit and a.thinking_tokens == budget


def test_the_presence_penalty_counts_the_tokens_of_earlier_phases(tok, tmp_path):
    """After the forced text this machine prefers "x" (logit 40) to "7" (36): a presence penalty of 6
    must turn it to "7" because it thought "x" before the budget ran out, in an earlier phase."""
    t = _single_tokens(tok)
    d = _bigram_checkpoint(tok, tmp_path / "penalty", {
        t["\n"]: {tok.think_start_id: 10.0}, tok.think_start_id: {t["x"]: 10.0}, t["x"]: {t["x"]: 10.0},
        t["\n\n"]: {t["x"]: 10.0, t["7"]: 9.0}, t["7"]: {tok.eos_token_id: 10.0}})
    ours, theirs = EngineBackend(Qwen3.from_pretrained(d), tok), TransformersBackend(d)
    chats = [[{"role": "user", "content": "12+5="}]]
    for penalty, answer in ((6.0, "7<|im_end|>"), (0.0, "xxx")):
        sampling = SamplingParams(temperature=0.0, presence_penalty=penalty)
        (a,), = ours.generate(chats, max_new_tokens=40, sampling=sampling, seed=0, thinking_budget=3)
        (b,), = theirs.generate(chats, max_new_tokens=40, sampling=sampling, seed=0, thinking_budget=3)
        assert a.token_ids == b.token_ids and a.budget_hit and a.text.endswith(answer)


@pytest.mark.parametrize("directive", [TEMPLATE_STOP_THINKING, STOP_THINKING_DIRECTIVE], ids=["template", "report"])
def test_the_budget_in_phases_equals_the_engine_controller(scripted_ckpt, tok, directive):
    """transformers has no in-loop budget controller: the phases (think up to the budget, force the
    text, answer) give the engine's exact tokens, forced flags and counts."""
    ours = EngineBackend(Qwen3.from_pretrained(scripted_ckpt), tok)
    theirs = TransformersBackend(scripted_ckpt, batch_size=2)
    chats = [[{"role": "user", "content": "12+5="}], [{"role": "system", "content": "/no_think"},
                                                    {"role": "user", "content": "3*4="}]]
    for budget in (None, 0, 3, 7):
        a, b = (be.generate(chats, max_new_tokens=40, sampling=GREEDY, seed=0, thinking_budget=budget,
                            directive=directive) for be in (ours, theirs))
        for (x,), (y,) in zip(a, b):
            assert (y.token_ids, y.forced, y.thinking_tokens, y.budget_hit, y.finish_reason) == \
                (x.token_ids, x.forced, x.thinking_tokens, x.budget_hit, x.finish_reason)
            if budget is None:  # thinks "x" to the length limit
                assert x.finish_reason == "length" and x.thinking_tokens == 39
            else:  # exactly `budget` thinking tokens, the forced text, then the answer
                assert x.thinking_tokens == budget and x.budget_hit and x.text.endswith("7<|im_end|>")


# ----------------------------------------------------------------------------- the suites, end to end
def test_every_suite_writes_its_results(tf_run):
    metrics, out = tf_run
    assert metrics["complete"] and set(metrics["suites"]) == set(hf.SUITES) and not metrics["skipped"]
    assert json.loads((out / "metrics.json").read_text())["complete"] is True
    assert metrics["backend"]["chosen"] == "transformers" and metrics["template"]["matches"]
    summary = (out / "summary.md").read_text()
    for section in ("## ThinkFollow", "## Thinking vs non-thinking", "## Accuracy vs thinking budget", "## pass@k",
                    "## Long-context retrieval"):
        assert section in summary
    for plot in metrics["plots"]:
        assert (out / plot).stat().st_size > 0
    assert {"budget.png", "thinkfollow_modes.png", "pass_at_k.png"} <= set(metrics["plots"])


def test_thinkfollow_suite(tf_run):
    r = tf_run[0]["suites"]["thinkfollow"]
    assert r["n"] == 8 and r["max_new_tokens"] == SMALL.max_new_tokens  # n=4 rounded up: both modes in every case
    assert 0.0 <= r["thinkfollow"] <= 1.0 and all(v is not None for v in r["by_expected"].values())
    users = [m["content"] for e in r["examples"] for m in e["messages"] if m["role"] == "user"]
    assert users and all(hf.BOXED_INSTRUCTION in u for u in users)


def test_modes_suite(tf_run):
    r = tf_run[0]["suites"]["modes"]
    assert r["thinking"]["n"] == r["non_thinking"]["n"] == SMALL.n
    assert r["max_new_tokens"] == {"thinking": SMALL.max_new_tokens, "non_thinking": SMALL.answer_tokens}


def test_budget_suite(tf_run):
    r = tf_run[0]["suites"]["budget"]
    assert [x["budget"] for x in r["runs"]] == list(SMALL.budgets) and r["n"] == SMALL.n
    # However the random model writes, no reply thinks past its budget (s1's Control is 1).
    assert all(x["max_thinking_tokens"] <= x["budget"] for x in r["runs"]) and r["s1"]["control"] == 1.0


def test_pass_at_k_suite(tf_run):
    r = tf_run[0]["suites"]["pass-at-k"]
    assert r["k"] == SMALL.k and r["n"] == SMALL.n
    assert 0.0 <= r["metrics"]["pass@1"] <= r["metrics"][f"pass@{SMALL.k}"] <= 1.0


def test_longcontext_suite_has_yarn_but_no_dca_through_transformers(tf_run):
    r = tf_run[0]["suites"]["longcontext"]
    assert r["conditions"] == ["S3", "S3+YaRN"] and "not available" in r["dca"]
    grid = r["retrieval"]["passkey"]["S3+YaRN"]
    assert grid["lengths"] == [128, 320] and grid["n_by_length"] == [SMALL.n, SMALL.n]
    # YaRN only beyond the trained length, with factor 4 over it.
    assert grid["model_config_by_length"]["128"]["rope_scaling"] is None
    assert grid["model_config_by_length"]["320"]["rope_scaling"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED}


def test_our_engine_runs_yarn_and_dca(random_ckpt, tmp_path):
    settings = hf.HFEvalSettings(**{**SMALL.to_dict(), "suites": ("longcontext",), "n": 2})
    r = hf.run_hf_eval(str(random_ckpt), tmp_path, settings, backend="auto", log=None)
    assert r["backend"]["chosen"] == "ours"
    lc = r["suites"]["longcontext"]
    assert lc["conditions"] == ["S3", "S3+YaRN", "S3+YaRN+DCA"]
    assert lc["retrieval"]["passkey"]["S3+YaRN+DCA"]["model_config_by_length"]["320"]["dual_chunk_attention_config"]


def test_a_scripted_checkpoint_scores_the_same_through_both_backends(scripted_ckpt, tmp_path):
    """The bigram machine's replies are the same under any sampling (its logits are 40 apart), so
    every chat suite must give identical results on our engine and through transformers; and the
    budget is exactly enforced in both (it thinks forever unless forced)."""
    settings = hf.HFEvalSettings(**{**SMALL.to_dict(), "suites": ("thinkfollow", "modes", "budget", "pass-at-k")})
    runs = {b: hf.run_hf_eval(str(scripted_ckpt), tmp_path / b, settings, backend=b, log=None)["suites"]
            for b in ("ours", "transformers")}
    for r in runs.values():
        for run in r["budget"]["runs"]:
            run.pop("seconds")
    assert runs["ours"] == runs["transformers"]
    budget = runs["ours"]["budget"]
    assert [x["mean_thinking_tokens"] for x in budget["runs"]] == [0, 4]
    assert all(x["budget_hit_share"] == 1.0 for x in budget["runs"])
    assert runs["ours"]["thinkfollow"]["by_expected"]["think"] == 0.0  # its think block never closes


# ----------------------------------------------------------------------------- the command
def test_dry_run_prints_the_plan_and_loads_nothing(random_ckpt, tmp_path):
    out = tmp_path / "never"
    result = CliRunner().invoke(main, ["eval-hf", str(random_ckpt), "--dry-run", "--n", "4", "--k", "2",
                                       "--budgets", "0,64", "--trained-length", str(TRAINED),
                                       "--lengths", "128,320", "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["backend"]["chosen"] == "ours" and plan["template"]["matches"]
    assert list(plan["suites"]) == list(hf.SUITES)
    assert plan["suites"]["budget"] == {"items": 4, "budgets": [0, 64], "replies": 12,
                                        "max_new_tokens": "budget + forced text + answer_tokens"}
    assert plan["suites"]["pass-at-k"]["replies"] == 8
    assert plan["suites"]["longcontext"]["lengths"] == [128, 320]
    assert "S3+YaRN+DCA" in plan["suites"]["longcontext"]["conditions"]
    assert not out.exists()


def test_a_directory_without_config_json_is_a_clear_error(random_ckpt, tmp_path):
    d = tmp_path / "tokenizer_only"
    d.mkdir()
    shutil.copy(random_ckpt / "tokenizer.json", d)
    result = CliRunner().invoke(main, ["eval-hf", str(d), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no config.json" in result.output and "Hugging Face" in result.output
    result = CliRunner().invoke(main, ["eval-hf", str(tmp_path / "nowhere" / "x" / "y"), "--dry-run"])
    assert result.exit_code == 2 and "no such checkpoint directory" in result.output


def test_the_command_needs_out_except_for_a_dry_run(random_ckpt):
    result = CliRunner().invoke(main, ["eval-hf", str(random_ckpt)])
    assert result.exit_code == 2 and "--out is required" in result.output


def test_help_lists_the_suites_and_backends():
    result = CliRunner().invoke(main, ["eval-hf", "--help"])
    assert result.exit_code == 0
    for word in ("thinkfollow", "pass-at-k", "longcontext", "transformers", "vllm", "--dry-run", "--device"):
        assert word in result.output


# ----------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("answer, expected", [
    ("The sum is \\boxed{133}.", "133"),
    ("\\boxed{1} first, then \\boxed{\\{2\\}}", "\\{2\\}"),
    ("\\boxed{\\text{Zosa}}", "Zosa"),
    ("\\boxed{12", None),
    ("133", None),
])
def test_boxed_answer(answer, expected):
    assert hf.boxed_answer(answer) == expected


def test_the_final_answer_is_the_boxed_value_after_the_think_block():
    item = tasks.generate("add", 0, 2)
    boxed = f"<think>\nsteps \\boxed{{0}}\n</think>\n\nSo {item.question} gives \\boxed{{{item.answer}}}.<|im_end|>"
    assert hf.score_task(item, boxed)
    assert hf.score_task(item, f"<think>\n\n</think>\n\n{item.answer}<|im_end|>")  # a bare answer still counts
    assert not hf.score_task(item, f"<think>\nmaybe \\boxed{{{item.answer}}}")  # never closed: no answer
    assert not hf.score_task(item, f"<think>\n\n</think>\n\n\\boxed{{{int(item.answer) + 1}}}")


def test_balanced_items_cover_every_cell():
    cells = {(f, d) for f, fam in tasks.FAMILIES.items() for d in range(fam.min_difficulty, fam.max_difficulty + 1)}
    items = hf.balanced_items(len(cells))
    assert {(it.family, it.difficulty) for it in items} == cells
    assert len(hf.balanced_items(5, ("add",))) == 5 and hf.balanced_items(7) == hf.balanced_items(7)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="suites"):
        hf.HFEvalSettings(suites=("thinkfollow", "mmlu"))
    with pytest.raises(ConfigError, match="unknown task families"):
        hf.HFEvalSettings(families=("chess",))
    assert hf.HFEvalSettings(budgets=(64, 0, 64)).budgets == (0, 64)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_backend_without_vllm_is_a_clear_error(random_ckpt):
    ckpt = hf.resolve_checkpoint(str(random_ckpt), download=False)
    with pytest.raises(ConfigError, match="vLLM is not installed"):
        hf.choose_backend("vllm", ckpt, "cuda")


def test_full_eval_converts_the_latest_checkpoint_and_evaluates_it(random_ckpt, tmp_path, monkeypatch):
    """`qwen3repro full-eval`: a stage's latest nanotron checkpoint -> Hugging Face layout with the tokenizer and
    chat template copied in -> eval-hf's suites on it, written beside the stage."""
    from click.testing import CliRunner

    from qwen3repro.nanotron.cli import full_eval_command
    from qwen3repro.nanotron.convert import hf_to_nanotron

    monkeypatch.chdir(tmp_path)
    checkpoints = tmp_path / "runs/full/qwen3-0.6b/fusion/checkpoints"
    hf_to_nanotron(random_ckpt, checkpoints / "40")  # the stage's last save, as the trainer leaves it
    (checkpoints / "latest.txt").write_text("40")
    r = CliRunner().invoke(full_eval_command, ["--stage", "fusion", "--model", "qwen3-0.6b", "--tokenizer",
                                               str(random_ckpt), "--suites", "thinkfollow", "--n", "8",
                                               "--backend", "transformers", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    stage = tmp_path / "runs/full/qwen3-0.6b/fusion"
    assert (stage / "hf/tokenizer.json").is_file() and (stage / "hf/config.json").is_file()
    metrics = json.loads((stage / "eval/metrics.json").read_text())
    assert "thinkfollow" in metrics["suites"]
    r = CliRunner().invoke(full_eval_command, ["--stage", "s1", "--model", "qwen3-0.6b"])
    assert r.exit_code != 0 and "no checkpoint yet" in r.output
