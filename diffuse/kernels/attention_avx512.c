/* Attention in bf16 on CPUs with AVX512-BF16 but no AMX: softmax(q k^T * scale) v in one pass
   over the keys, for blocks of 16 queries, one query per lane of a vector.

   Written as two matmuls and a softmax (diffuse/runtime/attention.py), the scores of a chunk of
   queries go out to memory three times (written by the first product, read and written by the
   softmax, read by the second product), and on SD1.5's 40-wide heads that traffic and the
   softmax's passes take about a third of the time (bench/RESULTS.md). Here the scores of 16
   queries against 16 keys stay in 16 registers:
   - each register holds one key's scores for the 16 queries, summed over the head's width two
     values at a time by vdpbf16ps (the keys' pairs broadcast to every lane);
   - with a query in every lane, the softmax's running maximum, its exp and its sum are plain
     vector operations, no reduction across lanes; the exp is exp2_cubic.h's, to the accuracy
     bf16 keeps;
   - two keys' weights, rounded to bf16 and interleaved, multiply the values' pairs of those keys
     (broadcast) into the output, kept transposed (one vector per output column) in a small
     float32 buffer.
   The running maximum is the first block's (32 keys); a later block's score more than 2^8 above
   it rescales that query's sum and output, so they stay in range without the per-block
   rescaling. Its scores are all computed before any of its weights, so one maximum holds for
   the whole block.

   Each head's keys are first packed as pairs of their values and its values as pairs of keys,
   each laid out as one step of the products reads them (pack_head), zero-padded to whole
   blocks of 32 keys, for head widths up to 160.

   Compiled on first use by diffuse/kernels/__init__.py; the threads are OpenMP's, the same
   runtime (and pool) as PyTorch's own. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "exp2_cubic.h"

#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define MAX_WIDTH 160
#define KEYS 32     /* keys per block: two halves of 16 scores, then their 16 pairs times the values */
#define HEADROOM 8.0f /* how far (in powers of 2) a score may rise above the running maximum */

int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

static inline uint32_t pair(uint16_t low, uint16_t high) { return (uint32_t)low | (uint32_t)high << 16; }

/* One head's keys as kp[key / 16][d2][key % 16] pairs of values, and its values as
   vp[key / 32][d][key pair % 16] pairs of keys: what one step of the products broadcasts, side by
   side. Zeros past the last key (up to mp) and past the last value of an odd width. */
static void pack_head(const uint16_t *k, const uint16_t *v, int64_t ks, int64_t vs, int64_t m, int64_t mp,
                      int64_t d, uint32_t *kp, uint32_t *vp) {
    const int64_t d2 = (d + 1) / 2;
    for (int64_t j = 0; j < mp; j++)
        for (int64_t c = 0; c < d2; c++) {
            const uint16_t low = j < m ? k[j * ks + 2 * c] : 0, high = j < m && 2 * c + 1 < d ? k[j * ks + 2 * c + 1] : 0;
            kp[(j / 16 * d2 + c) * 16 + j % 16] = pair(low, high);
        }
    for (int64_t p = 0; p < mp / 2; p++)
        for (int64_t c = 0; c < d; c++) {
            const uint16_t low = 2 * p < m ? v[2 * p * vs + c] : 0, high = 2 * p + 1 < m ? v[(2 * p + 1) * vs + c] : 0;
            vp[(p / 16 * d + c) * 16 + p % 16] = pair(low, high);
        }
}

/* The scores of 16 keys (kp's layout, [d2][16]) for the block's 16 queries (qpack, [d2][16]),
   one key per vector. */
AVX512_BF16 static inline __attribute__((always_inline)) void scores(const uint32_t *keys, const uint32_t *qpack,
                                                                     int64_t d2, __m512 *s) {
    for (int g = 0; g < 16; g++) s[g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d2; c++) {
        const __m512bh qz = (__m512bh)_mm512_load_si512((const __m512i *)(qpack + c * 16));
        for (int g = 0; g < 16; g++)
            s[g] = _mm512_dpbf16_ps(s[g], qz, (__m512bh)_mm512_set1_epi32((int)keys[c * 16 + g]));
    }
}

/* Each query's largest score among the first `valid` of 16 keys. */
AVX512_BF16 static inline __attribute__((always_inline)) __m512 largest(const __m512 *s, int64_t valid) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int g = 0; g < 16; g++)
        if (g < valid) top = _mm512_max_ps(top, s[g]);
    return top;
}

/* The weights exp2(score * cv - maxima) of 16 keys, of which those from `valid` on weigh 0,
   added to sums and written as 8 vectors of interleaved bf16 pairs (two keys' weights for
   each query, as vdpbf16ps multiplies them with the values' pairs). */
AVX512_BF16 static inline __attribute__((always_inline)) void weights(const __m512 *s, __m512 cv, __m512 maxima,
                                                                      int64_t valid, __m512 *sums, __m512bh *pz) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                                6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int g = 0; g < 16; g += 2) {
        const __m512 even = g < valid ? exp2_approx(_mm512_fmsub_ps(s[g], cv, maxima)) : _mm512_setzero_ps();
        const __m512 odd = g + 1 < valid ? exp2_approx(_mm512_fmsub_ps(s[g + 1], cv, maxima)) : _mm512_setzero_ps();
        *sums = _mm512_add_ps(*sums, _mm512_add_ps(even, odd));
        pz[g / 2] = (__m512bh)_mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
    }
}

