/* The paper's ReLU + LRN (section 3.3) on the CPU in one pass over memory each way; built and called by
 * lrn_native.py. Forward reads x and writes y; backward reads the gradient and x and writes dx: the
 * denominator is recomputed, never stored, so nothing is saved for the backward but x.
 *
 *   forward:  a = max(x, 0) (or x), D = k + scale * window_sum(a^2), y = a * D^-beta
 *   backward: m = D^-beta, t = g * m * a / D, dx = g * m - 2 scale beta * a * window_sum(t)
 *             (0 where x <= 0 with the ReLU, as torch's)
 *
 * Work comes in tiles of a few pixels of one image, one channel group (tower) at a time, so a window
 * never crosses a group boundary. A tile is copied into a small flat buffer where the next channel of
 * element i is element i + step, with zeros where a clipped window reaches past the group's first or
 * last channel: channels_last tiles are rows of r zeros, the group's channels, r zeros (step 1); NCHW
 * tiles are [channel][pixel] (step = pixels per tile), with r rows of zeros before and after. Every
 * loop then runs over the whole flat buffer, contiguous, which the compiler vectorises (the padding
 * computes zeros), and a window sum is `size` shifted loads. Each copy reads contiguous runs of memory.
 * channels_last layers whose groups are whole vectors of 16 channels (the network's 48 and 128) skip the
 * tiles where the CPU has AVX: the paper's LRN runs pixel by pixel straight from memory, its window's
 * neighbours shifted in across the group's vectors, with the tile code's bits (lrn_pixel_* below).
 * Storage types: float, double, and bfloat16 (computed in float, rounded once when stored).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

#define CL_PIXELS 16     /* channels_last: pixels per tile, each a row of one group's channels */
#define NCHW_PIXELS 256  /* NCHW: pixels per tile, one contiguous run per channel (64 and 128 measured slower) */

#define PLAIN(v) (v)
#define INLINE static inline __attribute__((always_inline))

/* The paper's LRN in float (beta = 3/4, size 5), 16 values at a time, where the CPU has a reciprocal square
 * root estimate (AVX-512F: 14 bits; AVX: 12 bits, on each half): D^-1/2 and D^-1/4 by one Newton step
 * from the estimate each, D^-3/4 = (D^-1/2)^2 D^1/4 and 1/D = (D^-1/2)^2, instead of two square roots and a
 * division, which took 40-60% of the kernels' time (docs/benchmarks.md). Within about 3 float32
 * roundings of the exact power, where the square roots and division were within 2.5. An infinite D
 * (squares that overflowed) gives 0 for both, as the division does. Elsewhere these return 0 and the
 * loops below in T run instead. The tile length n is a multiple of 16 (both layouts' tiles are). */
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#define LRN_FAST 1
#define LRN_LD(p) __extension__({ vec_f32 v_; memcpy(&v_, (p), sizeof v_); v_; })
#define LRN_ST(p, v) do { vec_f32 w_ = (v); memcpy((p), &w_, sizeof w_); } while (0)

static inline vec_f32 lrn_rsqrt(vec_f32 d) {  /* d^-1/2: the estimate, then one Newton step */
#if defined(__AVX512F__)
    vec_f32 r = (vec_f32)_mm512_rsqrt14_ps((__m512)d);
#else
    vec_f32 r;
    __m256 half[2];
    memcpy(half, &d, sizeof half);
    half[0] = _mm256_rsqrt_ps(half[0]), half[1] = _mm256_rsqrt_ps(half[1]);
    memcpy(&r, half, sizeof r);
#endif
    return r * (1.5f - (0.5f * d) * (r * r));
}

/* *p = D^-3/4 and *inv = 1/D, 0 where D is infinite (NaN stays NaN) */
static inline void lrn_powers(vec_f32 d, vec_f32 *p, vec_f32 *inv) {
    const vec_f32 u = lrn_rsqrt(d), uu = u * u;
    const vec_i32 finite = (vec_i32)(d != (vec_f32){0} + INFINITY);
    *p = (vec_f32)((vec_i32)(uu * lrn_rsqrt(u)) & finite);
    *inv = (vec_f32)((vec_i32)uu & finite);
}

