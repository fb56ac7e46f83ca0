"""Long-context evaluation: does YaRN + DCA give a four-fold context extension at tiny scale?

Claim (Qwen3 report §3.2, long-context stage): after S3 (RoPE base raised by ABF, documents up to
the S3 length), YaRN and Dual Chunk Attention are introduced "to achieve a four-fold increase in
sequence length capacity during inference". Every length of the suite is a multiple of the
trained length, the S3 stage's sequence length (`trained_length`): four-fold is 4x that.

Four conditions (`CONDITIONS`), same held-out items for each:

* ``S2``          — the S2 checkpoint as is (short context, base 1e4): the "before long context" baseline;
* ``S3``          — the S3 checkpoint as is: the control (does ABF alone already extrapolate?);
* ``S3+YaRN``     — S3 with ``rope_scaling={"rope_type": "yarn", "factor": 4,
                    "original_max_position_embeddings": <S3 length>}`` (transformers' formulas, models/rope.py);
* ``S3+YaRN+DCA`` — that plus ``dual_chunk_attention_config={"chunk_size": C, "local_size": W,
                    "original_max_position_embeddings": <S3 length>}`` (models/dca.py), C = ¾ and
                    W = 1/16 of the trained length by default (ChunkLlama's defaults; 1,536 / 128
                    at tiny's trained length of 2,048). As in vLLM, which serves this pair of keys, DCA
                    rotates with the base RoPE frequencies (`rope.rope_parameters`: YaRN's
                    interpolation does not apply under DCA) and YaRN's temperature enters as DCA's
                    dynamic key temperature, logits × (0.1 ln(L / S3 length) + 1)^2 (1.296 at 4x).

Protocol choices, each a documented setting (`LongContextSettings`) pinned in the result file:

* **YaRN only beyond the trained length** (`yarn_only_beyond_trained=True`). Frameworks implement
  *static* YaRN, which scales positions whatever the input's length and so can cost accuracy on
  short inputs; the Qwen3 model cards on the Hugging Face hub advise adding `rope_scaling` only
  when long contexts are needed. The model is therefore rebuilt with or without scaling per
  evaluated length: lengths <= `trained_length` use the plain S3 configuration, longer ones the
  scaled one. The length that decides is the cell's nominal length
  (an upper bound on every item's prompt + answer tokens).
* **DCA** is on at every length for its condition by default (`dca_only_beyond_trained=False`): it is
  training-free and designed to be harmless inside the trained length (queries within one chunk see
  plain RoPE), so the short lengths test that (the temperature is 1 up to the trained length).
  Stacking YaRN's frequency interpolation on DCA's already-in-range distances cut 8,192-token
  retrieval to 20% on development items (item seed 1), where the vLLM arrangement kept 100%
  (docs/LOG.md).
* **Retrieval** (`retrieval`): held-out pass-key items (`synthetic.passkey_eval_items`),
  `n_per_length` per length (>= 40: one item moves a cell by at most 2.5 points), needle depths
  spread evenly over the context and reported in `depth_bins` bins. Variant "passkey" (one needle)
  and "order" (two needles, position-sensitive). Greedy decoding of the answer tokens with a KV cache
  (`decoding`), exact match with `synthetic.check_retrieval`.
* **Loss by position** (`loss`): mean next-token NLL per position bucket over held-out S3-style
  documents of `loss_length_factor` × the trained length.

Efficiency: items of one length are batched (left padding; DCA, which takes no padding, batches
only prompts of equal token count), up to `max_batch_tokens` prompt tokens per batch; everything
runs under `torch.inference_mode()`; one model is built per (condition, length regime), sharing the
checkpoint's weight tensors (`models`); the project's progress line counts work in FLOPs.

Modules: `settings` (the suite file `evals/longcontext.toml`, conditions), `models`, `decoding`,
`retrieval`, `loss`, `suite` (`run_longcontext_eval`, the result file), `plots`. The command is
`qwen3repro eval longcontext` (`evals/cli.py`); the claims judging the results are in
`evals/claims/longcontext.py`.
"""
from .decoding import batches, first_word_complete, greedy_decode
from .loss import bucket_mean_nll, loss_by_position, loss_documents
from .models import CheckpointModels, ModelSource, forward_flops
from .plots import write_plots
from .retrieval import build_items, depth_bin, depth_bin_edges, retrieval_grid
from .settings import (
    CONDITION_NAMES, CONDITIONS, DEFAULT_SUITE, VARIANTS, Condition, LongContextSettings, condition_config,
    condition_overrides, load_suite, suite_settings,
)
from .suite import RESULT_FILE, items_per_condition, run_longcontext_eval, summarize

__all__ = [
    "CONDITIONS", "CONDITION_NAMES", "VARIANTS", "Condition", "LongContextSettings", "ModelSource",
    "CheckpointModels", "DEFAULT_SUITE", "RESULT_FILE", "load_suite", "suite_settings", "condition_config",
    "condition_overrides", "greedy_decode", "batches", "first_word_complete", "build_items", "depth_bin",
    "depth_bin_edges", "retrieval_grid", "loss_by_position", "loss_documents", "bucket_mean_nll",
    "items_per_condition", "run_longcontext_eval", "summarize", "write_plots", "forward_flops",
]
