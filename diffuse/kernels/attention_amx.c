/* Attention in bf16 on CPUs with AMX: softmax(q k^T * scale) v in one pass over the keys,
   the products on the AMX tiles and the softmax on AVX-512 between them.

   PyTorch's fused CPU kernel runs its products on the tiles too, but spends most of its time
   between them (bench/RESULTS.md): it rescales its output for every block of keys and computes
   each exp to float32 accuracy for a bf16 result. Here, for each block of 16 queries:
   - the scores of 32 keys at a time land in two 16x16 float32 tiles, stored to a small buffer;
   - each row's exp(score - running max) is taken with a cubic for 2^frac (exp2_cubic.h;
     relative error 1.7e-4, a 24th of bf16's rounding) and rounded to bf16, while the tiles already compute
     the next block's scores;
   - those bf16 rows times the values accumulate in float32 output tiles, the first four of
     which stay in the tile registers from the first block of keys to the last (a head wider
     than 64 keeps the rest in memory). Where the head's width leaves a padding column in
     them (SD1.5's 40), the packed values hold ones there, so the tiles also sum each row's
     weights, exactly as they were multiplied; elsewhere the rows are summed in float32.
   The running maximum is the first block's; a later score more than 2^8 above it (rare once
   the first blocks are seen) rescales that row's sum and output, so they stay in range without
   the per-block rescaling.

   The keys and values of each head are first packed into the tiles' pair-interleaved layout
   (zero-padded to whole tiles: head width to 32 for q k^T, to 16 for the output), for head
   widths up to 160: SD1.5's 40, 80 and 160, SD2's and SDXL's 64.

   Compiled on first use by diffuse/kernels/__init__.py; the threads are OpenMP's, the same
   runtime (and pool) as PyTorch's own. Each thread configures its tiles and asks Linux for
   the AMX state (arch_prctl), which PyTorch's own AMX code also does. */

#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "exp2_cubic.h"

#define AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define MAX_WIDTH 160
#define IN_TILES 4 /* output tiles kept in tile registers 4-7; the rest of a wider head's in memory */

/* AMX-BF16 and AMX-TILE (CPUID leaf 7: EDX bits 22 and 24), AVX-512 with bf16, and Linux's
   permission to use the tiles' state. */
int cpu_supported(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1)) return 0;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512bf16"))
        return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Packs one head's keys as AMX B tiles for q k^T and its values as B tiles for p v.
   kp: [blocks][dp/32][2][16 pairs][16 keys][2]; vp: [blocks][dv/16][16 pairs][16 dims][2]. */
static void pack_head(const uint16_t *k, const uint16_t *v, int64_t ks, int64_t vs, int64_t m, int64_t d,
                      int64_t dp, int64_t dv, uint16_t *kp, uint16_t *vp) {
    const int64_t blocks = (m + 31) / 32;
    for (int64_t kb = 0; kb < blocks; kb++) {
        for (int64_t c = 0; c < dp / 32; c++)
            for (int64_t half = 0; half < 2; half++) {
                uint16_t *tile = kp + ((kb * (dp / 32) + c) * 2 + half) * 512;
                for (int64_t j = 0; j < 16; j++) {
                    const int64_t key = kb * 32 + half * 16 + j;
                    for (int64_t p = 0; p < 16; p++)
                        for (int64_t e = 0; e < 2; e++) {
                            const int64_t dim = c * 32 + 2 * p + e;
                            tile[(p * 16 + j) * 2 + e] = (key < m && dim < d) ? k[key * ks + dim] : 0;
                        }
                }
            }
        for (int64_t o = 0; o < dv / 16; o++) {
            uint16_t *tile = vp + (kb * (dv / 16) + o) * 512;
            for (int64_t p = 0; p < 16; p++)
                for (int64_t e = 0; e < 2; e++) {
                    const int64_t key = kb * 32 + 2 * p + e;
                    for (int64_t j = 0; j < 16; j++) {
                        const int64_t dim = o * 16 + j;
                        /* bf16 1.0 in the first padding column: the row sums (query_block) */
                        const uint16_t pad = dim == d ? 0x3f80 : 0;
                        tile[(p * 16 + j) * 2 + e] = key >= m ? 0 : dim < d ? v[key * vs + dim] : pad;
                    }
                }
        }
    }
}

