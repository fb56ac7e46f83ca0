"""Peer checks against verl 0.9.1, run inside the verl environment (`make verl-env`) by tests/test_verl_peer.py.

    .venv-verl/bin/python tests/verl_peer/peer_checks.py WORKDIR [CHECK ...]

Prints one JSON object: check name -> {"ok": bool, "detail": str}. Each check is independent; an exception
is reported as that check's failure with its traceback's last lines. Nothing is downloaded: the tokenizer is
trained here with the project's own builder and saved in WORKDIR.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

WORKDIR = Path(sys.argv[1])
ATOL = 1e-6


# ----------------------------------------------------------------------------- shared fixtures
def tokenizer_dir() -> Path:
    """A small byte-level BPE with Qwen3's special tokens and our chat template, saved as HF reads it."""
    out = WORKDIR / "tokenizer"
    if not (out / "tokenizer.json").exists():
        from qwen3repro.data.general_tasks import GENERAL_TASKS, sample_task_queries
        from qwen3repro.tokenizer import train_tokenizer

        texts = [q.question for _, q in sample_task_queries({n: 1.0 for n in GENERAL_TASKS}, 200, seed=0,
                                                           heldout=False)]
        train_tokenizer(texts * 3, 1024).save(out)
    return out


def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge that always answers "Score: 8" (the reward is then 0.8)."""

    def do_POST(self):  # noqa: N802 - the http.server interface
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Agrees.\nScore: 8"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start_judge() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ["QWEN3REPRO_JUDGE_BASE_URL"] = f"http://127.0.0.1:{server.server_address[1]}/v1"


def corpus() -> list[tuple[dict, str]]:
    """(row, response text as the model wrote it, special tokens included) for every data-source kind."""
    from qwen3repro.chat import EMPTY_THINK
    from qwen3repro.verl.data import stage_rows

    rows = []
    for stage in ("reasoning-rl", "distill-online"):
        rows += stage_rows(stage, n=6, n_val=1)["train"]
    general = stage_rows("general-rl", n=8, n_val=1)["val"]  # one held-out row of every task
    rows += [r for r in general if r["extra_info"]["task"] not in ("write_person", "write_city", "code_write")]
    out = []
    for row in rows:
        truth = json.loads(row["reward_model"]["ground_truth"])
        ref = truth["reference"]
        answer = ref.get("answer") or (ref.get("item") or {}).get("answer") or ref.get("reference") or "Paris"
        think = "<think>\nLet me work it out.\n</think>\n\n" if row["extra_info"]["thinking"] else EMPTY_THINK
        responses = [think + answer, think + "a wrong answer", "<think>\nnever closed " + answer, think + answer +
                     "<|im_end|>", EMPTY_THINK + answer]
        if truth.get("tools"):
            call = ('<tool_call>\n{"name": "%s", "arguments": {"query": "x"}}\n</tool_call><|im_end|>'
                    % truth["tools"][0])
            tool_turn = "\n<|im_start|>user\n<tool_response>\n" + answer + "\n</tool_response><|im_end|>\n" \
                        "<|im_start|>assistant\n"
            responses += [think + call + tool_turn + think + answer, think + call + tool_turn + think + "no idea"]
        out += [(row, r) for r in responses]
    return out


def _batch(tok, items):
    """A verl DataProto of (row, response) pairs: left-padded prompts, right-padded responses."""
    from verl import DataProto

    from qwen3repro.verl.data import prompt_text

    prompts = [tok.encode(prompt_text(row), add_special_tokens=False) for row, _ in items]
    responses = [tok.encode(text, add_special_tokens=False) for _, text in items]
    p, r = max(map(len, prompts)), max(map(len, responses))
    pad = tok.pad_token_id
    prompt_ids = torch.tensor([[pad] * (p - len(x)) + x for x in prompts])
    response_ids = torch.tensor([x + [pad] * (r - len(x)) for x in responses])
    mask = torch.tensor([[0] * (p - len(a)) + [1] * len(a) + [1] * len(b) + [0] * (r - len(b))
                         for a, b in zip(prompts, responses)])
    non_tensors = {key: np.array([row[key] for row, _ in items], dtype=object)
                   for key in ("data_source", "reward_model", "extra_info")}
    return DataProto.from_dict(tensors={"prompts": prompt_ids, "responses": response_ids, "attention_mask": mask,
                                        "input_ids": torch.cat([prompt_ids, response_ids], 1)},
                               non_tensors=non_tensors), responses


# ----------------------------------------------------------------------------- checks
def check_reward_manager() -> str:
    """compute_score through both of verl's naive reward managers equals direct calls, on every kind of source."""
    from omegaconf import OmegaConf
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager as LoopNaive
    from verl.workers.reward_manager.naive import NaiveRewardManager

    from qwen3repro.verl.reward import compute_score

    start_judge()
    tok = hf_tokenizer()
    items = corpus()
    data, responses = _batch(tok, items)
    got = NaiveRewardManager(tokenizer=tok, num_examine=0, compute_score=compute_score)(data, return_dict=True)
    loop_manager = LoopNaive(OmegaConf.create({}), tok, compute_score)
    kinds, judged = set(), 0
    for i, ((row, text), ids) in enumerate(zip(items, responses)):
        decoded = tok.decode(ids, skip_special_tokens=True)
        direct = compute_score(row["data_source"], decoded, row["reward_model"]["ground_truth"], row["extra_info"])
        as_written = compute_score(row["data_source"], text, row["reward_model"]["ground_truth"], row["extra_info"])
        manager = float(got["reward_tensor"][i, len(ids) - 1])
        assert abs(manager - direct["score"]) < ATOL, (row["data_source"], text, manager, direct)
        assert float(got["reward_tensor"][i].sum()) == manager  # the reward sits on the last response token
        assert got["reward_extra_info"]["acc"][i] == direct["acc"]
        assert direct["score"] == as_written["score"], ("special tokens changed the score", text, direct, as_written)
        loop = asyncio.get_event_loop().run_until_complete(loop_manager.run_single(data[i:i + 1]))
        assert abs(loop["reward_score"] - direct["score"]) < ATOL, (row["data_source"], loop, direct)
        kinds.add(row["data_source"].split("/")[1])
        judged += row["data_source"].endswith(("judge_profile", "judge_compare_ages")) and direct["score"] > 0
    assert kinds == {"reasoning", "general", "distill"} and judged, (kinds, judged)
    return f"{len(items)} responses over {len({r['data_source'] for r, _ in items})} data sources, {judged} judged"


