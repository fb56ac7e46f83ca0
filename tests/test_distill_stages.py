"""Strong-to-weak distillation stages (Qwen3 report §4.5): teacher outputs, off-policy distillation,
on-policy distillation, their checks before compute, and the FLOP ledger of Table 21's comparison."""
from __future__ import annotations

import json
import random

import datasets
import pytest
import torch

from qwen3repro.chat import render
from qwen3repro.config import ConfigError
from qwen3repro.data import tasks
from qwen3repro.lineage import make_lineage, read_lineage, write_lineage
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
from qwen3repro.stages import distill, onpolicy_distill, sft, teacher_outputs
from qwen3repro.stages.common import StageContext
from qwen3repro.tokenizer import train_tokenizer
from qwen3repro.train.compute import ComputeLedger, flop_parameters

quiet = lambda s: None  # noqa: E731


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij0123456789") for _ in range(rng.randint(1, 6))) for _ in range(200)]
    return train_tokenizer([" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)], 400)


def _checkpoint(path, tok, *, seed=0, **changes):
    torch.manual_seed(seed)
    config = get_model_config("micro")
    model = Qwen3(config.replace(**changes) if changes else config)
    model.save_pretrained(path)
    tok.save(path)
    write_lineage(path, make_lineage(path.name, {"seed": seed, **changes}))
    return path


# ----------------------------------------------------------------------------- FLOPs
def test_flop_parameters_by_hand():
    # tiny-student (tied): per layer q,k,v,o = 128*4*32 + 2*128*2*32 + 4*32*128 = 49,152, q/k norms 64,
    # two RMSNorms 256, SwiGLU 3*128*384 = 147,456; 4 layers, the final norm 128, the tied 1024 x 128 matrix.
    assert flop_parameters(get_model_config("tiny-student")) == 4 * (49_152 + 64 + 256 + 147_456) + 128 + 1024 * 128
    # tiny-moe (untied): 4 of 16 experts of 3*128*64 each, a 16 x 128 router; the input embedding is a
    # lookup (not counted), the separate lm_head is a matmul (counted).
    assert flop_parameters(get_model_config("tiny-moe")) == 4 * (49_152 + 64 + 256 + 4 * 3 * 128 * 64 + 16 * 128) \
        + 128 + 1024 * 128


def test_ledger_flops_by_hand_and_state_round_trip():
    ledger = ComputeLedger(n_student=1000, n_teacher=5000)
    ledger.add(trained=10, generated=4)
    ledger.add(trained=2, student_scored=3, teacher_scored=7)
    assert ledger.flops == 6 * 1000 * 12 + 2 * 1000 * (4 + 3) + 2 * 5000 * 7
    again = ComputeLedger(n_student=1)
    again.load_state_dict(ledger.state_dict())
    assert again == ledger
    with pytest.raises(ValueError, match="trained"):
        ledger.add(trained=-1)


def test_compute_matched_steps_by_hand():
    # 6 * 1000 params * 400 tokens = 2.4e6 FLOPs a step
    assert distill.compute_matched_steps(2.4e7, 1000, 400) == 10
    assert distill.compute_matched_steps(2.6e7, 1000, 400) == 11
    assert distill.compute_matched_steps(1.0, 1000, 400) == 1
    # Tokens a step as the loader lays them out: 5 examples of 30 tokens packed into rows of 64 (2 a row),
    # 2 rows a batch: batches of [2 rows, 1 row] x 64 positions = 192 positions over 2 batches.
    examples = [sft.make_example(list(range(31)), [1] * 31) for _ in range(5)]
    loader = sft.SFTLoader(examples, batch_size=2, seq_len=64, pad_id=0, batching="pack")
    assert loader.batches_per_epoch(0) == 2 and loader.tokens_per_epoch(0) == 3 * 64
    assert distill.tokens_per_step(loader) == 96 and distill.tokens_per_step(loader, grad_accum=2) == 192


# ----------------------------------------------------------------------------- teacher outputs
def test_prompts_ask_for_their_mode_in_every_setting():
    cfg = teacher_outputs.TeacherOutputsConfig(n_task_queries=40, n_general_queries=20)
    prompts = teacher_outputs.build_prompts(cfg)
    assert len(prompts) == 2 * 60
    assert {p.setting for p in prompts} == set(teacher_outputs.MODE_SETTINGS)
    assert not any(p.setting == "unflagged" for p in prompts if p.mode == "no_think")
    assert all(not tasks.is_heldout(p.query.uid) for p in prompts)
    from qwen3repro.chat import wants_thinking
    assert all(wants_thinking(list(p.messages)) == (p.mode == "think") for p in prompts)


def _answer_for(prompt, right: bool) -> str:
    item = prompt.query.item
    return item.answer if right else item.answer + "9"


def test_judge_keeps_only_well_formed_verified_answers_in_their_mode():
    cfg = teacher_outputs.TeacherOutputsConfig(n_task_queries=4, n_general_queries=0)
    think = next(p for p in teacher_outputs.build_prompts(cfg) if p.mode == "think")
    right = f"<think>\nwork\n</think>\n\n{_answer_for(think, True)}<|im_end|>"
    assert teacher_outputs.judge(think, right, [1], "stop", True) == ("kept", True)
    wrong = f"<think>\nwork\n</think>\n\n{_answer_for(think, False)}<|im_end|>"
    assert teacher_outputs.judge(think, wrong, [1], "stop", True) == ("wrong_answer", False)
    assert teacher_outputs.judge(think, wrong, [1], "stop", False) == ("kept", False)
    assert teacher_outputs.judge(think, right, [1], "length", True)[0] == "cut_by_length"
    empty_block = f"<think>\n\n</think>\n\n{_answer_for(think, True)}<|im_end|>"
    assert teacher_outputs.judge(think, empty_block, [1], "stop", True)[0] == "wrong_mode_or_malformed"
    assert teacher_outputs.assistant_content(right, "think") == f"<think>\nwork\n</think>\n\n{_answer_for(think, True)}"
    assert teacher_outputs.assistant_content(empty_block, "no_think") == f"<think>\n\n</think>\n\n{_answer_for(think, True)}"


@pytest.fixture()
def teacher_dir(tmp_path, tok):
    return _checkpoint(tmp_path / "teacher", tok, seed=1)


def _scripted_teacher(monkeypatch, tok, cfg):
    """Replace generation by a teacher that answers every other query right (in both modes) and the rest
    wrong, thinking or not as asked, and runs out of tokens on every fifth prompt."""
    by_ids = {}
    for i, p in enumerate(teacher_outputs.build_prompts(cfg)):
        by_ids[tuple(tok.encode(render(list(p.messages), add_generation_prompt=True)))] = (i, p)

    def fake(model, tokenizer, prompts, sampling, max_new_tokens, seed, batch_size):
        out = []
        for ids in prompts:
            i, p = by_ids[tuple(ids)]
            answer = _answer_for(p, (i // 2) % 2 == 0) if p.query.item is not None else "x"
            block = "<think>\nstep\n</think>\n\n" if p.mode == "think" else "<think>\n\n</think>\n\n"
            finish = "length" if i % 5 == 4 else "stop"
            out.append((tok.encode(block + answer + ("<|im_end|>" if finish == "stop" else "")), finish))
        return out

    monkeypatch.setattr(teacher_outputs, "_generate_engine", fake)


def test_teacher_outputs_stage_writes_a_dataset_of_verified_responses(tmp_path, tok, teacher_dir, monkeypatch):
    cfg = teacher_outputs.TeacherOutputsConfig(n_task_queries=12, n_general_queries=0, samples_per_query=2,
                                               families=("add", "mul"))
    _scripted_teacher(monkeypatch, tok, cfg)
    out = teacher_outputs.run(cfg, teacher_dir, StageContext(tmp_path / "to", tmp_path / "cache", quiet))
    data = datasets.load_from_disk(str(out / teacher_outputs.DATA_DIR))
    prompts = teacher_outputs.build_prompts(cfg)
    kept = [i for i in range(len(prompts)) if (i // 2) % 2 == 0 and i % 5 != 4]
    assert len(data) == len(kept)  # two identical samples per prompt: one kept, the other a duplicate
    assert set(data["mode"]) == {"think", "no_think"}
    assert all(v is True for v in data["verified"])
    assert set(data["teacher"]) == {read_lineage(teacher_dir).hash}
    assert json.loads(data[0]["sampling"])["temperature"] in (0.6, 0.7)
    for row in data:
        last = row["messages"][-1]
        assert last["role"] == "assistant" and last["content"].startswith("<think>\n")
        assert (row["mode"] == "no_think") == last["content"].startswith("<think>\n\n</think>")
    report = json.loads((out / teacher_outputs.REPORT_FILE).read_text())
    assert report["rows"] == len(kept) and report["teacher"]["vocab_size"] == 512
    assert sum(report["outcomes"]["think"].values()) + sum(report["outcomes"]["no_think"].values()) == 2 * len(prompts)
    assert read_lineage(out).complete
    convs, _ = teacher_outputs.load_teacher_outputs(out, ("no_think",))
    assert len(convs) == sum(m == "no_think" for m in data["mode"])
    assert all(None not in m.values() for c in convs for m in c)


def test_vllm_backend_without_vllm_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(teacher_outputs, "_vllm_available", lambda: False)
    assert teacher_outputs.resolve_backend("auto") == "engine"
    with pytest.raises(ConfigError, match="vllm"):
        teacher_outputs.resolve_backend("vllm")


# ----------------------------------------------------------------------------- checks before compute
def _no_compute(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("compute was spent before the check")
    monkeypatch.setattr(sft, "fine_tune", refuse)
    monkeypatch.setattr(Qwen3, "from_pretrained", classmethod(lambda cls, *a, **k: refuse()))


def test_offpolicy_refuses_a_student_of_another_vocabulary(tmp_path, tok, teacher_dir, monkeypatch):
    cfg = teacher_outputs.TeacherOutputsConfig(n_task_queries=6, n_general_queries=0, families=("add",))
    _scripted_teacher(monkeypatch, tok, cfg)
    outputs = teacher_outputs.run(cfg, teacher_dir, StageContext(tmp_path / "to", tmp_path / "cache", quiet))
    student = _checkpoint(tmp_path / "student", tok, vocab_size=640)
    _no_compute(monkeypatch)
    dcfg = distill.DistillConfig.from_dict({"teacher_outputs": "t", "sft": {"seq_len": 128, "batch_size": 2,
                                                                            "steps": 2}})
    ctx = StageContext(tmp_path / "d", tmp_path / "cache", quiet, inputs={"t": outputs})
    with pytest.raises(ConfigError, match=r"vocab_size 512 .* has 640"):
        distill.run(dcfg, student, ctx)
    rng = random.Random(1)
    words = ["".join(rng.choice("klmnopqrst0123456789") for _ in range(rng.randint(1, 6))) for _ in range(200)]
    other_tok = train_tokenizer([" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)], 360)
    other = _checkpoint(tmp_path / "other", other_tok)  # the same model vocab_size (512), another vocabulary
    with pytest.raises(ConfigError, match="different tokenizers"):
        distill.run(dcfg, other, ctx)


ONPOLICY = dict(teacher="t", families=["add"], n_queries=8, steps=4, queries_per_step=2, max_new_tokens=6,
                max_new_tokens_no_think=4, lr=3e-3, eval_every=2, eval_items=2, eval_k=2, eval_max_new_tokens=4,
                ckpt_every=2)


def test_onpolicy_refuses_mismatched_vocabulary_or_context_before_compute(tmp_path, tok, monkeypatch):
    student = _checkpoint(tmp_path / "student", tok)
    other_vocab = _checkpoint(tmp_path / "teacher_vocab", tok, vocab_size=640)
    short = _checkpoint(tmp_path / "teacher_short", tok, max_position_embeddings=24)
    _no_compute(monkeypatch)
    cfg = onpolicy_distill.OnPolicyDistillConfig.from_dict(ONPOLICY)
    with pytest.raises(ConfigError, match="vocab_size"):
        onpolicy_distill.run(cfg, student, StageContext(tmp_path / "a", tmp_path / "c", quiet,
                                                        inputs={"t": other_vocab}))
    with pytest.raises(ConfigError, match=r"beyond the teacher's context of 24"):
        onpolicy_distill.run(cfg, student, StageContext(tmp_path / "b", tmp_path / "c", quiet, inputs={"t": short}))
    assert not (tmp_path / "a" / "metrics.jsonl").exists() and not (tmp_path / "b" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- on-policy distillation
def _records(out):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in map(json.loads, (out / "metrics.jsonl").open())]


def test_onpolicy_teacher_kl_falls_on_a_fixed_seed(tmp_path, tok):
    student = _checkpoint(tmp_path / "student", tok, seed=0)
    teacher = _checkpoint(tmp_path / "teacher", tok, seed=1)
    cfg = onpolicy_distill.OnPolicyDistillConfig.from_dict({**ONPOLICY, "steps": 12, "eval_every": 12,
                                                            "ckpt_every": 0, "queries_per_step": 4})
    out = onpolicy_distill.run(cfg, student, StageContext(tmp_path / "o", tmp_path / "c", quiet,
                                                          inputs={"t": teacher}))
    rows = [r for r in _records(out) if "teacher_kl" in r]
    first, last = sum(r["teacher_kl"] for r in rows[:3]) / 3, sum(r["teacher_kl"] for r in rows[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    for mode in ("think", "no_think"):
        assert all(r[f"teacher_kl/{mode}"] >= 0 and f"entropy/{mode}" in r and f"response_length/{mode}" in r
                   for r in rows)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["teacher_kl_end"] < ev["teacher_kl_start"]
    assert read_lineage(out).uses  # the teacher's lineage is folded in


def test_onpolicy_flops_match_a_hand_count_and_a_cut_run_resumes_exactly(tmp_path, tok, monkeypatch, cut_at_call):
    student = _checkpoint(tmp_path / "student", tok, seed=0)
    teacher = _checkpoint(tmp_path / "teacher", tok, seed=1, intermediate_size=256)
    cfg = onpolicy_distill.OnPolicyDistillConfig.from_dict({**ONPOLICY, "loss": "pg"})
    full = onpolicy_distill.run(cfg, student, StageContext(tmp_path / "full", tmp_path / "c", quiet,
                                                           inputs={"t": teacher}))
    records = _records(full)
    # Recount by hand: every step's prompts (the same stream) and the logged response lengths.
    stream = onpolicy_distill.QueryStream(onpolicy_distill.training_queries(cfg), cfg.seed)
    trained = generated = 0
    for r in records[1:]:
        taken = stream.take(cfg.queries_per_step)
        prompt_tokens = sum(len(onpolicy_distill.prompt_ids(tok, q, m)) for q in taken for m in cfg.modes)
        responses = sum(r[f"response_length/{m}"] * cfg.queries_per_step for m in cfg.modes)
        trained += prompt_tokens + round(responses)
        generated += round(responses)
    n_s = flop_parameters(get_model_config("micro"))
    n_t = flop_parameters(get_model_config("micro").replace(intermediate_size=256))
    compute = json.loads((full / "compute.json").read_text())
    assert compute["trained_tokens"] == trained and compute["generated_tokens"] == generated
    assert compute["flops"] == 6 * n_s * trained + 2 * n_s * generated + 2 * n_t * trained
    assert records[-1]["flops"] == compute["flops"]

    cut = tmp_path / "cut"
    with cut_at_call(onpolicy_distill, "distill_loss", 3):
        onpolicy_distill.run(cfg, student, StageContext(cut, tmp_path / "c", quiet, inputs={"t": teacher}))
    said = []
    onpolicy_distill.run(cfg, student, StageContext(cut, tmp_path / "c", said.append, inputs={"t": teacher}))
    assert any("resumed" in s for s in said)
    assert _records(cut) == records
    assert json.loads((cut / "compute.json").read_text()) == compute


def test_onpolicy_config_errors_name_the_setting():
    with pytest.raises(ConfigError, match="loss"):
        onpolicy_distill.OnPolicyDistillConfig(loss="forward")
    with pytest.raises(ConfigError, match="beta"):
        onpolicy_distill.OnPolicyDistillConfig(beta=1.5)
    with pytest.raises(ConfigError, match="modes"):
        onpolicy_distill.OnPolicyDistillConfig(modes=("think", "think"))


def test_offpolicy_distills_both_modes_and_a_control_matches_the_compute_it_is_given(tmp_path, tok, teacher_dir,
                                                                                       monkeypatch):
    cfg = teacher_outputs.TeacherOutputsConfig(n_task_queries=16, n_general_queries=0, families=("add", "mul"))
    _scripted_teacher(monkeypatch, tok, cfg)
    outputs = teacher_outputs.run(cfg, teacher_dir, StageContext(tmp_path / "to", tmp_path / "cache", quiet))
    student = _checkpoint(tmp_path / "student", tok, seed=2)
    table = {"teacher_outputs": "t", "sft": {"seq_len": 96, "batch_size": 2, "steps": 3, "n_eval": 2,
                                             "batching": "pack", "train": {"lr": 1e-3}}}
    out = distill.run(distill.DistillConfig.from_dict(table), student,
                      StageContext(tmp_path / "d", tmp_path / "cache", quiet, inputs={"t": outputs}))
    compute = json.loads((out / "compute.json").read_text())
    tokens = json.loads((out / "eval.json").read_text())["tokens_seen"]
    assert compute["trained_tokens"] == tokens == 3 * 2 * 96  # packed rows: every position is computed
    assert compute["flops"] == 6 * flop_parameters(get_model_config("micro")) * tokens
    assert set(read_lineage(out).uses) == {"t"}

    target = tmp_path / "arm"
    target.mkdir()
    (target / "compute.json").write_text(json.dumps({"flops": 10 * compute["flops"] / 3}))
    write_lineage(target, make_lineage("arm", {}))
    more = distill.DistillConfig.from_dict({**table, "match_compute_of": "arm"})
    out = distill.run(more, out, StageContext(tmp_path / "m", tmp_path / "cache", quiet,
                                              inputs={"t": outputs, "arm": target}))
    matched = json.loads((out / "compute.json").read_text())
    one_step = compute["flops"] / 3  # a full step: 2 packed rows of 96
    # The step count comes from the epoch's mean step (a last batch may hold one row), so the arm lands
    # within one step of the target, never short of it by more.
    assert matched["matched"]["steps"] >= 10
    assert abs(matched["flops"] - 10 * one_step) <= one_step
