/* A bfloat16 tensor quantized to 8 bits with one scale for the whole tensor, in two passes.

   The int8 layers (diffuse/runtime/int8.py) quantize each input as it arrives, so this
   runs once per int8 product. PyTorch's own reductions over bf16 tensors and its chain of
   elementwise operations (scale, round, shift, clamp, cast) each take a pass over memory
   and several took longer than the int8 product itself (bench/RESULTS.md); here the first
   pass finds the range and the second writes the bytes.

   What is quantized can be x itself or x * y (GEGLU's value times its gate, as the
   feed-forward layer's output product takes it), the product computed in float32 in both
   passes and never written out in bf16. layer_norm_quantize_bf16 quantizes a LayerNorm of x
   the same way (the transformer block's norms feed only int8 products): each row's statistics
   and the range come from one read of x, the bytes from a second, and the normalized values,
   float32 throughout, are never written out.

   Asymmetric (uint8): the range [min(x, 0), max(x, 0)] maps onto 0..255, zero exactly at
   the zero point, as oneDNN's u8 convolutions and matmuls take it. Symmetric (int8):
   [-max|x|, max|x|] onto -127..127, zero point 0.

   Compiled on first use by diffuse/kernels/__init__.py; the threads are OpenMP's, the
   same runtime (and pool) as PyTorch's own. */

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define MAX_THREADS 256

int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}

