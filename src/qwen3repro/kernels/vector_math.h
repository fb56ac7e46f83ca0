/* Vectors as wide as the machine's, and exp over them: shared by the decode kernels.
 *
 * GCC vector extensions: 16 floats with AVX-512, else 8 (AVX2's width, two of SSE's or NEON's). A
 * vector wider than the machine's is split by the compiler into code ~10x slower than either, so the
 * width follows the instruction set the file is compiled for (`qwen3repro.kernels`: -march=native,
 * or -mavx2 -mfma, or the compiler's baseline).
 */
#ifndef QWEN3REPRO_VECTOR_MATH_H
#define QWEN3REPRO_VECTOR_MATH_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* exp(x) lane by lane: x = n·ln2 + r with n the nearest integer to x/ln2 and |r| <= ln2/2, exp(r) by
 * Cephes' degree-6 polynomial, 2^n by building the float's exponent bits. Relative error ~1e-7;
 * exactly 0 below -87.3 (so a padding position, -inf, gets weight 0); above 88.3 it is exp(88.3). */
static inline vf vexp(vf v) {
    const vi under = v < -87.3f;
    vf x = (vf)(((vi)v & ~under) | ((vi)((vf){0} - 87.3f) & under));
    const vi over = x > 88.3f;
    x = (vf)(((vi)x & ~over) | ((vi)((vf){0} + 88.3f) & over));
    const vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;               /* x - n·ln2, in two parts */
    const vf p = ((((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r
                    + 4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * r * r + r + 1.0f);
    const vi two_n = (__builtin_convertvector(n, vi) + 127) << 23;
    return (vf)((vi)(p * (vf)two_n) & ~under);
}

#endif
