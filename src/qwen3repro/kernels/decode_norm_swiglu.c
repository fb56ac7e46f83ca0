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
#include <stdint.h>

#include "rows.h"

/* Rows large enough to share among threads; below this a parallel region costs more than it saves. */
#define PARALLEL_FLOATS (1 << 15)

/* out[r, i] = x[r, i] · (mean_i x[r, i]² + eps)^-½ for rows of n floats. */
void rms_scale(const float *restrict x, float *restrict out, int64_t rows, int64_t n, float eps, int threads)
{
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * n >= PARALLEL_FLOATS)
    for (int64_t r = 0; r < rows; r++) rms_row(x + r * n, out + r * n, n, eps);
}

/* out[r, i] = silu(gu[r, i]) · gu[r, inter + i] = gate / (1 + exp(-gate)) · up, for i < inter; the
 * rows of gu are 2·inter floats (gate, then up), those of out inter floats. */
void swiglu(const float *restrict gu, float *restrict out, int64_t rows, int64_t inter, int threads)
{
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * inter >= PARALLEL_FLOATS)
    for (int64_t r = 0; r < rows; r++) swiglu_row(gu + r * 2 * inter, gu + r * 2 * inter + inter, out + r * inter, inter);
}
