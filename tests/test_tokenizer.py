"""Byte-level BPE with Qwen3's special tokens: training, encode/decode, the HF directory format."""
import json
import random
import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3repro.chat import CHAT_TEMPLATE, render
from qwen3repro.files import RunFileError
from qwen3repro.stages import pretrain
from qwen3repro.stages.common import StageContext
from qwen3repro.tokenizer import (
    QWEN3_SKIPPABLE_TOKENS,
    QWEN3_SPECIAL_TOKENS,
    Tokenizer,
    train_tokenizer,
)

transformers = pytest.importorskip("transformers")


def make_corpus(seed: int = 0, n_docs: int = 400) -> list[str]:
    """A small multilingual corpus with code, numbers, chat markup and whitespace runs."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9))) for _ in range(600)]
    words += ["über", "naïve", "你好", "世界", "日本語", "Привет", "def", "return", "x=1;", "{}", "()", "    ", "\n\n"]
    docs = []
    for _ in range(n_docs):
        doc = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
        doc += f" {rng.randint(0, 10**6)} It's we'll I'M"
        if rng.random() < 0.3:
            doc = f"<|im_start|>user\n{doc}<|im_end|>\n<think>\n{doc[:20]}\n</think>"
        docs.append(doc)
    return docs


CORPUS = make_corpus()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, 512)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    return tok.save(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


def split_nfc(text: str) -> str:
    """What decode(encode(text)) gives: NFC of each piece between special-token strings."""
    pattern = "(" + "|".join(re.escape(t) for t in QWEN3_SPECIAL_TOKENS) + ")"
    return "".join(p if p in QWEN3_SPECIAL_TOKENS else unicodedata.normalize("NFC", p) for p in re.split(pattern, text))


texts_with_specials = st.lists(
    st.one_of(st.text(max_size=12), st.sampled_from(QWEN3_SPECIAL_TOKENS), st.sampled_from(["\n", " ", "\r\n", "'s"])),
    max_size=8,
).map("".join)


# -- special tokens and vocabulary -------------------------------------------------------------


def test_special_token_list_matches_qwen3():
    assert len(QWEN3_SPECIAL_TOKENS) == 26
    assert QWEN3_SPECIAL_TOKENS[:3] == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert QWEN3_SPECIAL_TOKENS[14:16] == ("<tool_call>", "</tool_call>")
    assert QWEN3_SPECIAL_TOKENS[-4:] == ("<tool_response>", "</tool_response>", "<think>", "</think>")
    # Released ids 151643..151668 keep this order; the first 14 are flagged special.
    assert QWEN3_SPECIAL_TOKENS.index("</think>") + 151643 == 151668
    assert QWEN3_SKIPPABLE_TOKENS == set(QWEN3_SPECIAL_TOKENS[:14])


def test_special_tokens_are_single_ids_at_the_end(tok):
    n = tok.vocab_size
    for offset, token in enumerate(QWEN3_SPECIAL_TOKENS):
        token_id = n - len(QWEN3_SPECIAL_TOKENS) + offset
        assert tok.token_to_id(token) == token_id
        assert tok.id_to_token(token_id) == token
        assert tok.encode(token) == [token_id]
        assert tok.decode([token_id]) == token
    assert tok.eos_token_id == tok.im_end_id == tok.token_to_id("<|im_end|>")
    assert tok.pad_token_id == tok.endoftext_id == tok.token_to_id("<|endoftext|>")
    assert tok.im_start_id == tok.token_to_id("<|im_start|>")
    assert tok.think_start_id == tok.token_to_id("<think>")
    assert tok.think_end_id == tok.token_to_id("</think>")


def test_special_strings_inside_text_become_single_ids(tok):
    ids = tok.encode("ab<|im_start|>user\nhi<think>x</think><|im_end|>")
    for token in ("<|im_start|>", "<think>", "</think>", "<|im_end|>"):
        assert ids.count(tok.token_to_id(token)) == 1


@pytest.mark.parametrize("size", [282, 300, 450, 777])
def test_vocab_size_is_exact(size):
    t = train_tokenizer(CORPUS[:150], size)
    assert t.vocab_size == len(t) == size
    assert t.token_to_id("</think>") == size - 1
    assert t.token_to_id("<|endoftext|>") == size - 26


def test_vocab_size_errors():
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(CORPUS[:10], 281)
    with pytest.raises(ValueError, match="only supports"):
        train_tokenizer(["tiny corpus"], 5000)


def test_training_is_deterministic():
    a = train_tokenizer(CORPUS, 600)
    b = train_tokenizer(list(CORPUS), 600)
    assert a.backend.to_str() == b.backend.to_str()


def test_no_merges_learned_inside_special_tokens(tok):
    # The corpus holds many "<|im_start|>": without cutting them out, the trainer would learn "im_start".
    learned = [tok.decode([i]) for i in range(tok.vocab_size - len(QWEN3_SPECIAL_TOKENS))]
    assert not any("im_start" in piece or "im_end" in piece for piece in learned)


def test_byte_level_pretokenizer_like_qwen2(tok):
    spec = json.loads(tok.backend.to_str())
    assert spec["normalizer"]["type"] == "NFC"
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"] is False
    pre = spec["pre_tokenizer"]["pretokenizers"]
    assert [p["type"] for p in pre] == ["Split", "ByteLevel"]
    assert spec["decoder"]["type"] == "ByteLevel"
    # Digits are split one by one, as in Qwen2/Qwen3.
    assert len(tok.encode("2025")) == 4


# -- encode / decode ---------------------------------------------------------------------------


@settings(max_examples=200)
@given(st.text())
def test_roundtrip_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


@settings(max_examples=200)
@given(texts_with_specials)
def test_roundtrip_with_special_tokens(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == split_nfc(text)
    pattern = "(" + "|".join(re.escape(t) for t in QWEN3_SPECIAL_TOKENS) + ")"
    kept = [p for p in re.split(pattern, text) if p not in QWEN3_SKIPPABLE_TOKENS]
    assert tok.decode(ids, skip_special_tokens=True) == "".join(map(split_nfc, kept))


def test_skip_special_tokens_keeps_think_and_tool_markup(tok):
    text = "<|im_start|>assistant\n<think>\nr\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == (
        "assistant\n<think>\nr\n</think>\n\n<tool_call>\n{}\n</tool_call>"
    )


def test_encode_rejects_non_strings(tok):
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


# -- the directory format and transformers -----------------------------------------------------


def test_saved_files(tok_dir, tok):
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert isinstance(config["model_max_length"], int)
    decoder = config["added_tokens_decoder"]
    assert {v["content"] for v in decoder.values()} == set(QWEN3_SPECIAL_TOKENS)
    assert all(int(k) == tok.token_to_id(v["content"]) for k, v in decoder.items())
    assert (tok_dir / "tokenizer.json").is_file()


def test_autotokenizer_loads_offline(hf_tok, tok):
    assert len(hf_tok) == tok.vocab_size
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.eos_token_id == tok.eos_token_id
    assert hf_tok.pad_token == "<|endoftext|>" and hf_tok.pad_token_id == tok.pad_token_id
    assert hf_tok.bos_token is None
    assert hf_tok.chat_template == CHAT_TEMPLATE
    for token in QWEN3_SPECIAL_TOKENS:
        assert hf_tok.convert_tokens_to_ids(token) == tok.token_to_id(token)
    text = "<|im_start|>assistant\n<think>\nr\n</think>\n\nok<|im_end|>"
    assert hf_tok.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text), skip_special_tokens=True)


@settings(max_examples=100)
@given(texts_with_specials)
def test_autotokenizer_encodes_like_us(hf_tok, tok, text):
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True)


def test_autotokenizer_chat_template_matches_render(hf_tok, tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi /think"},
                {"role": "assistant", "content": "Hello", "reasoning_content": "r"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False) == render(messages)
    assert tok.apply_chat_template(messages, tokenize=False) == render(messages)
    assert tok.apply_chat_template(messages) == tok.encode(render(messages))
    assert tok.apply_chat_template(messages[:2], add_generation_prompt=True, enable_thinking=False,
                                   tokenize=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_save_load_roundtrip(tok, tok_dir, tmp_path):
    again = Tokenizer.load(tok_dir)
    assert again.backend.to_str() == tok.backend.to_str()
    again.save(tmp_path, model_max_length=4096)
    assert Tokenizer.load(tmp_path).model_max_length == 4096


def test_load_directory_saved_by_transformers(hf_tok, tok, tmp_path):
    hf_tok.save_pretrained(str(tmp_path))
    again = Tokenizer.load(tmp_path)
    text = "It's 2025: naïve 你好 <think>\nx\n</think>\n\n<|im_end|>"
    assert again.encode(text) == tok.encode(text)
    assert again.eos_token_id == tok.eos_token_id


def test_load_through_transformers(tok, tmp_path):
    # A directory with only vocab.json + merges.txt (no tokenizer.json) goes through AutoTokenizer,
    # which rebuilds Qwen2's pre-tokenizer itself: the same path that loads a hub id at full scale.
    tok.backend.model.save(str(tmp_path))
    config = json.loads((tok.save(tmp_path / "ours") / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    via_hf = Tokenizer.load(tmp_path)
    assert via_hf.vocab_size == tok.vocab_size
    text = "Hello world, it's 12 naïve 你好\n\n  <|im_start|>user\nx<|im_end|>"
    assert via_hf.encode(text) == tok.encode(text)
    from transformers import AutoTokenizer

    wrapped = Tokenizer.from_hf(AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True))
    assert wrapped.encode(text) == tok.encode(text)


@pytest.mark.parametrize("left", [("tokenizer_config.json",), ()], ids=["config only", "empty"])
def test_a_directory_without_tokenizer_json_is_named(tok, tmp_path, left):
    """A stage directory that lost its tokenizer.json is an error naming it, not the special-tokens-only
    tokenizer transformers would assemble from tokenizer_config.json."""
    tok.save(tmp_path / "stage")
    for f in (tmp_path / "stage").iterdir():
        if f.name not in left:
            f.unlink()
    with pytest.raises(RunFileError, match=rf"{tmp_path / 'stage'}: no tokenizer\.json"):
        Tokenizer.load(tmp_path / "stage")


def test_a_stage_whose_parent_lost_its_tokenizer_stops_before_training(tok, tmp_path):
    parent = tmp_path / "tokenizer"
    tok.save(parent)
    (parent / "tokenizer.json").unlink()
    cfg = pretrain.PretrainConfig(name="s1", corpus="s1", tokens=1024, seq_len=128, batch_size=2, n_docs=4,
                                  model="micro", rope_theta=1e4)
    ctx = StageContext(out_dir=tmp_path / "s1", cache_dir=tmp_path / "data", printer=lambda line: None)
    with pytest.raises(RunFileError, match=rf"{parent}: no tokenizer\.json"):
        pretrain.run(cfg, parent, ctx)
    assert not (tmp_path / "data").exists()


def test_missing_special_tokens_is_an_error():
    import tokenizers
    from tokenizers.models import BPE

    with pytest.raises(ValueError, match="lacks Qwen3 special tokens"):
        Tokenizer(tokenizers.Tokenizer(BPE()))
