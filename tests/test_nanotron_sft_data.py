"""Full-scale SFT / off-policy distillation data: conversations -> masked packed shards -> nanotron's loss.

* shard round trip: every kept conversation comes back exactly once, with labels = the next token where
  `chat.tokenize_conversation`'s mask is 1 and -100 elsewhere, position ids restarting per conversation (the
  documents the nanotron model derives from them are the stored segments); too-long conversations are dropped
  and counted; malformed lines are errors naming file and line;
* sources: local JSON lines and parquet (stand-ins for the hub ids, which go through the same
  `datasets.load_dataset` call; here it is replaced, nothing is downloaded), mixed by weight;
* the loader splits rows over data-parallel ranks and refuses shards of another sequence length; the launcher
  refuses token shards for an SFT stage and conversation shards for a pretraining stage;
* nanotron's training step (1F1B pipeline engine, PP=2, 2 gloo processes) on micro-batches read from the
  shards through the launcher's batch conversion gives our plain model's `masked_cross_entropy` per micro-batch,
  and, with the launcher's token weighting for SFT, `masked_cross_entropy` over the whole step's tokens;
* `full --dry-run` for cold-start and distill prints the data source, the mask and the shard folder;
* fusion: shards written from a thinking and a non-thinking source hold each conversation token for token as the
  tiny fusion stage builds it (`/think` or no flag, `/no_think` with the empty think block, in the system or the
  user turn, per conversation), non-thinking data with reasoning is dropped and counted, and the sources' modes
  come from full/stages.toml.
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("nanotron")

from gloo_helpers import free_port  # noqa: E402

from qwen3repro.chat import tokenize_conversation  # noqa: E402
from qwen3repro.data.packing import DataError  # noqa: E402
from qwen3repro.nanotron import sft_data  # noqa: E402
from qwen3repro.tokenizer import train_tokenizer  # noqa: E402

SEQ = 96


def _conversations():
    """Chats of varied shape: system prompt, reasoning, multi-turn, a final answer without reasoning."""
    out = []
    for i in range(24):
        a, b = 3 + i, 7 * i + 1
        msgs = [{"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"<think>\nAdd {a} and {b}.\n</think>\n\n{a + b}"}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "Answer briefly."})
        if i % 4 == 1:
            msgs += [{"role": "user", "content": "And times two?"}, {"role": "assistant", "content": str(2 * (a + b))}]
        if i % 5 == 2:  # far longer than SEQ tokens: dropped and counted
            msgs[-1] = {"role": "assistant", "content": " ".join(f"step {k} adds {a}" for k in range(40))}
        out.append(msgs)
    return out


CONVS = _conversations()


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for c in CONVS for m in c]
    return train_tokenizer(texts, 300)


def _write_jsonl(path, convs):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("sft")
    src = _write_jsonl(d / "convs.jsonl", CONVS)
    manifest = sft_data.write_sft_shards([{"kind": "jsonl", "path_or_id": str(src), "text_field": "messages"}], tok,
                                         d / "shards", seq_len=SEQ, rows_per_shard=3, chunk_conversations=8,
                                         tokenizer_name="test-tokenizer", stage="cold-start")
    return d / "shards", manifest


def _segments(batch):
    """(input_ids, labels, position_ids) of every conversation in a batch of packed rows."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in sorted(set(seg.tolist()) - {-1}):
            at = seg == s
            out.append(tuple(batch[k][r][at].tolist() for k in ("input_ids", "labels", "position_ids")))
        pad = seg == -1
        assert (batch["labels"][r][pad] == -100).all()  # padding never trains
    return out