AVX512_BF16 static void query_block(const uint16_t *q, int64_t qs, int64_t rows, const uint32_t *kp,
                                    const uint32_t *vp, int64_t m, int64_t mp, int64_t d, float scale,
                                    uint16_t *out, int64_t os) {
    uint32_t qpack[MAX_WIDTH / 2 * 16] __attribute__((aligned(64)));
    float o[MAX_WIDTH * 16] __attribute__((aligned(64)));
    uint16_t ob[MAX_WIDTH * 16] __attribute__((aligned(64)));
    const int64_t d2 = (d + 1) / 2;
    for (int64_t c = 0; c < d2; c++)
        for (int64_t i = 0; i < 16; i++)
            qpack[c * 16 + i] = i >= rows ? 0 : pair(q[i * qs + 2 * c], 2 * c + 1 < d ? q[i * qs + 2 * c + 1] : 0);
    for (int64_t c = 0; c < d; c++) _mm512_store_ps(o + c * 16, _mm512_setzero_ps());
    const __m512 cv = _mm512_set1_ps(scale * 1.44269504f), headroom = _mm512_set1_ps(HEADROOM);
    __m512 maxima = _mm512_setzero_ps(), sums = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < mp; kb += KEYS) {
        /* The block's first 16 scores wait in memory while the next 16 are computed, so that the
           maximum is the whole block's before any of its weights is taken. */
        __m512 first[16], second[16];
        __m512bh pz[KEYS / 2];
        scores(kp + kb * d2, qpack, d2, first);
        const int64_t valid = m - kb, valid_first = valid < 16 ? valid : 16, valid_second = valid < 32 ? valid - 16 : 16;
        __m512 top = largest(first, valid_first);
        scores(kp + (kb + 16) * d2, qpack, d2, second);
        top = _mm512_mul_ps(_mm512_max_ps(top, largest(second, valid_second)), cv);
        if (kb == 0) {
            maxima = top;
        } else {
            const __mmask16 over = _mm512_cmp_ps_mask(top, _mm512_add_ps(maxima, headroom), _CMP_GT_OQ);
            if (__builtin_expect(over != 0, 0)) {  /* those queries' sums and outputs scaled down to match */
                const __m512 raised = _mm512_mask_mov_ps(maxima, over, top);
                const __m512 factor = exp2_approx(_mm512_sub_ps(maxima, raised));
                sums = _mm512_mul_ps(sums, factor);
                for (int64_t c = 0; c < d; c++) _mm512_store_ps(o + c * 16, _mm512_mul_ps(_mm512_load_ps(o + c * 16), factor));
                maxima = raised;
            }
        }
        weights(first, cv, maxima, valid_first, &sums, pz);
        weights(second, cv, maxima, valid_second, &sums, pz + 8);
        /* Eight output columns at a time: eight independent sums, not one chain. */
        const uint32_t *values = vp + kb / 2 * d;  /* [d][16] */
        int64_t c = 0;
        for (; c + 8 <= d; c += 8) {
            __m512 acc[8];
            for (int u = 0; u < 8; u++) acc[u] = _mm512_load_ps(o + (c + u) * 16);
            for (int p = 0; p < KEYS / 2; p++)
                for (int u = 0; u < 8; u++)
                    acc[u] = _mm512_dpbf16_ps(acc[u], pz[p], (__m512bh)_mm512_set1_epi32((int)values[(c + u) * 16 + p]));
            for (int u = 0; u < 8; u++) _mm512_store_ps(o + (c + u) * 16, acc[u]);
        }
        for (; c < d; c++) {
            __m512 acc = _mm512_load_ps(o + c * 16);
            for (int p = 0; p < KEYS / 2; p++)
                acc = _mm512_dpbf16_ps(acc, pz[p], (__m512bh)_mm512_set1_epi32((int)values[c * 16 + p]));
            _mm512_store_ps(o + c * 16, acc);
        }
    }
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), sums);
    for (int64_t c = 0; c < d; c++)
        _mm256_store_si256((__m256i *)(ob + c * 16), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(o + c * 16), inv)));
    for (int64_t i = 0; i < rows; i++)
        for (int64_t c = 0; c < d; c++) out[i * os + c] = ob[c * 16 + i];
}

/* out[b, h, n, :] = softmax(q k^T * scale) v for every b and h: q [batch, heads, n, d], k and v
   [batch, heads, m, d], out like q; strides (batch, head, row) in elements, each row's d values
   contiguous; d <= 160. kp and vp: room for every head's packed keys and values,
   mp * ceil(d / 2) and mp / 2 * d pairs per head (mp: m rounded up to 32). */
AVX512_BF16 void attention_avx512(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out,
                                  int64_t batch, int64_t heads, int64_t n, int64_t m, int64_t d,
                                  const int64_t *qst, const int64_t *kst, const int64_t *vst, const int64_t *ost,
                                  float scale, uint32_t *kp, uint32_t *vp, int threads) {
    const int64_t mp = (m + KEYS - 1) / KEYS * KEYS, d2 = (d + 1) / 2, bh = batch * heads;
    const int64_t kp_head = mp * d2, vp_head = mp / 2 * d;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < bh; i++) {
        const int64_t b = i / heads, h = i % heads;
        pack_head(k + b * kst[0] + h * kst[1], v + b * vst[0] + h * vst[1], kst[2], vst[2], m, mp, d,
                  kp + i * kp_head, vp + i * vp_head);
    }
    const int64_t qblocks = (n + 15) / 16;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < bh * qblocks; i++) {
        const int64_t head = i / qblocks, qb = i % qblocks, b = head / heads, h = head % heads;
        const int64_t rows = n - qb * 16 < 16 ? n - qb * 16 : 16;
        query_block(q + b * qst[0] + h * qst[1] + qb * 16 * qst[2], qst[2], rows, kp + head * kp_head,
                    vp + head * vp_head, m, mp, d, scale, out + b * ost[0] + h * ost[1] + qb * 16 * ost[2], ost[2]);
    }
}
