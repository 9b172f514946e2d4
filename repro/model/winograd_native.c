/* The transforms of Winograd's minimal filtering F(2x2, rxr) (Lavin and Gray, "Fast Algorithms for
 * Convolutional Neural Networks", 2015) for the paper's convolutions on the CPU: conv3-conv5 (3x3,
 * padding 1) by F(2x2, 3x3), conv2 (5x5, padding 2) by F(2x2, 5x5), and conv1 as an unpadded 3x3
 * convolution of its 4x4 blocks of pixels (cut by space_to_depth below) by F(2x2, 3x3); the matrix
 * products between the transforms are torch's (repro/model/winograd.py). The output is cut into 2x2
 * tiles (Shape says how many, from the output's size, and the input's padding); each tile's
 * n x n input patch d (n = r + 1) and each r x r filter g are carried into an n*n-point domain,
 *
 *     V = Bt d B,    U = G g Gt,    M = sum over input channels of U * V (n*n matrix products),
 *     Y = At M A     (the tile's 2x2 outputs),
 *
 * which takes n*n multiplications per tile and channel pair where the direct sum takes 4 r*r: 16 against
 * 36 for 3x3, 36 against 100 for 5x5.
 *
 * The matrices come from the Toom-Cook construction at the points below plus infinity (Bt, At and G are
 * the tables BT3/AT3/G3 and BT5/AT5/G5). F(2x2, 3x3) takes Lavin's 0, 1, -1. For F(2x2, 5x5) the usual
 * 0, 1, -1, 2, -2 rounds float32 about 3x worse than the direct sum; 0, 1, -1, 2, -1/2 rounds within
 * 1.3x of oneDNN's direct sum at conv2's shapes (docs/benchmarks.md), and its Bt and At hold only
 * dyadic fractions, so the activations' transforms round no more than adds do.
 *
 * The kernels below are written once for both sizes: each transform is a sum over a table's entries, in
 * loops that the compiler unrolls completely, so the zero entries vanish and the entries 1 and -1 become
 * adds; what runs is the sparse transform a person would write out by hand.
 *
 * Layouts: activations are channels_last (image b, row, column, channel; the channel stride is 1, the
 * others are passed), so each loop below runs over channels with unit stride and vectorises. The
 * transformed tensors are (groups, n*n, tiles, channels of one group), each of the n*n x groups matrices
 * contiguous for the products. Tiles are numbered (b * tiles_h + tile row) * tiles_w + tile column.
 * The filters are read, and their gradient written, in whatever dense layout they have (their strides).
 * Activations and their transforms are float32, float64, or (3x3, bfloat16 autocast) bfloat16 summed in
 * float32; the input gradient is accumulated in the float type.
 *
 * The backward kernels are the forward ones' exact adjoints: dM = A dY At, dd = B dV Bt summed over the
 * overlapping patches (with the rows and columns outside the image dropped, as padding is), dw = Gt dU G.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

typedef struct {
    int64_t batch, height, width, channels, groups;  /* activation (B, H, W, C) */
    int64_t s_b, s_h, s_w;                              /* its strides, in elements (channel stride 1) */
    int64_t tiles_h, tiles_w;                           /* the output's 2x2 tiles down and across */
    int64_t pad;                                        /* the input's padding (the input's shape only) */
} Shape;

typedef struct {
    int64_t filters, channels, groups;                  /* w (K, C / groups, r, r): K, C / groups, groups */
    int64_t s_k, s_c, s_h, s_w;                         /* its strides, in elements (any dense layout) */
} Filters;