/* The 16 x 32 scores of the query block against key block kb, into s (row stride 32). */
#define SCORES(kb, s)                                                           \
    do {                                                                        \
        _tile_zero(0);                                                          \
        _tile_zero(1);                                                          \
        for (int64_t c = 0; c < chunks; c++) {                                  \
            _tile_loadd(2, qbuf + c * 32, dp * 2);                              \
            _tile_loadd(3, kp + (((kb) * chunks + c) * 2) * 512, 64);           \
            _tile_dpbf16ps(0, 2, 3);                                            \
            _tile_loadd(3, kp + (((kb) * chunks + c) * 2 + 1) * 512, 64);       \
            _tile_dpbf16ps(1, 2, 3);                                            \
        }                                                                       \
        _tile_stored(0, (s), 128);                                              \
        _tile_stored(1, (s) + 16, 128);                                         \
    } while (0)

/* Output tile i (tile register t: the intrinsics take its number as a constant) += p v. */
#define PV_TILE(i, t)                                                           \
    if (outs > (i)) {                                                           \
        _tile_loadd(3, vp + (kb * outs + (i)) * 512, 64);                       \
        _tile_dpbf16ps(t, 2, 3);                                                \
    }

/* How far (in powers of 2) a score may rise above the row's running maximum before the row's
   sum and output are rescaled: p up to 2^8 is exact enough in bf16 and float32, and rescaling
   only on such a jump (rare after the first blocks) keeps the output in the tiles. */
#define HEADROOM 8.0f

/* One block's 16 x 32 scores s to bf16 weights exp2(score * cv - running max) in p, the rows'
   sums added to sums unless the output tiles sum them (sum_in_tiles); returns a bit per row
   whose maximum rose past the headroom (its sum already rescaled, its factor in factors).
   Inlined with masked a constant, so every block but the last runs without lane masks. */