static inline vec_f32 lrn_relu(vec_f32 x) {  /* as torch.where(x < 0, 0, x): NaN passes */
    return (vec_f32)((vec_i32)x & ~(vec_i32)(x < 0));
}

static inline vec_f32 lrn_window5(const float *sq, int64_t i, int64_t step) {  /* as NAME##_window, in order */
    const float *first = sq + i - 2 * step;
    return LRN_LD(first) + LRN_LD(first + step) + LRN_LD(first + 2 * step) + LRN_LD(first + 3 * step)
           + LRN_LD(first + 4 * step);
}

/* The paper's forward over a tile (sq holds the squares, with margins): 1 where it ran */
static inline int lrn_fast_forward(const float *restrict x, float *restrict y, const float *restrict sq, int64_t n,
                                   int64_t step, float scale, float k, int relu) {
    if (n % 16) return 0;
    for (int64_t i = 0; i < n; i += 16) {
        const vec_f32 xv = LRN_LD(x + i), a = relu ? lrn_relu(xv) : xv;
        vec_f32 p, inv;
        lrn_powers(k + scale * lrn_window5(sq, i, step), &p, &inv);
        LRN_ST(y + i, a * p);
    }
    return 1;
}

/* The paper's backward's first pass: g = g D^-3/4, t = g D^-3/4 a / D: 1 where it ran */
static inline int lrn_fast_backward(const float *restrict x, float *restrict g, float *restrict t,
                                    const float *restrict sq, int64_t n, int64_t step, float scale, float k,
                                    int relu) {
    if (n % 16) return 0;
    for (int64_t i = 0; i < n; i += 16) {
        const vec_f32 xv = LRN_LD(x + i), a = relu ? lrn_relu(xv) : xv;
        vec_f32 p, inv;
        lrn_powers(k + scale * lrn_window5(sq, i, step), &p, &inv);
        const vec_f32 gm = LRN_LD(g + i) * p;
        LRN_ST(g + i, gm);
        LRN_ST(t + i, gm * a * inv);
    }
    return 1;
}

/* channels_last, one pixel's group of 16 * nv channels at a time, straight from memory and back (no tile
 * buffers): a window's neighbours are the lanes shifted in from the next vector down or up (zeros past
 * the group's ends), summed in the tile code's order with the same powers, so the bits are the tile
 * code's. The network's groups are 48 and 128 channels; up to LRN_PIXEL_VECTORS vectors. */
