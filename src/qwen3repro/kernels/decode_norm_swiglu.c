/* The decode step's element-wise work between its matmuls: RMSNorm scaling and SwiGLU, one call each.
 *
 * `DenseDecodeStep` folds each RMSNorm's weight into the matmul that follows, so a norm is only
 * x · (mean(x²) + eps)^-½ per row; SwiGLU is silu(gate) · up. In PyTorch these take 4 and 2 tensor
 * operations, each costing microseconds of dispatch at rollout sizes (32 rows of a few hundred
 * floats); here each is one pass over rows that stay in cache. Results agree with the PyTorch
 * operations to float rounding (tests/test_kernels.py).
 *
 * Layouts: float32, rows of unit stride, `stride` floats apart.
 */
#include <math.h>
#include <stdint.h>

#include "vector_math.h"

/* Rows large enough to share among threads; below this a parallel region costs more than it saves. */
#define PARALLEL_FLOATS (1 << 15)

/* out[r, i] = x[r, i] · (mean_i x[r, i]² + eps)^-½ for rows of n floats. */
void rms_scale(const float *restrict x, float *restrict out, int64_t rows, int64_t n, float eps, int threads)
{
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * n >= PARALLEL_FLOATS)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        vf acc = (vf){0};
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES) {
            const vf v = load(xr + i);
            acc += v * v;
        }
        float ss = 0.f;
        for (int l = 0; l < LANES; l++) ss += acc[l];
        for (; i < n; i++) ss += xr[i] * xr[i];
        const float s = 1.f / sqrtf(ss / (float)n + eps);
        for (i = 0; i + LANES <= n; i += LANES) store(o + i, load(xr + i) * s);
        for (; i < n; i++) o[i] = xr[i] * s;
    }
}

/* out[r, i] = silu(gu[r, i]) · gu[r, inter + i] = gate / (1 + exp(-gate)) · up, for i < inter; the
 * rows of gu are 2·inter floats (gate, then up), those of out inter floats. */
void swiglu(const float *restrict gu, float *restrict out, int64_t rows, int64_t inter, int threads)
{
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * inter >= PARALLEL_FLOATS)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gu + r * 2 * inter, *up = gate + inter;
        float *o = out + r * inter;
        int64_t i = 0;
        for (; i + LANES <= inter; i += LANES) {
            const vf g = load(gate + i);
            store(o + i, g / (1.0f + vexp(-g)) * load(up + i));
        }
        for (; i < inter; i++) o[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}
