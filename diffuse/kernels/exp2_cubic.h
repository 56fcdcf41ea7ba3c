/* The exponential both attention kernels (attention_amx.c, attention_avx512.c) take for the
   softmax's weights, which they round to bf16: included by each, and hashed into each one's
   build (diffuse/kernels/__init__.py), so a change here rebuilds both. */

#ifndef DIFFUSE_EXP2_CUBIC_H
#define DIFFUSE_EXP2_CUBIC_H

#include <immintrin.h>

/* 2^t for finite t <= 64 (NaN stays NaN): 2^floor(t) * 2^frac(t), the fraction's power from a
   cubic fitted for relative error on [0, 1) (1.7e-4 at most, a 24th of bf16's rounding); far
   below 0 the power of 2 underflows to 0. */
__attribute__((target("avx512f"))) static inline __m512 exp2_approx(__m512 t) {
    __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 frac = _mm512_sub_ps(t, whole);
    __m512 p = _mm512_set1_ps(0.07632546f);
    p = _mm512_fmadd_ps(p, frac, _mm512_set1_ps(0.22830825f));
    p = _mm512_fmadd_ps(p, frac, _mm512_set1_ps(0.69503617f));
    p = _mm512_fmadd_ps(p, frac, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, whole);
}

#endif
