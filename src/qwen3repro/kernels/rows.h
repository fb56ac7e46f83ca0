/* Row-wise building blocks of a decode step, shared by the kernels: RMSNorm scaling, SwiGLU and a
 * small matrix product, each over a range of rows that one thread owns.
 *
 * Needs vector_math.h (LANES, vf). Layouts: float32, rows of unit stride.
 */
#ifndef QWEN3REPRO_ROWS_H
#define QWEN3REPRO_ROWS_H

#include <math.h>
#include <stdint.h>

#include "vector_math.h"

/* out = x · (mean(x²) + eps)^-½ for one row of n floats. */
static inline void rms_row(const float *restrict x, float *restrict out, int64_t n, float eps)
{
    vf acc = (vf){0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const vf v = load(x + i);
        acc += v * v;
    }
    float ss = 0.f;
    for (int l = 0; l < LANES; l++) ss += acc[l];
    for (; i < n; i++) ss += x[i] * x[i];
    const float s = 1.f / sqrtf(ss / (float)n + eps);
    for (i = 0; i + LANES <= n; i += LANES) store(out + i, load(x + i) * s);
    for (; i < n; i++) out[i] = x[i] * s;
}

/* out[i] = silu(gate[i]) · up[i] = gate / (1 + exp(-gate)) · up, for i < n. */
static inline void swiglu_row(const float *restrict gate, const float *restrict up, float *restrict out, int64_t n)
{
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const vf g = load(gate + i);
        store(out + i, g / (1.0f + vexp(-g)) * load(up + i));
    }
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* ---------------------------------------------------------------------------- matrix product
 * out[r, :] (+)= x[r, :] · W for `rows` rows, W [K, N] row-major (the layout `DenseDecodeStep` keeps
 * its weights in: [in, out]). At decode sizes (a thread's ~16 rows, K and N of a few hundred) this
 * register-blocked loop runs near the core's peak, where a library call per product, with its
 * dispatch and threading, costs more than the arithmetic.
 *
 * A block of ROWS_PER_BLOCK rows × VECS_PER_BLOCK vectors of columns is accumulated in registers over
 * all of K: each step loads VECS_PER_BLOCK vectors of W's row k and broadcasts one x per row. The
 * block fills the vector registers without spilling: 8 × 3 of AVX-512's 32 (plus 3 for W and one
 * broadcast), 6 × 2 of AVX2's 16. */
#if LANES == 16
#define ROWS_PER_BLOCK 8
#define VECS_PER_BLOCK 3
#else
#define ROWS_PER_BLOCK 6
#define VECS_PER_BLOCK 2
#endif

/* One block: mr ≤ ROWS_PER_BLOCK rows × nv ≤ VECS_PER_BLOCK vectors; inlined with constant mr and nv,
 * so the accumulators are registers. */
static inline __attribute__((always_inline)) void gemm_block(
    const int mr, const int nv, const float *restrict x, int64_t ldx, const float *restrict W, int64_t N,
    int64_t K, float *restrict out, int64_t ldo, int accumulate)
{
    vf acc[ROWS_PER_BLOCK][VECS_PER_BLOCK];
    for (int r = 0; r < mr; r++) for (int v = 0; v < nv; v++) acc[r][v] = (vf){0};
    for (int64_t k = 0; k < K; k++) {
        vf w[VECS_PER_BLOCK];
        for (int v = 0; v < nv; v++) w[v] = load(W + k * N + v * LANES);
        for (int r = 0; r < mr; r++) {
            const float b = x[r * ldx + k];
            for (int v = 0; v < nv; v++) acc[r][v] += b * w[v];
        }
    }
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++) {
            float *o = out + r * ldo + v * LANES;
            store(o, accumulate ? load(o) + acc[r][v] : acc[r][v]);
        }
}

/* All rows of one column block of nv vectors (a constant after inlining). */
static inline __attribute__((always_inline)) void gemm_columns(
    const int nv, const float *x, int64_t ldx, int64_t rows, const float *W, int64_t K, int64_t N,
    float *out, int64_t ldo, int accumulate)
{
    int64_t r = 0;
    for (; r + ROWS_PER_BLOCK <= rows; r += ROWS_PER_BLOCK)
        gemm_block(ROWS_PER_BLOCK, nv, x + r * ldx, ldx, W, N, K, out + r * ldo, ldo, accumulate);
    /* The last rows: one case per count, each a block with constant sizes. */
#define REST(m) case m: gemm_block(m, nv, x + r * ldx, ldx, W, N, K, out + r * ldo, ldo, accumulate); break
    switch (rows - r) {
        REST(1); REST(2); REST(3); REST(4); REST(5);
#if ROWS_PER_BLOCK > 6
        REST(6); REST(7);
#endif
        default: break;
    }
#undef REST
}

/* out[r, n] = (out[r, n] if accumulate else 0) + Σ_k x[r, k] · W[k, n], for r < rows and n < N.
 * x rows ldx floats apart, out rows ldo floats apart. */
static inline void gemm_rows(const float *x, int64_t ldx, int64_t rows, const float *W, int64_t K, int64_t N,
                             float *out, int64_t ldo, int accumulate)
{
    int64_t n0 = 0;
    for (; n0 + VECS_PER_BLOCK * LANES <= N; n0 += VECS_PER_BLOCK * LANES)
        gemm_columns(VECS_PER_BLOCK, x, ldx, rows, W + n0, K, N, out + n0, ldo, accumulate);
    for (; n0 + LANES <= N; n0 += LANES)  /* fewer than VECS_PER_BLOCK vectors left */
        gemm_columns(1, x, ldx, rows, W + n0, K, N, out + n0, ldo, accumulate);
    for (; n0 < N; n0++)  /* fewer than LANES columns left */
        for (int64_t r = 0; r < rows; r++) {
            float s = 0.f;
            for (int64_t k = 0; k < K; k++) s += x[r * ldx + k] * W[k * N + n0];
            out[r * ldo + n0] = accumulate ? out[r * ldo + n0] + s : s;
        }
}

#endif
