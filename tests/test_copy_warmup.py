"""Copy warm-up batches (`data.copy_warmup`): structure, determinism, exact resume, bad cursors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qwen3repro.config import ConfigError
from qwen3repro.data.copy_warmup import CopyWarmupLoader, copy_batch, copy_row
from qwen3repro.data.packing import DataError, PackingLoader
from qwen3repro.stages.pretrain import PretrainConfig

EOT = 99


def _documents(tokens: np.ndarray, segments: np.ndarray) -> list[np.ndarray]:
    return [tokens[segments == s] for s in np.unique(segments)]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), seq_len=st.integers(8, 300), lo=st.integers(1, 20), extra=st.integers(0, 30))
def test_every_document_is_a_span_twice_then_eot(seed, seq_len, lo, extra):
    rng = np.random.default_rng(seed)
    tokens, segments = copy_row(rng, seq_len, n_ordinary=50, eot_id=EOT, span_range=(lo, lo + extra))
    assert tokens.shape == segments.shape == (seq_len + 1,)
    assert tokens.max() <= EOT and (tokens[tokens != EOT] < 50).all()
    docs = _documents(tokens, segments)
    for i, doc in enumerate(docs):
        complete = i < len(docs) - 1  # only the last document may be cut by the row's end
        if complete:
            assert doc[-1] == EOT and doc.size % 2 == 1
            span = doc[:-1].size // 2
            assert lo <= span <= lo + extra
            np.testing.assert_array_equal(doc[:span], doc[span:2 * span])
        else:  # a cut document is still a prefix of span + span + EOT
            body = doc[doc != EOT]
            assert any(body.size <= 2 * span and np.array_equal(body[span:], body[:max(body.size - span, 0)])
                       for span in range(lo, lo + extra + 1))


def test_batch_format_matches_the_packing_loader():
    b = copy_batch(3, 0, batch_size=4, seq_len=32, n_ordinary=50, eot_id=EOT)
    docs = [np.arange(1, 40), np.arange(1, 20)]
    ref = next(iter(PackingLoader(docs, seq_len=32, batch_size=4, eot_id=EOT)))
    assert set(b) == set(ref)
    for key in b:
        assert b[key].dtype == ref[key].dtype and b[key].shape == (4, 32)
    torch.testing.assert_close(b["labels"][:, :-1], b["input_ids"][:, 1:])


def test_batches_are_a_function_of_seed_and_index():
    a = copy_batch(1, 5, batch_size=2, seq_len=64, n_ordinary=50, eot_id=EOT)
    again = copy_batch(1, 5, batch_size=2, seq_len=64, n_ordinary=50, eot_id=EOT)
    other = copy_batch(1, 6, batch_size=2, seq_len=64, n_ordinary=50, eot_id=EOT)
    torch.testing.assert_close(a["input_ids"], again["input_ids"])
    assert not torch.equal(a["input_ids"], other["input_ids"])


def _loader(steps=3, seq_len=16, batch_size=2):
    inner = PackingLoader([np.arange(1, 30), np.arange(1, 50), np.arange(3, 9)], seq_len=16, batch_size=2, eot_id=EOT)
    return CopyWarmupLoader(inner, steps=steps, batch_size=batch_size, seq_len=seq_len, n_ordinary=50, eot_id=EOT,
                            seed=7, span_range=(2, 5))


def _take(loader, n):
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch["input_ids"])
            if len(out) == n:
                break
    return out


def test_warmup_batches_come_first_then_the_corpus_and_resume_exactly():
    full = _take(_loader(), 9)
    corpus = _take(PackingLoader([np.arange(1, 30), np.arange(1, 50), np.arange(3, 9)], seq_len=16, batch_size=2,
                                 eot_id=EOT), 6)
    for got, want in zip(full[3:], corpus):
        torch.testing.assert_close(got, want)
    for cut in (1, 3, 5):  # inside the warm-up, at its end, inside the corpus
        first = _loader()
        head = _take(first, cut)
        state = first.state_dict()
        resumed = _loader()
        resumed.load_state_dict(state)
        tail = _take(resumed, 9 - cut)
        for got, want in zip(head + tail, full):
            torch.testing.assert_close(got, want)


def test_warmup_rows_may_be_shorter_than_the_corpus_rows():
    loader = _loader(seq_len=8, batch_size=4)
    shapes = [tuple(ids.shape) for ids in _take(loader, 5)]
    assert shapes == [(4, 8)] * 3 + [(2, 16)] * 2


def test_a_cursor_of_another_warmup_is_refused_by_name():
    state = _loader(steps=3).state_dict()
    with pytest.raises(DataError, match="steps=3"):
        _loader(steps=4).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len=16"):
        _loader(seq_len=8).load_state_dict(state)
    with pytest.raises(DataError, match="batch_size=2"):
        _loader(batch_size=3).load_state_dict(state)
    with pytest.raises(DataError, match="without the warm-up"):
        _loader().load_state_dict({"epoch": 0, "batch": 0})


def test_config_adds_warmup_steps_and_rejects_bad_values():
    base = dict(name="s1", corpus="s1", tokens=8192, seq_len=64, batch_size=4, n_docs=10)
    assert PretrainConfig(**base).steps == 32
    assert PretrainConfig(**base, copy_warmup_steps=5).steps == 37
    with pytest.raises(ConfigError, match="copy_warmup_steps"):
        PretrainConfig(**base, copy_warmup_steps=-1)
    with pytest.raises(ConfigError, match="grad_accum"):
        PretrainConfig(**base, copy_warmup_steps=2, train={"grad_accum": 2})
    assert PretrainConfig(**base, copy_warmup_span=[16, 31]).copy_warmup_span == (16, 31)  # TOML gives a list
    for bad in ([0, 4], [5, 4], [3], [1.5, 4]):
        with pytest.raises(ConfigError, match="copy_warmup_span"):
            PretrainConfig(**base, copy_warmup_span=bad)
    with pytest.raises(ConfigError, match="copy_warmup_seq_len"):
        PretrainConfig(**base, copy_warmup_seq_len=-8)
