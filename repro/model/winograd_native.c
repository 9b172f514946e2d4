/* The transforms of Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray, "Fast Algorithms for
 * Convolutional Neural Networks", 2015) for a 3x3, stride-1, padding-1 convolution on the CPU; the
 * matrix products between them are torch's (repro/model/winograd.py). The output is cut into 2x2 tiles;
 * each tile's 4x4 input patch d and each 3x3 filter g are carried into a 16-point domain,
 *
 *     V = Bt d B,    U = G g Gt,    M = sum over input channels of U * V (16 matrix products),
 *     Y = At M A     (the tile's 2x2 outputs),
 *
 * which takes 16 multiplications per tile and channel pair where the direct sum takes 36. Bt, At hold only
 * 0 and +-1, so those transforms are additions; G (the filters' transform, below) also halves.
 *
 * Layouts: activations are channels_last (image b, row, column, channel; the channel stride is 1, the
 * others are passed), so each loop below runs over channels with unit stride and vectorises. The
 * transformed tensors are (groups, 16, tiles, channels of one group), each of the 16 x groups matrices
 * contiguous for the products. Tiles are numbered (b * tiles_h + tile row) * tiles_w + tile column.
 * The filters are read, and their gradient written, in whatever dense layout they have (their strides).
 * Work is split over images: the backward's overlapping patches of one image stay in one thread.
 *
 * The backward kernels are the forward ones' exact adjoints: dM = A dY At, dd = B dV Bt summed over the
 * overlapping patches (with the rows and columns outside the image dropped, as padding is).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

typedef struct {
    int64_t batch, height, width, channels, groups;  /* activation (B, H, W, C) */
    int64_t s_b, s_h, s_w;                              /* its strides, in elements (channel stride 1) */
} Shape;

typedef struct {
    int64_t filters, channels, groups;                  /* w (K, C / groups, 3, 3): K, C / groups, groups */
    int64_t s_k, s_c, s_h, s_w;                         /* its strides, in elements (any dense layout) */
} Filters;

static inline int64_t tiles_of(int64_t n) { return (n + 1) / 2; }

/* Bt row combination over four rows r0..r3 (each a value), in place: (r0 - r2, r1 + r2, r2 - r1, r1 - r3). */
#define BT(a0, a1, a2, a3, o0, o1, o2, o3) do { o0 = a0 - a2; o1 = a1 + a2; o2 = a2 - a1; o3 = a1 - a3; } while (0)
/* B (the adjoint): (v0, v1 - v2 + v3, -v0 + v1 + v2, -v3), written as the transposed sums. */
#define BB(a0, a1, a2, a3, o0, o1, o2, o3) do { o0 = a0; o1 = a1 - a2 + a3; o2 = a2 - a0 + a1; o3 = -a3; } while (0)