/* F(2x2, 3x3), points 0, 1, -1, infinity. */
static const double BT3[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
static const double AT3[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
static const double G3[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};

/* F(2x2, 5x5), points 0, 1, -1, 2, -1/2, infinity. */
static const double BT5[6][6] = {
    {1, 1.5, -2, -1.5, 1, 0}, {0, -1, -2.5, -0.5, 1, 0}, {0, 1, 0.5, -2.5, 1, 0},
    {0, -0.5, -1, 0.5, 1, 0}, {0, 2, -1, -2, 1, 0},      {0, 1, 1.5, -2, -1.5, 1}};
static const double AT5[2][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -0.5, 1}};
static const double G5[6][5] = {
    {1, 0, 0, 0, 0},
    {-1.0 / 3, -1.0 / 3, -1.0 / 3, -1.0 / 3, -1.0 / 3},
    {1.0 / 3, -1.0 / 3, 1.0 / 3, -1.0 / 3, 1.0 / 3},
    {1.0 / 15, 2.0 / 15, 4.0 / 15, 8.0 / 15, 16.0 / 15},
    {-16.0 / 15, 8.0 / 15, -4.0 / 15, 2.0 / 15, -1.0 / 15},
    {0, 0, 0, 0, 1}};

/* acc = sum over k < K of COEF * X (both expressions of k_), skipping the zero coefficients; the loop is
 * unrolled completely, so COEF is a constant at each term and the skipped terms leave no code. The first
 * term starts the sum (not 0 + term, which would turn -0 into +0 and add an addition). acc and X may be a
 * scalar T or a vector of T's (below). */
#define TSUM(T, acc, K, COEF, X)                                                                    \
    do {                                                                                            \
        int first_ = 1;                                                                             \
        _Pragma("GCC unroll 8") for (int k_ = 0; k_ < (K); k_++) {                                  \
            const double c_ = (COEF);                                                               \
            if (c_ != 0) {                                                                          \
                __typeof__(acc) t_ = c_ == 1 ? (X) : c_ == -1 ? -(X) : (T)c_ * (X);                 \
                acc = first_ ? t_ : acc + t_;                                                       \
                first_ = 0;                                                                         \
            }                                                                                       \
        }                                                                                           \
    } while (0)

/* The activations' transforms run over channels a vector at a time (then one at a time for the rest):
 * V is the vector type, GCC's vector extension, or T itself. The compiler's own vectoriser gives up on
 * the 6x6 transforms' loop nests, so the vectors are written out. LD and ST move one V, unaligned. */
typedef double vec_f64 __attribute__((vector_size(64)));
#define LD(V, ptr) __extension__({ V v_; memcpy(&v_, (ptr), sizeof(V)); v_; })
#define ST(V, ptr, value) do { V w_ = (value); memcpy((ptr), &w_, sizeof(V)); } while (0)

/* Where the activations and their transforms are stored: as T itself (IO = SAME), or as bfloat16 (IO =
 * BF16; bfloat16 autocast), loaded exactly into floats and rounded once when stored, as torch rounds. The
 * sums are in float either way. LD_<IO> and ST_<IO> move one V (a vector or a scalar) from or to storage. */
static inline float bf16_load_one(const bf16_t *p) { return bf16_load(*p); }
static inline void bf16_store_one(bf16_t *p, float f) { *p = bf16_store(f); }
#define LD_SAME(V, ptr) LD(V, ptr)
#define ST_SAME(V, ptr, value) ST(V, ptr, value)
#define LD_BF16(V, ptr) _Generic(*(V *)0, vec_f32: bf16_load_vec, float: bf16_load_one)(ptr)
#define ST_BF16(V, ptr, value) \
    _Generic(*(V *)0, vec_f32: bf16_store_vec, float: bf16_store_one)((ptr), (value))
/* BODY(V, ...) for the channels cl .. ch - 1 of group g (local numbers c, from cl - g * per): vectors
 * first, then one channel at a time. */
#define OVER_CHANNELS(T, VT, g, per, cl, ch, BODY, ...)                                             \
    do {                                                                                            \
        const int64_t width_ = sizeof(VT) / sizeof(T);                                              \
        const int64_t from_ = (cl) > (g) * (per) ? (cl) : (g) * (per);                              \
        const int64_t to_ = (ch) < ((g) + 1) * (per) ? (ch) : ((g) + 1) * (per);                    \
        int64_t c = from_ - (g) * (per);                                                            \
        for (; c + width_ <= to_ - (g) * (per); c += width_) BODY(VT, __VA_ARGS__);                 \
        for (; c < to_ - (g) * (per); c++) BODY(T, __VA_ARGS__);                                    \
    } while (0)

/* Tile t's image b and its top-left output pixel (2 * ty, 2 * tx). */
#define TILE_AT(s, t, b, ty, tx)                                                                    \
    const int64_t th_ = (s).tiles_h, tw_ = (s).tiles_w;                                             \
    const int64_t b = (t) / (th_ * tw_), ty = (t) / tw_ % th_, tx = (t) % tw_

/* V = Bt d B for channels c .. c + |V| - 1 of one tile: d's N*N values at p[k] + c0 + c. */
#define INPUT_BODY(V, T, N, BT, IO)                                                                 \
    do {                                                                                            \
        V d[N * N], e[N * N];                                                                       \
        _Pragma("GCC unroll 64") for (int k = 0; k < N * N; k++) d[k] = LD_##IO(V, p[k] + c0 + c);  \
        _Pragma("GCC unroll 8") for (int i = 0; i < N; i++)  /* rows: Bt d */                       \
            _Pragma("GCC unroll 8") for (int j = 0; j < N; j++)                                     \
                TSUM(T, e[N * i + j], N, BT[i][k_], d[N * k_ + j]);                                 \
        _Pragma("GCC unroll 8") for (int i = 0; i < N; i++)  /* columns: (Bt d) B */                \
            _Pragma("GCC unroll 8") for (int j = 0; j < N; j++) {                                   \
                V a;                                                                                \
                TSUM(T, a, N, BT[j][k_], e[N * i + k_]);                                            \
                ST_##IO(V, out + (N * i + j) * step + c, a);                                        \
            }                                                                                       \
    } while (0)

/* y = At M A + bias for output channels k0 + c ..: M's N*N values lie `step` apart from a + c. */
#define OUTPUT_BODY(V, T, N, AT, IO)                                                                \
    do {                                                                                            \
        V r[2 * N];                                                                                 \
        _Pragma("GCC unroll 8") for (int i = 0; i < 2; i++)  /* rows: At M */                       \
            _Pragma("GCC unroll 8") for (int j = 0; j < N; j++)                                     \
                TSUM(T, r[N * i + j], N, AT[i][k_], LD_##IO(V, a + (N * k_ + j) * step + c));       \
        V add;                                                                                      \
        if (bias) add = LD(V, bias + k0 + c); else memset(&add, 0, sizeof add);                     \
        _Pragma("GCC unroll 8") for (int i = 0; i < 2; i++)  /* columns: (At M) A, plus the bias */ \
            _Pragma("GCC unroll 8") for (int j = 0; j < 2; j++) {                                   \
                V o;                                                                                \
                TSUM(T, o, N, AT[j][k_], r[N * i + k_]);                                            \
                ST_##IO(V, q[2 * i + j] + k0 + c, o + add);                                         \
            }                                                                                       \
    } while (0)

/* dM = A dY At for output channels k0 + c .. of one tile: dY's 2x2 values at p[k] + k0 + c. */
#define GRAD_OUTPUT_BODY(V, T, N, AT, IO)                                                           \
    do {                                                                                            \
        V d[4], u[2 * N];                                                                           \
        _Pragma("GCC unroll 8") for (int i = 0; i < 4; i++) d[i] = LD_##IO(V, p[i] + k0 + c);       \
        _Pragma("GCC unroll 8") for (int i = 0; i < N; i++)  /* rows: A dY */                       \
            _Pragma("GCC unroll 8") for (int j = 0; j < 2; j++)                                     \
                TSUM(T, u[2 * i + j], 2, AT[k_][i], d[2 * k_ + j]);                                 \
        _Pragma("GCC unroll 8") for (int i = 0; i < N; i++)  /* columns: (A dY) At */               \
            _Pragma("GCC unroll 8") for (int j = 0; j < N; j++) {                                   \
                V a;                                                                                \
                TSUM(T, a, 2, AT[k_][j], u[2 * i + k_]);                                            \
                ST_##IO(V, out + (N * i + j) * step + c, a);                                        \
            }                                                                                       \
    } while (0)

/* dd = B dV Bt for channels c0 + c .. of one tile, added to the patch at p[k] where `inside[k]`: dV's
 * N*N values lie `step` apart from in + c. */
#define GRAD_INPUT_BODY(V, T, N, BT, IO)                                                            \
    do {                                                                                            \
        V a[N * N], e[N * N];                                                                       \
        _Pragma("GCC unroll 64") for (int k = 0; k < N * N; k++) a[k] = LD_##IO(V, in + k * step + c);      \
        _Pragma("GCC unroll 8") for (int i = 0; i < N; i++)  /* rows: B dV */                       \
            _Pragma("GCC unroll 8") for (int j = 0; j < N; j++)                                     \
                TSUM(T, e[N * i + j], N, BT[k_][i], a[N * k_ + j]);                                 \
        _Pragma("GCC unroll 8") for (int i = 0; i < N; i++)  /* columns: (B dV) Bt */               \
            _Pragma("GCC unroll 8") for (int j = 0; j < N; j++)                                     \
                TSUM(T, a[N * i + j], N, BT[k_][j], e[N * i + k_]);                                 \
        _Pragma("GCC unroll 64") for (int k = 0; k < N * N; k++)                                    \
            if (whole || inside[k]) ST(V, p[k] + c0 + c, LD(V, p[k] + c0 + c) + a[k]);             \
    } while (0)

/* The six kernels of F(2x2, RxR) for element type T (vectors VT), named wino<R>_<kernel>_<SUFFIX>,
 * N = R + 1; BT, AT, G name the tables.
 *
 * The activations' four kernels work on a block of tiles t0 .. t1 - 1 (its transformed tensor is
 * (groups, N*N, t1 - t0, channels of a group)) and split the channels over threads, in units of one
 * vector: units lo .. hi - 1 are channels lo * W .. hi * W - 1. Patches of neighbouring tiles overlap, so
 * a split over tiles would have grad_input's threads add to the same pixels; a split over channels never
 * does. */
#define DEFINE_ACTIVATIONS(R, N, SUFFIX, T, VT, BT, AT, S, IO)                                              \
static const int64_t W##R##SUFFIX = sizeof(VT) / sizeof(T);                                                 \
/* V's block from x (shape s), channel units lo .. hi - 1. zero: `channels` zeros. */                       \
static int input##R##_range_##SUFFIX(const S *x, Shape s, S *v, const S *zero, int64_t t0, int64_t t1,      \
                                     int64_t lo, int64_t hi) {                                              \
    const int64_t cg = s.channels / s.groups, step = (t1 - t0) * cg;                                        \
    const int64_t cl = lo * W##R##SUFFIX, ch = hi * W##R##SUFFIX < s.channels ? hi * W##R##SUFFIX : s.channels;\
    for (int64_t t = t0; t < t1; t++) {                                                                     \
        TILE_AT(s, t, b, ty, tx);                                                                           \
        const S *p[N * N];                                                                                  \
        for (int i = 0; i < N; i++)                                                                         \
            for (int j = 0; j < N; j++) {                                                                   \
                int64_t r = 2 * ty - s.pad + i, c = 2 * tx - s.pad + j;                                     \
                p[N * i + j] = (r < 0 || r >= s.height || c < 0 || c >= s.width)                            \
                    ? zero : x + b * s.s_b + r * s.s_h + c * s.s_w;                                         \
            }                                                                                               \
        for (int64_t g = cl / cg; g < s.groups && g * cg < ch; g++) {                                       \
            S *out = v + (g * N * N * (t1 - t0) + (t - t0)) * cg;                                           \
            const int64_t c0 = g * cg;                                                                      \
            OVER_CHANNELS(T, VT, g, cg, cl, ch, INPUT_BODY, T, N, BT, IO);                                  \
        }                                                                                                   \
    }                                                                                                       \
    return 0;                                                                                               \
}                                                                                                           \
int wino##R##_input_##SUFFIX(const S *x, Shape s, S *v, const S *zero, int64_t t0, int64_t t1,              \
                             int64_t first, int64_t last, int threads) {                                    \
    IN_THREADS(threads, first, last, input##R##_range_##SUFFIX(x, s, v, zero, t0, t1, lo, hi));             \
}                                                                                                           \
                                                                                                            \
/* y (shape s: its channels are the outputs) = At M A (+ bias) for M's block, channel units lo .. hi - 1.   \
 * The outputs of a tile that fall outside the image (odd sizes) go to `spare`, K scratch values. */        \
static int output##R##_range_##SUFFIX(const S *m, const T *bias, Shape s, S *y, int64_t t0, int64_t t1,     \
                                      int64_t lo, int64_t hi) {                                             \
    const int64_t kg = s.channels / s.groups, step = (t1 - t0) * kg;                                        \
    const int64_t cl = lo * W##R##SUFFIX, ch = hi * W##R##SUFFIX < s.channels ? hi * W##R##SUFFIX : s.channels;\
    S *spare = malloc(sizeof(S) * s.channels);                                                              \
    if (!spare) return 1;                                                                                   \
    for (int64_t t = t0; t < t1; t++) {                                                                     \
        TILE_AT(s, t, b, ty, tx);                                                                           \
        const int down = 2 * ty + 1 < s.height, right = 2 * tx + 1 < s.width;                               \
        S *q[4];                                                                                            \
        q[0] = y + b * s.s_b + 2 * ty * s.s_h + 2 * tx * s.s_w;                                             \
        q[1] = right ? q[0] + s.s_w : spare, q[2] = down ? q[0] + s.s_h : spare;                            \
        q[3] = right && down ? q[0] + s.s_h + s.s_w : spare;                                                \
        for (int64_t g = cl / kg; g < s.groups && g * kg < ch; g++) {                                       \
            const S *a = m + (g * N * N * (t1 - t0) + (t - t0)) * kg;                                       \
            const int64_t k0 = g * kg;                                                                      \
            OVER_CHANNELS(T, VT, g, kg, cl, ch, OUTPUT_BODY, T, N, AT, IO);                                 \
        }                                                                                                   \
    }                                                                                                       \
    free(spare);                                                                                            \
    return 0;                                                                                               \
}                                                                                                           \
int wino##R##_output_##SUFFIX(const S *m, const T *bias, Shape s, S *y, int64_t t0, int64_t t1,             \
                              int64_t first, int64_t last, int threads) {                                   \
    IN_THREADS(threads, first, last, output##R##_range_##SUFFIX(m, bias, s, y, t0, t1, lo, hi));            \
}                                                                                                           \
                                                                                                            \
/* dM's block = A dY At per tile, from dy of shape s, channel units lo .. hi - 1. */                        \
static int grad_output##R##_range_##SUFFIX(const S *dy, Shape s, S *dm, const S *zero, int64_t t0,          \
                                           int64_t t1, int64_t lo, int64_t hi) {                            \
    const int64_t kg = s.channels / s.groups, step = (t1 - t0) * kg;                                        \
    const int64_t cl = lo * W##R##SUFFIX, ch = hi * W##R##SUFFIX < s.channels ? hi * W##R##SUFFIX : s.channels;\
    for (int64_t t = t0; t < t1; t++) {                                                                     \
        TILE_AT(s, t, b, ty, tx);                                                                           \
        const S *p[4];                                                                                      \
        for (int i = 0; i < 2; i++)                                                                         \
            for (int j = 0; j < 2; j++) {                                                                   \
                int64_t r = 2 * ty + i, c = 2 * tx + j;                                                     \
                p[2 * i + j] = (r >= s.height || c >= s.width)                                              \
                    ? zero : dy + b * s.s_b + r * s.s_h + c * s.s_w;                                        \
            }                                                                                               \
        for (int64_t g = cl / kg; g < s.groups && g * kg < ch; g++) {                                       \
            S *out = dm + (g * N * N * (t1 - t0) + (t - t0)) * kg;                                          \
            const int64_t k0 = g * kg;                                                                      \
            OVER_CHANNELS(T, VT, g, kg, cl, ch, GRAD_OUTPUT_BODY, T, N, AT, IO);                            \
        }                                                                                                   \
    }                                                                                                       \
    return 0;                                                                                               \
}                                                                                                           \
int wino##R##_grad_output_##SUFFIX(const S *dy, Shape s, S *dm, const S *zero, int64_t t0, int64_t t1,      \
                                   int64_t first, int64_t last, int threads) {                              \
    IN_THREADS(threads, first, last, grad_output##R##_range_##SUFFIX(dy, s, dm, zero, t0, t1, lo, hi));     \
}                                                                                                           \
                                                                                                            \
/* dx (shape s, channels_last, zeroed before the first block) += B dV Bt for dV's block, each patch added   \
 * where it lies inside the image, channel units lo .. hi - 1. */                                           \
static int grad_input##R##_range_##SUFFIX(const S *dv, Shape s, T *dx, int64_t t0, int64_t t1, int64_t lo,  \
                                          int64_t hi) {                                                     \
    const int64_t cg = s.channels / s.groups, step = (t1 - t0) * cg;                                        \
    const int64_t cl = lo * W##R##SUFFIX, ch = hi * W##R##SUFFIX < s.channels ? hi * W##R##SUFFIX : s.channels;\
    for (int64_t t = t0; t < t1; t++) {                                                                     \
        TILE_AT(s, t, b, ty, tx);                                                                           \
        T *p[N * N];                                                                                        \
        int inside[N * N], all = 1;                                                                         \
        for (int i = 0; i < N; i++)                                                                         \
            for (int j = 0; j < N; j++) {                                                                   \
                int64_t r = 2 * ty - s.pad + i, c = 2 * tx - s.pad + j;                                     \
                inside[N * i + j] = !(r < 0 || r >= s.height || c < 0 || c >= s.width);                     \
                p[N * i + j] = inside[N * i + j] ? dx + b * s.s_b + r * s.s_h + c * s.s_w : 0;              \
                all &= inside[N * i + j];                                                                   \
            }                                                                                               \
        for (int64_t g = cl / cg; g < s.groups && g * cg < ch; g++) {                                       \
            const S *in = dv + (g * N * N * (t1 - t0) + (t - t0)) * cg;                                     \
            const int64_t c0 = g * cg;                                                                      \
            if (all) {  /* the whole patch: the same code without the tests */                              \
                const int whole = 1;                                                                        \
                OVER_CHANNELS(T, VT, g, cg, cl, ch, GRAD_INPUT_BODY, T, N, BT, IO);                         \
            } else {                                                                                        \
                const int whole = 0;                                                                        \
                OVER_CHANNELS(T, VT, g, cg, cl, ch, GRAD_INPUT_BODY, T, N, BT, IO);                         \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
    return 0;                                                                                               \
}                                                                                                           \
int wino##R##_grad_input_##SUFFIX(const S *dv, Shape s, T *dx, int64_t t0, int64_t t1, int64_t first,       \
                                  int64_t last, int threads) {                                              \
    IN_THREADS(threads, first, last, grad_input##R##_range_##SUFFIX(dv, s, dx, t0, t1, lo, hi));            \
}

/* The filters' two kernels of F(2x2, RxR) for element type T, named wino<R>_<kernel>_<SUFFIX>: the filters
 * and their gradient are float32 or float64, under bfloat16 autocast too (their transform is rounded to
 * bfloat16 afterwards, as autocast rounds the filters). */
#define DEFINE_FILTERS(R, N, SUFFIX, T, G)                                                                  \
/* U (groups, N*N, C / groups, K / groups) = G w Gt from the filters w (K, C / groups, R, R), any strides,  \
 * for the input channels lo .. hi - 1 of every group. The loop over output channels is innermost: it       \
 * writes U's rows in order. (Once per call and small: left to the compiler's vectoriser.) */               \
static int weight##R##_range_##SUFFIX(const T *w, Filters fs, T *u, int64_t lo, int64_t hi) {               \
    const int64_t groups = fs.groups, cg = fs.channels, kg = fs.filters / groups, step = cg * kg;           \
    for (int64_t g = 0; g < groups; g++)                                                                    \
        for (int64_t c = lo; c < hi; c++) {                                                                 \
            T *out = u + ((g * N * N) * cg + c) * kg;                                                       \
            const T *f0 = w + g * kg * fs.s_k + c * fs.s_c;                                                 \
            _Pragma("GCC ivdep") for (int64_t kk = 0; kk < kg; kk++) {                                      \
                const T *f = f0 + kk * fs.s_k;                                                              \
                T r[N * R];                                                                                 \
                _Pragma("GCC unroll 8") for (int i = 0; i < N; i++)  /* rows: G w */                        \
                    _Pragma("GCC unroll 8") for (int j = 0; j < R; j++)                                     \
                        TSUM(T, r[R * i + j], R, G[i][k_], f[k_ * fs.s_h + j * fs.s_w]);                    \
                _Pragma("GCC unroll 8") for (int i = 0; i < N; i++)  /* columns: (G w) Gt */                \
                    _Pragma("GCC unroll 8") for (int j = 0; j < N; j++) {                                   \
                        T a;                                                                                \
                        TSUM(T, a, R, G[j][k_], r[R * i + k_]);                                             \
                        out[(N * i + j) * step + kk] = a;                                                   \
                    }                                                                                       \
            }                                                                                               \
        }                                                                                                   \
    return 0;                                                                                               \
}                                                                                                           \
int wino##R##_weight_##SUFFIX(const T *w, Filters fs, T *u, int64_t first, int64_t last, int threads) {     \
    IN_THREADS(threads, first, last, weight##R##_range_##SUFFIX(w, fs, u, lo, hi));                         \
}                                                                                                           \
                                                                                                            \
/* dw (K, C / groups, R, R; strides fs) = Gt dU G, the above's adjoint, for input channels lo .. hi - 1. */ \
static int grad_weight##R##_range_##SUFFIX(const T *du, Filters fs, T *dw, int64_t lo, int64_t hi) {        \
    const int64_t groups = fs.groups, cg = fs.channels, kg = fs.filters / groups, step = cg * kg;           \
    for (int64_t g = 0; g < groups; g++)                                                                    \
        for (int64_t c = lo; c < hi; c++) {                                                                 \
            const T *in = du + ((g * N * N) * cg + c) * kg;                                                 \
            T *f0 = dw + g * kg * fs.s_k + c * fs.s_c;                                                      \
            _Pragma("GCC ivdep") for (int64_t kk = 0; kk < kg; kk++) {                                      \
                T r[N * R];                                                                                 \
                _Pragma("GCC unroll 8") for (int i = 0; i < N; i++)  /* dU G */                             \
                    _Pragma("GCC unroll 8") for (int j = 0; j < R; j++)                                     \
                        TSUM(T, r[R * i + j], N, G[k_][j], in[(N * i + k_) * step + kk]);                   \
                T *f = f0 + kk * fs.s_k;                                                                    \
                _Pragma("GCC unroll 8") for (int i = 0; i < R; i++)  /* Gt (dU G) */                        \
                    _Pragma("GCC unroll 8") for (int j = 0; j < R; j++) {                                   \
                        T a;                                                                                \
                        TSUM(T, a, N, G[k_][i], r[R * k_ + j]);                                             \
                        f[i * fs.s_h + j * fs.s_w] = a;                                                     \
                    }                                                                                       \
            }                                                                                               \
        }                                                                                                   \
    return 0;                                                                                               \
}                                                                                                           \
int wino##R##_grad_weight_##SUFFIX(const T *du, Filters fs, T *dw, int64_t first, int64_t last,             \
                                   int threads) {                                                           \
    IN_THREADS(threads, first, last, grad_weight##R##_range_##SUFFIX(du, fs, dw, lo, hi));                  \
}

/* out (B, ceil(H / f), ceil(W / f), f*f*C; contiguous) = x (B, H, W, C; channels_last, strides s) cut into
 * f x f blocks: channel (dy * f + dx) * C + c of block (h, w) is x[f h + dy, f w + dx, c], 0 past the edge;
 * images lo .. hi - 1. A stride-f convolution of x is a stride-1 one of out (repro/model/winograd.py).
 * S is x's storage type, D out's. Each block is written whole, in order, f runs of f * C values from f
 * rows; conv1's run of 12 (f = 4, 3 colours) by a copy of constant length, which the compiler turns into
 * a few vector moves (a call to memcpy per 12 values cost more than the copying). A row is first made a
 * dense run of D by ROW: itself where it is one already; a float32 image's rows rounded to bfloat16 as
 * torch's cast rounds, a vector at a time, so the cast is not a pass over memory of its own. */
#define DEFINE_ROW(SUFFIX, T) /* a row as it is where dense, else gathered into buf */                       \
static inline const T *row_##SUFFIX(const T *x, int64_t s_w, int64_t c, int64_t w, T *buf) {                 \
    if (s_w == c) return x;                                                                                 \
    for (int64_t p = 0; p < w; p++) memcpy(buf + p * c, x + p * s_w, sizeof(T) * c);                        \
    return buf;                                                                                             \
}
DEFINE_ROW(f32, float)
DEFINE_ROW(f64, double)
DEFINE_ROW(bf16, bf16_t)
static inline const bf16_t *row_f32_bf16(const float *x, int64_t s_w, int64_t c, int64_t w, bf16_t *buf) {
    const float *dense = x;
    float *f = NULL;
    if (s_w != c) { /* gather the row first (not the network's case: its images are dense) */
        f = malloc(sizeof(float) * w * c);
        if (!f) return NULL;
        for (int64_t p = 0; p < w; p++) memcpy(f + p * c, x + p * s_w, sizeof(float) * c);
        dense = f;
    }
    const int64_t n = w * c, width = sizeof(vec_f32) / sizeof(float);
    int64_t i = 0;
    for (; i + width <= n; i += width) bf16_store_vec(buf + i, LD(vec_f32, dense + i));
    for (; i < n; i++) buf[i] = bf16_store(dense[i]);
    free(f);
    return buf;
}
#define DEFINE_SPACE_TO_DEPTH(SUFFIX, S, D)                                                                 \
static int space_to_depth_range_##SUFFIX(const S *restrict x, Shape s, int64_t f, D *restrict out, int64_t lo, \
                                        int64_t hi) {                                                       \
    const int64_t hb = (s.height + f - 1) / f, wb = (s.width + f - 1) / f, run = f * s.channels;           \
    const int64_t row_len = s.width * s.channels;                                                           \
    D *buf = malloc(sizeof(D) * f * row_len); /* f rows, where they must be made dense */                  \
    const D **rows = malloc(sizeof(D *) * f);                                                               \
    if (!buf || !rows) { free(buf); free(rows); return 1; }                                                 \
    for (int64_t b = lo; b < hi; b++)                                                                       \
        for (int64_t h = 0; h < hb; h++) {                                                                  \
            for (int64_t dy = 0; dy < f; dy++) {                                                            \
                const int64_t r = f * h + dy;                                                               \
                rows[dy] = r < s.height                                                                     \
                    ? row_##SUFFIX(x + b * s.s_b + r * s.s_h, s.s_w, s.channels, s.width, buf + dy * row_len) \
                    : NULL;                                                                                 \
                if (r < s.height && !rows[dy]) { free(buf); free(rows); return 1; }                         \
            }                                                                                               \
            D *dst = out + (b * hb + h) * wb * f * run;                                                     \
            for (int64_t w = 0; w < wb; w++)                                                                \
                for (int64_t dy = 0; dy < f; dy++, dst += run) {                                            \
                    const int64_t pixels = rows[dy] ? (s.width - f * w < f ? s.width - f * w : f) : 0;      \
                    if (pixels == f && run == 12)                                                           \
                        memcpy(dst, rows[dy] + f * w * s.channels, 12 * sizeof(D));                         \
                    else {                                                                                  \
                        if (pixels)                                                                         \
                            memcpy(dst, rows[dy] + f * w * s.channels, sizeof(D) * pixels * s.channels);    \
                        memset(dst + pixels * s.channels, 0, sizeof(D) * (f - pixels) * s.channels);        \
                    }                                                                                       \
                }                                                                                           \
        }                                                                                                   \
    free(buf);                                                                                              \
    free(rows);                                                                                             \
    return 0;                                                                                               \
}                                                                                                           \
int wino_space_to_depth_##SUFFIX(const S *x, Shape s, int64_t f, D *out, int64_t first, int64_t last,       \
                                 int threads) {                                                             \
    IN_THREADS(threads, first, last, space_to_depth_range_##SUFFIX(x, s, f, out, lo, hi));                  \
}

DEFINE_OPENMP_QUERY(wino)

/* Channels per vector unit, the unit the activations' kernels split over threads. */
int wino_width_f32(void) { return sizeof(vec_f32) / sizeof(float); }
int wino_width_f64(void) { return sizeof(vec_f64) / sizeof(double); }
int wino_width_bf16(void) { return sizeof(vec_f32) / sizeof(float); }

DEFINE_ACTIVATIONS(3, 4, f32, float, vec_f32, BT3, AT3, float, SAME)
DEFINE_ACTIVATIONS(3, 4, f64, double, vec_f64, BT3, AT3, double, SAME)
DEFINE_ACTIVATIONS(3, 4, bf16, float, vec_f32, BT3, AT3, bf16_t, BF16)
DEFINE_ACTIVATIONS(5, 6, f32, float, vec_f32, BT5, AT5, float, SAME)
DEFINE_ACTIVATIONS(5, 6, f64, double, vec_f64, BT5, AT5, double, SAME)
DEFINE_SPACE_TO_DEPTH(f32, float, float)
DEFINE_SPACE_TO_DEPTH(f64, double, double)
DEFINE_SPACE_TO_DEPTH(bf16, bf16_t, bf16_t)
DEFINE_SPACE_TO_DEPTH(f32_bf16, float, bf16_t)
DEFINE_FILTERS(3, 4, f32, float, G3)
DEFINE_FILTERS(3, 4, f64, double, G3)
DEFINE_FILTERS(5, 6, f32, float, G5)
DEFINE_FILTERS(5, 6, f64, double, G5)