#define LRN_PIXEL_VECTORS 16
static inline vec_f32 lrn_lanes5(vec_f32 below, vec_f32 v, vec_f32 above) {  /* channels c-2 .. c+2, in order */
    const vec_i32 m2 = {14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29};
    const vec_i32 m1 = {15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30};
    const vec_i32 p1 = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    const vec_i32 p2 = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17};
    return __builtin_shuffle(below, v, m2) + __builtin_shuffle(below, v, m1) + v + __builtin_shuffle(v, above, p1)
           + __builtin_shuffle(v, above, p2);
}
static inline vec_f32 lrn_load_f32(const float *p) { return LRN_LD(p); }
static inline void lrn_store_f32(float *p, vec_f32 v) { LRN_ST(p, v); }
#define DEFINE_PIXEL(SUFFIX, S, LOADV, STOREV)                                                             \
static inline void lrn_pixel_forward_##SUFFIX(const S *x, S *y, int nv, float scale, float k, int relu) {  \
    vec_f32 a[LRN_PIXEL_VECTORS], sq[LRN_PIXEL_VECTORS + 2];                                              \
    sq[0] = sq[nv + 1] = (vec_f32){0};                                                                    \
    for (int j = 0; j < nv; j++) {                                                                        \
        const vec_f32 xv = LOADV(x + 16 * j);                                                             \
        a[j] = relu ? lrn_relu(xv) : xv;                                                                  \
        sq[j + 1] = a[j] * a[j];                                                                          \
    }                                                                                                     \
    for (int j = 0; j < nv; j++) { /* y may be x (in place): every x was read above */                    \
        vec_f32 p, inv;                                                                                   \
        lrn_powers(k + scale * lrn_lanes5(sq[j], sq[j + 1], sq[j + 2]), &p, &inv);                        \
        STOREV(y + 16 * j, a[j] * p);                                                                     \
    }                                                                                                     \
}                                                                                                         \
static inline void lrn_pixel_backward_##SUFFIX(const S *gy, const S *x, S *dx, int nv, float scale,       \
                                               float k, float coef, int relu) {                          \
    vec_f32 a[LRN_PIXEL_VECTORS], sq[LRN_PIXEL_VECTORS + 2], gm[LRN_PIXEL_VECTORS];                       \
    vec_f32 t[LRN_PIXEL_VECTORS + 2];                                                                     \
    vec_i32 keep[LRN_PIXEL_VECTORS];                                                                      \
    sq[0] = sq[nv + 1] = t[0] = t[nv + 1] = (vec_f32){0};                                                 \
    for (int j = 0; j < nv; j++) {                                                                        \
        const vec_f32 xv = LOADV(x + 16 * j);                                                             \
        a[j] = relu ? lrn_relu(xv) : xv;                                                                  \
        keep[j] = (vec_i32)(xv > 0); /* as torch's ReLU backward: 0 where x <= 0 */                       \
        sq[j + 1] = a[j] * a[j];                                                                          \
    }                                                                                                     \
    for (int j = 0; j < nv; j++) {                                                                        \
        vec_f32 p, inv;                                                                                   \
        lrn_powers(k + scale * lrn_lanes5(sq[j], sq[j + 1], sq[j + 2]), &p, &inv);                        \
        gm[j] = LOADV(gy + 16 * j) * p;                                                                   \
        t[j + 1] = gm[j] * a[j] * inv;                                                                    \
    }                                                                                                     \
    for (int j = 0; j < nv; j++) {                                                                        \
        const vec_f32 v = gm[j] - coef * a[j] * lrn_lanes5(t[j], t[j + 1], t[j + 2]);                    \
        STOREV(dx + 16 * j, relu ? (vec_f32)((vec_i32)v & keep[j]) : v);                                  \
    }                                                                                                     \
}
DEFINE_PIXEL(f32, float, lrn_load_f32, lrn_store_f32)
DEFINE_PIXEL(bf16, bf16_t, bf16_load_vec, bf16_store_vec)
#else
#define LRN_FAST 0
#define lrn_fast_forward(...) 0
#define lrn_fast_backward(...) 0
#define LRN_PIXEL_VECTORS 0
#define lrn_pixel_forward_f32 lrn_no_pixels
#define lrn_pixel_backward_f32 lrn_no_pixels
#define lrn_pixel_forward_bf16 lrn_no_pixels
#define lrn_pixel_backward_bf16 lrn_no_pixels
#endif
#define LRN_NO_FAST(...) 0 /* float64: the square roots and division, the reference's own operations */
/* Where there are no pixel kernels (float64; CPUs without AVX) the tile code runs: never called */
static inline void lrn_no_pixels(const void *first, ...) { (void)first; }

/* BODY for each pixel group of tiles tile0 .. tile1 - 1 (per pixels a tile, tiles_per_image an image) of a
 * channels_last tensor, `at` its first element: the pixel kernels' walk over a tile range. */
#define FOR_PIXEL_GROUPS(at, tile0, tile1, tiles_per_image, per, pixels, channels, groups, cg, BODY)          \
    for (int64_t t_ = (tile0); t_ < (tile1); t_++) {                                                          \
        const int64_t b_ = t_ / (tiles_per_image), p0_ = (t_ % (tiles_per_image)) * (per);                   \
        const int64_t end_ = (pixels) - p0_ < (per) ? (pixels) : p0_ + (per);                                 \
        for (int64_t p_ = p0_; p_ < end_; p_++)                                                               \
            for (int64_t g_ = 0; g_ < (groups); g_++) {                                                       \
                const int64_t at = (b_ * (pixels) + p_) * (channels) + g_ * (cg);                             \
                BODY;                                                                                         \
            }                                                                                                 \
    }

