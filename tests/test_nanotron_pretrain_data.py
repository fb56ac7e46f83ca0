"""Full-scale pretraining data: a stage's mixture -> tokenise -> cut -> pack -> parquet shards -> PackedShardLoader.

Local stand-ins replace the hub datasets (parquet, streamed, and JSON lines, written here; a hub id goes through
the same `datasets.load_dataset` call, replaced, nothing is downloaded), with a tokenizer trained on the test's
own text. What is checked:

* round trip: every document the job consumed comes back exactly once from the shards (its pieces joined by
  their stored offsets and decoded), special-token strings inside a document stay text, and the loader's
  batches have labels = the next token inside a segment (-100 across segments and on padding) and position
  ids restarting per segment;
* S3's length mix measured on the written rows: 75% / 25% of the segments in the recipe's two length ranges,
  where the same documents without the mix come out almost all in the long range;
* a job killed after k shards (or between a shard and its manifest) and rerun writes exactly the files and
  manifest of an uncut run: no document duplicated or lost;
* two workers take disjoint parts of a source and together cover it;
* the loader splits files over data-parallel ranks and resumes after a number of consumed samples;
* errors name the problem (a null text names its source and document; changed settings name the setting;
  unfinished workers are refused); the command line's defaults come from full/stages.toml.
"""
from __future__ import annotations

import json
import random
from collections import defaultdict

import datasets
import pyarrow.parquet as pq
import pytest
import torch

from qwen3repro.data.packing import DataError
from qwen3repro.data.synthetic import mix_rows
from qwen3repro.nanotron import pretrain_data as ptd
from qwen3repro.tokenizer import train_tokenizer

SEQ = 128
MIX = [[0.5, 1.0, 0.75], [0.125, 0.5, 0.25]]  # recipes/s3.toml's length mix: ranges [64, 128] and [16, 64] here
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def _text(tag: str, i: int, n_words: int, rng: random.Random) -> str:
    return f"{tag} {i}: " + " ".join(rng.choice(WORDS) for _ in range(n_words))


def _corpus():
    rng = random.Random(0)
    long = [_text("long", i, rng.randint(120, 700), rng) for i in range(30)]
    short = [_text("short", i, rng.randint(2, 14), rng) for i in range(150)]
    short[3] += " <|endoftext|> and <|im_start|> are only text here"  # scraped markup, not control tokens
    return long, short


LONG, SHORT = _corpus()


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(LONG + SHORT, 320)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The stand-ins: long documents as two streamed parquet files (text column "content"), short ones as JSON lines."""
    d = tmp_path_factory.mktemp("sources")
    (d / "long").mkdir()
    datasets.Dataset.from_dict({"content": LONG[:15]}).to_parquet(str(d / "long" / "a.parquet"))
    datasets.Dataset.from_dict({"content": LONG[15:]}).to_parquet(str(d / "long" / "b.parquet"))
    (d / "short.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(SHORT)))
    return d


def _sources(files, long_weight=0.3):
    return [{"kind": "parquet", "path_or_id": str(files / "long"), "text_field": "content", "streaming": True,
             "weight": long_weight, "name": "long"},
            {"kind": "jsonl", "path_or_id": str(files / "short.jsonl"), "weight": 1 - long_weight, "name": "short"}]


def _rows(out):
    """Every written row as (input_ids, [(source, document, offset, tokens), ...]), over all workers."""
    rows = []
    for manifest in ptd.read_token_manifests(out):
        for f in manifest["files"]:
            for r in pq.read_table(out / f["file"]).to_pylist():
                segs, at = [], 0
                for n, src, doc, off in zip(r["segment_lengths"], r["segment_sources"], r["segment_documents"],
                                            r["segment_offsets"]):
                    segs.append((manifest["sources"][src]["name"], manifest["worker_index"], doc, off,
                                 r["input_ids"][at:at + n]))
                    at += n
                assert all(t == manifest["pad_id"] for t in r["input_ids"][at:])  # the rest is padding
                assert len(r["input_ids"]) == SEQ + 1
                rows.append(segs)
    return rows


def _documents(out, tok):
    """{(source, worker, document): text} rebuilt from the shards' segments; each piece must appear once."""
    pieces = defaultdict(dict)
    eot = tok.endoftext_id
    for segs in _rows(out):
        for src, worker, doc, off, ids in segs:
            assert off not in pieces[(src, worker, doc)], "a piece written twice"
            pieces[(src, worker, doc)][off] = ids
    docs = {}
    for key, by_offset in pieces.items():
        ids, at = [], 0
        for off in sorted(by_offset):
            assert off == at, f"{key}: a gap at token {at}"
            ids += by_offset[off]
            at += len(by_offset[off])
        assert ids[-1] == eot and eot not in ids[:-1]  # one separator, at the end: document text never makes one
        docs[key] = tok.decode(ids[:-1])
    return docs


