/* lowrank.h — C API of the low-rank mixture kernel (docs/methods.md §8). This file is also the cffi cdef:
 * build_cpu.py drops the preprocessor lines and hands the rest to ffi.cdef, so keep it to plain
 * declarations (no macros in the prototypes, no inline code).
 *
 * Shape legend (row-major, C-contiguous; validated in Python before anything reaches here):
 *   N tokens, D in features, O out features, r rank, E experts, K gate entries per token
 *   x (N, D)   A (E, r, D)   B (E, O, r)   y, dy (N, O)   dx (N, D)   dA (E, r, D)   dB (E, O, r)
 *   scale (E)  in_mask (E, D) or NULL      out_mask (E, O) or NULL
 *
 * The three gate forms are one calling convention:
 *   dense   idx = NULL, w = G (N, E), K = E       expert of entry (n, j) is j
 *   top-k   idx (N, K) int32, w (N, K)            expert of entry (n, j) is idx[n, j]; -1 = empty slot
 *   index   idx (N) int32, w = NULL, K = 1        weight 1; idx -1 = base only (row skipped)
 * An entry with weight 0 (or expert -1) adds nothing to y, dx, dA, dB: it is skipped, not multiplied
 * by zero, so a row whose gates are all zero gets exactly +0.0 even when x, A or B hold NaN.
 * dgate (same shape as w, dense or top-k only) is filled for every listed entry, zero weight or not,
 * because d y / d w does not depend on w. (Dense gates apply all experts of a row in one stacked
 * product, so in a row that *is* active a NaN / Inf in x, A or B can reach a zero-weight expert's
 * terms through 0·NaN; top-k and index forms skip such experts entirely.)
 *
 * Outputs: y is overwritten (accumulate = 0) or added to (accumulate = 1; inactive rows untouched).
 * Backward outputs dx, dA, dB, dgate are overwritten; pass NULL for any that is not needed.
 * Return value: 0 on success, 1 when scratch memory could not be allocated, 2 for an unknown version.
 *
 * Versions (lowrank_cpu.c): tsl_forward_f32 & co. run the newest; tsl_forward_version_f32 & co. run
 * version 1 … tsl_kernel_versions() (1 = plain loops, the readable reference; 2 on = optimised).
 */
#ifndef TINYSLIM_LOWRANK_H
#define TINYSLIM_LOWRANK_H
#include <stddef.h>
#include <stdint.h>

int tsl_forward_f32(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                    const float *x, const float *A, const float *B,
                    const int32_t *idx, const float *w, const float *scale,
                    const float *in_mask, const float *out_mask,
                    float *y, int accumulate);
int tsl_forward_f64(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                    const double *x, const double *A, const double *B,
                    const int32_t *idx, const double *w, const double *scale,
                    const double *in_mask, const double *out_mask,
                    double *y, int accumulate);

int tsl_backward_f32(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                     const float *x, const float *A, const float *B,
                     const int32_t *idx, const float *w, const float *scale,
                     const float *in_mask, const float *out_mask, const float *dy,
                     float *dx, float *dA, float *dB, float *dgate);
int tsl_backward_f64(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                     const double *x, const double *A, const double *B,
                     const int32_t *idx, const double *w, const double *scale,
                     const double *in_mask, const double *out_mask, const double *dy,
                     double *dx, double *dA, double *dB, double *dgate);

int tsl_kernel_versions(void);
int tsl_forward_version_f32(int version, int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                            const float *x, const float *A, const float *B,
                            const int32_t *idx, const float *w, const float *scale,
                            const float *in_mask, const float *out_mask,
                            float *y, int accumulate);
int tsl_forward_version_f64(int version, int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                            const double *x, const double *A, const double *B,
                            const int32_t *idx, const double *w, const double *scale,
                            const double *in_mask, const double *out_mask,
                            double *y, int accumulate);
int tsl_backward_version_f32(int version, int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                             const float *x, const float *A, const float *B,
                             const int32_t *idx, const float *w, const float *scale,
                             const float *in_mask, const float *out_mask, const float *dy,
                             float *dx, float *dA, float *dB, float *dgate);
int tsl_backward_version_f64(int version, int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                             const double *x, const double *A, const double *B,
                             const int32_t *idx, const double *w, const double *scale,
                             const double *in_mask, const double *out_mask, const double *dy,
                             double *dx, double *dA, double *dB, double *dgate);

/* Threads: the most a call may use (a small problem uses fewer, lowrank_v2.h); n <= 0 means "OpenMP's default" (OMP_NUM_THREADS or the core count). */
void tsl_set_num_threads(int n);
int tsl_get_num_threads(void);
int tsl_has_openmp(void);
/* One line: compiler, vector width, OpenMP. */
const char *tsl_build_info(void);

/* ---- CUDA library (ext/lowrank_cuda.cu, loaded by tinyslim/kernels/cuda.py with cffi ABI mode) ----
 * Everything below is float32 and every array pointer is a device pointer, including scale and the
 * masks. stream is a cudaStream_t (NULL = the legacy default stream). Returns a cudaError_t (0 = ok).
 * build_cpu.py stops reading the header at this section; cuda.py carries the same declarations
 * (a test checks that they match). */
int tsl_cuda_forward(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                     const float *x, const float *A, const float *B,
                     const int32_t *idx, const float *w, const float *scale,
                     const float *in_mask, const float *out_mask,
                     float *y, void *stream);
int tsl_cuda_backward(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                      const float *x, const float *A, const float *B,
                      const int32_t *idx, const float *w, const float *scale,
                      const float *in_mask, const float *out_mask, const float *dy,
                      float *dx, float *dA, float *dB, float *dgate, void *stream);
int tsl_cuda_device_count(int *count);
int tsl_cuda_device_name(int device, char *name, int length);
const char *tsl_cuda_error_string(int error);
int tsl_cuda_malloc(void **ptr, size_t bytes);
int tsl_cuda_free(void *ptr);
int tsl_cuda_memcpy(void *dst, const void *src, size_t bytes, int kind); /* kind: 1 h→d, 2 d→h, 3 d→d */
int tsl_cuda_synchronize(void);

#endif