def check_rlhf_dataset() -> str:
    """verl's RLHFDataset reads our parquet with a local tokenizer, and renders our prompts as our template does."""
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from qwen3repro.verl.data import prompt_text, write_stage

    tok = hf_tokenizer()
    lines = []
    for stage in ("reasoning-rl", "general-rl", "distill-online"):
        out = WORKDIR / "data" / stage
        meta = write_stage(stage, out, n=24, n_val=1)
        for split in ("train", "val"):
            config = OmegaConf.create({"max_prompt_length": 8192, "cache_dir": str(WORKDIR / "cache"),
                                       "filter_overlong_prompts_workers": 1})
            dataset = RLHFDataset(str(out / f"{split}.parquet"), tok, config)
            assert len(dataset) == meta["files"][f"{split}.parquet"]["rows"], (stage, split, len(dataset))
            for i in range(len(dataset)):
                item = dataset[i]
                row = {"prompt": item["raw_prompt"], "extra_info": item["extra_info"]}
                ours = prompt_text(row)
                theirs = tok.apply_chat_template(item["raw_prompt"], add_generation_prompt=True, tokenize=False)
                assert ours == theirs, (stage, ours, theirs)
                assert item["index"] == item["extra_info"]["index"] == i
                assert item["data_source"].startswith("qwen3repro/") and item["agent_name"] in (
                    "tool_agent", "single_turn_agent")
                json.loads(item["reward_model"]["ground_truth"])
                if item["extra_info"].get("need_tools_kwargs"):
                    assert set(item["tools_kwargs"]) >= set(item["extra_info"]["tool_selection"])
                    assert item["agent_name"] == "tool_agent"
            lines.append(f"{stage}/{split}: {len(dataset)}")
    return ", ".join(lines)