AMX static inline __attribute__((always_inline)) int block_weights(
    const float *s, uint16_t *p, float *maxima, float *sums, float *factors, __m512 cv, __mmask16 lm,
    __mmask16 hm, int masked, int sum_in_tiles) {
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY), headroom = _mm512_set1_ps(HEADROOM);
    int rescale = 0;
    for (int r = 0; r < 16; r++) {
        /* Past the last key the packed keys are zeros: those lanes (lm, hm) are left out. */
        const __m512 shift = _mm512_set1_ps(maxima[r]);
        __m512 lo = _mm512_fmsub_ps(_mm512_load_ps(s + r * 32), cv, shift);
        __m512 hi = _mm512_fmsub_ps(_mm512_load_ps(s + r * 32 + 16), cv, shift);
        const __mmask16 over = masked ? _mm512_mask_cmp_ps_mask(lm, lo, headroom, _CMP_GT_OQ) |
                                            _mm512_mask_cmp_ps_mask(hm, hi, headroom, _CMP_GT_OQ)
                                      : _mm512_cmp_ps_mask(_mm512_max_ps(lo, hi), headroom, _CMP_GT_OQ);
        if (__builtin_expect(over != 0, 0)) {
            const __m512 lo_in = masked ? _mm512_mask_mov_ps(neg_inf, lm, lo) : lo;
            const __m512 hi_in = masked ? _mm512_mask_mov_ps(neg_inf, hm, hi) : hi;
            const float rise = _mm512_reduce_max_ps(_mm512_max_ps(lo_in, hi_in));
            maxima[r] += rise;
            factors[r] = exp2f(-rise);
            rescale |= 1 << r;
            const __m512 by = _mm512_set1_ps(rise);
            lo = _mm512_sub_ps(lo, by);
            hi = _mm512_sub_ps(hi, by);
            if (!sum_in_tiles)
                _mm512_store_ps(sums + r * 16, _mm512_mul_ps(_mm512_load_ps(sums + r * 16), _mm512_set1_ps(factors[r])));
        }
        lo = exp2_approx(lo);
        hi = exp2_approx(hi);
        if (masked) {
            lo = _mm512_maskz_mov_ps(lm, lo);
            hi = _mm512_maskz_mov_ps(hm, hi);
        }
        if (!sum_in_tiles)
            _mm512_store_ps(sums + r * 16, _mm512_add_ps(_mm512_load_ps(sums + r * 16), _mm512_add_ps(lo, hi)));
        _mm512_store_si512((__m512i *)(p + r * 32), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    return rescale;
}

AMX static void query_block(const uint16_t *q, int64_t qs, int64_t rows, const uint16_t *kp, const uint16_t *vp,
                            int64_t m, int64_t d, int64_t dp, int64_t dv, float scale, uint16_t *out, int64_t os) {
    uint16_t qbuf[16 * MAX_WIDTH] __attribute__((aligned(64)));
    float sbuf[2][16 * 32] __attribute__((aligned(64)));
    uint16_t pbuf[16 * 32] __attribute__((aligned(64)));
    float obuf[16 * MAX_WIDTH] __attribute__((aligned(64)));
    float sums[16 * 16] __attribute__((aligned(64)));
    float maxima[16], factors[16];
    const int64_t chunks = dp / 32, outs = dv / 16, blocks = (m + 31) / 32;
    /* Where the output has a padding column, the packed values hold ones there (pack_head), so
       the tiles sum each row's weights as they are multiplied. */
    const int sum_in_tiles = dv > d;
    memset(qbuf, 0, 16 * dp * 2);
    for (int64_t r = 0; r < rows; r++) memcpy(qbuf + r * dp, q + r * qs, d * 2);
    const int64_t tail = m - (blocks - 1) * 32; /* keys in the last block, 1..32 */
    const __mmask16 lo_mask = tail >= 16 ? 0xffff : (__mmask16)((1u << tail) - 1);
    const __mmask16 hi_mask = tail >= 32 ? 0xffff : tail <= 16 ? 0 : (__mmask16)((1u << (tail - 16)) - 1);
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY), cv = _mm512_set1_ps(scale * 1.44269504f);

    SCORES(0, sbuf[0]);
    for (int r = 0; r < 16; r++) {  /* the first block's maxima start the running ones */
        const __mmask16 lm = blocks == 1 ? lo_mask : 0xffff, hm = blocks == 1 ? hi_mask : 0xffff;
        __m512 lo = _mm512_mask_mov_ps(neg_inf, lm, _mm512_mul_ps(_mm512_load_ps(sbuf[0] + r * 32), cv));
        __m512 hi = _mm512_mask_mov_ps(neg_inf, hm, _mm512_mul_ps(_mm512_load_ps(sbuf[0] + r * 32 + 16), cv));
        maxima[r] = _mm512_reduce_max_ps(_mm512_max_ps(lo, hi));
        _mm512_store_ps(sums + r * 16, _mm512_setzero_ps());
    }
    if (outs > 0) _tile_zero(4);
    if (outs > 1) _tile_zero(5);
    if (outs > 2) _tile_zero(6);
    if (outs > 3) _tile_zero(7);
    for (int r = 0; r < 16; r++)
        for (int64_t j = IN_TILES * 16; j < dv; j += 16) _mm512_store_ps(obuf + r * dv + j, _mm512_setzero_ps());
    for (int64_t kb = 0; kb < blocks; kb++) {
        /* The next block's scores are asked of the tiles before this block's exps, so the two
           can run at once. */
        if (kb + 1 < blocks) SCORES(kb + 1, sbuf[(kb + 1) & 1]);
        const float *s = sbuf[kb & 1];
        const int rescale = kb == blocks - 1
            ? block_weights(s, pbuf, maxima, sums, factors, cv, lo_mask, hi_mask, 1, sum_in_tiles)
            : block_weights(s, pbuf, maxima, sums, factors, cv, 0xffff, 0xffff, 0, sum_in_tiles);
        if (rescale) {  /* the rows whose maximum rose: their output so far scaled down to match */
            if (outs > 0) _tile_stored(4, obuf, dv * 4);
            if (outs > 1) _tile_stored(5, obuf + 16, dv * 4);
            if (outs > 2) _tile_stored(6, obuf + 32, dv * 4);
            if (outs > 3) _tile_stored(7, obuf + 48, dv * 4);
            for (int r = 0; r < 16; r++)
                for (int64_t j = 0; (rescale >> r & 1) && j < dv; j += 16)
                    _mm512_store_ps(obuf + r * dv + j, _mm512_mul_ps(_mm512_load_ps(obuf + r * dv + j), _mm512_set1_ps(factors[r])));
            if (outs > 0) _tile_loadd(4, obuf, dv * 4);
            if (outs > 1) _tile_loadd(5, obuf + 16, dv * 4);
            if (outs > 2) _tile_loadd(6, obuf + 32, dv * 4);
            if (outs > 3) _tile_loadd(7, obuf + 48, dv * 4);
        }
        _tile_loadd(2, pbuf, 64);
        PV_TILE(0, 4) PV_TILE(1, 5) PV_TILE(2, 6) PV_TILE(3, 7)
        for (int64_t o = IN_TILES; o < outs; o++) {  /* through tile 0, free once the scores are stored */
            _tile_loadd(0, obuf + o * 16, dv * 4);
            _tile_loadd(3, vp + (kb * outs + o) * 512, 64);
            _tile_dpbf16ps(0, 2, 3);
            _tile_stored(0, obuf + o * 16, dv * 4);
        }
    }
    if (outs > 0) _tile_stored(4, obuf, dv * 4);
    if (outs > 1) _tile_stored(5, obuf + 16, dv * 4);
    if (outs > 2) _tile_stored(6, obuf + 32, dv * 4);
    if (outs > 3) _tile_stored(7, obuf + 48, dv * 4);
    for (int64_t r = 0; r < rows; r++) {
        const float sum = sum_in_tiles ? obuf[r * dv + d] : _mm512_reduce_add_ps(_mm512_load_ps(sums + r * 16));
        const __m512 inv = _mm512_set1_ps(1.0f / sum);
        for (int64_t j = 0; j < d; j += 16) {
            const __mmask16 lanes = j + 16 <= d ? 0xffff : (__mmask16)((1u << (d - j)) - 1);
            __m256bh b = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, obuf + r * dv + j), inv));
            _mm256_mask_storeu_epi16(out + r * os + j, lanes, (__m256i)b);
        }
    }
}

