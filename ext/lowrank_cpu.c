/* lowrank_cpu.c — the low-rank mixture kernel on the CPU (C99 + OpenMP), docs/methods.md §8: the part
 * that does not depend on the float type (threads, the build line). The kernels are numbered versions,
 * as in llm.c's dev/cuda, each in its own file and each checked against the NumPy reference by the
 * tests and by the benchmark before it is timed:
 *
 *   lowrank_v1.h   version 1: the op as its equation, plain loops (one token, one expert at a time)
 *   lowrank_v2.h   version 2: token blocks, packed factors, register-tiled vector micro-kernels, OpenMP
 *   lowrank_v3.h   version 3: version 2 with the long sums cache-blocked as in a GEMM (the default)
 *
 * lowrank_cpu_f32.c and lowrank_cpu_f64.c compile every version for float and double and export the
 * entry points of lowrank.h (tsl_forward_f32 … = the newest version; tsl_forward_version_f32 … by number).
 */
#include <stdio.h>
#include "lowrank.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(TSL_VBYTES)
#define VBITS (TSL_VBYTES * 8)
#elif defined(__AVX512F__)
#define VBITS 512
#elif defined(__AVX__)
#define VBITS 256
#else
#define VBITS 128
#endif

int tsl_kernel_versions(void) { return 3; }

static int g_num_threads = 0; /* 0 = OpenMP's default */

void tsl_set_num_threads(int n) { g_num_threads = n > 0 ? n : 0; }

int tsl_get_num_threads(void) {
#ifdef _OPENMP
    return g_num_threads > 0 ? g_num_threads : omp_get_max_threads();
#else
    return 1;
#endif
}

int tsl_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

const char *tsl_build_info(void) {
    static char buf[256];
#ifdef __VERSION__
    const char *cc = __VERSION__;
#else
    const char *cc = "unknown compiler";
#endif
#if defined(__AVX512F__)
    const char *isa = "AVX-512";
#elif defined(__AVX2__)
    const char *isa = "AVX2";
#elif defined(__AVX__)
    const char *isa = "AVX";
#else
    const char *isa = "baseline";
#endif
    snprintf(buf, sizeof buf, "C kernels: cc %s, %s ISA, %d-bit vectors, OpenMP %s", cc, isa, VBITS,
             tsl_has_openmp() ? "on" : "off");
    return buf;
}