def check_hermes_parser() -> str:
    """verl's Hermes tool parser and our chat.parse agree on the tool calls our template renders."""
    from verl.experimental.agent_loop.tool_parser import HermesToolParser

    from qwen3repro.chat import parse, render

    tok = hf_tokenizer()
    parser = HermesToolParser(tok)
    calls = [
        [{"name": "lookup", "arguments": {"name": "Elur", "attribute": "job"}}],
        [{"name": "calculator", "arguments": {"expression": "(12 + 7) * 3"}},
         {"name": "search", "arguments": {"query": "lives in Paris, héllo \"quoted\""}}],
        [{"name": "search", "arguments": {"query": "x", "filters": {"k": [1, 2.5, None, True]}}}],
    ]
    checked = 0
    for turn_calls in calls:
        for content in ("", "I will call the tool.", "<think>\nreasoning first\n</think>\n\nCalling."):
            text = render([{"role": "user", "content": "q"},
                           {"role": "assistant", "content": content, "tool_calls": turn_calls}])
            turn = text.split("<|im_start|>assistant\n")[-1]
            ids = tok.encode(turn, add_special_tokens=False)
            _, theirs = asyncio.get_event_loop().run_until_complete(parser.extract_tool_calls(ids))
            ours = parse(turn)["tool_calls"]
            assert [c.name for c in theirs] == [c["name"] for c in ours] == [c["name"] for c in turn_calls]
            assert [json.loads(c.arguments) for c in theirs] == [c["arguments"] for c in ours]
            checked += 1
    # Where they differ (and why the reward does not depend on it): a malformed block is a parse error for us
    # and silently skipped by verl (neither is a call); a call written inside the think block is a call for
    # verl's parser but not for ours (our template never renders one there).
    malformed = '<think>\n\n</think>\n\n<tool_call>\n{"name": "lookup", "arguments": \n</tool_call><|im_end|>'
    _, theirs = asyncio.get_event_loop().run_until_complete(parser.extract_tool_calls(tok.encode(malformed)))
    assert theirs == [] and parse(malformed)["tool_calls"] == [] and parse(malformed)["errors"]
    in_think = '<think>\n<tool_call>\n{"name": "lookup", "arguments": {}}\n</tool_call>\n</think>\n\nAnswer.'
    _, theirs = asyncio.get_event_loop().run_until_complete(parser.extract_tool_calls(tok.encode(in_think)))
    assert len(theirs) == 1 and parse(in_think)["tool_calls"] == []
    return f"{checked} rendered turns agree; malformed and in-think calls differ as documented"


def _actor_config(eps_low: float, eps_high: float, agg: str):
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", clip_ratio_low=eps_low, clip_ratio_high=eps_high, loss_agg_mode=agg,
                       ppo_micro_batch_size_per_gpu=1, rollout_n=8, ppo_mini_batch_size=8)


def _tensors(draw, st, max_log_ratio: float):
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    floats = st.floats(-6.0, -0.01, allow_nan=False)
    logps = torch.tensor(draw(st.lists(floats, min_size=b * t, max_size=b * t)), dtype=torch.float64).view(b, t)
    shift = st.floats(-max_log_ratio, max_log_ratio, allow_nan=False)
    old = logps + torch.tensor(draw(st.lists(shift, min_size=b * t, max_size=b * t)), dtype=torch.float64).view(b, t)
    adv = torch.tensor(draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=b, max_size=b)),
                       dtype=torch.float64)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t)), dtype=torch.float64).view(b, t)
    mask[0, 0] = 1.0  # at least one scored token
    return logps, old, adv, mask


def check_grpo_loss() -> str:
    """losses.grpo_loss == verl's core_algos vanilla policy loss (loss and gradient), for each loss_type that has a
    verl aggregation: dapo/bnpo <-> token-mean, grpo <-> seq-mean-token-mean, dr_grpo <-> seq-mean-token-sum-norm;
    asymmetric clipping. Ratios stay below verl's dual-clip bound (clip_ratio_c = 3, which our loss lacks)."""
    from hypothesis import given, settings, strategies as st
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    from qwen3repro.losses import grpo_loss

    pairs = {"dapo": "token-mean", "bnpo": "token-mean", "grpo": "seq-mean-token-mean",
             "dr_grpo": "seq-mean-token-sum-norm"}
    seen = {"n": 0}

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(data=st.data(), eps_low=st.sampled_from([0.1, 0.2]), eps_high=st.sampled_from([0.2, 0.28, 0.4]),
           loss_type=st.sampled_from(sorted(pairs)))
    def run(data, eps_low, eps_high, loss_type):
        logps, old, adv, mask = _tensors(data.draw, st, max_log_ratio=1.0)  # ratio in [e^-1, e] < 3
        ours_in = logps.clone().requires_grad_(True)
        ours = grpo_loss(ours_in, old, adv, mask, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high)
        theirs_in = logps.clone().requires_grad_(True)
        config = _actor_config(eps_low, eps_high, pairs[loss_type])
        # What verl's trainer sets from the batch (workers/utils/losses.py): every sequence of the batch counts in
        # the sequence means, a fully masked one too (as in ours), and dr_grpo's constant is the response length.
        config.global_batch_info.update(dp_size=1, batch_num_tokens=mask.sum(), global_batch_size=logps.shape[0],
                                        loss_scale_factor=logps.shape[1])
        theirs, _ = compute_policy_loss_vanilla(old, theirs_in, adv[:, None].expand_as(logps), mask,
                                                loss_agg_mode=pairs[loss_type], config=config)
        assert torch.allclose(ours, theirs, atol=ATOL), (loss_type, float(ours), float(theirs))
        g_ours, = torch.autograd.grad(ours, ours_in)
        g_theirs, = torch.autograd.grad(theirs, theirs_in)
        assert torch.allclose(g_ours, g_theirs, atol=ATOL), (loss_type, g_ours, g_theirs)
        seen["n"] += 1

    run()
    return f"{seen['n']} hypothesis cases (loss and gradient, 4 aggregations)"


