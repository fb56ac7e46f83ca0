"""Packing loader: every token once per epoch in order, segments, positions, resumable cursor, errors."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qwen3repro.data.packing import IGNORE_INDEX, DataError, PackingLoader, load_documents

EOT = 0

documents = st.lists(st.lists(st.integers(1, 50), min_size=0, max_size=30), min_size=1, max_size=12)
settings_ = st.fixed_dictionaries(
    {
        "seq_len": st.integers(1, 16),
        "batch_size": st.integers(1, 4),
        "seed": st.integers(0, 3),
        "shuffle": st.booleans(),
        "document_masking": st.booleans(),
    }
)


def epoch_batches(loader):
    return list(loader)


def flat_rows(batches):
    return [{k: b[k][i].numpy() for k in b} for b in batches for i in range(b["input_ids"].shape[0])]


def expected_stream(docs, order):
    out, seg = [], []
    for s, d in enumerate(order):
        out += list(docs[d]) + [EOT]
        seg += [s] * (len(docs[d]) + 1)
    return out, seg


@given(documents, settings_)
def test_every_token_once_in_order_with_segments_and_labels(docs, kw):
    loader = PackingLoader(docs, eot_id=EOT, **kw)
    order = loader.epoch_documents(0)
    stream, seg = expected_stream(docs, order)
    rows = flat_rows(epoch_batches(loader))
    L = kw["seq_len"]
    assert len(rows) == -(-len(stream) // L)
    got_tokens, got_segs = [], []
    for k, r in enumerate(rows):
        real = r["segment_ids"] >= 0
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any()  # padding only at the end of the last row
        got_tokens += r["input_ids"][:n].tolist()
        got_segs += r["segment_ids"][:n].tolist()
        assert (r["labels"][n:] == IGNORE_INDEX).all()
        for t in range(n):
            nxt = k * L + t + 1
            if nxt >= len(stream):
                assert r["labels"][t] == IGNORE_INDEX
            elif kw["document_masking"] and seg[nxt] != seg[nxt - 1]:
                assert r["labels"][t] == IGNORE_INDEX  # no prediction across documents
            else:
                assert r["labels"][t] == stream[nxt]
        # positions
        if kw["document_masking"]:
            pos = r["position_ids"][:n]
            for t in range(n):
                restart = t == 0 or r["segment_ids"][t] != r["segment_ids"][t - 1]
                assert pos[t] == (0 if restart else pos[t - 1] + 1)
        else:
            assert r["position_ids"].tolist() == list(range(L))
    assert got_tokens == stream  # every token of every document, exactly once, in packing order
    assert got_segs == seg  # each token labelled with its own document
    # segment ordinals map back to dataset documents
    seg_docs = loader.segment_documents(0)
    for s, d in enumerate(order):
        toks = [t for t, g in zip(got_tokens, got_segs) if g == s]
        assert toks == list(docs[d]) + [EOT] and seg_docs[s] == d


@given(documents, settings_, st.data())
def test_cursor_resume_equals_uninterrupted(docs, kw, data):
    full = PackingLoader(docs, eot_id=EOT, **kw)
    uninterrupted = epoch_batches(full) + epoch_batches(full)  # two epochs
    cut = data.draw(st.integers(0, len(uninterrupted)))
    first = PackingLoader(docs, eot_id=EOT, **kw)
    got = []
    it = iter(first)
    while len(got) < cut:
        try:
            got.append(next(it))
        except StopIteration:
            it = iter(first)
    state = json.loads(json.dumps(first.state_dict()))  # the cursor is plain JSON
    second = PackingLoader(docs, eot_id=EOT, **kw)
    second.load_state_dict(state)
    it = iter(second)
    while len(got) < len(uninterrupted):
        try:
            got.append(next(it))
        except StopIteration:
            it = iter(second)
    assert len(got) == len(uninterrupted)
    for a, b in zip(got, uninterrupted):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shuffle_is_seeded_and_changes_per_epoch():
    docs = [[i + 1] * 3 for i in range(40)]
    a = PackingLoader(docs, seq_len=8, batch_size=2, eot_id=EOT, seed=7)
    b = PackingLoader(docs, seq_len=8, batch_size=2, eot_id=EOT, seed=7)
    c = PackingLoader(docs, seq_len=8, batch_size=2, eot_id=EOT, seed=8)
    assert (a.epoch_documents(0) == b.epoch_documents(0)).all()
    assert not (a.epoch_documents(0) == c.epoch_documents(0)).all()
    assert not (a.epoch_documents(0) == a.epoch_documents(1)).all()
    assert sorted(a.epoch_documents(1).tolist()) == list(range(40))


def test_iteration_is_one_epoch_then_next():
    docs = [[1, 2, 3], [4, 5]]
    loader = PackingLoader(docs, seq_len=4, batch_size=1, eot_id=EOT, shuffle=False)
    assert len(loader) == 2 and len(list(loader)) == 2
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batch"] == 0
    assert len(list(loader)) == 2 and loader.state_dict()["epoch"] == 2


def test_drop_last_keeps_only_full_rows_and_batches():
    docs = [list(range(1, 10))]  # 10 tokens with EOT
    loader = PackingLoader(docs, seq_len=3, batch_size=2, eot_id=EOT, shuffle=False, drop_last=True)
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["input_ids"].shape == (2, 3)
    assert (batches[0]["segment_ids"] >= 0).all()


def test_too_long_document_error_names_index_and_length():
    docs = [[1] * 5, [2] * 12, [3] * 4]
    with pytest.raises(DataError, match=r"document 1 has 12 tokens.*max_doc_len=10"):
        PackingLoader(docs, seq_len=8, batch_size=1, eot_id=EOT, max_doc_len=10)


@given(documents, st.integers(1, 8), st.integers(1, 8))
def test_split_policy_keeps_every_token_and_bounds_pieces(docs, max_len, seq_len):
    loader = PackingLoader(docs, seq_len=seq_len, batch_size=3, eot_id=EOT, max_doc_len=max_len,
                           too_long="split", shuffle=False, document_masking=True)
    rows = flat_rows(list(loader))
    toks = np.concatenate([r["input_ids"][r["segment_ids"] >= 0] for r in rows]).tolist()
    segs = np.concatenate([r["segment_ids"][r["segment_ids"] >= 0] for r in rows]).tolist()
    assert toks == [t for d in docs for t in list(d) + [EOT]]
    for s in set(segs):
        piece = [t for t, g in zip(toks, segs) if g == s]
        assert len(piece) <= max_len + 1  # + the EOT after a document's last piece
    seg_docs = loader.segment_documents(0)
    for s in set(segs):
        piece = [t for t, g in zip(toks, segs) if g == s and t != EOT]
        d = docs[seg_docs[s]]
        assert any(d[i : i + len(piece)] == piece for i in range(len(d) - len(piece) + 1)) or not piece


def test_datasets_input_matches_list_input(tmp_path):
    import datasets

    docs = [[1, 2, 3], [4, 5, 6, 7], [8], [9, 10]]
    ds = datasets.Dataset.from_dict({"input_ids": docs, "text": ["a", "b", "c", "d"]})
    a = list(PackingLoader(ds, seq_len=3, batch_size=2, eot_id=EOT, seed=3))
    b = list(PackingLoader(docs, seq_len=3, batch_size=2, eot_id=EOT, seed=3))
    assert len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_cursor_from_other_settings_is_refused():
    docs = [[1, 2, 3], [4, 5]]
    a = PackingLoader(docs, seq_len=4, batch_size=1, eot_id=EOT)
    b = PackingLoader(docs, seq_len=5, batch_size=1, eot_id=EOT)
    with pytest.raises(DataError, match="seq_len"):
        b.load_state_dict(a.state_dict())


def test_shards_missing_corrupt_and_good(tmp_path):
    import datasets

    good = tmp_path / "good.parquet"
    datasets.Dataset.from_dict({"input_ids": [[1, 2], [3]]}).to_parquet(str(good))
    assert load_documents([good])["input_ids"] == [[1, 2], [3]]
    missing = tmp_path / "nope.parquet"
    with pytest.raises(DataError, match="nope.parquet"):
        load_documents([good, missing])
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(DataError, match="bad.parquet"):
        load_documents([good, bad])
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text('{"text": "hi"}\n')
    with pytest.raises(DataError, match=r"nocol.jsonl.*input_ids"):
        load_documents(nocol)
    badjson = tmp_path / "bad.jsonl"
    badjson.write_text('{"input_ids": [1, 2]\n{{{\n')
    with pytest.raises(DataError, match="bad.jsonl"):
        load_documents(badjson)