def _consumed_documents(manifest):
    """What the shards must hold: the first `consumed` documents of each source (one worker)."""
    consumed = manifest["state"]["consumed"]
    return ({("long", 0, i): t for i, t in enumerate(LONG[:consumed["long"]])}
            | {("short", 0, i): t for i, t in enumerate(SHORT[:consumed["short"]])})


# ------------------------------------------------------------------------------------------ round trip
def test_round_trip_every_consumed_document_exactly_once(files, tok, tmp_path):
    out = tmp_path / "out"
    m = ptd.write_token_shards(_sources(files), tok, out, seq_len=SEQ, rows_per_shard=6, document_masking=True,
                               stage="s1", tokenizer_name="test-tokenizer")
    assert m["done"] and m["stopped_by"] == "exhausted" and len(m["files"]) > 3
    consumed = m["state"]["consumed"]
    assert consumed["long"] == len(LONG)  # the long source ran out first: the mixture stops there
    assert 0 < consumed["short"] < len(SHORT) and m["counts"]["documents"] == sum(consumed.values())
    assert _documents(out, tok) == _consumed_documents(m)
    # weights: 30% long by draws, so about 70 short documents were read alongside the 30 long ones
    assert 40 < consumed["short"] < 110
    assert m["counts"]["tokens"] == sum(len(ids) for segs in _rows(out) for *_, ids in segs)

    loader = ptd.PackedShardLoader(out, 2, seq_len=SEQ)
    assert loader.document_masking is True
    n_rows = sum(f["rows"] for f in m["files"])
    batches = list(loader)
    assert len(batches) == len(loader) == n_rows // 2
    for b in batches:
        assert all(v.shape == (2, SEQ) and v.dtype == torch.int64 for v in b.values())
        for r in range(2):
            seg, pos, ids, labels = (b[k][r] for k in ("segment_ids", "position_ids", "input_ids", "labels"))
            for s in sorted(set(seg.tolist()) - {-1}):
                at = torch.nonzero(seg == s).flatten()
                assert pos[at].tolist() == list(range(len(at)))  # positions restart in every segment
                assert labels[at[:-1]].tolist() == ids[at[1:]].tolist()  # next token inside the segment
                if at[-1] + 1 < SEQ:
                    assert labels[at[-1]] == -100  # never across a segment boundary or into padding
            assert (labels[seg == -1] == -100).all()


def test_without_document_masking_labels_cross_documents(files, tok, tmp_path):
    out = tmp_path / "out"
    ptd.write_token_shards(_sources(files), tok, out, seq_len=SEQ, rows_per_shard=50, document_masking=False)
    crossings = 0
    for b in ptd.PackedShardLoader(out, 1):
        seg, labels, ids = b["segment_ids"][0], b["labels"][0], b["input_ids"][0]
        assert b["position_ids"][0].tolist() == list(range(SEQ))
        real = torch.nonzero((seg[:-1] >= 0) & (seg[1:] >= 0)).flatten()  # next token is a document's
        assert (labels[real] == ids[real + 1]).all() and (labels[:-1][seg[1:] < 0] == -100).all()
        crossings += int((seg[1:] != seg[:-1])[real].sum())
    assert crossings > 0  # trained from one document's end-of-text into the next document


def test_hub_ids_go_through_load_dataset(files, tok, tmp_path, monkeypatch):
    """A hub id is loaded by `datasets.load_dataset(id, config, split, streaming)`; replaced here by the local file."""
    real, calls = datasets.load_dataset, []

    def fake_load_dataset(path, name=None, split=None, streaming=False, cache_dir=None, **kw):
        if kw:  # the local builders themselves
            return real(path, name, split=split, streaming=streaming, cache_dir=cache_dir, **kw)
        calls.append((path, name, split, streaming))
        return real("json", data_files=str(files / "short.jsonl"), split="train", streaming=streaming)

    monkeypatch.setattr("qwen3repro.data.mixture.datasets.load_dataset", fake_load_dataset)
    src = {"kind": "hub", "path_or_id": "org/web", "config_name": "en", "streaming": True}
    m = ptd.write_token_shards([src], tok, tmp_path / "out", seq_len=SEQ)
    assert calls == [("org/web", "en", "train", True)] and m["state"]["consumed"]["hub:org/web"] == len(SHORT)


