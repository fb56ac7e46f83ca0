"""MoE experiment: micro-batch vs global-batch load balancing (Qwen3 report §2; Qiu et al. 2025).

Qwen3-MoE was trained with the *global-batch* load-balancing loss (LBL) of Qiu et al. 2025
("Demons in the Detail", arXiv 2501.11873): the expert selection frequencies f_i are counted over
every micro-batch of the optimizer step (and every data-parallel rank) instead of each micro-batch
alone. Their finding, and the claim measured here:

    Global-batch LBL reaches a lower global expert-load imbalance than micro-batch LBL at equal or
    lower loss, and the experts specialise more by data domain.

Why the data layout matters. In large-scale training a micro-batch is a handful of long
sequences, usually of one domain (code, math, web). The micro-batch LBL then asks every domain
to spread its tokens uniformly over all experts, which forbids domain specialisation; the global
LBL only asks the sum over the step's micro-batches, which span all domains, to be balanced.
Packed short documents mix several domains in one sequence (the S1 packing loader puts ~3
documents of ~2.5 kinds in a 256-token sequence), which removes the difference between the two
losses. So this experiment builds the batches the mechanism needs:

* **domain-pure micro-batches** — the S1 training documents are split by kind (prose, knowledge,
  parallel, code, arith, problem, passkey: the corpus's "domains"), each kind is packed on its
  own (`PackingLoader`, seeded), and a micro-batch is `micro_batch_size` sequences of one kind;
* **a mixed global batch** — an optimizer step accumulates `micro_batches_per_step` micro-batches
  whose kinds are drawn by systematic sampling in proportion to each kind's share of the training
  tokens, so every step sees the corpus mixture;
* **the two losses, same coefficient** — `losses.load_balancing_loss` with its two scopes. micro:
  the mean over the step's micro-batches of E·Σ_i f_i^j P_i^j (transformers' convention); global:
  f̄ counted over all micro-batches of the step (detached) and P local and differentiable:
  Σ_j E·Σ_i f̄_i P_i^j / N = E·Σ_i f̄_i P̄_i.
* **per-layer LBL** (`lbl_layers = "per_layer"`, the loss's `layers` setting) — each MoE layer's
  loss over its own experts, averaged over layers, as in Switch, Megatron and Qiu et al.
  transformers' `load_balancing_loss_func` (`"pooled"`) pools all layers' rows into one f and P,
  so a surplus on expert i of one layer cancels a deficit on expert i of another although they
  are different experts: at the tiny scale the pooled loss sat at its uniform value (k) while
  every layer stayed ~2.5x imbalanced (max/mean).

The step runs its micro-batches in one forward pass (rows are independent: causal attention, no
batch statistics), which is numerically the same as accumulating their gradients and lets the
global counts be known before the backward without a second forward. The language-model loss is
the token mean over the step, as with token-weighted accumulation.

What is held equal within a pair: corpus, the sequence of micro-batches (same seed), steps, LR
schedule, coefficient and initial weights. Each arm is trained for every seed in `seeds` (a seed
sets initial weights and packing/domain order); results are reported per seed and as the mean.

Measurement, on held-out documents (the S1 stream after the training documents, so none was
trained on), each document run on its own and truncated to `seq_len`. Per-domain quantities are
combined with the *training mixture* weights w_d (each kind's share of the training tokens), so
"global" means the corpus the model was balanced on:

* **loss** — held-out next-token cross-entropy per domain, mixed with w_d (the verdict's loss);
  also the plain token mean and the training CE averaged over the last quarter of the steps
  (both arms see the same batches, so that difference is paired).
* **global load imbalance** — per MoE layer the expert load of the mixture,
  load_e = Σ_d w_d p(e|d), summarised as max/mean (= 1 + MaxVio_global of Wang et al. 2024, the
  measure Qiu et al. report; 1 = balanced) and the coefficient of variation; averaged over layers.
  During training the same max/mean is logged on every step's global batch (`imb_global`), next
  to the mean over micro-batches (`imb_micro`, what the micro-batch loss optimises).
* **domain specialisation** — the mutual information between domain and expert choice,
  I(D; E) = Σ_d w_d KL(p(e|d) ‖ p(e)) per layer in nats, averaged over layers: 0 when every
  domain routes like the whole corpus, log(#domains) at most. It equals the mean divergence of the
  domains' loads from uniform minus the global load's divergence from uniform, so unlike a
  "share of the top-k experts" it does not grow when routing merely concentrates globally. The
  top-k share of Qiu et al.'s figure (floor k/E) is reported too.

The claim is `reproduced` when, on the mean over seeds, all three hold: global imbalance lower,
loss not higher by more than `loss_tolerance`, mutual information higher. Each seed's verdict is
reported as well.

Layout: `settings` (the `[experiments.moe]` table), `data` (domain-pure micro-batches), `training`
(the step loss and one arm's run), `routing` (imbalance and specialisation of routing counts),
`heldout` (routing a trained run on held-out documents), `verdict` (the claim's parts and the
diagnosis), `plots`, and `runner` (`run_moe_experiment`, the whole experiment).
"""
from __future__ import annotations

from .data import DomainBatchLoader, training_domains
from .heldout import group_counts, heldout_documents, measure_run, route_documents
from .routing import (
    coefficient_of_variation,
    domain_specialisation,
    global_imbalance,
    kl_from_global,
    kl_from_uniform,
    max_over_mean,
    micro_imbalance,
    mixture_load,
    mutual_information,
    topk_share,
)
from .runner import run_moe_experiment
from .settings import CLAIM, LBL_LAYERS, MODES, MoEExperimentSettings
from .training import selection_counts, step_loss, train_arm
from .verdict import PART_NAMES, SUMMARY_KEYS, claim_parts, judge, mean_summary, summarise

__all__ = ["CLAIM", "MODES", "LBL_LAYERS", "MoEExperimentSettings", "DomainBatchLoader", "run_moe_experiment",
           "step_loss", "selection_counts", "global_imbalance", "micro_imbalance", "mixture_load", "topk_share",
           "kl_from_global", "kl_from_uniform", "mutual_information", "domain_specialisation", "max_over_mean",
           "coefficient_of_variation", "PART_NAMES", "SUMMARY_KEYS", "claim_parts", "summarise", "mean_summary",
           "judge", "heldout_documents", "route_documents", "group_counts", "measure_run", "training_domains",
           "train_arm"]
