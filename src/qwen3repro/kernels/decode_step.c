/* A whole decode step of a dense Qwen3 in one call: embedding, every layer (RMSNorm, q/k/v, attention,
 * o_proj, RMSNorm, gate/up, SwiGLU, down_proj) and the final norm and LM head, for a batch of rows.
 *
 * The rows of a decode step are independent of each other until sampling, so each thread takes a
 * contiguous range of rows and runs it through the whole step alone: no barrier inside the step, and
 * every matrix product is a small one (a thread's rows × K × N) done by a register-blocked loop
 * (rows.h) that runs near the core's peak. With PyTorch operations the same step is ~40 calls, and
 * products this small do not parallelise inside a library call: one core does them while the other
 * waits. The arithmetic is `DenseDecodeStep.__call__`'s (weights prepared by it: norm weights folded
 * into the next product, q/k heads grouped by KV head in RoPE pair order); results agree with it to
 * float rounding (tests/test_kernels.py).
 *
 * Each thread reads every weight once per step, so for models whose weights do not fit in the cache
 * a split by columns would move less memory: the engine measures this kernel against its PyTorch
 * operations per machine and shape and keeps the faster (`DenseDecodeStep._step_is_faster`).
 *
 * Compiled with HEAD_DIM and GROUP fixed (attention.h). Layouts (float32, contiguous):
 *   embed [V, hidden]; lm_head [hidden, V]; per layer w_qkv [hidden, (Hk·(G+2))·D],
 *   w_o [Hk·G·D, hidden], w_gu [hidden, 2·inter] (gate, then up), w_down [inter, hidden], and the
 *   caches and norms as attention.h lays them out; the workspace rows as `DenseDecodeStep._bind`.
 */
#include <stdint.h>

#include "attention.h"
#include "rows.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* One layer's prepared weights, epsilons and KV cache (mirrored by `qwen3repro.kernels.StepLayer`). */
struct step_layer {
    const float *w_qkv, *qk_norm, *w_o, *w_gu, *w_down;
    float *keys, *values;
    float attn_norm_eps, qk_norm_eps, mlp_norm_eps;
};

/* The model, the cache and the workspace of one batch (mirrored by `qwen3repro.kernels.StepArgs`). */
struct step_args {
    int64_t batch, hidden, kv_heads, inter, vocab, capacity, n_layers;
    const struct step_layer *layers;
    const float *embed, *lm_head, *rope, *bias;  /* bias NULL: no padding */
    float final_norm_eps;
    /* workspace: x, xn [B, hidden]; qkv [B, Hk·(G+2)·D]; scores [B·Hk, G, T]; att [B, Hk·G·D];
     * gu [B, 2·inter]; act [B, inter] */
    float *x, *xn, *qkv, *scores, *att, *gu, *act;
};

/* Rows [r0, r1) through the whole step. */
static void step_rows(const struct step_args *a, const int64_t *tokens, const int64_t *positions, float *logits,
                      int64_t slot, int64_t r0, int64_t r1)
{
    const int64_t n = r1 - r0, hidden = a->hidden, hk = a->kv_heads, inter = a->inter;
    const int64_t qkv_width = hk * (G + 2) * D, att_width = hk * G * D;
    float *x = a->x + r0 * hidden, *xn = a->xn + r0 * hidden, *qkv = a->qkv + r0 * qkv_width;
    float *att = a->att + r0 * att_width, *gu = a->gu + r0 * 2 * inter, *act = a->act + r0 * inter;

    for (int64_t r = 0; r < n; r++) memcpy(x + r * hidden, a->embed + tokens[r0 + r] * hidden, hidden * sizeof(float));
    for (int64_t l = 0; l < a->n_layers; l++) {
        const struct step_layer *L = a->layers + l;
        for (int64_t r = 0; r < n; r++) rms_row(x + r * hidden, xn + r * hidden, hidden, L->attn_norm_eps);
        gemm_rows(xn, hidden, n, L->w_qkv, hidden, qkv_width, qkv, qkv_width, 0);
        /* attend_head indexes the whole batch's buffers by (row, KV head). */
        for (int64_t bh = r0 * hk; bh < r1 * hk; bh++)
            attend_head(bh, a->qkv, qkv_width, L->qk_norm, L->qk_norm_eps, a->rope, positions, L->keys, L->values,
                        a->bias, a->scores, a->att, hk, a->capacity, slot);
        gemm_rows(att, att_width, n, L->w_o, att_width, hidden, x, hidden, 1);
        for (int64_t r = 0; r < n; r++) rms_row(x + r * hidden, xn + r * hidden, hidden, L->mlp_norm_eps);
        gemm_rows(xn, hidden, n, L->w_gu, hidden, 2 * inter, gu, 2 * inter, 0);
        for (int64_t r = 0; r < n; r++) swiglu_row(gu + r * 2 * inter, gu + r * 2 * inter + inter, act + r * inter, inter);
        gemm_rows(act, inter, n, L->w_down, inter, hidden, x, hidden, 1);
    }
    for (int64_t r = 0; r < n; r++) rms_row(x + r * hidden, xn + r * hidden, hidden, a->final_norm_eps);
    gemm_rows(xn, hidden, n, a->lm_head, hidden, a->vocab, logits + r0 * a->vocab, a->vocab, 0);
}

/* tokens, positions [B] -> logits [B, V]; writes each row's key and value at `slot` of every layer. */
void decode_step(const struct step_args *a, const int64_t *tokens, const int64_t *positions, float *logits,
                 int64_t slot, int threads)
{
    #pragma omp parallel num_threads(threads)
    {
        int64_t part = 0, parts = 1;
#ifdef _OPENMP
        part = omp_get_thread_num();
        parts = omp_get_num_threads();
#endif
        step_rows(a, tokens, positions, logits, slot, a->batch * part / parts, a->batch * (part + 1) / parts);
    }
}
