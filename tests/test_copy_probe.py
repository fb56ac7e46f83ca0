"""The copy probe behind the claims' "cannot copy" diagnoses: an induction oracle passes, a model
that ignores its context or copies from one fixed distance back does not."""
from types import SimpleNamespace

import pytest
import torch

from qwen3repro.evals.claims.copy_probe import copies, no_copy_diagnosis
from qwen3repro.evals.claims.settings import claim_settings
from qwen3repro.evals.copying import SPAN_TOKENS, copy_probe

COPY_GAIN_MIN = claim_settings().copy_probe.copy_gain_min


class _Chars:
    """A stand-in tokenizer: one id per character (held-out prose is plain text)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 256 for c in text]


def _logits(probs: torch.Tensor):
    return SimpleNamespace(logits=torch.log(probs.clamp_min(1e-9)))


def induction_oracle(x: torch.Tensor, context: int = 4):
    """Predicts, at each position, the token that followed the latest earlier occurrence of the last
    `context` tokens (uniform when there is none): content-based copying, as an induction head does."""
    probs = torch.full((1, x.shape[1], 256), 1 / 256)
    seq = x[0].tolist()
    for t in range(context - 1, len(seq)):
        key = seq[t - context + 1:t + 1]
        for j in range(t - 1, context - 2, -1):
            if seq[j - context + 1:j + 1] == key:
                probs[0, t] = 0.001 / 255
                probs[0, t, seq[j + 1]] = 0.999
                break
    return _logits(probs)


def context_blind(x: torch.Tensor):
    return _logits(torch.full((1, x.shape[1], 256), 1 / 256))


def fixed_offset(x: torch.Tensor, offset: int = SPAN_TOKENS[-1]):
    """Copies the token `offset` - 1 back: passes a probe of one span length, not of several."""
    probs = torch.full((1, x.shape[1], 256), 1 / 256)
    seq = x[0].tolist()
    for t in range(offset - 1, len(seq)):
        probs[0, t] = 0.001 / 255
        probs[0, t, seq[t - offset + 1]] = 0.999
    return _logits(probs)


def test_oracle_copies_and_blind_model_does_not():
    tok = _Chars()
    good = copy_probe(induction_oracle, tok, n_spans=5)
    assert copies(good) and good["copy_gain"] > 1.5 and good["second_nll"] < good["first_nll"] / 2
    blind = copy_probe(context_blind, tok, n_spans=5)
    assert not copies(blind) and abs(blind["copy_gain"]) < 1e-6
    assert no_copy_diagnosis(good, "S3") == ""
    text = no_copy_diagnosis(blind, "S3")
    assert "does not copy" in text and f"< {COPY_GAIN_MIN}" in text


def test_one_fixed_distance_does_not_pass_for_copying():
    """Attending one fixed distance back copies a span of exactly that length, so the probe varies
    the span length: over the mixed lengths such a model gains far less than real copying."""
    tok = _Chars()
    assert copies(copy_probe(fixed_offset, tok, span_tokens=(SPAN_TOKENS[-1],), n_spans=5))
    mixed = copy_probe(fixed_offset, tok, n_spans=10)["copy_gain"]
    oracle = copy_probe(induction_oracle, tok, n_spans=10)["copy_gain"]
    assert mixed < oracle / 2


def test_a_checkpoint_directory_is_loaded_with_its_tokenizer(tmp_path):
    from qwen3repro.models.qwen3 import Qwen3
    from qwen3repro.models.registry import get_model_config
    from qwen3repro.tokenizer import train_tokenizer
    from qwen3repro.data.synthetic import heldout_text

    texts = [d["text"] for d in heldout_text(n_per_language=20)]
    tok = train_tokenizer(texts, vocab_size=512)
    torch.manual_seed(0)
    model = Qwen3(get_model_config("micro"))
    model.save_pretrained(tmp_path)
    tok.save(tmp_path)
    res = copy_probe(tmp_path, n_spans=4)
    assert res["spans"] == 4 and not copies(res)  # an untrained model does not copy



def test_retrieval_rows_skip_the_probe_when_the_model_retrieves_at_its_length(tmp_path, make_plan):
    """The copy diagnosis goes to a failing row only when no direct evidence says the model copies:
    a YaRN + DCA row whose plain-S3 retrieval at the trained length reproduced gets none, the same
    row without that evidence (and a failing post-training row) gets the probe's sentence."""

    from qwen3repro.evals.claims import ClaimRow
    from qwen3repro.evals.claims.copy_probe import add_copy_diagnoses
    from qwen3repro.models.qwen3 import Qwen3
    from qwen3repro.models.registry import get_model_config
    from qwen3repro.tokenizer import train_tokenizer
    from qwen3repro.data.synthetic import heldout_text

    tok = train_tokenizer([d["text"] for d in heldout_text(n_per_language=20)], vocab_size=512)
    torch.manual_seed(0)
    for stage in ("s3", "cold-start"):
        Qwen3(get_model_config("micro")).save_pretrained(tmp_path / "flagship" / stage)
        tok.save(tmp_path / "flagship" / stage)
    (tmp_path / "claims").mkdir()
    plan = make_plan(tmp_path, {"flagship/s3": None, "flagship/cold-start": None})

    def rows(s3_reproduced):
        return [ClaimRow("s3_abf[flagship/passkey]", "", "", "", s3_reproduced),
                ClaimRow("yarn_dca[flagship/passkey]", "", "", "", False, diagnosis="DCA loses far needles"),
                ClaimRow("grpo", "", "", "", False, role="flagship")]

    retrieving = rows(True)
    add_copy_diagnoses(plan, retrieving, printer=lambda _m: None)
    assert retrieving[1].diagnosis == "DCA loses far needles"
    assert "does not copy" in retrieving[2].diagnosis
    blind = rows(False)
    add_copy_diagnoses(plan, blind, printer=lambda _m: None)
    assert "does not copy" in blind[0].diagnosis and "does not copy" in blind[1].diagnosis


if __name__ == "__main__":
    pytest.main([__file__])
