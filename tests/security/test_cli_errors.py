"""Every error of the command line is one line naming the file or key at fault, never a traceback.

A checkpoint or run directory can be damaged by hand or by a crash: an emptied `lineage.json`, a
truncated `stage.json` or `config.json`, a missing weights file, a `metrics.jsonl` line that is JSON but
not a record. `qwen3repro` prints `error: <what, where>` on stderr and exits with status 2;
`qwen3repro --debug ...` prints the traceback first.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qwen3repro import pipeline
from qwen3repro.cli import main
from qwen3repro.files import RunFileError
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
from qwen3repro.tokenizer import train_tokenizer
from qwen3repro.train.metrics import MetricsLog


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A complete micro checkpoint directory with its tokenizer: what `qwen3repro chat` loads."""
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    Qwen3(get_model_config("micro")).save_pretrained(out)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 6))) for _ in range(100)]
    train_tokenizer([" ".join(rng.choice(words) for _ in range(30)) for _ in range(100)], 300).save(out)
    return out


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    out.mkdir()
    for f in checkpoint.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _one_line_error(result, *names: str) -> str:
    """stderr is exactly one `error:` line that names each of `names`; exit status 2."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def _debug_shows_the_traceback(args: list[str], error_line: str) -> None:
    result = CliRunner().invoke(main, ["--debug", *args])
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1] == error_line


# Damage to a checkpoint directory, and the file the error must name.
CHECKPOINT_DAMAGE = {
    "config.json missing": (lambda d: (d / "config.json").unlink(), "config.json"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text('{"hidden_size": '), "config.json"),
    "config.json empty": (lambda d: (d / "config.json").write_text(""), "config.json"),
    "config.json a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json"),
    "config.json without sizes": (lambda d: (d / "config.json").write_text("{}"), "config.json"),
    "config.json with a wrong type": (
        lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                             "rope_theta": "big"})), "config.json"),
    "weights missing": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    "weights corrupt": (lambda d: (d / "model.safetensors").write_bytes(b"not a safetensors file"),
                        "model.safetensors"),
    "tokenizer corrupt": (lambda d: (d / "tokenizer.json").write_text("{"), "tokenizer.json"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_chat_on_a_damaged_checkpoint(checkpoint, tmp_path, damage):
    spoil, named = CHECKPOINT_DAMAGE[damage]
    ckpt = _copy(checkpoint, tmp_path)
    spoil(ckpt)
    args = ["chat", str(ckpt), "--prompt", "hi", "--max-new-tokens", "1"]
    line = _one_line_error(CliRunner().invoke(main, args), str(ckpt), named)
    _debug_shows_the_traceback(args, line)


def test_chat_on_the_intact_checkpoint_answers(checkpoint):
    result = CliRunner().invoke(main, ["chat", str(checkpoint), "--prompt", "hi", "--max-new-tokens", "2", "--seed", "0"])
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------- run directories
@pytest.fixture
def no_training(monkeypatch):
    """Stage runs replaced by a failure: these tests must stop at reading the run files, before training."""
    class _Refuse:
        @staticmethod
        def run(cfg, parent, ctx):
            raise AssertionError(f"{ctx.out_dir}: a stage was about to train")

    monkeypatch.setattr(pipeline, "stage_module", lambda kind: _Refuse)


RUN_DAMAGE = {
    "lineage.json empty": ("lineage.json", ""),
    "lineage.json not JSON": ("lineage.json", '{"stage": "tokenizer", '),
    "lineage.json a list": ("lineage.json", "[]"),
    "lineage.json without its fields": ("lineage.json", '{"stage": "tokenizer"}'),
    "stage.json not JSON": ("stage.json", '{"lineage_hash": '),
    "stage.json a number": ("stage.json", "3"),
}


@pytest.mark.parametrize("damage", list(RUN_DAMAGE))
def test_pipeline_on_a_damaged_stage_directory(tmp_path, no_training, damage):
    name, text = RUN_DAMAGE[damage]
    stage_dir = tmp_path / "runs" / "micro" / "tokenizer"
    stage_dir.mkdir(parents=True)
    (stage_dir / name).write_text(text)
    args = ["pipeline", "micro", "--out", str(tmp_path / "runs"), "--no-claims"]
    line = _one_line_error(CliRunner().invoke(main, args), str(stage_dir / name))
    _debug_shows_the_traceback(args, line)


@pytest.mark.parametrize("record", ["[1, 2]", "3", '"loss"', "null"])
def test_a_metrics_line_that_is_not_a_record_names_the_file_and_line(tmp_path, record):
    path = tmp_path / "metrics.jsonl"
    path.write_text(f'{{"step": 1, "loss": 2.0}}\n{record}\n{{"step": 2, "loss": 1.5}}\n')
    with pytest.raises(RunFileError, match=rf"{path}:2: expected a JSON object"):
        MetricsLog(str(path)).read()


def test_a_metrics_line_that_is_not_a_record_is_one_cli_line(tmp_path, monkeypatch):
    """A stage resuming in a directory whose metrics.jsonl holds a bare list: the resume reads the log
    (`TrainingRun` cuts it back to the checkpoint's step) and the command line names the file and line."""
    stage_dir = tmp_path / "runs" / "micro" / "tokenizer"

    class _Resume:
        @staticmethod
        def run(cfg, parent, ctx):
            (ctx.out_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n')
            MetricsLog(str(ctx.out_dir / "metrics.jsonl")).truncate_to(1)
            raise AssertionError("the damaged log was read without an error")

    monkeypatch.setattr(pipeline, "stage_module", lambda kind: _Resume)
    result = CliRunner().invoke(main, ["pipeline", "micro", "--out", str(tmp_path / "runs"), "--no-claims"])
    _one_line_error(result, f"{stage_dir / 'metrics.jsonl'}:2")


def test_an_unexpected_exception_keeps_its_traceback(tmp_path, monkeypatch):
    """Only errors that say what is wrong are shortened: a bug still shows where it happened."""
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("qwen3repro.cli.build_plan", broken)
    result = CliRunner().invoke(main, ["pipeline", "micro", "--dry-run"])
    assert isinstance(result.exception, ZeroDivisionError) and "error:" not in result.output