/* S: storage type, T: compute type. A tile's buffers hold `total` elements after a margin of `margin`
 * zeros (margin = r * step); the window of element i is elements i - margin .. i + margin, step apart. */
#define DEFINE_LRN(NAME, S, T, LOAD, STORE, SQRT, POW, FAST_FORWARD, FAST_BACKWARD, PIXELS, PIXEL_FORWARD, PIXEL_BACKWARD)                                                     \
typedef struct {                                                                                          \
    int64_t runs, len, stride, width, offset; /* runs of len elements, stride apart in memory, width    \
                                                 apart in the buffer, from buffer element offset */       \
    int64_t step, total, margin;                                                                          \
} NAME##_tile;                                                                                            \
                                                                                                          \
static inline void NAME##_gather(const S *restrict src, T *restrict dst, const NAME##_tile *tl) {         \
    for (int64_t j = 0; j < tl->runs; j++)                                                                \
        for (int64_t i = 0; i < tl->len; i++) dst[tl->offset + j * tl->width + i] = LOAD(src[j * tl->stride + i]); \
}                                                                                                         \
                                                                                                          \
static inline void NAME##_scatter(const T *restrict src, S *restrict dst, const NAME##_tile *tl) {        \
    for (int64_t j = 0; j < tl->runs; j++)                                                                \
        for (int64_t i = 0; i < tl->len; i++) dst[j * tl->stride + i] = STORE(src[tl->offset + j * tl->width + i]); \
}                                                                                                         \
                                                                                                          \
/* sq = relu(x)^2 or x^2 */                                                                               \
INLINE void NAME##_squares(const T *restrict x, T *restrict sq, int64_t n, int relu) {                    \
    for (int64_t i = 0; i < n; i++) {                                                                     \
        T v = relu && x[i] < 0 ? 0 : x[i]; /* as torch.where(x < 0, 0, x): NaN passes, a diverged layer shows */ \
        sq[i] = v * v;                                                                                    \
    }                                                                                                     \
}                                                                                                         \
                                                                                                          \
/* The sum of v[i + (w - r) * step] for w = 0 .. size - 1 (v has margins of zeros on both sides) */       \
INLINE T NAME##_window(const T *restrict v, int64_t i, int size, int64_t step) {                          \
    const T *first = v + i - (size / 2) * step;                                                           \
    T s = first[0];                                                                                       \
    for (int w = 1; w < size; w++) s += first[w * step];                                                  \
    return s;                                                                                             \
}                                                                                                         \
                                                                                                          \
INLINE T NAME##_inverse_power(T d, T beta, int three_quarters) {                                          \
    if (three_quarters) { /* beta = 0.75, the paper's */                                                  \
        T rs = (T)1 / SQRT(d);                                                                            \
        return rs * SQRT(rs); /* d^-3/4, faster than a general power */                                   \
    }                                                                                                     \
    return POW(d, -beta);                                                                                 \
}                                                                                                         \
                                                                                                          \
/* One tile: y = a * D^-beta, from x and the buffer sq (margins of zeros on both sides) */               \
INLINE void NAME##_forward_tile(const T *restrict x, T *restrict y, T *restrict sq, int64_t n, int size,  \
                                int64_t step, T scale, T beta, T k, int relu, int paper) {               \
    NAME##_squares(x, sq, n, relu);                                                                       \
    if (paper && FAST_FORWARD(x, y, sq, n, step, scale, k, relu)) return;                                 \
    for (int64_t i = 0; i < n; i++) {                                                                     \
        T a = relu && x[i] < 0 ? 0 : x[i];                                                                \
        y[i] = a * NAME##_inverse_power(k + scale * NAME##_window(sq, i, size, step), beta, paper);              \
    }                                                                                                     \
}                                                                                                         \
                                                                                                          \
