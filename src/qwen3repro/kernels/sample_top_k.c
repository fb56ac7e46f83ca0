/* Top-k / top-p sampling of one token per row, fused into one call.
 *
 * The arithmetic of `qwen3repro.generate.sampling.sample` for top-k > 0 and no min-p (the report's
 * thinking and non-thinking settings), which costs about a dozen tensor operations per decode step
 * in PyTorch:
 *   1. the k largest logits of the row, in descending order (ties: the lower token id first);
 *   2. probabilities softmax(values / temperature) over those k;
 *   3. top-p: zero every probability whose preceding mass (cumulative sum before it) reaches top_p
 *      (the first one never is);
 *   4. the exponential race: the token with the largest p / E, with E ~ Exp(1) given in `noise`
 *      (drawn by the caller's seeded generator), which is a draw from the renormalised p.
 * Rows run in parallel with OpenMP. Results agree with the PyTorch path (tests/test_kernels.py).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MAX_K 256  /* candidate arrays on the stack; qwen3repro.kernels.MAX_TOP_K must equal it */
#define CHUNK 16   /* entries tested against the threshold at once in the second pass */

/* Insert (value, v) into the descending list top[0..n) of at most k entries; NaN never enters, and an
 * equal value goes after the ones already there. */
static inline void insert(float *top, int64_t *id, int64_t *n, int64_t k, float value, int64_t v) {
    if (value != value || (*n == k && !(value > top[k - 1]))) return;
    int64_t i = *n < k ? (*n)++ : k - 1;  /* the slot that frees up: the end, or the k-th */
    int64_t at = i;
    while (at > 0 && value > top[at - 1]) at--;
    memmove(top + at + 1, top + at, (i - at) * sizeof *top);
    top[at] = value;
    if (id) {
        memmove(id + at + 1, id + at, (i - at) * sizeof *id);
        id[at] = v;
    }
}

/* logits [B, row_stride] (first `vocab` entries used), noise [B, k] -> tokens [B]. Returns 0, or -1
 * when k is out of range. */
int sample_top_k(const float *restrict logits, int64_t row_stride, int64_t batch, int64_t vocab, int64_t k,
                 float temperature, float top_p, const float *restrict noise, int64_t *restrict tokens,
                 int threads)
{
    if (k < 1 || k > MAX_K || k > vocab) return -1;

    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < batch; b++) {
        const float *x = logits + b * row_stride;
        float top[MAX_K];
        int64_t id[MAX_K];
        /* The k largest in descending order (ties: lower id first), in two passes. Deal the row into
         * `groups` groups (entry v into group v % groups) and take each group's maximum (contiguous
         * loads, so it vectorises): at least k entries are >= the k-th largest group maximum, so the
         * top k all are, and only the few entries that reach it need to be inserted in order. */
        const int64_t groups = vocab / k >= 2 * CHUNK ? (vocab / (k * CHUNK)) * CHUNK : 0;
        float threshold = -INFINITY;
        if (groups) {
            float group_max[groups];
            for (int64_t j = 0; j < groups; j++) group_max[j] = -INFINITY;
            for (int64_t r = 0; r + groups <= vocab; r += groups)
                for (int64_t j = 0; j < groups; j++) group_max[j] = x[r + j] > group_max[j] ? x[r + j] : group_max[j];
            for (int64_t v = vocab / groups * groups; v < vocab; v++)
                group_max[v % groups] = x[v] > group_max[v % groups] ? x[v] : group_max[v % groups];
            int64_t n = 0;
            for (int64_t j = 0; j < groups; j++) insert(top, NULL, &n, k, group_max[j], 0);
            threshold = top[k - 1];
        }
        int64_t n = 0, v = 0;
        for (; v + CHUNK <= vocab; v += CHUNK) {
            int any = 0;
            for (int i = 0; i < CHUNK; i++) any |= x[v + i] >= threshold;
            if (any)
                for (int i = 0; i < CHUNK; i++)
                    if (x[v + i] >= threshold) insert(top, id, &n, k, x[v + i], v + i);
        }
        for (; v < vocab; v++)
            if (x[v] >= threshold) insert(top, id, &n, k, x[v], v);
        if (n == 0) { tokens[b] = 0; continue; }  /* only NaN in the row */
        /* Softmax over the candidates, top-p, and the race. */
        float p[MAX_K], total = 0.f;
        const float m = top[0] / temperature;
        for (int64_t i = 0; i < n; i++) { p[i] = expf(top[i] / temperature - m); total += p[i]; }
        float before = 0.f, best = -1.f;
        int64_t choice = id[0];
        for (int64_t i = 0; i < n; i++) {
            const float prob = p[i] / total;
            const int kept = i == 0 || before < top_p;
            before += prob;
            const float race = kept ? prob / noise[b * k + i] : 0.f;
            if (race > best) { best = race; choice = id[i]; }
        }
        tokens[b] = choice;
    }
    return 0;
}
