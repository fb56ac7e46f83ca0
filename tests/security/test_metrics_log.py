"""metrics.jsonl with a damaged line: the reader skips it and keeps every record after it, and the cut at
resume keeps what it does not understand where it sits instead of dropping the records that follow it."""
from __future__ import annotations

import json

import pytest

from qwen3repro.files import RunFileError
from qwen3repro.train.metrics import CorruptLinesWarning, MetricsLog

GARBAGE = {
    "garbage": b"\x00\x17#garbage!",
    "truncated JSON": b'{"step": 20, "loss": 1.2',
    "not UTF-8": b'{"step": 20, "loss": \xff\xfe}',
}


def write_log(path, bad: bytes, at: int = 20, last: int = 40) -> None:
    """Records for steps 1..last, line `at` replaced by `bad`."""
    lines = [json.dumps({"loss": 1.0 / step, "step": step}, sort_keys=True).encode() for step in range(1, last + 1)]
    lines[at - 1] = bad
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("bad", GARBAGE.values(), ids=GARBAGE.keys())
def test_the_reader_skips_a_corrupt_line_and_keeps_the_rest(tmp_path, bad):
    write_log(tmp_path / "metrics.jsonl", bad)
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    with pytest.warns(CorruptLinesWarning, match=r"metrics\.jsonl: 1 line\(s\) not JSON \(line 20\)"):
        records = log.read()
    assert [r["step"] for r in records] == [s for s in range(1, 41) if s != 20]
    assert log.corrupt_lines == [20]


@pytest.mark.parametrize("bad", GARBAGE.values(), ids=GARBAGE.keys())
def test_the_cut_at_resume_keeps_later_records_and_the_corrupt_line_in_place(tmp_path, bad):
    path = tmp_path / "metrics.jsonl"
    write_log(path, bad)
    before = path.read_bytes().split(b"\n")
    with pytest.warns(CorruptLinesWarning, match="kept as they are"):
        MetricsLog(str(path)).truncate_to(40)
    assert path.read_bytes().split(b"\n") == before  # nothing to cut: not one byte lost
    with pytest.warns(CorruptLinesWarning):
        MetricsLog(str(path)).truncate_to(30)
    assert path.read_bytes().split(b"\n") == before[:30] + [b""]  # steps 1..30, line 20 as it was


def test_corrupt_lines_after_the_cut_go_with_the_steps_they_follow(tmp_path):
    """A crash mid-append leaves a cut last line after the checkpoint's step: it is dropped with the
    records of the steps being redone, and the log reads cleanly afterwards."""
    path = tmp_path / "metrics.jsonl"
    write_log(path, b'{"step": 40, "lo', at=40)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # no newline after the cut line
    with pytest.warns(CorruptLinesWarning, match="line 40 dropped with the later steps"):
        MetricsLog(str(path)).truncate_to(39)
    log = MetricsLog(str(path))
    assert [r["step"] for r in log.read()] == list(range(1, 40)) and log.corrupt_lines == []
    log.append({"step": 40, "loss": 0.5})
    assert log.read()[-1] == {"step": 40, "loss": 0.5}


def test_a_step_that_is_not_an_integer_names_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": "two"}\n')
    with pytest.raises(RunFileError, match=rf"{path}:2: 'step' must be an integer"):
        MetricsLog(str(path)).truncate_to(1)