# ------------------------------------------------------------------------------------------ shards
def test_shard_round_trip_mask_equals_tokenize_conversation(shards, tok):
    from qwen3repro.nanotron.model import segment_ids_from_positions

    path, manifest = shards
    want, too_long = {}, 0
    for c in CONVS:
        ids, mask = tokenize_conversation(tok, c)
        if len(ids) > SEQ + 1:
            too_long += 1
            continue
        labels = tuple(t if m else -100 for t, m in zip(ids[1:], mask[1:]))
        want[tuple(ids[:-1])] = labels
    assert too_long > 0 and len(want) > 0
    counts = manifest["counts"]
    assert counts["read"] == len(CONVS) and counts["kept"] == len(want)
    assert counts["dropped_too_long"] == too_long and counts["dropped_no_assistant_tokens"] == 0
    assert manifest["chat_template_sha256"] == sft_data.chat_template_hash() and manifest["seq_len"] == SEQ

    loader = sft_data.MaskedShardLoader(path, seq_len=SEQ, micro_batch_size=1)
    assert len(loader.ds) == counts["rows"] and len(manifest["files"]) > 1
    seen = []
    for batch in loader:
        assert batch["input_ids"].shape == (1, SEQ)
        for ids, labels, pos in _segments(batch):
            assert want[tuple(ids)] == tuple(labels)  # the mask is tokenize_conversation's, shifted by one
            assert pos == list(range(len(ids)))
            seen.append(tuple(ids))
        # the document boundaries the nanotron model derives from position ids are the stored segments
        seg = batch["segment_ids"][0]
        derived = segment_ids_from_positions(batch["position_ids"])
        real = seg >= 0
        if derived is not None:
            assert torch.equal(derived[0][real] - derived[0][0], seg[real])
    assert sorted(seen) == sorted(want)  # every kept conversation exactly once
    assert sum(int((b["labels"] != -100).sum()) for b in loader) == counts["assistant_tokens"]


@pytest.mark.parametrize("line, needle", [
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('{"conversation": []}', "no 'messages' field"),
    ('{"messages": "hello"}', "non-empty list of messages"),
    ('{"messages": [{"content": "no role"}]}', "message 0 must be an object with a string 'role'"),
    ('{"messages": [{"role": "narrator", "content": "x"}]}', "narrator"),
])
def test_malformed_line_is_an_error_naming_the_line(tmp_path, tok, line, needle):
    src = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": CONVS[0]})
    src.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(DataError) as e:
        sft_data.write_sft_shards([{"kind": "jsonl", "path_or_id": str(src), "text_field": "messages"}], tok,
                                  tmp_path / "out", seq_len=SEQ)
    assert f"{src} line 3" in str(e.value) and needle in str(e.value)


def test_parquet_and_jsonl_sources_mixed_by_weight(tmp_path, tok):
    import datasets

    pq = tmp_path / "thinking.parquet"
    datasets.Dataset.from_list([{"messages": c, "id": i} for i, c in enumerate(CONVS)]).to_parquet(str(pq))
    jl = _write_jsonl(tmp_path / "plain.jsonl", CONVS[:12])
    sources = [{"kind": "parquet", "path_or_id": str(pq), "text_field": "messages", "weight": 0.5, "name": "a"},
               {"kind": "jsonl", "path_or_id": str(jl), "text_field": "messages", "weight": 0.5, "name": "b"}]
    m = sft_data.write_sft_shards(sources, tok, tmp_path / "out", seq_len=SEQ, seed=3)
    per = m["per_source"]
    assert per["b"]["read"] == 12  # stops when the first source runs out (every prefix keeps the weights)
    assert 0 < per["a"]["read"] < len(CONVS) and m["counts"]["read"] == per["a"]["read"] + per["b"]["read"]
    again = sft_data.write_sft_shards(sources, tok, tmp_path / "out2", seq_len=SEQ, seed=3)
    assert again["counts"] == m["counts"]  # seeded

    bad = [{"kind": "parquet", "path_or_id": str(pq), "text_field": "conversation"}]
    with pytest.raises(DataError, match=r"source parquet:.* row 0: no 'conversation' column"):
        sft_data.write_sft_shards(bad, tok, tmp_path / "out3", seq_len=SEQ)