/* One tile: dx from x and g (g is overwritten with g D^-beta; sq and t need margins) */                  \
INLINE void NAME##_backward_tile(const T *restrict x, T *restrict g, T *restrict dx, T *restrict sq,      \
                                 T *restrict t, int64_t n, int size, int64_t step, T scale, T beta, T k,  \
                                 int relu, int paper) {                                                              \
    T coef = (T)2 * scale * beta;                                                                         \
    NAME##_squares(x, sq, n, relu);                                                                       \
    int fast = paper && FAST_BACKWARD(x, g, t, sq, n, step, scale, k, relu); /* the first loop's work */   \
    for (int64_t i = 0; i < n && !fast; i++) {                                                            \
        T a = relu && x[i] < 0 ? 0 : x[i];                                                                \
        T d = k + scale * NAME##_window(sq, i, size, step);                                               \
        T gm = g[i] * NAME##_inverse_power(d, beta, paper); /* g D^-beta, the first term */                      \
        g[i] = gm;                                                                                        \
        t[i] = gm * a / d;                                                                                \
    }                                                                                                     \
    for (int64_t i = 0; i < n; i++) {                                                                     \
        T a = relu && x[i] < 0 ? 0 : x[i];                                                                \
        T v = g[i] - coef * a * NAME##_window(t, i, size, step);                                          \
        dx[i] = relu && !(x[i] > 0) ? 0 : v; /* as torch's ReLU backward: 0 where x <= 0 */               \
    }                                                                                                     \
}                                                                                                         \
                                                                                                          \
/* The tile shape of a layer, and where group g of tile t starts in memory (relative to image b's start) */ \
static NAME##_tile NAME##_shape(int channels_last, int64_t cg, int r) {                                   \
    if (channels_last)                                                                                    \
        return (NAME##_tile){CL_PIXELS, cg, 0, cg + 2 * r, r, 1, CL_PIXELS * (cg + 2 * r), r};            \
    return (NAME##_tile){cg, NCHW_PIXELS, 0, NCHW_PIXELS, 0, NCHW_PIXELS, cg * NCHW_PIXELS,               \
                         (int64_t)r * NCHW_PIXELS};                                                       \
}                                                                                                         \
                                                                                                          \
static int64_t NAME##_place(NAME##_tile *tl, int channels_last, int64_t channels, int64_t pixels,         \
                            int64_t cg, int64_t g, int64_t p0, int64_t count, T *const *zeroed, int nz) {  \
    int64_t per = channels_last ? CL_PIXELS : NCHW_PIXELS;                                                \
    if (channels_last) {                                                                                  \
        tl->runs = count;                                                                                 \
        tl->stride = channels;                                                                            \
    } else {                                                                                              \
        tl->len = count;                                                                                  \
        tl->stride = pixels;                                                                              \
    }                                                                                                     \
    if (count < per) /* a short last tile: the pixels it lacks read as zeros */                           \
        for (int z = 0; z < nz; z++) memset(zeroed[z], 0, (size_t)tl->total * sizeof(T));                 \
    return channels_last ? p0 * channels + g * cg : g * cg * pixels + p0;                                 \
}                                                                                                         \
                                                                                                          \
/* Whether channels_last work goes pixel by pixel (the PIXEL_ kernels, straight from memory) */              \
static inline int NAME##_by_pixels(int channels_last, int paper, int64_t cg) {                            \
    return PIXELS && channels_last && paper && cg % 16 == 0 && cg / 16 <= LRN_PIXEL_VECTORS;              \
}                                                                                                         \
                                                                                                          \
