"""Long-CoT cold start (Qwen3 report §4.1): build the filtered data set, then fine-tune on it.

    run(ColdStartStageConfig.from_dict(recipe ⊕ scale), parent=<S3 checkpoint>, ctx) -> <out_dir>

1. **Data** (`coldstart.pipeline.build_coldstart_dataset`): a query pool, the query filter, N candidate
   responses per kept query, Pass@N, the six response filters and a minimal subset — with the counts of
   every step in `coldstart_report.json` and both sets as JSONL. `responses = "filtered"` trains on the
   filtered set; `"unfiltered"` on candidates drawn without the response filter (the Filtering claim's
   control: same pool, generator, sizes and steps).
2. **Used queries**: the uids of the queries the trained set comes from go to `used_queries.json`, the
   interface reasoning RL reads so that it never reuses a cold-start query (§4.2, criterion 1).
3. **Training**: `stages.sft.fine_tune` with the stage's `[sft]` table — the same trainer and
   assistant-only loss as every SFT stage.

The directory gets `lineage.json` last, with this stage's config and the hash of the conversations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Mapping

from ..coldstart.pipeline import FILTERED_FILE, UNFILTERED_FILE, ColdStartConfig, build_coldstart_dataset
from ..config import ConfigError
from ..config_fields import TableOf, checked_fields
from ..lineage import make_lineage, write_lineage
from ..rl.selection import USED_QUERIES_FILE
from . import sft
from ..files import write_json_atomic
from .common import StageContext

RESPONSES = {"filtered": FILTERED_FILE, "unfiltered": UNFILTERED_FILE}


@dataclass(frozen=True)
class ColdStartStageConfig:
    name: str
    responses: str = "filtered"
    """'filtered' (the report's cold start) or 'unfiltered' (the Filtering claim's control)."""
    coldstart: Annotated[Mapping[str, Any], TableOf(ColdStartConfig)] = field(default_factory=dict)
    """`coldstart.pipeline.ColdStartConfig`: pool, candidate generator, filters and their thresholds."""
    sft: sft.SFTTable = field(default_factory=dict)
    """`stages.sft.SFTConfig` fields except name and data (seq_len, batch_size, steps, train, ...)."""
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if self.responses not in RESPONSES:
            raise ConfigError(f"{self.name}: responses must be one of {sorted(RESPONSES)}, got {self.responses!r}")
        self.data_config()
        self.sft_config()  # validate both tables now, naming unknown keys

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "ColdStartStageConfig") -> "ColdStartStageConfig":
        return cls(**checked_fields(cls, d, where))

    def data_config(self) -> ColdStartConfig:
        return ColdStartConfig.from_dict(self.coldstart)

    def sft_config(self) -> sft.SFTConfig:
        return sft.SFTConfig.for_stage(self.name, self.sft, data=RESPONSES[self.responses], seed=self.seed)


def run(cfg: ColdStartStageConfig, parent: Path, ctx: StageContext) -> Path:
    """Build the cold-start data and fine-tune the S3 checkpoint `parent` on it into `ctx.out_dir`."""
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    filtered, unfiltered, report = build_coldstart_dataset(cfg.data_config(), out_dir=out)
    conversations = filtered if cfg.responses == "filtered" else unfiltered
    write_json_atomic(out / USED_QUERIES_FILE, report["used_uids"][cfg.responses])
    data_hash = sft.fine_tune(cfg.sft_config(), parent, ctx, conversations)
    write_lineage(out, make_lineage(cfg.name, cfg, parent, data_hashes={"conversations": data_hash}))
    return out


__all__ = ["ColdStartStageConfig", "RESPONSES", "run"]