/* 16 bf16 values (the lanes of `lanes`; the others read as 0) widened to float32. */
AVX512 static inline __m512 load_bf16(const uint16_t *p, __mmask16 lanes) {
    __m256i halves = _mm256_maskz_loadu_epi16(lanes, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

enum { VALUES = 0, PRODUCT = 1 };

/* The values to quantize at x[j] (and y[j]). */
AVX512 static inline __m512 load_values(const uint16_t *x, const uint16_t *y, int op, int64_t j, __mmask16 lanes) {
    __m512 v = load_bf16(x + j, lanes);
    if (op == PRODUCT) return _mm512_mul_ps(v, load_bf16(y + j, lanes));
    return v;
}

/* The range of x[0, end): lows and highs start at 0, so the range always holds zero.
   Returns whether the values are all finite: x * 0 is NaN for a NaN or an infinity, and a
   sum of those stays NaN, where min and max would drop a NaN. */
AVX512 static int range_of(const uint16_t *x, const uint16_t *y, int op, int64_t end, float *low, float *high) {
    __m512 lows = _mm512_setzero_ps(), highs = _mm512_setzero_ps(), nans = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= end; j += 16) {
        __m512 v = load_values(x, y, op, j, 0xffff);
        lows = _mm512_min_ps(lows, v);
        highs = _mm512_max_ps(highs, v);
        nans = _mm512_add_ps(nans, _mm512_mul_ps(v, _mm512_setzero_ps())); /* NaN or inf -> NaN */
    }
    if (j < end) {
        const __mmask16 lanes = (__mmask16)((1u << (end - j)) - 1);
        __m512 v = load_values(x, y, op, j, lanes);
        lows = _mm512_min_ps(lows, v);
        highs = _mm512_max_ps(highs, v);
        nans = _mm512_add_ps(nans, _mm512_mul_ps(v, _mm512_setzero_ps()));
    }
    *low = _mm512_reduce_min_ps(lows);
    *high = _mm512_reduce_max_ps(highs);
    return isfinite(_mm512_reduce_add_ps(nans));
}

AVX512 static void write_bytes(const uint16_t *x, const uint16_t *y, int op, int64_t end, uint8_t *out,
                               float inverse_scale, float zero_point, float lowest, float highest) {
    const __m512 inv = _mm512_set1_ps(inverse_scale), zp = _mm512_set1_ps(zero_point);
    const __m512 lo = _mm512_set1_ps(lowest), hi = _mm512_set1_ps(highest);
    for (int64_t j = 0; j < end; j += 16) {
        const __mmask16 lanes = j + 16 <= end ? 0xffff : (__mmask16)((1u << (end - j)) - 1);
        __m512 q = _mm512_fmadd_ps(load_values(x, y, op, j, lanes), inv, zp);
        q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
        __m512i whole = _mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_mask_storeu_epi8(out + j, lanes, _mm512_cvtepi32_epi8(whole));
    }
}

/* The scale and zero point for the range [low, high] (which holds 0), and the grid's ends. Returns
   whether the scale is usable: a range wider than float32's largest, or so narrow that its scale
   is subnormal (1 / scale overflows, or the CPU flushes it to zero), has none, and bf16 computes
   that tensor. */
static int choose_scale(float low, float high, int asymmetric, float *s, float *z, float *lowest, float *highest) {
    if (asymmetric) {
        *s = (high - low) / 255.0f;
        *s = *s > 0.0f ? *s : 1.0f;
        *z = nearbyintf(-low / *s);
        *lowest = 0.0f, *highest = 255.0f;
    } else {
        const float top = high > -low ? high : -low;
        *s = top > 0.0f ? top / 127.0f : 1.0f;
        *z = 0.0f, *lowest = -127.0f, *highest = 127.0f;
    }
    return isfinite(*s) && *s >= FLT_MIN;
}

/* Runs the code given last on x + offset (and y + offset), out + i, length for the pieces of logical elements
   [begin, end) of `rows` rows of `width` values lying `row_stride` apart (out is dense). */
#define FOR_PIECES(begin, end, width, row_stride, ...)                                   \
    for (int64_t i = (begin); i < (end);) {                                                \
        const int64_t r = i / (width), c = i % (width);                                    \
        const int64_t length = (width) - c < (end) - i ? (width) - c : (end) - i;          \
        const int64_t offset = r * (row_stride) + c;                                       \
        __VA_ARGS__                                                                         \
        i += length;                                                                        \
    }

/* Quantizes op's values of x (and y) into out; writes the scale and zero point. Returns 0, or 1 (out not
   written) where x holds a NaN or an infinity or spans more than float32's scales can, which
   the caller then computes in bf16. */
AVX512 int quantize_bf16(const uint16_t *x, const uint16_t *y, int op, int64_t rows, int64_t width, int64_t row_stride,
                         int asymmetric, uint8_t *out, float *scale, int32_t *zero_point, int threads) {
    const int64_t n = rows * width;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    float lows[MAX_THREADS], highs[MAX_THREADS];
    int finite[MAX_THREADS], all_finite = 1;
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        const int64_t chunk = (n + count - 1) / count, begin = t * chunk < n ? t * chunk : n;
        const int64_t end = begin + chunk < n ? begin + chunk : n;
        float low_here = 0.0f, high_here = 0.0f;
        int finite_here = 1;
        FOR_PIECES(begin, end, width, row_stride, {
            float l, h;
            finite_here &= range_of(x + offset, y ? y + offset : y, op, length, &l, &h);
            low_here = l < low_here ? l : low_here;
            high_here = h > high_here ? h : high_here;
        })
        lows[t] = low_here, highs[t] = high_here, finite[t] = finite_here;
        #pragma omp barrier
        float low = 0.0f, high = 0.0f;
        int ok = 1;
        for (int i = 0; i < count; i++) {
            low = lows[i] < low ? lows[i] : low;
            high = highs[i] > high ? highs[i] : high;
            ok &= finite[i];
        }
        if (t == 0) all_finite = ok;
        if (ok) {
            float s, z, lowest, highest;
            const int usable = choose_scale(low, high, asymmetric, &s, &z, &lowest, &highest);
            if (t == 0 && !usable) all_finite = 0;
            if (usable)
                FOR_PIECES(begin, end, width, row_stride, {
                    write_bytes(x + offset, y ? y + offset : y, op, length, out + i, 1.0f / s, z, lowest, highest);
                })
            if (t == 0) {
                *scale = s;
                *zero_point = (int32_t)z;
            }
        }
    }
    return !all_finite;
}

/* Row r's LayerNorm, 16 values from column j: (x - mean) * rstd * weight + bias in float32. */
AVX512 static inline __m512 normalized(const uint16_t *row, const uint16_t *weight, const uint16_t *bias, __m512 mean,
                                       __m512 rstd, int64_t j, __mmask16 lanes) {
    __m512 centred = _mm512_mul_ps(_mm512_sub_ps(load_bf16(row + j, lanes), mean), rstd);
    return _mm512_fmadd_ps(centred, load_bf16(weight + j, lanes), load_bf16(bias + j, lanes));
}

/* The mean and 1 / sqrt(variance + eps) of one row (two passes over it, the second from cache),
   and the range of its normalized values folded into *low and *high. Returns whether all are finite
   (a variance past float32's largest included, where rstd would round to 0). */
