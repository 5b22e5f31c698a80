/* lowrank_cpu_f32.c — the CPU kernels in float: every version compiled with `real` = float, and the
 * exported entry points of lowrank.h. (lowrank_cpu_f64.c is the same file in double: the kernels'
 * functions are static, so each type gets its own copy under the same name.) */
#include <stdint.h>
typedef float real;
#define TSL_REAL_BYTES 4 /* sizeof(real), for the preprocessor */
typedef int32_t ireal; /* the integer of the same size (shuffle masks) */
#include "lowrank_v3.h"
#include "lowrank_v2.h"
#include "lowrank_v1.h"

/* the default: the newest version */
int tsl_forward_f32(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K, const real *x, const real *A,
                    const real *B, const int32_t *idx, const real *w, const real *scale, const real *in_mask,
                    const real *out_mask, real *y, int accumulate) {
    return forward_v3(N, D, O, r, E, K, x, A, B, idx, w, scale, in_mask, out_mask, y, accumulate);
}

int tsl_backward_f32(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K, const real *x, const real *A,
                     const real *B, const int32_t *idx, const real *w, const real *scale, const real *in_mask,
                     const real *out_mask, const real *dy, real *dx, real *dA, real *dB, real *dgate) {
    return backward_v3(N, D, O, r, E, K, x, A, B, idx, w, scale, in_mask, out_mask, dy, dx, dA, dB, dgate);
}

/* each version by number (tests, tutorial 09, the benchmark) */
int tsl_forward_version_f32(int version, int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                            const real *x, const real *A, const real *B, const int32_t *idx, const real *w,
                            const real *scale, const real *in_mask, const real *out_mask, real *y,
                            int accumulate) {
    switch (version) {
    case 1: return forward_v1(N, D, O, r, E, K, x, A, B, idx, w, scale, in_mask, out_mask, y, accumulate);
    case 2: return forward_v2(N, D, O, r, E, K, x, A, B, idx, w, scale, in_mask, out_mask, y, accumulate);
    case 3: return forward_v3(N, D, O, r, E, K, x, A, B, idx, w, scale, in_mask, out_mask, y, accumulate);
    default: return 2;
    }
}

int tsl_backward_version_f32(int version, int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                             const real *x, const real *A, const real *B, const int32_t *idx, const real *w,
                             const real *scale, const real *in_mask, const real *out_mask, const real *dy,
                             real *dx, real *dA, real *dB, real *dgate) {
    switch (version) {
    case 1: return backward_v1(N, D, O, r, E, K, x, A, B, idx, w, scale, in_mask, out_mask, dy, dx, dA, dB, dgate);
    case 2: return backward_v2(N, D, O, r, E, K, x, A, B, idx, w, scale, in_mask, out_mask, dy, dx, dA, dB, dgate);
    case 3: return backward_v3(N, D, O, r, E, K, x, A, B, idx, w, scale, in_mask, out_mask, dy, dx, dA, dB, dgate);
    default: return 2;
    }
}
