/* One decode step of a Qwen3 attention layer for a batch of rows, fused into one call.
 *
 * What the generation engine's `DenseDecodeStep` does with ~10 tensor operations per layer (QK-norm,
 * RoPE, two cache writes, q·kᵀ, softmax, p·v), each costing microseconds of dispatch at rollout sizes,
 * done here in one pass per (row, KV head) while its keys and values are in cache.
 *
 * Compiled at first use by `qwen3repro.kernels` with HEAD_DIM and GROUP fixed (attention.h, which
 * holds the per-(row, KV head) work and the layouts); OpenMP over the (row, KV head) pairs.
 */
#include <stdint.h>

#include "attention.h"

void decode_attention(
    const float *restrict qkv, int64_t qkv_stride, const float *restrict qk_norm, float eps,
    const float *restrict rope, const int64_t *restrict positions,
    float *restrict keys, float *restrict values, const float *restrict bias,
    float *restrict scores, float *restrict out,
    int64_t batch, int64_t kv_heads, int64_t T, int64_t slot, int threads)
{
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < batch * kv_heads; bh++)
        attend_head(bh, qkv, qkv_stride, qk_norm, eps, rope, positions, keys, values, bias, scores, out,
                    kv_heads, T, slot);
}
