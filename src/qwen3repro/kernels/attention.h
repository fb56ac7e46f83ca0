/* One decode step of a Qwen3 attention layer for one (row, KV head) pair: QK-norm, RoPE, the cache
 * writes, q·kᵀ, softmax and p·v, in one pass while its keys and values are in cache. Included by the
 * kernels that run it over a batch (decode_attention.c: one layer; decode_step.c: a whole step).
 *
 * Compiled with HEAD_DIM and GROUP (query heads per KV head) fixed, so every inner loop has a constant
 * trip count and vectorises. The arithmetic follows `DenseDecodeStep._torch_attention`; results agree
 * with it to float rounding (tests/test_kernels.py).
 *
 * Layouts (all float32, contiguous, as `DenseDecodeStep` keeps them):
 *   qkv     [B, qkv_stride]: per row the q/k heads grouped by KV head ([GROUP q heads, 1 k head] for
 *           each), then the Hk v heads; each q/k head's dimensions in RoPE pair order
 *           (x_0, x_{D/2}, x_1, x_{D/2+1}, ...);
 *   qk_norm [Hk·(GROUP+1), HEAD_DIM]: QK-norm weights in the same order (q's carry 1/√D);
 *   rope    [P, HEAD_DIM/2, 2]: (cos, sin) of every position and frequency;
 *   keys    [B·Hk, HEAD_DIM, T] (transposed), values [B·Hk, T, HEAD_DIM], T a multiple of 16;
 *   bias    [B·Hk, T]: 0 for real tokens, -inf for padding (NULL: no padding);
 *   scores  [B·Hk, GROUP, T]: workspace;
 *   out     [B, Hk·GROUP·HEAD_DIM]: attention output, query heads in order.
 */
#ifndef QWEN3REPRO_ATTENTION_H
#define QWEN3REPRO_ATTENTION_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<head dimension, a multiple of 16>"
#endif
#ifndef GROUP
#error "compile with -DGROUP=<query heads per KV head>"
#endif

#define D HEAD_DIM
#define G GROUP
#include "vector_math.h"

#define DV (D / LANES)                           /* vectors per head */
#define KEY_BLOCKS (G <= 2 ? 4 : G <= 4 ? 2 : 1) /* key vectors per pass: KEY_BLOCKS·G accumulators */

#if D % LANES != 0
#error "HEAD_DIM must be a multiple of LANES"
#endif

/* RMS-normalise one head (x · (mean(x²) + eps)^-½ · w), then rotate its (x_i, x_{i+D/2}) pairs, stored
 * side by side, by the position's angles: RoPE as a complex multiplication. */
static inline void norm_rope(const float *x, const float *w, const float *cos_sin, float eps, float *out) {
    float ss = 0.f;
    for (int d = 0; d < D; d++) ss += x[d] * x[d];
    const float r = 1.f / sqrtf(ss / D + eps);
    for (int i = 0; i < D / 2; i++) {
        const float c = cos_sin[2 * i], s = cos_sin[2 * i + 1];
        const float a = x[2 * i] * r * w[2 * i], b = x[2 * i + 1] * r * w[2 * i + 1];
        out[2 * i] = a * c - b * s;
        out[2 * i + 1] = a * s + b * c;
    }
}

/* Row b = bh / kv_heads, KV head h = bh % kv_heads: writes that head's key and value at `slot` and its
 * G query heads' attention output into `out`. */