/* The forward's tile buffers: x and y tiles, and the squares with margins on both sides */               \
static T *NAME##_forward_buffer(int64_t channels, int64_t groups, int channels_last, int size) {           \
    NAME##_tile tl = NAME##_shape(channels_last, channels / groups, size / 2);                             \
    return (T *)calloc((size_t)(3 * tl.total + 2 * tl.margin), sizeof(T));                                \
}                                                                                                         \
                                                                                                          \
static void NAME##_forward_tiles(const S *x, S *y, int64_t channels, int64_t pixels, int64_t groups,      \
                                 int channels_last, int64_t tile0, int64_t tile1, int size, double scale,  \
                                 double beta, double k, int relu, T *buf) {                                \
    int r = size / 2;                                                                                     \
    int64_t cg = channels / groups;                                                                       \
    NAME##_tile tl = NAME##_shape(channels_last, cg, r);                                                  \
    int64_t per = channels_last ? CL_PIXELS : NCHW_PIXELS, tiles_per_image = (pixels + per - 1) / per;   \
    int64_t n = tl.total, mg = tl.margin;                                                                 \
    int paper = size == 5 && beta == 0.75;                                                                \
    T *xt = buf, *yt = xt + n, *sq = yt + n + mg; /* sq: margins both sides */                             \
    if (NAME##_by_pixels(channels_last, paper, cg)) {                                                     \
        FOR_PIXEL_GROUPS(at, tile0, tile1, tiles_per_image, per, pixels, channels, groups, cg,             \
                         PIXEL_FORWARD(x + at, y + at, (int)(cg / 16), (float)scale, (float)k, relu));    \
        return;                                                                                           \
    }                                                                                                     \
    for (int64_t t = tile0; t < tile1; t++) {                                                             \
        int64_t b = t / tiles_per_image, p0 = (t % tiles_per_image) * per;                                \
        int64_t count = pixels - p0 < per ? pixels - p0 : per;                                            \
        for (int64_t g = 0; g < groups; g++) {                                                            \
            int64_t at = b * channels * pixels +                                                          \
                         NAME##_place(&tl, channels_last, channels, pixels, cg, g, p0, count, &xt, 1);    \
            NAME##_gather(x + at, xt, &tl);                                                               \
            if (paper) /* constants the compiler folds: an unrolled window, no branch in the loops */      \
                NAME##_forward_tile(xt, yt, sq, n, 5, tl.step, (T)scale, (T)0.75, (T)k, relu, 1);         \
            else                                                                                          \
                NAME##_forward_tile(xt, yt, sq, n, size, tl.step, (T)scale, (T)beta, (T)k, relu, 0);      \
            NAME##_scatter(yt, y + at, &tl);                                                              \
        }                                                                                                 \
    }                                                                                                     \
}                                                                                                         \
                                                                                                          \
int NAME##_forward(const S *x, S *y, int64_t channels, int64_t pixels, int64_t groups, int channels_last,  \
                   int64_t tile0, int64_t tile1, int size, double scale, double beta, double k, int relu) { \
    T *buf = NAME##_forward_buffer(channels, groups, channels_last, size);                                \
    if (!buf) return 1;                                                                                   \
    NAME##_forward_tiles(x, y, channels, pixels, groups, channels_last, tile0, tile1, size, scale, beta, k, \
                         relu, buf);                                                                      \
    free(buf);                                                                                            \
    return 0;                                                                                             \
}                                                                                                         \
                                                                                                          \
/* ReLU + LRN + max pooling (kernel pk, stride ps, no padding, floor) of a channels_last x, for an        \
 * evaluation forward: the LRN's output never reaches memory. Work is output rows row0 .. row1 - 1 of     \
 * batch * out_height; each input row's LRN is computed once into a ring of pk rows (as the unfused      \
 * kernel computes it: one image of `width` pixels, so the bits are the same) and pooled from there.     \
 * A window holding a NaN gives NaN, as torch's max pooling. */                                           \