def test_hub_source_goes_through_load_dataset(tmp_path, tok, monkeypatch):
    """A hub id is loaded as the pretraining sources are (datasets.load_dataset); replaced here, never downloaded."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, cache_dir=None):
        calls.append((path, name, split, streaming))
        return datasets.Dataset.from_list([{"messages": c} for c in CONVS[:6]])

    monkeypatch.setattr("qwen3repro.data.mixture.datasets.load_dataset", fake_load_dataset)
    src = {"kind": "hub", "path_or_id": "org/chats", "config_name": "all", "text_field": "messages", "streaming": True}
    m = sft_data.write_sft_shards([src], tok, tmp_path / "out", seq_len=SEQ)
    assert calls == [("org/chats", "all", "train", True)] and m["counts"]["read"] == 6


def test_loader_splits_rows_over_dp_ranks_and_checks_length(shards):
    path, manifest = shards
    ranks = [sft_data.MaskedShardLoader(path, seq_len=SEQ, micro_batch_size=2, dp_rank=r, dp_size=2) for r in (0, 1)]
    a, b = (set(r.rows(0).tolist()) for r in ranks)
    assert not a & b and len(a) == len(b) == ranks[0].rows_per_rank
    assert len(list(ranks[0])) == len(list(ranks[1])) == len(ranks[0])
    assert not torch.equal(torch.as_tensor(ranks[0].rows(0)), torch.as_tensor(ranks[0].rows(1)))  # new order per epoch
    with pytest.raises(DataError, match=f"packed to {SEQ} tokens, the stage trains at 4096"):
        sft_data.MaskedShardLoader(path, seq_len=4096, micro_batch_size=1)


def test_launcher_refuses_the_wrong_kind_of_data(shards, tmp_path):
    from qwen3repro.nanotron.launch import make_loader

    path, _ = shards
    kw = dict(seq_len=SEQ, micro_batch_size=1, seed=0, dp_rank=0, dp_size=1, eot_id=0)
    tokens = tmp_path / "tokens.jsonl"
    tokens.write_text('{"input_ids": [1, 2, 3]}\n')
    with pytest.raises(DataError, match="assistant tokens only"):
        make_loader("sft", str(tokens), **kw)
    with pytest.raises(DataError, match="pretraining stage"):
        make_loader("pretrain", str(path), **kw)
    assert isinstance(make_loader("sft", str(path), **kw), sft_data.MaskedShardLoader)


# ------------------------------------------------------------------------------ the training step


def _step_worker(rank, port, path):
    from qwen3repro.losses import masked_cross_entropy
    from qwen3repro.models.qwen3 import Qwen3
    from qwen3repro.models.registry import get_model_config
    from qwen3repro.nanotron import compat

    torch.set_num_threads(1)
    compat.init_gloo(rank, 2, port)
    compat.import_nanotron()
    import nanotron.distributed as dist
    from nanotron.parallel.pipeline_parallel.engine import OneForwardOneBackwardPipelineEngine

    from qwen3repro.nanotron.convert import load_state_dict_into
    from qwen3repro.nanotron.launch import make_loader, nanotron_batches
    from qwen3repro.nanotron.model import Qwen3NTConfig, build_qwen3, weight_by_tokens

    pc = compat.cpu_parallel_context(tp=1, pp=2)
    cfg = get_model_config("micro")
    torch.manual_seed(0)
    ref = Qwen3(cfg)
    model = build_qwen3(Qwen3NTConfig.from_model_config(cfg, attn_implementation="sdpa"), pc, device=torch.device("cpu"))
    load_state_dict_into(model, {k: v.detach() for k, v in ref.state_dict().items()}, cfg)

    # The launcher's path: its loader for an SFT stage, its batch conversion, nanotron's 1F1B engine (the YAML's).
    loader = make_loader("sft", path, seq_len=SEQ, micro_batch_size=2, seed=0, dp_rank=0, dp_size=1, eot_id=0,
                         vocab_size=cfg.vocab_size)
    raw = list(loader)[:2]
    loader.epoch = 0
    batches = nanotron_batches(loader, model, torch.device("cpu"))
    inputs = [next(batches) for _ in range(2)]
    engine = OneForwardOneBackwardPipelineEngine()
    outs = engine.train_batch_iter(model, pg=pc.pp_pg, batch=iter(inputs), nb_microbatches=2, grad_accumulator=None)
    if dist.get_rank(pc.pp_pg) == model.loss.rank:
        got = float(sum(o["loss"].detach() for o in outs))
        want = 0.0
        with torch.no_grad():
            for b in raw:  # our plain model, the shards' labels as they are (-100 off the assistant)
                logits = ref(b["input_ids"], position_ids=b["position_ids"], segment_ids=b["segment_ids"]).logits
                want += float(masked_cross_entropy(logits, b["labels"])) / 2
        assert abs(got - want) <= 1e-5 * abs(want), (got, want)
        # and the mask matters: the loss over every token is a different number
        with torch.no_grad():
            b = raw[0]
            every = masked_cross_entropy(ref(b["input_ids"], position_ids=b["position_ids"],
                                             segment_ids=b["segment_ids"]).logits, b["input_ids"].roll(-1, 1))
        assert abs(float(every) - want) > 1e-3

    # The launcher's SFT step weights by tokens: the step's loss is the mean over all its assistant tokens,
    # as the tiny SFT stage (masked_cross_entropy over both micro-batches at once), not the mean of two means.
    weight_by_tokens(model, inputs)
    outs = OneForwardOneBackwardPipelineEngine().train_batch_iter(model, pg=pc.pp_pg, batch=iter(inputs),
                                                                  nb_microbatches=2, grad_accumulator=None)
    if dist.get_rank(pc.pp_pg) == model.loss.rank:
        got = float(sum(o["loss"].detach() for o in outs))
        with torch.no_grad():
            logits = torch.cat([ref(b["input_ids"], position_ids=b["position_ids"], segment_ids=b["segment_ids"]).logits
                                for b in raw])
            pooled = float(masked_cross_entropy(logits, torch.cat([b["labels"] for b in raw])))
        assert abs(got - pooled) <= 1e-5 * abs(pooled), (got, pooled)
        assert abs(pooled - want) > 1e-5  # the two weightings differ on these batches, so the check means something
    dist.barrier()
    dist.destroy_process_group()


def test_training_step_loss_on_masked_shards_equals_masked_cross_entropy(shards):
    path, _ = shards
    torch.multiprocessing.spawn(_step_worker, args=(free_port(), str(path)), nprocs=2, join=True)


# ------------------------------------------------------------------------------------- the command
@pytest.mark.parametrize("stage, model, source", [
    ("cold-start", "qwen3-32b", "hub open-r1/OpenR1-Math-220k (messages column"),
    ("distill", "qwen3-0.6b", "disk runs/full/flagship/teacher-outputs/data (messages column"),
])
def test_dry_run_prints_data_source_and_mask(tmp_path, stage, model, source):
    from click.testing import CliRunner

    from qwen3repro.nanotron.cli import full_command

    r = CliRunner().invoke(full_command, ["--stage", stage, "--model", model, "--dry-run", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    shard_dir = f"runs/full/{model}/{stage}/sft-shards"
    for needle in ("conversations (SFT)", source, "loss on assistant tokens only", "labels -100",
                   "packed into rows of 32768", f"shards      {shard_dir}",
                   f"python -m qwen3repro.nanotron.sft_data --stage {stage} --model {model}"):
        assert needle in r.output, needle
    side = json.loads((tmp_path / f"{stage}.qwen3repro.json").read_text())
    assert side["shards"] == {"format": "sft-masked", "path": shard_dir,
                              "loss": "assistant tokens only (labels -100 elsewhere)"}
    launch = (tmp_path / f"{stage}.slurm").read_text() if (tmp_path / f"{stage}.slurm").exists() else r.output
    assert f"--data {shard_dir}" in launch


# ------------------------------------------------------------------------------------------ fusion
FUSION_SEED = 5
THINKING = [[{"role": "user", "content": f"What is {a} plus {a + 2}?"},
             {"role": "assistant", "content": f"<think>\nAdd {a} and {a + 2}.\n</think>\n\n{2 * a + 2}"}]
            for a in range(24)]
# The first non-thinking conversation answers with reasoning: it does not belong to non-thinking data.
DIRECT = [[{"role": "user", "content": "What is 1 plus 1?"},
           {"role": "assistant", "content": "<think>\nOne and one.\n</think>\n\n2"}]] + [
    [{"role": "user", "content": f"Name the number after {a}."}, {"role": "assistant", "content": str(a + 1)}]
    for a in range(23)]


def _tiny_fusion_conversation(messages, thinking, rng, unflagged_share, system_flag_share):
    """What the tiny fusion stage's `build_conversations` makes of a thinking sample or a direct (non-thinking)
    one, written out with its own pieces (`_single_turn`, THINK / NO_THINK, the empty think block of
    `DirectSample.content`) and its own order of random draws."""
    from qwen3repro.chat import EMPTY_THINK
    from qwen3repro.stages import fusion

    question, answer = messages[0]["content"], messages[1]["content"]
    if thinking:
        if rng.random() < unflagged_share:
            return fusion._single_turn(question, answer, None, False)
        return fusion._single_turn(question, answer, fusion.THINK, rng.random() < system_flag_share)
    return fusion._single_turn(question, EMPTY_THINK + answer, fusion.NO_THINK, rng.random() < system_flag_share)


def test_fusion_shards_flag_each_conversation_as_the_tiny_fusion_stage(tmp_path, tok):
    import random

    from qwen3repro.chat import EMPTY_THINK

    think_src = _write_jsonl(tmp_path / "thinking.jsonl", THINKING)
    direct_src = _write_jsonl(tmp_path / "direct.jsonl", DIRECT)
    sources = [{"kind": "jsonl", "path_or_id": str(think_src), "text_field": "messages", "weight": 0.5,
                "name": "thinking"},
               {"kind": "jsonl", "path_or_id": str(direct_src), "text_field": "messages", "weight": 0.5,
                "name": "non-thinking"}]
    flags = sft_data.FusionFlags({"thinking": "think", "non-thinking": "no_think"}, unflagged_share=0.3,
                                 system_flag_share=0.4)
    m = sft_data.write_sft_shards(sources, tok, tmp_path / "shards", seq_len=SEQ, seed=FUSION_SEED, fusion=flags,
                                  stage="fusion")

    # The tiny stage's conversation for each one read, in the order the sources were mixed (per conversation
    # seeded by its place in that order), tokenised as the shards' masks are.
    want = []
    mixed = sft_data.interleave([iter(THINKING), iter(DIRECT)], [0.5, 0.5], FUSION_SEED)
    for k, (i, messages) in enumerate(mixed):
        if i == 1 and messages is DIRECT[0]:
            continue  # reasoning in non-thinking data: dropped
        rng = random.Random(f"fusion-flags|{FUSION_SEED}|{k}")
        built = _tiny_fusion_conversation(messages, i == 0, rng, 0.3, 0.4)
        ids, mask = tokenize_conversation(tok, built)
        want.append((tuple(ids[:-1]), tuple(t if keep else -100 for t, keep in zip(ids[1:], mask[1:]))))
    assert m["counts"]["dropped_mode_mismatch"] == 1 and m["counts"]["kept"] == len(want)

    got = [(tuple(ids), tuple(labels)) for b in sft_data.MaskedShardLoader(tmp_path / "shards", seq_len=SEQ,
                                                                          micro_batch_size=1)
           for ids, labels, _ in _segments(b)]
    assert sorted(got) == sorted(want)  # token for token, every conversation once
    cats = m["categories"]
    assert set(cats) == {"think_unflagged", "think_user_flag", "think_system_flag", "no_think_user_flag",
                         "no_think_system_flag"} and sum(cats.values()) == len(want)
    assert m["thinking_modes"] == {"thinking": "think", "non-thinking": "no_think"} and m["enable_thinking"] is None
    texts = [tok.decode(list(ids)) for ids, _ in got]
    plain = [t for t in texts if "Name the number" in t]
    assert plain and all("/no_think" in t and EMPTY_THINK in t for t in plain)  # flagged, empty think block
    assert not any("/no_think" in t for t in texts if "plus" in t)


def test_fusion_conversation_of_a_multi_turn_chat():
    """The shared builder on what real data holds: a system prompt, several turns."""
    import random

    from qwen3repro.chat import EMPTY_THINK
    from qwen3repro.stages.fusion import fusion_conversation

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"}]
    out, cat = fusion_conversation(chat, "no_think", random.Random(0), unflagged_share=0.3, system_flag_share=0.0)
    assert cat == "no_think_user_flag" and out[3]["content"] == "Capital of France? /no_think"
    assert out[2]["train"] is False and "train" not in out[4]  # earlier turns are context only
    assert out[4]["content"] == EMPTY_THINK + "Paris" and chat[4]["content"] == "Paris"  # the input is not changed
    out, cat = fusion_conversation(chat, "think", random.Random(0), unflagged_share=0.0, system_flag_share=1.0)
    assert cat == "think_system_flag" and out[0]["content"] == "Be brief. /think" and len(out) == len(chat)


def test_fusion_modes_must_name_every_source(tmp_path, tok):
    src = _write_jsonl(tmp_path / "a.jsonl", THINKING[:2])
    with pytest.raises(DataError, match=r"sources without a mode \['a'\], modes for no source \['b'\]"):
        sft_data.write_sft_shards([{"kind": "jsonl", "path_or_id": str(src), "text_field": "messages", "name": "a"}],
                                  tok, tmp_path / "out", seq_len=SEQ, fusion=sft_data.FusionFlags({"b": "think"}))


def test_fusion_stage_reads_its_modes_from_full_stages_toml():
    from qwen3repro.nanotron.config_gen import build_stage_spec

    flags = sft_data.fusion_flags(build_stage_spec("fusion", "qwen3-0.6b"))
    assert flags.modes == {"thinking": "think", "non-thinking": "no_think"}
    assert (flags.unflagged_share, flags.system_flag_share) == (0.3, 0.4)  # recipes/fusion.toml
    assert sft_data.fusion_flags(build_stage_spec("cold-start", "qwen3-0.6b")) is None