AVX512 static int row_stats(const uint16_t *row, const uint16_t *weight, const uint16_t *bias, int64_t width, float eps,
                            float *mean_out, float *rstd_out, float *low, float *high) {
    __m512 sums = _mm512_setzero_ps();
    for (int64_t j = 0; j < width; j += 16) {
        const __mmask16 lanes = j + 16 <= width ? 0xffff : (__mmask16)((1u << (width - j)) - 1);
        sums = _mm512_add_ps(sums, load_bf16(row + j, lanes));
    }
    const float mean = _mm512_reduce_add_ps(sums) / (float)width;
    const __m512 means = _mm512_set1_ps(mean);
    __m512 squares = _mm512_setzero_ps();
    for (int64_t j = 0; j < width; j += 16) {
        const __mmask16 lanes = j + 16 <= width ? 0xffff : (__mmask16)((1u << (width - j)) - 1);
        const __m512 d = _mm512_maskz_sub_ps(lanes, load_bf16(row + j, lanes), means);
        squares = _mm512_fmadd_ps(d, d, squares);
    }
    const float spread = _mm512_reduce_add_ps(squares);
    const float rstd = 1.0f / sqrtf(spread / (float)width + eps);
    const __m512 rstds = _mm512_set1_ps(rstd);
    __m512 lows = _mm512_set1_ps(*low), highs = _mm512_set1_ps(*high), nans = _mm512_setzero_ps();
    for (int64_t j = 0; j < width; j += 16) {
        const __mmask16 lanes = j + 16 <= width ? 0xffff : (__mmask16)((1u << (width - j)) - 1);
        const __m512 v = _mm512_maskz_mov_ps(lanes, normalized(row, weight, bias, means, rstds, j, lanes));
        lows = _mm512_min_ps(lows, v);
        highs = _mm512_max_ps(highs, v);
        nans = _mm512_add_ps(nans, _mm512_mul_ps(v, _mm512_setzero_ps()));
    }
    *mean_out = mean, *rstd_out = rstd;
    *low = _mm512_reduce_min_ps(lows);
    *high = _mm512_reduce_max_ps(highs);
    return isfinite(_mm512_reduce_add_ps(nans)) && isfinite(spread);
}

/* LayerNorm over each of `rows` rows of `width` contiguous bf16 values (bf16 weight and bias), the
   result quantized as one tensor into out (dense); `stats` holds 2 * rows floats of scratch. Returns
   as quantize_bf16 does: 0, or 1 (out not written) for a NaN, an infinity or no usable scale. */
AVX512 int layer_norm_quantize_bf16(const uint16_t *x, int64_t rows, int64_t width, const uint16_t *weight,
                                    const uint16_t *bias, float eps, int asymmetric, uint8_t *out, float *stats,
                                    float *scale, int32_t *zero_point, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    float lows[MAX_THREADS], highs[MAX_THREADS];
    int finite[MAX_THREADS], all_finite = 1;
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        const int64_t chunk = (rows + count - 1) / count, begin = t * chunk < rows ? t * chunk : rows;
        const int64_t end = begin + chunk < rows ? begin + chunk : rows;
        float low_here = 0.0f, high_here = 0.0f;
        int finite_here = 1;
        for (int64_t r = begin; r < end; r++)
            finite_here &= row_stats(x + r * width, weight, bias, width, eps, stats + 2 * r, stats + 2 * r + 1,
                                     &low_here, &high_here);
        lows[t] = low_here, highs[t] = high_here, finite[t] = finite_here;
        #pragma omp barrier
        float low = 0.0f, high = 0.0f;
        int ok = 1;
        for (int i = 0; i < count; i++) {
            low = lows[i] < low ? lows[i] : low;
            high = highs[i] > high ? highs[i] : high;
            ok &= finite[i];
        }
        float s, z, lowest, highest;
        const int usable = ok && choose_scale(low, high, asymmetric, &s, &z, &lowest, &highest);
        if (t == 0) all_finite = usable;
        if (usable) {
            const __m512 inv = _mm512_set1_ps(1.0f / s), zp = _mm512_set1_ps(z);
            const __m512 lo = _mm512_set1_ps(lowest), hi = _mm512_set1_ps(highest);
            for (int64_t r = begin; r < end; r++) {
                const __m512 mean = _mm512_set1_ps(stats[2 * r]), rstd = _mm512_set1_ps(stats[2 * r + 1]);
                for (int64_t j = 0; j < width; j += 16) {
                    const __mmask16 lanes = j + 16 <= width ? 0xffff : (__mmask16)((1u << (width - j)) - 1);
                    __m512 q = _mm512_fmadd_ps(normalized(x + r * width, weight, bias, mean, rstd, j, lanes), inv, zp);
                    q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
                    __m512i whole = _mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    _mm_mask_storeu_epi8(out + r * width + j, lanes, _mm512_cvtepi32_epi8(whole));
                }
            }
            if (t == 0) *scale = s, *zero_point = (int32_t)z;
        }
    }
    return !all_finite;
}
