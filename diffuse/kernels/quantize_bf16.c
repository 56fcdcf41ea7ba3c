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
   float32 throughout, are never written out; group_norm_silu_quantize_bf16 does the same for
   the ResBlocks' GroupNorm and SiLU on a channels-last map. quantize_rows_bf16 makes the int8
   weights at load time.

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

/* The threads' ranges merged into the tensor's scale (choose_scale). Returns 0 where a thread saw a
   value that is not finite, or the scale is not usable. */
static int merged_scale(const float *lows, const float *highs, const int *finite, int count, int asymmetric,
                        float *s, float *z, float *lowest, float *highest) {
    float low = 0.0f, high = 0.0f;
    int ok = 1;
    for (int i = 0; i < count; i++) {
        low = lows[i] < low ? lows[i] : low;
        high = highs[i] > high ? highs[i] : high;
        ok &= finite[i];
    }
    return ok && choose_scale(low, high, asymmetric, s, z, lowest, highest);
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
        float s, z, lowest, highest;
        const int usable = merged_scale(lows, highs, finite, count, asymmetric, &s, &z, &lowest, &highest);
        if (t == 0) all_finite = usable;
        if (usable) {
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
        float s, z, lowest, highest;
        const int usable = merged_scale(lows, highs, finite, count, asymmetric, &s, &z, &lowest, &highest);
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

/* A weight's rows (one per output channel, `width` contiguous bf16 values each, rows dense) as int8
   with one float32 scale per row, symmetric: scale = max|row| / 127 (at least FLT_MIN), each value
   round-to-nearest-even(value / scale) clamped to -127..127, in float32 as PyTorch computes it, so
   the bytes are the same; one read of the row from memory, where PyTorch's chain made float32
   copies of the whole weight. */
AVX512 void quantize_rows_bf16(const uint16_t *w, int64_t rows, int64_t width, int8_t *out, float *scales, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = w + r * width;
        __m512 tops = _mm512_setzero_ps();
        for (int64_t j = 0; j < width; j += 16) {
            const __mmask16 lanes = j + 16 <= width ? 0xffff : (__mmask16)((1u << (width - j)) - 1);
            tops = _mm512_max_ps(tops, _mm512_abs_ps(load_bf16(row + j, lanes)));
        }
        float s = _mm512_reduce_max_ps(tops) / 127.0f;
        s = s > FLT_MIN ? s : FLT_MIN;
        scales[r] = s;
        const __m512 divisor = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
        for (int64_t j = 0; j < width; j += 16) {
            const __mmask16 lanes = j + 16 <= width ? 0xffff : (__mmask16)((1u << (width - j)) - 1);
            __m512 q = _mm512_div_ps(load_bf16(row + j, lanes), divisor);
            q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
            _mm_mask_storeu_epi8(out + r * width + j, lanes, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
        }
    }
}

/* 2^t for t <= 0, as softmax_bf16.c computes it (a degree-4 polynomial for the fraction, relative
   error 2.6e-6); below -200 it is 0. */
AVX512 static inline __m512 exp2_nonpositive(__m512 t) {
    t = _mm512_max_ps(_mm512_set1_ps(-200.0f), t);
    __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 frac = _mm512_sub_ps(t, whole);
    __m512 p = _mm512_set1_ps(0.013534055f);
    p = _mm512_fmadd_ps(p, frac, _mm512_set1_ps(0.052011424f));
    p = _mm512_fmadd_ps(p, frac, _mm512_set1_ps(0.24144298f));
    p = _mm512_fmadd_ps(p, frac, _mm512_set1_ps(0.69300373f));
    p = _mm512_fmadd_ps(p, frac, _mm512_set1_ps(1.0000026f));
    return _mm512_scalef_ps(p, whole);
}

/* silu(v) = v * sigmoid(v), the sigmoid from e = exp(-|v|): 1 / (1 + e) for v >= 0, e / (1 + e) below. */
AVX512 static inline __m512 silu(__m512 v) {
    const __m512 e = exp2_nonpositive(_mm512_mul_ps(_mm512_abs_ps(v), _mm512_set1_ps(-1.44269504f)));
    const __m512 denominator = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
    const __mmask16 negative = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 numerator = _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), negative, e);
    return _mm512_mul_ps(v, _mm512_div_ps(numerator, denominator));
}