def _packed(values: torch.Tensor) -> torch.Tensor:
    """[B, T] response values in verl's unpadded layout for prompts of one token: one row of 1 + T positions
    per sequence, the response's values first (verl reads them shifted left by one)."""
    return torch.cat([torch.cat([row, row.new_zeros(1)]) for row in values])


def check_distill_k1() -> str:
    """Our on-policy distillation loss (losses.reverse_kl_pg_loss: advantage -(log p_S - log p_T), token mean) ==
    verl's distillation loss k1 with use_policy_gradient=True (loss and gradient), on-policy and off-policy
    within the clip range; verl's loss_max_clamp is off (our loss has none)."""
    from hypothesis import given, settings, strategies as st
    from tensordict import TensorDict
    from verl.trainer.distillation.losses import distillation_loss
    from verl.workers.config import DistillationConfig, DistillationLossConfig

    from qwen3repro.losses import reverse_kl_pg_loss

    seen = {"n": 0}

    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(data=st.data(), on_policy=st.booleans())
    def run(data, on_policy):
        logps, teacher, _, mask = _tensors(data.draw, st, max_log_ratio=3.0)
        # Off-policy: the sampler's log-probs within verl's clip range (ratio in [0.85, 1.15], eps 0.2), where
        # the clipped surrogate equals the unclipped one our loss uses.
        shift = torch.tensor(data.draw(st.lists(st.floats(-0.15, 0.15), min_size=logps.numel(),
                                                max_size=logps.numel())), dtype=torch.float64).view_as(logps)
        old = logps if on_policy else logps + shift
        b, t = logps.shape
        ours_in = logps.clone().requires_grad_(True)
        ours = reverse_kl_pg_loss(ours_in, teacher, mask, old_logps=None if on_policy else old)
        theirs_in = logps.clone().requires_grad_(True)
        loss_config = DistillationLossConfig(loss_mode="k1", use_policy_gradient=True, loss_max_clamp=None,
                                             clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2)
        # `distillation_loss` reads only the loss settings; enabling distillation would also ask for a teacher
        # model and its GPUs, which this check has no use for.
        distill_config = DistillationConfig(enabled=False, distillation_loss=loss_config)
        batch = TensorDict({
            "prompts": torch.ones(b, 1, dtype=torch.long), "responses": torch.ones(b, t, dtype=torch.long),
            "attention_mask": torch.ones(b, 1 + t, dtype=torch.long), "response_mask": mask.bool(),
            # Per sequence, as verl's teacher loop hands them over: a jagged tensor in the unpadded layout.
            "teacher_logprobs": torch.nested.nested_tensor(
                [torch.cat([row, row.new_zeros(1)])[:, None] for row in teacher], layout=torch.jagged),
            "old_log_probs": old.detach(),
            "dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": b,
        }, batch_size=[])  # the scalars (dp_size, ...) sit beside the per-sequence tensors
        theirs, _ = distillation_loss(_actor_config(0.2, 0.2, "token-mean"), distill_config,
                                      {"log_probs": _packed(theirs_in)}, batch)
        assert torch.allclose(ours, theirs.to(ours.dtype), atol=ATOL), (float(ours), float(theirs))
        g_ours, = torch.autograd.grad(ours, ours_in)
        g_theirs, = torch.autograd.grad(theirs, theirs_in)
        assert torch.allclose(g_ours, g_theirs, atol=ATOL), (g_ours, g_theirs)
        seen["n"] += 1

    run()
    return f"{seen['n']} hypothesis cases (loss and gradient)"


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


def main(names: list[str]) -> None:
    WORKDIR.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names or list(CHECKS):
        try:
            results[name] = {"ok": True, "detail": CHECKS[name]()}
        except BaseException as exc:  # noqa: BLE001 - every failure is reported, the other checks still run
            results[name] = {"ok": False, "detail": "".join(traceback.format_exception(exc))[-3000:]}
    print("PEER-RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[2:])