/* out[b, h, n, :] = softmax(q k^T * scale) v for every b and h: q [batch, heads, n, d], k and v
   [batch, heads, m, d], out like q; strides (batch, head, row) in elements, each row's d values
   contiguous; d <= 160. kp and vp: room for every head's packed keys and values,
   ceil(m / 32) * dp * 32 and ceil(m / 32) * dv * 32 values per head (dp, dv: d rounded up to
   32 and 16). */
AMX void attention_amx(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out,
                       int64_t batch, int64_t heads, int64_t n, int64_t m, int64_t d,
                       const int64_t *qst, const int64_t *kst, const int64_t *vst, const int64_t *ost,
                       float scale, uint16_t *kp, uint16_t *vp, int threads) {
    const int64_t dp = (d + 31) / 32 * 32, dv = (d + 15) / 16 * 16, blocks = (m + 31) / 32;
    const int64_t kp_head = blocks * dp * 32, vp_head = blocks * dv * 32, bh = batch * heads;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < bh; i++) {
        const int64_t b = i / heads, h = i % heads;
        pack_head(k + b * kst[0] + h * kst[1], v + b * vst[0] + h * vst[1], kst[2], vst[2], m, d, dp, dv,
                  kp + i * kp_head, vp + i * vp_head);
    }
    const int64_t qblocks = (n + 15) / 16;
    #pragma omp parallel num_threads(threads)
    {
        TileConfig cfg = {0};
        cfg.palette_id = 1;
        for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
        _tile_loadconfig(&cfg);
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < bh * qblocks; i++) {
            const int64_t head = i / qblocks, qb = i % qblocks, b = head / heads, h = head % heads;
            const int64_t rows = n - qb * 16 < 16 ? n - qb * 16 : 16;
            query_block(q + b * qst[0] + h * qst[1] + qb * 16 * qst[2], qst[2], rows, kp + head * kp_head,
                        vp + head * vp_head, m, d, dp, dv, scale, out + b * ost[0] + h * ost[1] + qb * 16 * ost[2],
                        ost[2]);
        }
        _tile_release();
    }
}
