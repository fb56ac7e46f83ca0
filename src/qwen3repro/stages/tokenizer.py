"""Tokenizer stage: a byte-level BPE with Qwen3's special tokens, trained on the synthetic corpus.

At full scale the released Qwen3 tokenizer is used instead (`Tokenizer.load(hub id)`); this stage
exists for the tiny scale, whose languages and vocabulary are our own.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config_fields import Positive, checked_fields
from ..data.synthetic import tokenizer_training_texts
from ..lineage import make_lineage, write_lineage
from ..tokenizer import train_tokenizer
from .common import StageContext


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: Positive
    """Total size including Qwen3's 26 special tokens (must not exceed the models' vocab_size)."""
    seq_len: Positive
    """S1's sequence length: the sample is S1 and S2 documents as those stages generate them, and
    their short retrieval documents are sized to the row (`data.synthetic.short_retrieval_range`)."""
    n_docs: Positive = 6000
    """Synthetic S1+S2 documents to learn the merges from."""
    min_frequency: Positive = 2
    seed: int = 0

    @classmethod
    def from_dict(cls, d, where: str = "TokenizerConfig") -> "TokenizerConfig":
        return cls(**checked_fields(cls, d, where))


def run(cfg: TokenizerConfig, parent: Path | None, ctx: StageContext) -> Path:
    out = Path(ctx.out_dir)
    ctx.say(f"tokenizer: training byte-level BPE, vocab {cfg.vocab_size}, on {cfg.n_docs} synthetic documents")
    tok = train_tokenizer(tokenizer_training_texts(seq_len=cfg.seq_len, seed=cfg.seed, n_docs=cfg.n_docs), cfg.vocab_size,
                          min_frequency=cfg.min_frequency)
    tok.save(out)
    write_lineage(out, make_lineage("tokenizer", cfg, parent))
    ctx.say(f"tokenizer: {len(tok)} tokens written to {out}")
    return out