# ------------------------------------------------------------------------------------------ length mix
def _segment_rows(out, tok):
    """Mix row of every written segment, by its document tokens (the separator excluded); None: filling."""
    ranges = ptd.LengthMixCutter(SEQ, MIX).ranges
    found = []
    for segs in _rows(out):
        for *_, ids in segs:
            n = len(ids) - (ids[-1] == tok.endoftext_id)
            found.append(next((k for k, (lo, hi) in enumerate(ranges) if lo <= n <= hi), None))
    return found


def test_length_mix_is_measured_on_the_output(files, tok, tmp_path):
    # Half the draws long documents: enough long text to cut the 75% from, besides the short documents that fall
    # in the lower range by themselves (they count there; the schedule makes up for them).
    kw = dict(seq_len=SEQ, rows_per_shard=8, document_masking=True)
    m = ptd.write_token_shards(_sources(files, 0.5), tok, tmp_path / "mix", length_mix=MIX, **kw)
    rows = _segment_rows(tmp_path / "mix", tok)
    mixed = [r for r in rows if r is not None]
    assert len(mixed) > 150
    share = mixed.count(0) / len(mixed)
    assert abs(share - 0.75) <= 1 / len(mixed) + 0.005, share  # 75% of the segments in [S3/2, S3], 25% below
    assert rows.count(None) == m["length_mix_measured"]["filling_segments"]  # short documents fill the gaps
    assert m["length_mix_measured"]["segments"] == [mixed.count(0), mixed.count(1)]
    assert m["length_mix_measured"]["ranges"] == [[64, 128], [16, 64]]
    assert _documents(tmp_path / "mix", tok) == _consumed_documents(m)  # cut to the mix, the pieces still rejoin

    # The same documents cut at the row length only: nearly every piece of a long document is a full row.
    ptd.write_token_shards(_sources(files, 0.5), tok, tmp_path / "plain", **kw)
    plain = [r for r in _segment_rows(tmp_path / "plain", tok) if r is not None]
    assert plain.count(1) / len(plain) < 0.15


def test_length_mix_schedule_is_the_tiny_corpus_schedule():
    """When every piece lands in the row it was cut for, the rows follow data.synthetic.mix_rows exactly."""
    cutter, schedule = ptd.LengthMixCutter(SEQ, MIX), []
    for _ in range(100):
        k = cutter.next_row()
        schedule.append(k)
        cutter.counts[k] += 1
    tiny = mix_rows([0.75, 0.25])
    assert schedule == [next(tiny) for _ in range(100)]


# ------------------------------------------------------------------------------------------ resume
def _written(out):
    return {f.name: pq.read_table(f) for f in sorted(out.glob("*.parquet"))}


def _without_stream_states(manifest):
    """A manifest less `datasets`' iterator states, whose inner form differs after a resume (same position)."""
    return {**manifest, "state": {**manifest["state"], "stream_states": None}}


@pytest.mark.parametrize("cuts", [[("_write_shard", 3)], [("_write_manifest", 2)],
                                  [("_write_shard", 2), ("_write_shard", 3)]],
                         ids=["in-a-shard", "between-shard-and-manifest", "killed-twice"])
def test_killed_job_resumes_to_exactly_the_uncut_output(files, tok, tmp_path, cut_at_call, cuts):
    kw = dict(seq_len=SEQ, rows_per_shard=5, length_mix=MIX, document_masking=True, seed=7)
    whole = ptd.write_token_shards(_sources(files), tok, tmp_path / "whole", **kw)
    out = tmp_path / "cut"
    for cut in cuts:  # the job dies at the n-th shard write of a run (or between a shard and its manifest)
        with cut_at_call(ptd, *cut):
            ptd.write_token_shards(_sources(files), tok, out, **kw)
        partial = json.loads((out / ptd.manifest_name(0, 1)).read_text())
        assert not partial["done"] and 0 < len(partial["files"]) < len(whole["files"])
    with pytest.raises(DataError, match=r"workers \[0\] have not finished"):
        ptd.PackedShardLoader(out, 1)
    resumed = ptd.write_token_shards(_sources(files), tok, out, **kw)
    # the same files, counts, documents consumed per source and mix schedule
    assert _without_stream_states(resumed) == _without_stream_states(whole)
    mine, theirs = _written(out), _written(tmp_path / "whole")
    assert list(mine) == list(theirs) and all(mine[k].equals(theirs[k]) for k in mine)
    assert _documents(out, tok) == _documents(tmp_path / "whole", tok)
    # a finished worker is left alone; changed settings are refused, naming them
    assert ptd.write_token_shards(_sources(files), tok, out, **kw) == resumed
    with pytest.raises(DataError, match="seq_len: manifest 128, now 64"):
        ptd.write_token_shards(_sources(files), tok, out, **{**kw, "seq_len": 64})