/* The normalized, activated values of one pixel's channels [j, j + 16): silu((x + shift) * a + c). */
AVX512 static inline __m512 norm_silu(const uint16_t *pixel, const float *shift, const float *a, const float *c, int64_t j,
                                      __mmask16 lanes) {
    __m512 v = load_bf16(pixel + j, lanes);
    if (shift) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(lanes, shift + j));
    return silu(_mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(lanes, a + j), _mm512_maskz_loadu_ps(lanes, c + j)));
}

#define NORM_BLOCK 256 /* pixels summed in float32 before the sums go into float64 */

/* GroupNorm of a channels-last bf16 map [batch, pixels, channels] (`groups` groups of adjacent
   channels, bf16 weight and bias), optionally of x + shift (float32 [batch, channels], one value
   per image and channel: the ResBlock's timestep embedding), then SiLU, the result quantized as one
   tensor into out (laid out as x) as quantize_bf16 does; the normalized values are never written
   in bf16. Scratch: sums (threads * batch * channels * 2 doubles), coefs (batch * channels * 2
   floats: each channel's factor, then each one's offset). Three reads of x: the statistics, the
   range, the bytes. Returns 0, or 1 (out not written) for a NaN, an infinity (a variance past
   float64's largest included) or no usable scale. */
AVX512 int group_norm_silu_quantize_bf16(const uint16_t *x, int64_t batch, int64_t pixels, int64_t channels,
                                         int64_t groups, const uint16_t *weight, const uint16_t *bias,
                                         const float *shift, float eps, int asymmetric, uint8_t *out, double *sums,
                                         float *coefs, float *scale, int32_t *zero_point, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    float lows[MAX_THREADS], highs[MAX_THREADS];
    int finite[MAX_THREADS], all_finite = 1, stats_finite = 1;
    const int64_t rows = batch * pixels, per_group = channels / groups, slots = batch * channels;
    const float *factors = coefs, *offsets = coefs + slots;
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        const int64_t chunk = (rows + count - 1) / count, begin = t * chunk < rows ? t * chunk : rows;
        const int64_t end = begin + chunk < rows ? begin + chunk : rows;
        double *mine = sums + (int64_t)t * slots * 2;
        for (int64_t i = 0; i < slots * 2; i++) mine[i] = 0.0;
        for (int64_t r = begin; r < end;) {
            const int64_t b = r / pixels, image_end = (b + 1) * pixels;
            const int64_t limit = end < image_end ? end : image_end;
            const int64_t stop = r + NORM_BLOCK < limit ? r + NORM_BLOCK : limit;
            for (int64_t j = 0; j < channels; j += 16) {
                const __mmask16 lanes = j + 16 <= channels ? 0xffff : (__mmask16)((1u << (channels - j)) - 1);
                const __m512 add = shift ? _mm512_maskz_loadu_ps(lanes, shift + b * channels + j) : _mm512_setzero_ps();
                __m512 s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();
                for (int64_t p = r; p < stop; p++) {
                    const __m512 v = _mm512_add_ps(load_bf16(x + p * channels + j, lanes), add);
                    s1 = _mm512_add_ps(s1, v);
                    s2 = _mm512_fmadd_ps(v, v, s2);
                }
                float f1[16], f2[16];
                _mm512_storeu_ps(f1, s1);
                _mm512_storeu_ps(f2, s2);
                for (int k = 0; k < 16 && j + k < channels; k++) {
                    mine[2 * (b * channels + j + k)] += f1[k];
                    mine[2 * (b * channels + j + k) + 1] += f2[k];
                }
            }
            r = stop;
        }
        #pragma omp barrier
        #pragma omp single
        for (int64_t b = 0; b < batch; b++)
            for (int64_t g = 0; g < groups; g++) {
                double s1 = 0.0, s2 = 0.0;
                for (int i = 0; i < count; i++)
                    for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {
                        s1 += sums[((int64_t)i * slots + b * channels + c) * 2];
                        s2 += sums[((int64_t)i * slots + b * channels + c) * 2 + 1];
                    }
                const double n = (double)pixels * (double)per_group, mean = s1 / n;
                const double spread = s2 / n - mean * mean, variance = spread > 0.0 ? spread : 0.0;
                if (!isfinite(s1) || !isfinite(s2)) stats_finite = 0;
                const float rstd = (float)(1.0 / sqrt(variance + eps));
                for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {
                    const uint32_t weight_bits = (uint32_t)weight[c] << 16, bias_bits = (uint32_t)bias[c] << 16;
                    float w, beta;
                    __builtin_memcpy(&w, &weight_bits, 4);
                    __builtin_memcpy(&beta, &bias_bits, 4);
                    coefs[b * channels + c] = rstd * w;
                    coefs[slots + b * channels + c] = beta - (float)mean * rstd * w;
                }
            }
        __m512 low_lanes = _mm512_setzero_ps(), high_lanes = _mm512_setzero_ps(), nans = _mm512_setzero_ps();
        for (int64_t r = begin; r < end; r++) {
            const int64_t b = r / pixels;
            const float *sh = shift ? shift + b * channels : NULL;
            for (int64_t j = 0; j < channels; j += 16) {
                const __mmask16 lanes = j + 16 <= channels ? 0xffff : (__mmask16)((1u << (channels - j)) - 1);
                const __m512 v = _mm512_maskz_mov_ps(
                    lanes, norm_silu(x + r * channels, sh, factors + b * channels, offsets + b * channels, j, lanes));
                low_lanes = _mm512_min_ps(low_lanes, v);
                high_lanes = _mm512_max_ps(high_lanes, v);
                nans = _mm512_add_ps(nans, _mm512_mul_ps(v, _mm512_setzero_ps()));
            }
        }
        lows[t] = _mm512_reduce_min_ps(low_lanes), highs[t] = _mm512_reduce_max_ps(high_lanes);
        finite[t] = isfinite(_mm512_reduce_add_ps(nans));
        #pragma omp barrier
        float s, z, lowest, highest;
        const int usable =
            stats_finite && merged_scale(lows, highs, finite, count, asymmetric, &s, &z, &lowest, &highest);
        if (t == 0) all_finite = usable;
        if (usable) {
            const __m512 inv = _mm512_set1_ps(1.0f / s), zp = _mm512_set1_ps(z);
            const __m512 lo = _mm512_set1_ps(lowest), hi = _mm512_set1_ps(highest);
            for (int64_t r = begin; r < end; r++) {
                const int64_t b = r / pixels;
                const float *sh = shift ? shift + b * channels : NULL;
                for (int64_t j = 0; j < channels; j += 16) {
                    const __mmask16 lanes = j + 16 <= channels ? 0xffff : (__mmask16)((1u << (channels - j)) - 1);
                    const __m512 v = norm_silu(x + r * channels, sh, factors + b * channels, offsets + b * channels, j, lanes);
                    __m512 q = _mm512_min_ps(_mm512_max_ps(_mm512_fmadd_ps(v, inv, zp), lo), hi);
                    __m512i whole = _mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    _mm_mask_storeu_epi8(out + r * channels + j, lanes, _mm512_cvtepi32_epi8(whole));
                }
            }
            if (t == 0) *scale = s, *zero_point = (int32_t)z;
        }
    }
    return !all_finite;
}
