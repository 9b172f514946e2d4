/* What repro's C kernels share (repro/native.py builds them with this folder on the include path).
 *
 * IN_THREADS(threads, first, last, CALL): run CALL, an int expression of `lo` and `hi`, over the range
 * first .. last - 1 cut into one part per thread, and return the OR of the parts' codes. Built with
 * OpenMP (only where torch's own OpenMP runtime is GNU libgomp, so the library shares torch's threads
 * rather than starting a second pool), the parts run on torch's intra-op threads, which after one of
 * torch's operators are still spinning, waiting for work; without it, CALL runs once over the whole
 * range and Python's threads split the work instead (repro/native.py, in_threads).
 */
#ifndef REPRO_NATIVE_H
#define REPRO_NATIVE_H

#include <stdint.h>

#include <string.h>

/* bfloat16 storage: the upper half of a float. Loading is exact; storing rounds to nearest, ties to
 * even, as torch does, and keeps a NaN a (quiet) NaN. */
typedef uint16_t bf16_t;

static inline float bf16_load(bf16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u); /* NaN stays a quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even, as torch */
    return (bf16_t)(u >> 16);
}


/* 16 floats, GCC's vector extension (AVX-512's width; two AVX registers elsewhere), and the same 16 values
 * as bfloat16: loaded exactly, stored rounded as bf16_store rounds each lane. */
typedef float vec_f32 __attribute__((vector_size(64)));
typedef uint16_t vec_bf16 __attribute__((vector_size(32)));
typedef uint32_t vec_u32 __attribute__((vector_size(64)));
typedef int32_t vec_i32 __attribute__((vector_size(64)));
static inline vec_f32 bf16_load_vec(const bf16_t *p) {
    vec_bf16 h;
    memcpy(&h, p, sizeof h);
    return (vec_f32)(__builtin_convertvector(h, vec_u32) << 16);
}
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
#include <immintrin.h>
#endif
static inline void bf16_store_vec(bf16_t *p, vec_f32 f) {  /* bf16_store, lane by lane */
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
    /* The CPU's conversion rounds as bf16_store does (to nearest even, a NaN kept quiet) but flushes float32
     * denormals to zero: it stores every vector without one (all but never does an activation hold one). */
    if (!_mm512_fpclass_ps_mask((__m512)f, 0x20)) { /* 0x20: denormal */
        const __m256bh h = _mm512_cvtneps_pbh((__m512)f);
        memcpy(p, &h, sizeof h);
        return;
    }
#endif
    const vec_u32 u = (vec_u32)f;
    const vec_u32 nan = (vec_u32)((vec_i32)(u & 0x7fffffffu) > 0x7f800000);
    const vec_u32 out = (nan & ((u >> 16) | 0x40u)) | (~nan & ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16));
    const vec_bf16 h = __builtin_convertvector(out, vec_bf16);
    memcpy(p, &h, sizeof h);
}

#ifdef _OPENMP
#include <omp.h>
#define NATIVE_OPENMP 1
#define IN_THREADS(threads, first, last, CALL)                                                  \
    do {                                                                                        \
        int err_ = 0;                                                                           \
        _Pragma("omp parallel num_threads(threads) reduction(|:err_)")                          \
        {                                                                                       \
            int64_t n_ = omp_get_num_threads(), i_ = omp_get_thread_num();                      \
            int64_t lo = (first) + ((last) - (first)) * i_ / n_;                                \
            int64_t hi = (first) + ((last) - (first)) * (i_ + 1) / n_;                          \
            if (lo < hi) err_ |= (CALL);                                                        \
        }                                                                                       \
        return err_;                                                                            \
    } while (0)
#else
#define NATIVE_OPENMP 0
#define IN_THREADS(threads, first, last, CALL)                                                  \
    do {                                                                                        \
        (void)(threads);                                                                        \
        int64_t lo = (first), hi = (last);                                                      \
        return (CALL);                                                                          \
    } while (0)
#endif

/* int PREFIX_openmp(void): whether this library was built with OpenMP (its *_all kernels split work). */
#define DEFINE_OPENMP_QUERY(PREFIX) int PREFIX##_openmp(void) { return NATIVE_OPENMP; }

#endif