int NAME##_forward_pool(const S *x, S *out, int64_t channels, int64_t height, int64_t width,              \
                        int64_t groups, int64_t row0, int64_t row1, int size, double scale, double beta,  \
                        double k, int relu, int pk, int ps) {                                             \
    int64_t oh_n = (height - pk) / ps + 1, ow_n = (width - pk) / ps + 1, row_len = channels * width;      \
    int64_t row_tiles = (width + CL_PIXELS - 1) / CL_PIXELS;                                              \
    T *buf = NAME##_forward_buffer(channels, groups, 1, size);                                            \
    S *rows = (S *)malloc((size_t)(pk * row_len) * sizeof(S));                                            \
    int64_t *held = (int64_t *)malloc((size_t)pk * sizeof(int64_t)); /* which input row each slot holds */ \
    T *best = (T *)malloc((size_t)channels * sizeof(T));                                                  \
    if (!buf || !rows || !held || !best) {                                                                \
        free(buf); free(rows); free(held); free(best);                                                    \
        return 1;                                                                                         \
    }                                                                                                     \
    for (int i = 0; i < pk; i++) held[i] = -1;                                                            \
    for (int64_t t = row0; t < row1; t++) {                                                               \
        int64_t b = t / oh_n, oh = t % oh_n;                                                              \
        for (int i = 0; i < pk; i++) {                                                                    \
            int64_t h = oh * ps + i, slot = h % pk;                                                       \
            if (held[slot] != b * height + h) {                                                           \
                NAME##_forward_tiles(x + (b * height + h) * row_len, rows + slot * row_len, channels, width, \
                                     groups, 1, 0, row_tiles, size, scale, beta, k, relu, buf);           \
                held[slot] = b * height + h;                                                              \
            }                                                                                             \
        }                                                                                                 \
        for (int64_t ow = 0; ow < ow_n; ow++) {                                                           \
            for (int64_t c = 0; c < channels; c++) best[c] = (T)-INFINITY;                                \
            for (int i = 0; i < pk; i++) {                                                                \
                const S *in = rows + ((oh * ps + i) % pk) * row_len + ow * ps * channels;                 \
                for (int j = 0; j < pk; j++)                                                              \
                    for (int64_t c = 0; c < channels; c++) {                                              \
                        T v = LOAD(in[j * channels + c]);                                                 \
                        best[c] = (v > best[c] || v != v) ? v : best[c];                                  \
                    }                                                                                     \
            }                                                                                             \
            S *o = out + ((b * oh_n + oh) * ow_n + ow) * channels;                                        \
            for (int64_t c = 0; c < channels; c++) o[c] = STORE(best[c]);                                 \
        }                                                                                                 \
    }                                                                                                     \
    free(buf); free(rows); free(held); free(best);                                                        \
    return 0;                                                                                             \
}                                                                                                         \
                                                                                                          \
