"""`qwen3repro eval spread`: the claims of several runs side by side, each long-context cell with its mean
and range; a run without claims, or with a malformed claims file, is refused with its path named."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from click.testing import CliRunner

from qwen3repro.cli import main
from qwen3repro.evals.claims.row import ClaimRow
from qwen3repro.evals.claims.spread import CLAIMS_FILE, load_runs, spread, write_spread
from qwen3repro.files import RunFileError


def _run(root, name, s3_at_8192, verdict, extra=()):
    summary = {"S3": {"at_2048": 0.95, "at_8192": 0.0, "at_512": 1.0, "at_trained_length": 0.95},
               "S3+YaRN+DCA": {"at_2048": 1.0, "at_8192": s3_at_8192, "at_trained_length": 1.0},
               "S2": {"at_2048": 0.0, "at_8192": None}}
    rows = [ClaimRow("yarn_dca[flagship/passkey]", "YaRN + DCA give 4x context", "32K -> 128K",
                     f"S3+YaRN+DCA {s3_at_8192:.0%}@8192", verdict, details={"summary": summary}),
            *extra]
    d = root / name
    (d / CLAIMS_FILE).parent.mkdir(parents=True)
    (d / CLAIMS_FILE).write_text(json.dumps([asdict(r) for r in rows]))
    return d


def test_verdicts_figures_and_cells_over_runs(tmp_path):
    other = ClaimRow("moe", "global-batch balancing", "-", "1.9 vs 1.8", None)
    dirs = [_run(tmp_path, "tiny", 1.0, True), _run(tmp_path, "tiny-seed1", 0.8, True, [other]),
            _run(tmp_path, "tiny-seed2", 0.5, False)]
    records = spread(load_runs(dirs))
    assert [r["name"] for r in records] == ["yarn_dca[flagship/passkey]", "moe"]
    lc, moe = records
    assert lc["verdicts"] == {"tiny": "yes", "tiny-seed1": "yes", "tiny-seed2": "no"}
    assert (lc["reproduced_in"], lc["measured_in"]) == (2, 3)
    assert moe["verdicts"] == {"tiny": "absent", "tiny-seed1": "not measured", "tiny-seed2": "absent"}
    assert (moe["reproduced_in"], moe["measured_in"]) == (0, 0)
    cell = lc["cells"]["S3+YaRN+DCA@8192"]
    assert cell["values"] == {"tiny": 1.0, "tiny-seed1": 0.8, "tiny-seed2": 0.5}
    assert cell["mean"] == pytest.approx(2.3 / 3) and (cell["min"], cell["max"]) == (0.5, 1.0)
    assert "S2@8192" not in lc["cells"] and lc["cells"]["S2@2048"]["mean"] == 0.0  # None: not evaluated there
    assert list(lc["cells"])[:4] == ["S3@512", "S3@2048", "S3@8192", "S3+YaRN+DCA@2048"]  # by length, not text

    out = tmp_path / "SPREAD.md"
    write_spread(load_runs(dirs), dirs, out)
    text = out.read_text()
    assert "| YaRN + DCA give 4x context | yes | yes | no | 2 of 3 |" in text
    assert "| S3+YaRN+DCA@8192 | 100% | 80% | 50% | 77% | 50%-100% |" in text
    assert json.loads(out.with_suffix(".json").read_text())["rows"][0]["reproduced_in"] == 2


def test_bad_runs_are_refused_with_their_path(tmp_path):
    good = _run(tmp_path, "tiny", 1.0, True)
    with pytest.raises(RunFileError, match="tiny-seed9.*no claims"):
        load_runs([good, tmp_path / "tiny-seed9"])
    bad = tmp_path / "broken"
    (bad / CLAIMS_FILE).parent.mkdir(parents=True)
    (bad / CLAIMS_FILE).write_text('[{"name": "x"}]')
    with pytest.raises(RunFileError, match="broken.*not a claims file"):
        load_runs([good, bad])
    (bad / CLAIMS_FILE).write_text("{not json")
    result = CliRunner().invoke(main, ["eval", "spread", str(good), str(bad), "--out", str(tmp_path / "S.md")])
    assert result.exit_code == 2 and "broken" in result.output and "not a claims file" in result.output
    assert not (tmp_path / "S.md").exists()


def test_cli_writes_the_table_and_dry_run_writes_nothing(tmp_path):
    dirs = [str(_run(tmp_path, n, a, v)) for n, a, v in (("tiny", 1.0, True), ("tiny-seed1", 0.9, True))]
    out = tmp_path / "SPREAD.md"
    dry = CliRunner().invoke(main, ["eval", "spread", *dirs, "--out", str(out), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["rows"] == {"tiny": ["yarn_dca[flagship/passkey]"],
                                              "tiny-seed1": ["yarn_dca[flagship/passkey]"]}
    assert not out.exists()
    result = CliRunner().invoke(main, ["eval", "spread", *dirs, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "reproduced in 2 of 2" in result.output and out.exists()


def test_shared_compares_only_the_rows_every_run_holds(tmp_path):
    # A full run beside seed runs that measure some of its claims: --shared leaves out the rows only the
    # full run holds; with no row held by every run there is nothing to write, and nothing is written.
    grpo = ClaimRow("grpo[flagship]", "GRPO improves reasoning", "+", "pass@1 0.30 -> 0.41", True)
    dirs = [_run(tmp_path, "tiny", 1.0, True, [grpo]), _run(tmp_path, "tiny-seed1", 0.8, True)]
    assert [r["name"] for r in spread(load_runs(dirs))] == ["yarn_dca[flagship/passkey]", "grpo[flagship]"]
    assert [r["name"] for r in spread(load_runs(dirs), shared=True)] == ["yarn_dca[flagship/passkey]"]
    out = tmp_path / "SPREAD.md"
    result = CliRunner().invoke(main, ["eval", "spread", *map(str, dirs), "--out", str(out), "--shared"])
    assert result.exit_code == 0, result.output
    assert "GRPO" not in out.read_text() and "YaRN + DCA" in out.read_text()
    lone = ClaimRow("fusion[flagship]", "fusion", "-", "x", True)
    other = tmp_path / "other"
    (other / CLAIMS_FILE).parent.mkdir(parents=True)
    (other / CLAIMS_FILE).write_text(json.dumps([asdict(lone)]))
    result = CliRunner().invoke(main, ["eval", "spread", str(dirs[0]), str(other), "--out", str(tmp_path / "S.md"), "--shared"])
    assert result.exit_code == 2 and "nothing to compare" in result.output
    assert not (tmp_path / "S.md").exists()