#define DEFINE_WINOGRAD(SUFFIX, T)                                                                          \
/* V (groups, 16, tiles, C / groups) from x, for images lo .. hi - 1. zero: `channels` zeros. */            \
static int input_range_##SUFFIX(const T *x, Shape s, T *v, const T *zero, int64_t lo, int64_t hi) {         \
    const int64_t th = tiles_of(s.height), tw = tiles_of(s.width), tiles = s.batch * th * tw;                \
    const int64_t cg = s.channels / s.groups;                                                               \
    for (int64_t b = lo; b < hi; b++)                                                                       \
        for (int64_t ty = 0; ty < th; ty++)                                                                 \
            for (int64_t tx = 0; tx < tw; tx++) {                                                           \
                const T *p[16];                                                                             \
                for (int i = 0; i < 4; i++)                                                                 \
                    for (int j = 0; j < 4; j++) {                                                           \
                        int64_t r = 2 * ty - 1 + i, c = 2 * tx - 1 + j;                                     \
                        p[4 * i + j] = (r < 0 || r >= s.height || c < 0 || c >= s.width)                    \
                            ? zero : x + b * s.s_b + r * s.s_h + c * s.s_w;                                 \
                    }                                                                                       \
                const int64_t t = (b * th + ty) * tw + tx;                                                  \
                for (int64_t g = 0; g < s.groups; g++) {                                                    \
                    T *out = v + (g * 16 * tiles + t) * cg;                                                 \
                    const int64_t c0 = g * cg;                                                              \
                    _Pragma("GCC ivdep") for (int64_t c = 0; c < cg; c++) {                                                      \
                        T d[16], e[16];                                                                     \
                        for (int k = 0; k < 16; k++) d[k] = p[k][c0 + c];                                   \
                        for (int j = 0; j < 4; j++)  /* rows: Bt d */                                       \
                            BT(d[j], d[4 + j], d[8 + j], d[12 + j], e[j], e[4 + j], e[8 + j], e[12 + j]);    \
                        for (int i = 0; i < 4; i++)  /* columns: (Bt d) B */                                \
                            BT(e[4 * i], e[4 * i + 1], e[4 * i + 2], e[4 * i + 3],                          \
                               d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]);                          \
                        for (int k = 0; k < 16; k++) out[k * tiles * cg + c] = d[k];                        \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
    return 0;                                                                                               \
}                                                                                                           \
int wino_input_##SUFFIX(const T *x, Shape s, T *v, const T *zero, int64_t first, int64_t last, int threads) {  \
    IN_THREADS(threads, first, last, input_range_##SUFFIX(x, s, v, zero, lo, hi));                               \
}                                                                                                           \
                                                                                                            \
/* y (shape s: its channels are the outputs) = At M A (+ bias), for images lo .. hi - 1.                  \
 * The outputs of a tile that fall outside the image (odd sizes) go to `spare`, K scratch values. */       \
static int output_range_##SUFFIX(const T *m, const T *bias, Shape s, T *y, int64_t lo, int64_t hi) {\
    const int64_t th = tiles_of(s.height), tw = tiles_of(s.width), tiles = s.batch * th * tw;                \
    const int64_t kg = s.channels / s.groups, step = tiles * kg;                                            \
    T *spare = malloc(sizeof(T) * s.channels);                                                              \
    if (!spare) return 1;                                                                                   \
    for (int64_t b = lo; b < hi; b++)                                                                       \
        for (int64_t ty = 0; ty < th; ty++)                                                                 \
            for (int64_t tx = 0; tx < tw; tx++) {                                                           \
                const int64_t t = (b * th + ty) * tw + tx;                                                  \
                const int down = 2 * ty + 1 < s.height, right = 2 * tx + 1 < s.width;                       \
                T *q00 = y + b * s.s_b + 2 * ty * s.s_h + 2 * tx * s.s_w;                                   \
                T *q01 = right ? q00 + s.s_w : spare, *q10 = down ? q00 + s.s_h : spare;                    \
                T *q11 = right && down ? q00 + s.s_h + s.s_w : spare;                                       \
                for (int64_t g = 0; g < s.groups; g++) {                                                    \
                    const T *a = m + (g * 16 * tiles + t) * kg;                                             \
                    const int64_t k0 = g * kg;                                                              \
                    _Pragma("GCC ivdep") for (int64_t k = 0; k < kg; k++) {                                 \
                        T r[8];                                                                             \
                        for (int j = 0; j < 4; j++) {  /* rows: At M */                                     \
                            const T a0 = a[j * step + k], a1 = a[(4 + j) * step + k];                       \
                            const T a2 = a[(8 + j) * step + k], a3 = a[(12 + j) * step + k];                \
                            r[j] = a0 + a1 + a2;                                                            \
                            r[4 + j] = a1 - a2 - a3;                                                        \
                        }                                                                                   \
                        const T add = bias ? bias[k0 + k] : (T)0;                                           \
                        /* columns: (At M) A, plus the bias */                                              \
                        q00[k0 + k] = r[0] + r[1] + r[2] + add;                                             \
                        q01[k0 + k] = r[1] - r[2] - r[3] + add;                                             \
                        q10[k0 + k] = r[4] + r[5] + r[6] + add;                                             \
                        q11[k0 + k] = r[5] - r[6] - r[7] + add;                                             \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
    free(spare);                                                                                            \
    return 0;                                                                                               \
}                                                                                                           \
int wino_output_##SUFFIX(const T *m, const T *bias, Shape s, T *y, int64_t first, int64_t last,           \
                         int threads) {                                                                     \
    IN_THREADS(threads, first, last, output_range_##SUFFIX(m, bias, s, y, lo, hi));                   \
}                                                                                                           \
                                                                                                            \
/* dM (groups, 16, tiles, K / groups) = A dY At per tile, from dy of shape s, images lo .. hi - 1. */      \
static int grad_output_range_##SUFFIX(const T *dy, Shape s, T *dm, const T *zero, int64_t lo, int64_t hi) { \
    const int64_t th = tiles_of(s.height), tw = tiles_of(s.width), tiles = s.batch * th * tw;                \
    const int64_t kg = s.channels / s.groups;                                                               \
    for (int64_t b = lo; b < hi; b++)                                                                       \
        for (int64_t ty = 0; ty < th; ty++)                                                                 \
            for (int64_t tx = 0; tx < tw; tx++) {                                                           \
                const T *p[4];                                                                              \
                for (int i = 0; i < 2; i++)                                                                 \
                    for (int j = 0; j < 2; j++) {                                                           \
                        int64_t r = 2 * ty + i, c = 2 * tx + j;                                             \
                        p[2 * i + j] = (r >= s.height || c >= s.width)                                      \
                            ? zero : dy + b * s.s_b + r * s.s_h + c * s.s_w;                                \
                    }                                                                                       \
                const int64_t t = (b * th + ty) * tw + tx;                                                  \
                for (int64_t g = 0; g < s.groups; g++) {                                                    \
                    T *out = dm + (g * 16 * tiles + t) * kg;                                                \
                    const int64_t k0 = g * kg;                                                              \
                    _Pragma("GCC ivdep") for (int64_t k = 0; k < kg; k++) {                                                      \
                        const T y00 = p[0][k0 + k], y01 = p[1][k0 + k], y10 = p[2][k0 + k], y11 = p[3][k0 + k];\
                        /* rows: A dY (4 x 2), A = [[1, 0], [1, 1], [1, -1], [0, -1]] */                    \
                        const T u[8] = {y00, y01, y00 + y10, y01 + y11, y00 - y10, y01 - y11, -y10, -y11};  \
                        for (int i = 0; i < 4; i++) {  /* columns: (A dY) At */                             \
                            const T a = u[2 * i], c = u[2 * i + 1];                                         \
                            out[(4 * i + 0) * tiles * kg + k] = a;                                          \
                            out[(4 * i + 1) * tiles * kg + k] = a + c;                                      \
                            out[(4 * i + 2) * tiles * kg + k] = a - c;                                      \
                            out[(4 * i + 3) * tiles * kg + k] = -c;                                         \
                        }                                                                                   \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
    return 0;                                                                                               \
}                                                                                                           \
int wino_grad_output_##SUFFIX(const T *dy, Shape s, T *dm, const T *zero, int64_t first, int64_t last,     \
                              int threads) {                                                                \
    IN_THREADS(threads, first, last, grad_output_range_##SUFFIX(dy, s, dm, zero, lo, hi));                       \
}                                                                                                           \
                                                                                                            \
/* dx (shape s, contiguous channels_last: its images lo .. hi - 1 are overwritten) = the sum over tiles of \
 * B dV Bt, each patch added where it lies inside the image. */                                             \
static int grad_input_range_##SUFFIX(const T *dv, Shape s, T *dx, int64_t lo, int64_t hi) {                \
    const int64_t th = tiles_of(s.height), tw = tiles_of(s.width), tiles = s.batch * th * tw;                \
    const int64_t cg = s.channels / s.groups;                                                               \
    for (int64_t b = lo; b < hi; b++) {                                                                     \
        for (int64_t r = 0; r < s.height; r++)                                                              \
            for (int64_t c = 0; c < s.width; c++)                                                           \
                memset(dx + b * s.s_b + r * s.s_h + c * s.s_w, 0, sizeof(T) * s.channels);                  \
        for (int64_t ty = 0; ty < th; ty++)                                                                 \
            for (int64_t tx = 0; tx < tw; tx++) {                                                           \
                const int64_t t = (b * th + ty) * tw + tx;                                                  \
                T *p[16];                                                                                   \
                int inside[16];                                                                             \
                for (int i = 0; i < 4; i++)                                                                 \
                    for (int j = 0; j < 4; j++) {                                                           \
                        int64_t r = 2 * ty - 1 + i, c = 2 * tx - 1 + j;                                     \
                        inside[4 * i + j] = !(r < 0 || r >= s.height || c < 0 || c >= s.width);             \
                        p[4 * i + j] = inside[4 * i + j] ? dx + b * s.s_b + r * s.s_h + c * s.s_w : 0;      \
                    }                                                                                       \
                for (int64_t g = 0; g < s.groups; g++) {                                                    \
                    const T *in = dv + (g * 16 * tiles + t) * cg;                                           \
                    const int64_t c0 = g * cg;                                                              \
                    if (inside[0] && inside[3] && inside[12] && inside[15]) {  /* the whole patch */        \
                        _Pragma("GCC ivdep") for (int64_t c = 0; c < cg; c++) {                                                  \
                            T a[16], e[16];                                                                 \
                            for (int k = 0; k < 16; k++) a[k] = in[k * tiles * cg + c];                     \
                            for (int j = 0; j < 4; j++)                                                     \
                                BB(a[j], a[4 + j], a[8 + j], a[12 + j], e[j], e[4 + j], e[8 + j], e[12 + j]);\
                            for (int i = 0; i < 4; i++)                                                     \
                                BB(e[4 * i], e[4 * i + 1], e[4 * i + 2], e[4 * i + 3],                      \
                                   a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]);                      \
                            for (int k = 0; k < 16; k++) p[k][c0 + c] += a[k];                              \
                        }                                                                                   \
                    } else {                                                                                \
                        _Pragma("GCC ivdep") for (int64_t c = 0; c < cg; c++) {                                                  \
                            T a[16], e[16];                                                                 \
                            for (int k = 0; k < 16; k++) a[k] = in[k * tiles * cg + c];                     \
                            for (int j = 0; j < 4; j++)                                                     \
                                BB(a[j], a[4 + j], a[8 + j], a[12 + j], e[j], e[4 + j], e[8 + j], e[12 + j]);\
                            for (int i = 0; i < 4; i++)                                                     \
                                BB(e[4 * i], e[4 * i + 1], e[4 * i + 2], e[4 * i + 3],                      \
                                   a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]);                      \
                            for (int k = 0; k < 16; k++)                                                    \
                                if (inside[k]) p[k][c0 + c] += a[k];                                        \
                        }                                                                                   \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
    }                                                                                                       \
    return 0;                                                                                               \
}                                                                                                           \
int wino_grad_input_##SUFFIX(const T *dv, Shape s, T *dx, int64_t first, int64_t last, int threads) {           \
    IN_THREADS(threads, first, last, grad_input_range_##SUFFIX(dv, s, dx, lo, hi));                              \
}                                                                                                           \
                                                                                                            \
/* U (groups, 16, C / groups, K / groups) = G w Gt from the filters w (K, C / groups, 3, 3), any strides, \
 * for the input channels lo .. hi - 1 of every group; G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2],   \
 * [0, 0, 1]]. The loop over output channels is innermost: it writes U's rows in order. */                 \
static int weight_range_##SUFFIX(const T *w, Filters fs, T *u, int64_t lo, int64_t hi) {                 \
    const int64_t groups = fs.groups, cg = fs.channels, kg = fs.filters / groups, step = cg * kg;           \
    for (int64_t g = 0; g < groups; g++)                                                                    \
        for (int64_t c = lo; c < hi; c++) {                                                                 \
            T *out = u + ((g * 16) * cg + c) * kg;                                                          \
            const T *f0 = w + g * kg * fs.s_k + c * fs.s_c;                                                 \
            _Pragma("GCC ivdep") for (int64_t kk = 0; kk < kg; kk++) {                                      \
                const T *f = f0 + kk * fs.s_k;                                                              \
                T r[12];                                                                                    \
                for (int j = 0; j < 3; j++) {  /* rows: G w */                                              \
                    const T w0 = f[j * fs.s_w], w1 = f[fs.s_h + j * fs.s_w], w2 = f[2 * fs.s_h + j * fs.s_w];\
                    r[j] = w0;                                                                              \
                    r[3 + j] = (T)0.5 * (w0 + w1 + w2);                                                     \
                    r[6 + j] = (T)0.5 * (w0 - w1 + w2);                                                     \
                    r[9 + j] = w2;                                                                          \
                }                                                                                           \
                for (int i = 0; i < 4; i++) {  /* columns: (G w) Gt */                                      \
                    const T a = r[3 * i], b = r[3 * i + 1], d = r[3 * i + 2];                               \
                    out[(4 * i) * step + kk] = a;                                                           \
                    out[(4 * i + 1) * step + kk] = (T)0.5 * (a + b + d);                                    \
                    out[(4 * i + 2) * step + kk] = (T)0.5 * (a - b + d);                                    \
                    out[(4 * i + 3) * step + kk] = d;                                                       \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
    return 0;                                                                                               \
}                                                                                                           \
int wino_weight_##SUFFIX(const T *w, Filters fs, T *u, int64_t first, int64_t last, int threads) {        \
    IN_THREADS(threads, first, last, weight_range_##SUFFIX(w, fs, u, lo, hi));                              \
}                                                                                                           \
                                                                                                            \
/* dw (K, C / groups, 3, 3; strides fs) = Gt dU G, the above's adjoint, for input channels lo .. hi - 1. */\
static int grad_weight_range_##SUFFIX(const T *du, Filters fs, T *dw, int64_t lo, int64_t hi) {           \
    const int64_t groups = fs.groups, cg = fs.channels, kg = fs.filters / groups, step = cg * kg;           \
    for (int64_t g = 0; g < groups; g++)                                                                    \
        for (int64_t c = lo; c < hi; c++) {                                                                 \
            const T *in = du + ((g * 16) * cg + c) * kg;                                                    \
            T *f0 = dw + g * kg * fs.s_k + c * fs.s_c;                                                      \
            _Pragma("GCC ivdep") for (int64_t kk = 0; kk < kg; kk++) {                                      \
                T r[12];                                                                                    \
                for (int i = 0; i < 4; i++) {  /* dU G; Gt = [[1, 1/2, 1/2, 0], [0, 1/2, -1/2, 0], [0, 1/2, 1/2, 1]] */\
                    const T a = in[(4 * i) * step + kk], b = in[(4 * i + 1) * step + kk];                   \
                    const T d = in[(4 * i + 2) * step + kk], e = in[(4 * i + 3) * step + kk];               \
                    r[3 * i] = a + (T)0.5 * (b + d);                                                        \
                    r[3 * i + 1] = (T)0.5 * (b - d);                                                        \
                    r[3 * i + 2] = (T)0.5 * (b + d) + e;                                                    \
                }                                                                                           \
                T *f = f0 + kk * fs.s_k;                                                                    \
                for (int j = 0; j < 3; j++) {  /* Gt (dU G) */                                              \
                    f[j * fs.s_w] = r[j] + (T)0.5 * (r[3 + j] + r[6 + j]);                                  \
                    f[fs.s_h + j * fs.s_w] = (T)0.5 * (r[3 + j] - r[6 + j]);                                \
                    f[2 * fs.s_h + j * fs.s_w] = (T)0.5 * (r[3 + j] + r[6 + j]) + r[9 + j];                 \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
    return 0;                                                                                               \
}                                                                                                           \
int wino_grad_weight_##SUFFIX(const T *du, Filters fs, T *dw, int64_t first, int64_t last, int threads) {\
    IN_THREADS(threads, first, last, grad_weight_range_##SUFFIX(du, fs, dw, lo, hi));                       \
}

DEFINE_OPENMP_QUERY(wino)

DEFINE_WINOGRAD(f32, float)
DEFINE_WINOGRAD(f64, double)