int NAME##_backward(const S *grad_y, const S *x, S *grad_x, int64_t channels, int64_t pixels,             \
                    int64_t groups, int channels_last, int64_t tile0, int64_t tile1, int size, double scale, \
                    double beta, double k, int relu) {                                                    \
    int r = size / 2;                                                                                     \
    int64_t cg = channels / groups;                                                                       \
    NAME##_tile tl = NAME##_shape(channels_last, cg, r);                                                  \
    int64_t per = channels_last ? CL_PIXELS : NCHW_PIXELS, tiles_per_image = (pixels + per - 1) / per;   \
    int64_t n = tl.total, mg = tl.margin;                                                                 \
    int paper = size == 5 && beta == 0.75;                                                                \
    if (NAME##_by_pixels(channels_last, paper, cg)) {                                                     \
        const T coef = (T)2 * (T)scale * (T)0.75; /* as the tile code's */                                \
        FOR_PIXEL_GROUPS(at, tile0, tile1, tiles_per_image, per, pixels, channels, groups, cg,             \
                         PIXEL_BACKWARD(grad_y + at, x + at, grad_x + at, (int)(cg / 16), (float)scale,   \
                                        (float)k, coef, relu));                                           \
        return 0;                                                                                         \
    }                                                                                                     \
    T *buf = (T *)calloc((size_t)(3 * n + 2 * (n + 2 * mg)), sizeof(T));                                  \
    if (!buf) return 1;                                                                                   \
    T *xt = buf, *gt = xt + n, *dt = gt + n, *sq = dt + n + mg, *tp = sq + n + 2 * mg; /* with margins */  \
    T *zeroed[2] = {xt, gt};                                                                              \
    for (int64_t t = tile0; t < tile1; t++) {                                                             \
        int64_t b = t / tiles_per_image, p0 = (t % tiles_per_image) * per;                                \
        int64_t count = pixels - p0 < per ? pixels - p0 : per;                                            \
        for (int64_t g = 0; g < groups; g++) {                                                            \
            int64_t at = b * channels * pixels +                                                          \
                         NAME##_place(&tl, channels_last, channels, pixels, cg, g, p0, count, zeroed, 2); \
            NAME##_gather(x + at, xt, &tl);                                                               \
            NAME##_gather(grad_y + at, gt, &tl);                                                          \
            if (paper)                                                                                    \
                NAME##_backward_tile(xt, gt, dt, sq, tp, n, 5, tl.step, (T)scale, (T)0.75, (T)k, relu, 1); \
            else                                                                                          \
                NAME##_backward_tile(xt, gt, dt, sq, tp, n, size, tl.step, (T)scale, (T)beta, (T)k, relu, 0); \
            NAME##_scatter(dt, grad_x + at, &tl);                                                         \
        }                                                                                                 \
    }                                                                                                     \
    free(buf);                                                                                            \
    return 0;                                                                                             \
}                                                                                                         \
                                                                                                          \
/* The same three over all of tile0 .. tile1 - 1 (rows for the pooling), split over `threads` */          \
int NAME##_forward_all(const S *x, S *y, int64_t channels, int64_t pixels, int64_t groups, int channels_last, \
                       int64_t tile0, int64_t tile1, int size, double scale, double beta, double k, int relu, \
                       int threads) {                                                                     \
    IN_THREADS(threads, tile0, tile1, NAME##_forward(x, y, channels, pixels, groups, channels_last, lo, hi,  \
                                                     size, scale, beta, k, relu));                        \
}                                                                                                         \
                                                                                                          \
int NAME##_backward_all(const S *grad_y, const S *x, S *grad_x, int64_t channels, int64_t pixels,         \
                        int64_t groups, int channels_last, int64_t tile0, int64_t tile1, int size,        \
                        double scale, double beta, double k, int relu, int threads) {                     \
    IN_THREADS(threads, tile0, tile1, NAME##_backward(grad_y, x, grad_x, channels, pixels, groups,       \
                                                      channels_last, lo, hi, size, scale, beta, k, relu)); \
}                                                                                                         \
                                                                                                          \
int NAME##_forward_pool_all(const S *x, S *out, int64_t channels, int64_t height, int64_t width,          \
                            int64_t groups, int64_t row0, int64_t row1, int size, double scale,           \
                            double beta, double k, int relu, int pk, int ps, int threads) {               \
    IN_THREADS(threads, row0, row1, NAME##_forward_pool(x, out, channels, height, width, groups, lo, hi,  \
                                                        size, scale, beta, k, relu, pk, ps));             \
}

DEFINE_OPENMP_QUERY(lrn)

DEFINE_LRN(lrn_f32, float, float, PLAIN, PLAIN, sqrtf, powf, lrn_fast_forward, lrn_fast_backward, LRN_FAST,
           lrn_pixel_forward_f32, lrn_pixel_backward_f32)
DEFINE_LRN(lrn_f64, double, double, PLAIN, PLAIN, sqrt, pow, LRN_NO_FAST, LRN_NO_FAST, 0, lrn_no_pixels, lrn_no_pixels)
DEFINE_LRN(lrn_bf16, bf16_t, float, bf16_load, bf16_store, sqrtf, powf, lrn_fast_forward, lrn_fast_backward,
           LRN_FAST, lrn_pixel_forward_bf16, lrn_pixel_backward_bf16)