static inline void attend_head(
    int64_t bh, const float *restrict qkv, int64_t qkv_stride, const float *restrict qk_norm, float eps,
    const float *restrict rope, const int64_t *restrict positions,
    float *restrict keys, float *restrict values, const float *restrict bias,
    float *restrict scores, float *restrict out, int64_t kv_heads, int64_t T, int64_t slot)
{
    const int64_t t_len = slot + 1, t_pad = (t_len + LANES - 1) / LANES * LANES;
    const int64_t n_qk = kv_heads * (G + 1);
    const int64_t b = bh / kv_heads, h = bh % kv_heads;
    const float *row = qkv + b * qkv_stride;
    const float *cos_sin = rope + positions[b] * D;

    /* QK-norm and RoPE for this KV head's G queries and its key (q[G]). */
    float q[G + 1][D];
    for (int j = 0; j <= G; j++) {
        const int64_t head = h * (G + 1) + j;
        norm_rope(row + head * D, qk_norm + head * D, cos_sin, eps, q[j]);
    }

    /* The new key and value go into the cache at `slot`. */
    float *restrict K = keys + bh * D * T, *restrict V = values + bh * T * D;
    for (int d = 0; d < D; d++) K[d * T + slot] = q[G][d];
    memcpy(V + slot * D, row + n_qk * D + h * D, D * sizeof(float));

    /* Scores q·k (+ padding bias) for every cached position, LANES positions per vector; positions
     * [t_len, t_pad) are computed from unused slots and then overwritten with -inf. */
    float *restrict s = scores + bh * G * T;
    const float *pad = bias ? bias + bh * T : NULL;
    int64_t t0 = 0;
    for (; t0 + KEY_BLOCKS * LANES <= t_pad; t0 += KEY_BLOCKS * LANES) {
        vf acc[KEY_BLOCKS][G];
        for (int u = 0; u < KEY_BLOCKS; u++) for (int j = 0; j < G; j++) acc[u][j] = (vf){0};
        for (int d = 0; d < D; d++)
            for (int u = 0; u < KEY_BLOCKS; u++) {
                const vf k = load(K + d * T + t0 + u * LANES);
                for (int j = 0; j < G; j++) acc[u][j] += q[j][d] * k;
            }
        for (int u = 0; u < KEY_BLOCKS; u++)
            for (int j = 0; j < G; j++)
                store(s + j * T + t0 + u * LANES, pad ? acc[u][j] + load(pad + t0 + u * LANES) : acc[u][j]);
    }
    for (; t0 < t_pad; t0 += LANES) {
        vf acc[G];
        for (int j = 0; j < G; j++) acc[j] = (vf){0};
        for (int d = 0; d < D; d++) {
            const vf k = load(K + d * T + t0);
            for (int j = 0; j < G; j++) acc[j] += q[j][d] * k;
        }
        for (int j = 0; j < G; j++) store(s + j * T + t0, pad ? acc[j] + load(pad + t0) : acc[j]);
    }
    for (int j = 0; j < G; j++)
        for (int64_t t = t_len; t < t_pad; t++) s[j * T + t] = -INFINITY;

    /* Softmax numerators (exp(s - max)) in place; the normalisation is applied to the output. */
    float inv_sum[G];
    for (int j = 0; j < G; j++) {
        float *sj = s + j * T;
        float top[LANES];
        memcpy(top, sj, sizeof top);
        for (int64_t t = LANES; t < t_pad; t += LANES)
            for (int i = 0; i < LANES; i++) top[i] = sj[t + i] > top[i] ? sj[t + i] : top[i];
        float m = top[0];
        for (int i = 1; i < LANES; i++) m = top[i] > m ? top[i] : m;
        vf sum = (vf){0};
        for (int64_t t = 0; t < t_pad; t += LANES) {
            const vf e = vexp(load(sj + t) - m);
            store(sj + t, e);
            sum += e;
        }
        float total = 0.f;
        for (int i = 0; i < LANES; i++) total += sum[i];
        inv_sum[j] = 1.f / total;
    }

    /* Weighted sum of the values; even and odd positions accumulate apart (two independent chains). */
    vf o[2][G][DV];
    for (int e = 0; e < 2; e++) for (int j = 0; j < G; j++) for (int k = 0; k < DV; k++) o[e][j][k] = (vf){0};
    int64_t t = 0;
    for (; t + 2 <= t_len; t += 2)
        for (int e = 0; e < 2; e++) {
            vf v[DV];
            for (int k = 0; k < DV; k++) v[k] = load(V + (t + e) * D + k * LANES);
            for (int j = 0; j < G; j++) {
                const float p = s[j * T + t + e];
                for (int k = 0; k < DV; k++) o[e][j][k] += p * v[k];
            }
        }
    for (; t < t_len; t++)
        for (int j = 0; j < G; j++) {
            const float p = s[j * T + t];
            for (int k = 0; k < DV; k++) o[0][j][k] += p * load(V + t * D + k * LANES);
        }
    float *dst = out + b * (kv_heads * G * D) + h * G * D;
    for (int j = 0; j < G; j++)
        for (int k = 0; k < DV; k++) store(dst + j * D + k * LANES, (o[0][j][k] + o[1][j][k]) * inv_sum[j]);
}

#endif