def test_max_documents_stops_and_a_larger_limit_continues(files, tok, tmp_path):
    kw = dict(seq_len=SEQ, rows_per_shard=5)
    first = ptd.write_token_shards(_sources(files), tok, tmp_path / "out", max_documents=20, **kw)
    assert first["done"] and first["stopped_by"] == "max_documents" and first["counts"]["documents"] == 20
    ptd.PackedShardLoader(tmp_path / "out", 1)  # a smoke run's shards are usable
    rest = ptd.write_token_shards(_sources(files), tok, tmp_path / "out", **kw)
    assert rest["done"] and rest["stopped_by"] == "exhausted" and rest["state"]["consumed"]["long"] == len(LONG)
    assert _documents(tmp_path / "out", tok) == _consumed_documents(rest)  # none twice, none lost


# ------------------------------------------------------------------------------------------ workers
@pytest.mark.parametrize("source", ["long", "short"])
def test_two_workers_are_disjoint_and_cover_the_source(files, tok, tmp_path, source):
    """Streamed parquet (two files: one per worker) and JSON lines (contiguous halves), one source at a time."""
    spec = next(s for s in _sources(files) if s["name"] == source)
    for w in (0, 1):
        m = ptd.write_token_shards([spec], tok, tmp_path / "out", seq_len=SEQ, rows_per_shard=4, worker_index=w,
                                   num_workers=2)
        assert m["done"] and all(f["file"].startswith(f"w{w:05d}-") for f in m["files"])
    docs = _documents(tmp_path / "out", tok)
    texts = {w: [t for (_, worker, _), t in docs.items() if worker == w] for w in (0, 1)}
    assert texts[0] and texts[1] and not set(texts[0]) & set(texts[1])
    assert sorted(texts[0] + texts[1]) == sorted(LONG if source == "long" else SHORT)


# ------------------------------------------------------------------------------------------ loader
@pytest.fixture(scope="module")
def shards(files, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    ptd.write_token_shards(_sources(files), tok, out, seq_len=SEQ, rows_per_shard=4, document_masking=True)
    return out


def test_loader_splits_files_over_ranks(shards):
    ranks = [ptd.PackedShardLoader(shards, 2, r, 2, seed=3) for r in (0, 1)]
    n_batches = len(ranks[0])  # this epoch's
    seen = [[tuple(row.tolist()) for b in loader for row in b["input_ids"]] for loader in ranks]
    assert len(seen[0]) == len(seen[1]) == 2 * n_batches > 0  # the same number of rows on every rank
    assert not set(seen[0]) & set(seen[1])  # each rank reads its own files
    again = [tuple(row.tolist()) for b in ranks[0] for row in b["input_ids"]]  # epoch 1: another order
    assert again != seen[0]


def test_loader_resumes_after_consumed_samples(shards):
    whole = ptd.PackedShardLoader(shards, 2, 1, 2, seed=5)
    stream = [b for _ in range(3) for b in whole]  # three epochs
    assert whole.consumed_samples == 2 * len(stream)
    for k in (0, 1, 3, len(stream) // 3 + 1, len(stream) - 1):  # mid-epoch and across epoch boundaries
        resumed = ptd.PackedShardLoader(shards, 2, 1, 2, seed=5, start_sample=2 * k)
        rest = [b for _ in range(3) for b in resumed][: len(stream) - k]
        assert len(rest) == len(stream) - k
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rest, stream[k:]))
    skipped = ptd.PackedShardLoader(shards, 2, 1, 2, seed=5)
    skipped.skip(6)
    assert torch.equal(next(iter(skipped))["input_ids"], stream[3]["input_ids"])
    with pytest.raises(DataError, match="whole micro-batches of 2"):
        skipped.skip(3)


