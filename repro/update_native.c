/* The paper's update (section 5) in one pass over memory, for the CPU:
 *
 *   v <- momentum * v - weight_decay * lr * w - lr * grad ;   w <- w + v
 *
 * optim.paper_update runs it eagerly as four multi-tensor kernels, each a pass over the parameters'
 * memory (eleven reads and writes of each parameter's size); here each element of w, g and v is read
 * once and w and v written once. The arithmetic and its rounding are the eager kernels', step by step:
 * torch rounds momentum and each alpha to the tensor's dtype and computes `a + alpha * b` as one fused
 * multiply-add (its vectorised add), so the results are the same bits (tests/test_update_native.py).
 * Build with -fno-fast-math (repro/native.py): the order written here is the order computed.
 */
#include <math.h>
#include <stdint.h>

#include "native.h"

#define DEFINE_UPDATE(NAME, T, FMA)                                                                       \
static int NAME##_range(T *restrict w, const T *restrict g, T *restrict v, int64_t lo, int64_t hi,         \
                        double lr, double momentum, double weight_decay) {                                 \
    const T m = (T)momentum, alpha_w = (T)(-weight_decay * lr), alpha_g = (T)(-lr);                       \
    for (int64_t i = lo; i < hi; i++) {                                                                    \
        T t = v[i] * m;                       /* _foreach_mul_(velocity, momentum) */                      \
        if (weight_decay != 0.0)                                                                           \
            t = FMA(w[i], alpha_w, t);        /* _foreach_add_(velocity, params, alpha=-wd * lr) */        \
        t = FMA(g[i], alpha_g, t);            /* _foreach_add_(velocity, grads, alpha=-lr) */              \
        v[i] = t;                                                                                          \
        w[i] = w[i] + t;                      /* _foreach_add_(params, velocity) */                        \
    }                                                                                                      \
    return 0;                                                                                              \
}                                                                                                          \
                                                                                                           \
/* Elements first .. last - 1, split over `threads` (OpenMP builds; see native.h) */                            \
int NAME(T *w, const T *g, T *v, int64_t first, int64_t last, double lr, double momentum,                 \
         double weight_decay, int threads) {                                                               \
    IN_THREADS(threads, first, last, NAME##_range(w, g, v, lo, hi, lr, momentum, weight_decay));          \
}

DEFINE_OPENMP_QUERY(update)

DEFINE_UPDATE(update_f32, float, fmaf)
DEFINE_UPDATE(update_f64, double, fma)
