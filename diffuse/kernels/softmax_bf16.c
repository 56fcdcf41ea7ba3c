/* Softmax over the rows of a bfloat16 matrix, in place, for AVX-512 CPUs with bf16.

   The attention of a bf16 UNet on the CPU spends much of its time in its softmax
   (SD1.5 at 512: 4096 x 4096 scores per head; bench/RESULTS.md). PyTorch's softmax
   computes each exp to float32 accuracy, and that exp is most of the time; its result
   is then rounded to bf16, which keeps 8 bits. This kernel computes the exp with a
   degree-4 polynomial (relative error 2.6e-6, a thousandth of bf16's rounding) and
   works one row at a time in cache: find the row's max, write exp(x - max) as float32
   to a scratch row while summing it, then scale by 1/sum and round to bf16.

   Compiled on first use by diffuse/kernels/__init__.py; the threads are OpenMP's,
   the same runtime (and pool) as PyTorch's own. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

/* 16 bf16 values (the lanes of `lanes`; the others read as 0) widened to float32:
   a bf16 is the top half of the float32 with the same bits. */
AVX512_BF16 static inline __m512 load_bf16(const uint16_t *p, __mmask16 lanes) {
    __m256i halves = _mm256_maskz_loadu_epi16(lanes, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

AVX512_BF16 static inline void store_bf16(uint16_t *p, __mmask16 lanes, __m512 x) {
    __m256bh rounded = _mm512_cvtneps_pbh(x);  /* round to nearest even */
    _mm256_mask_storeu_epi16(p, lanes, (__m256i)rounded);
}

/* 2^t for t <= 0 (NaN stays NaN): 2^floor(t) * 2^frac(t), the fraction's power from a
   polynomial fitted for relative error on [0, 1). Below -200 the result is 0, as for
   -inf (a masked score). */
AVX512_BF16 static inline __m512 exp2_nonpositive(__m512 t) {
    t = _mm512_max_ps(_mm512_set1_ps(-200.0f), t);  /* NaN in t is returned as is */
    __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 frac = _mm512_sub_ps(t, whole);
    __m512 p = _mm512_set1_ps(0.013534055f);
    p = _mm512_fmadd_ps(p, frac, _mm512_set1_ps(0.052011424f));
    p = _mm512_fmadd_ps(p, frac, _mm512_set1_ps(0.24144298f));
    p = _mm512_fmadd_ps(p, frac, _mm512_set1_ps(0.69300373f));
    p = _mm512_fmadd_ps(p, frac, _mm512_set1_ps(1.0000026f));
    return _mm512_scalef_ps(p, whole);
}

AVX512_BF16 static void softmax_row(uint16_t *row, int64_t cols, float *scratch) {
    const int64_t whole_vectors = cols / 16 * 16;
    const __mmask16 all = 0xffff, tail = (__mmask16)((1u << (cols - whole_vectors)) - 1);

    __m512 maxima = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < cols; j += 16) {
        const __mmask16 lanes = j < whole_vectors ? all : tail;
        maxima = _mm512_mask_max_ps(maxima, lanes, load_bf16(row + j, lanes), maxima);
    }
    const float max = _mm512_reduce_max_ps(maxima);

    /* exp(x - max) = 2^((x - max) log2(e)); subtracting first keeps scores near
       float32's largest from overflowing. */
    const __m512 log2e = _mm512_set1_ps(1.44269504f), row_max = _mm512_set1_ps(max);
    __m512 sums = _mm512_setzero_ps();
    for (int64_t j = 0; j < cols; j += 16) {
        const __mmask16 lanes = j < whole_vectors ? all : tail;
        __m512 e = exp2_nonpositive(_mm512_mul_ps(_mm512_sub_ps(load_bf16(row + j, lanes), row_max), log2e));
        sums = _mm512_mask_add_ps(sums, lanes, sums, e);
        _mm512_mask_storeu_ps(scratch + j, lanes, e);
    }

    const __m512 scale = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sums));
    for (int64_t j = 0; j < cols; j += 16) {
        const __mmask16 lanes = j < whole_vectors ? all : tail;
        store_bf16(row + j, lanes, _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, scratch + j), scale));
    }
}

/* Rows start row_stride elements apart, each `cols` contiguous values; scratch holds
   `cols` floats per thread. */
AVX512_BF16 void softmax_bf16_rows(uint16_t *rows, int64_t n_rows, int64_t cols, int64_t row_stride,
                                   float *scratch, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n_rows; r++)
        softmax_row(rows + r * row_stride, cols, scratch + (int64_t)omp_get_thread_num() * cols);
}