def test_loader_checks_the_stage(shards):
    with pytest.raises(DataError, match="packed for 128 tokens, the stage trains at 4096"):
        ptd.PackedShardLoader(shards, 1, seq_len=4096)
    with pytest.raises(DataError, match="the model only 100"):
        ptd.PackedShardLoader(shards, 1, vocab_size=100)
    assert ptd.is_packed_shards(shards) and not ptd.is_packed_shards(shards / "nowhere")


# ------------------------------------------------------------------------------------------ errors + command
def test_a_null_text_names_its_source_and_document(tok, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"text": null}\n')
    with pytest.raises(DataError, match=r"source jsonl:.*bad.jsonl \(.*\) document 1 of worker 0 of 1's part: "
                                        r"the text is NoneType"):
        ptd.write_token_shards([{"kind": "jsonl", "path_or_id": str(src)}], tok, tmp_path / "out", seq_len=SEQ)


def test_command_line_defaults_come_from_the_stage(tok, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        ptd.main(["--help"])
    assert e.value.code == 0 and "--worker-index" in capsys.readouterr().out

    seen = {}
    monkeypatch.setattr(ptd, "write_token_shards", lambda sources, tokenizer, out, **kw: seen.update(
        sources=sources, tokenizer=tokenizer, out=out, **kw) or {"done": True, "stopped_by": "exhausted", "counts": {}})
    ptd.main(["--stage", "s3", "--model", "qwen3-0.6b", "--worker-index", "1", "--num-workers", "4"])
    assert str(seen["out"]) == "runs/full/qwen3-0.6b/s3/token-shards" and seen["tokenizer"] == "Qwen/Qwen3-0.6B"
    assert seen["seq_len"] == 32768 and seen["length_mix"] == ((0.5, 1.0, 0.75), (0.125, 0.5, 0.25))
    assert seen["document_masking"] is True and (seen["worker_index"], seen["num_workers"]) == (1, 4)
    ids = [s["path_or_id"] for s in seen["sources"]]
    assert "common-pile/stackv2_edu_filtered" in ids and "bigcode/starcoderdata" not in ids
    with pytest.raises(SystemExit):
        ptd.main(["--stage", "fusion", "--model", "qwen3-0.6b"])  # conversations: sft_data's job


def test_tokenizer_loads_through_auto_tokenizer_from_a_folder(files, tok, tmp_path):
    folder = tok.save(tmp_path / "tokenizer")
    kw = dict(seq_len=SEQ, max_documents=5)
    m = ptd.write_token_shards(_sources(files)[1:], str(folder), tmp_path / "by-name", **kw)
    assert m["tokenizer"] == str(folder) and m["tokenizer_sha256"] == ptd.tokenizer_fingerprint(tok)
    ptd.write_token_shards(_sources(files)[1:], tok, tmp_path / "by-object", **kw)
    a, b = _written(tmp_path / "by-name"), _written(tmp_path / "by-object")
    assert list(a) == list(b) and all(a[k].equals(b[k]) for k in a)


def test_the_launcher_reads_packed_shards_and_resumes_past_consumed_samples(shards):
    """`launch.make_loader` takes a pretraining stage's packed shard folder to `PackedShardLoader`, and
    `launch.skip_consumed` (what a resumed trainer feeds) continues with the uncut stream's next micro-batch."""
    from qwen3repro.nanotron.launch import make_loader, skip_consumed

    def loader():
        return make_loader("pretrain", str(shards), seq_len=SEQ, micro_batch_size=2, seed=5, dp_rank=1, dp_size=2,
                           eot_id=0, document_masking=True)

    assert isinstance(loader(), ptd.PackedShardLoader)
    whole = skip_consumed(loader(), 0, 2)
    stream = [next(whole)["input_ids"] for _ in range(12)]  # several epochs of this rank
    resumed = skip_consumed(loader(), 2 * 7, 2)
    assert all(torch.equal(next(resumed)["input_ids"], want) for want in stream[7:])
    with pytest.raises(DataError, match="holds no masked conversation shards"):  # an SFT stage refuses them
        make_loader("sft", str(shards), seq_len=SEQ, micro_batch_size=2, seed=0, dp_rank=0, dp_size=1, eot_id=0)
