/* lowrank_v3.h — version 3 of the low-rank mixture kernel on the CPU (C99 + OpenMP), docs/methods.md §8.
 * Version 2 (lowrank_v2.h) with four changes, everything else (the work items, each thread's share of
 * them, the dot-product tiles) the same; version 1 (lowrank_v1.h) is the op in plain loops.
 *
 *   1. The wide products are cache-blocked as a GEMM is: the sum over b runs in blocks of KC_V3 = 64 In
 *      rows, and each block (64 rows × one 4-vector panel = 16 KB in float32 with AVX-512) is used by every
 *      4-row × 4-vector register tile before the next block is read. v2 streamed the whole panel (D rows:
 *      256 KB at D = 1024) past every row tile, from L2.
 *   2. Coefficient rows that are contiguous (x, dy and the rank intermediates H, G) are read in place;
 *      only strided ones (the columns of H, G behind dA, dB) are packed. v2 packed every wide product's
 *      coefficients, a scalar transpose of the x block that cost about a tenth of a dense forward.
 *   3. Thread 0 sums its part of dA straight into dA (zeroed once); the other threads' partials are added
 *      to it in thread order, so the result is the same on every run and there is no copy when one
 *      thread does all the work (a small call's backward, N = 1: 7.2 → 4.8 µs).
 *   4. One parallel region per call (packing, work items, reduction), its phases separated by short spin
 *      waits (spin_wait_v3) instead of OpenMP barriers. v2 opened up to three regions with an explicit
 *      barrier and a worksharing loop's barrier inside: under passive waiting each one puts a thread to
 *      sleep, and on a 2-core VM a wake-up costs ~50 µs (a 2-thread LoRA forward at N = 4096, D 128,
 *      O 16 took 191 µs against 167 µs on one thread; one region: 125 µs).
 *
 * Names carry the suffix _v3 (axpys_v3, group_forward_v3, …): version 2's file is compiled into the same
 * translation unit, and each version keeps its own greppable copy.
 *
 *   y_n = Σ_e c[n,e] · B'_e (A'_e x_n)        c[n,e] = g[n,e] · s_e,  A'_e = A_e ⊙ m_in_e,  B'_e = m_out_e ⊙ B_e
 *
 * Shape legend: N tokens, D in, O out, r rank, E experts, K gate entries per token; a *group* is m tokens
 * that use the same R rank rows (R = r for one expert, R = E·r for dense gates: all experts stacked);
 * Rp = R rounded up to the vector length VL (zero padding), TB tokens per work item.
 *   x (N,D)  A (E,r,D)  B (E,O,r)  y (N,O)
 *   packed per call:  Ap (E·r, D) = A'      Bt (E·r, O) = B'ᵀ per expert     (rows indexed by rank row)
 *                     ApT (groups, D, Rp)    Bp (groups, O, Rp)               (rank on the fast axis)
 *   scratch per thread:  H, G (TB, Rp)  — the rank intermediate never leaves L1/L2
 *
 * How the work is cut (the whole file follows from these three lines):
 *   1. A group is two skinny GEMMs through H:   H = X_rows · ApT     C = coef ⊙ H     Y_rows += C · Bt
 *   2. Dense and top-k gates walk the tokens in blocks of TB (x and y of a block stay in cache while each
 *      active expert of the block is applied; top-k buckets the block's tokens by expert, so experts
 *      nobody picked cost nothing). Per-token indices are counting-sorted by expert first, so each
 *      expert's A and B are read once per chunk of its own tokens. OpenMP runs over blocks / chunks: a
 *      token's y (and dx) row belongs to exactly one work item, so no two threads ever write it.
 *   3. The backward reuses the groups: recompute H, form G = dY_rows · Bp (rank space), then
 *      dgate = s⟨G, H⟩, dx += (c·G) · Ap, and dA, dB accumulate into per-thread partial sums that one
 *      parallel reduction adds up (and masks) at the end.
 *
 * Two micro-kernels do all the arithmetic, written with GCC vector extensions (the same code compiles to
 * AVX-512, AVX2, SSE or NEON; 4-row register tiles):
 *   axpys   Out[a] (+)= Σ_b coef(a, b) · In[b]   the GEMM inner step "broadcast a coefficient, FMA a
 *                                                vector": every product except the next line
 *   dots    H[i, j] = ⟨X_i, W_j⟩                 H and G when r fills at most half a vector (x is then
 *                                                read in full vectors, reduced horizontally at the end)
 *
 * Threads: a problem runs on one thread unless it has MIN_WORK_PER_THREAD multiply-adds for each thread
 * it gets (waking a sleeping OpenMP thread costs tens of µs, more on a busy machine). Scratch memory
 * (packed factors, per-thread buffers) lives in per-thread arenas that grow and are reused across calls,
 * so a small call makes no malloc at all.
 *
 * lowrank_cpu_f32.c and lowrank_cpu_f64.c include this file with `real` defined as float / double;
 * every function here is static, so each type gets its own copy under the same greppable name.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sched.h>
#include <string.h>
#include "lowrank.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* The widest vectors the compiler targets (-march=native): 512-bit with AVX-512 (Zen 5 and Intel server
 * cores run them at full width), 256-bit with AVX, else 128-bit. -DTSL_VBYTES=32 overrides. */
#ifndef TSL_VBYTES
#if defined(__AVX512F__)
#define TSL_VBYTES 64
#elif defined(__AVX__)
#define TSL_VBYTES 32
#else
#define TSL_VBYTES 16
#endif
#endif
#define VBYTES TSL_VBYTES
#define TSL_LANES (TSL_VBYTES / TSL_REAL_BYTES) /* VL for the preprocessor */

#define ALWAYS_INLINE static inline __attribute__((always_inline))

static int64_t min64_v3(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64_v3(int64_t a, int64_t b) { return a > b ? a : b; }

/* One thread per this many multiply-adds (about 80 µs of one core's work): below it, a problem runs on
 * the calling thread alone. */
#define MIN_WORK_PER_THREAD ((int64_t)2 << 20)

static int threads_for_v3(int64_t work, int64_t items) {
    const int64_t most = min64_v3(tsl_get_num_threads(), min64_v3(items, work / MIN_WORK_PER_THREAD));
    return most > 1 ? (int)most : 1;
}

/* Tokens per work item. Dense: 64 (x, y of the block in L2). Top-k: enough that each active expert sees
 * ~32 tokens of the block, so its A, B come from cache for a worthwhile amount of work. Index: chunks
 * of one expert's tokens. Never so big that a thread goes without work. */
static int64_t block_tokens_v3(int64_t N, int64_t E, int64_t K, int form_dense, int nthreads) {
    int64_t tb = form_dense ? 64 : min64_v3(512, max64_v3(64, 32 * E / max64_v3(K, 1)));
    const int64_t per_thread = (N + nthreads - 1) / nthreads;
    if (per_thread < tb) tb = max64_v3(8, (per_thread + 7) / 8 * 8);
    return tb;
}

/* Per-thread arenas (slot 0: the caller's packed factors and work list; slot 1: each thread's scratch).
 * They only grow, and live as long as the thread: OpenMP keeps its pool threads between calls. */
static __thread char *arena_base_v3[2];
static __thread size_t arena_size_v3[2];

static void *arena_v3(int slot, size_t bytes) {
    if (bytes > arena_size_v3[slot]) {
        free(arena_base_v3[slot]);
        arena_base_v3[slot] = malloc(bytes);
        arena_size_v3[slot] = arena_base_v3[slot] ? bytes : 0;
    }
    return arena_base_v3[slot];
}

/* Carve `count` items of `size` bytes from *cursor, 64-byte aligned; with *cursor == NULL only measures. */
static void *carve_v3(char **cursor, size_t *used, size_t count, size_t size) {
    const size_t at = (*used + 63) & ~(size_t)63;
    *used = at + count * size;
    return *cursor ? *cursor + at : NULL;
}

#define VL ((int64_t)(VBYTES / sizeof(real)))
typedef real vec __attribute__((vector_size(VBYTES)));
typedef real uvec __attribute__((vector_size(VBYTES), aligned(sizeof(real)), may_alias));

ALWAYS_INLINE vec vload_v3(const real *p) { return *(const uvec *)p; }
ALWAYS_INLINE void vstore_v3(real *p, vec v) { *(uvec *)p = v; }

/* ---- the micro-kernel: Out[a][o] (+)= Σ_b coef(a, b) · In[b][o],  coef(a, b) = Crow[a][b·cb] ----- */
/* One register tile: mr rows × nv vectors of Out stay in registers while all nb In rows stream past; per
 * b it loads nv vectors of In[b] and broadcasts mr coefficients: mr·nv FMAs for nv + mr loads.
 * Coefficients come either packed, P[b·mr + i] = coef(a0 + i, b) (one pointer: the GEMM "packed A
 * panel"), or straight from mr row pointers (P == NULL; no packing pass, used for narrow outputs).
 * overwrite = 1 stores the sum instead of adding it (Out is never read: no memset, no read-modify-write). */
ALWAYS_INLINE void axpy_tile_v3(const int mr, const int nv, real *const *out, const real *const *in, int64_t nb,
                                const real *P, const real *const *crow, int64_t cb, int64_t c0, int64_t o,
                                int overwrite, int64_t skip) {
    vec acc[4][4];
    const real *c[4];
    for (int i = 0; i < mr; i++) {
        c[i] = P ? NULL : crow[i] + c0;
        for (int v = 0; v < nv; v++) acc[i][v] = overwrite || skip ? (vec){0} : vload_v3(out[i] + o + v * VL);
    }
    int64_t b = 0;
    if (nv == 1) { /* one vector per row: split b into even / odd sums so that 2·mr FMA chains overlap */
        vec odd[4];
        for (int i = 0; i < mr; i++) odd[i] = (vec){0};
        for (; b + 2 <= nb; b += 2) {
            if (!P && (b & 15) == 0) /* x rows come from DRAM one element at a time: fetch ahead */
                for (int i = 0; i < mr; i++) __builtin_prefetch(c[i] + (b + 64) * cb);
            const vec iv0 = vload_v3(in[b] + o), iv1 = vload_v3(in[b + 1] + o);
            for (int i = 0; i < mr; i++) {
                acc[i][0] += (P ? P[b * mr + i] : c[i][b * cb]) * iv0;
                odd[i] += (P ? P[(b + 1) * mr + i] : c[i][(b + 1) * cb]) * iv1;
            }
        }
        for (int i = 0; i < mr; i++) acc[i][0] += odd[i];
    }
    for (; b < nb; b++) {
        vec iv[4];
        const real *src = in[b] + o;
        if (!P && (b & 15) == 0)
            for (int i = 0; i < mr; i++) __builtin_prefetch(c[i] + (b + 64) * cb);
        for (int v = 0; v < nv; v++) iv[v] = vload_v3(src + v * VL);
        for (int i = 0; i < mr; i++) {
            const real ci = P ? P[b * mr + i] : c[i][b * cb];
            for (int v = 0; v < nv; v++) acc[i][v] += ci * iv[v];
        }
    }
    real *dst[4]; /* the stores may alias anything (may_alias): read the row pointers first */
    for (int i = 0; i < mr; i++) dst[i] = out[i] + o;
    if (skip && !overwrite) { /* ragged tail: this vector overlaps `skip` columns that are done already */
        for (int i = 0; i < mr; i++)
            for (int64_t l = skip; l < VL; l++) dst[i][l] += acc[i][0][l];
        return;
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) vstore_v3(dst[i] + v * VL, acc[i][v]);
}

/* Every row of Out for the columns [o, o + NV·VL): tiles of 4 rows, then single rows; a tile's packed
 * coefficients start at P + a·nb. */
#define TILE(MR, NV, PK)                                                                                   \
    axpy_tile_v3(MR, NV, Out + a, In + b0, kb, (PK) ? P + a * nb + b0 * (MR) : NULL, Crow + a, cb, b0 * cb, o, \
                 overwrite && b0 == 0, skip)
#define ROWS(NV, PK)                                                                                       \
    do {                                                                                                   \
        int64_t a = 0;                                                                                     \
        for (; a + 4 <= na; a += 4) TILE(4, NV, PK);                                                       \
        for (; a < na; a++) TILE(1, NV, PK);                                                               \
    } while (0)

/* P: scratch of na·nb reals. Wide outputs (≥ 4 vectors) sweep panels of 4 vectors, and within a panel
 * blocks of KC_V3 In rows (the block stays in L1 while all the row tiles pass); their coefficients are
 * packed once only when strided (cb ≠ 1). Narrow outputs (the rank side, 1–3 vectors) read the
 * coefficient rows in place: packing them would cost a transpose of x per call. */
#ifndef KC_V3
#define KC_V3 64
#endif
static void axpys_v3(int64_t na, int64_t nb, int64_t L, real *const *Out, const real *const *In,
                     const real *const *Crow, int64_t cb, real *P, int overwrite) {
    int64_t o = 0, skip = 0, b0 = 0, kb = nb;
    if (L >= 4 * VL) {
        const int pack = cb != 1; /* coefficient rows that are contiguous are read in place */
        int64_t a = 0; /* pack: tiles of 4 rows interleaved, then single rows */
        for (; pack && a + 4 <= na; a += 4)
            for (int i = 0; i < 4; i++)
                for (int64_t b = 0; b < nb; b++) P[a * nb + b * 4 + i] = Crow[a + i][b * cb];
        for (; pack && a < na; a++)
            for (int64_t b = 0; b < nb; b++) P[a * nb + b] = Crow[a][b * cb];
        for (; o + 4 * VL <= L; o += 4 * VL)
            for (b0 = 0; b0 < nb; b0 += KC_V3) { /* KC_V3 In rows of the panel stay in L1 while the tiles pass */
                kb = min64_v3(KC_V3, nb - b0);
                if (pack) ROWS(4, 1); else ROWS(4, 0);
            }
        b0 = 0;
        kb = nb;
    }
    const int64_t nv = (L - o) / VL;
    if (nv == 3) ROWS(3, 0); else if (nv == 2) ROWS(2, 0); else if (nv == 1) ROWS(1, 0);
    o += nv * VL;
    if (o < L && L >= VL) { /* ragged tail: redo the last full vector [L−VL, L); its first lanes are done */
        skip = VL - (L - o);
        o = L - VL;
        ROWS(1, 0);
        o = L;
    }
    for (; o < L; o++) /* rows shorter than one vector */
        for (int64_t a = 0; a < na; a++) {
            real s = overwrite ? 0 : Out[a][o];
            for (int64_t b = 0; b < nb; b++) s += Crow[a][b * cb] * In[b][o];
            Out[a][o] = s;
        }
}
#undef TILE
#undef ROWS

/* The lane sums of 16 accumulators, in registers: fold pairs of vectors (the halves of every segment of
 * two vectors added into one vector) until every lane holds one whole sum; out[k] = Σ lanes of v[k].
 * 15 folds of two shuffles and an add, where summing each vector lane by lane would be 16 · VL
 * dependent scalar adds (for short rows that took longer than the products). The order of the adds
 * is fixed, so results do not change from run to run. */
typedef ireal imask __attribute__((vector_size(VBYTES)));
/* FOLD_LO[level][lane]: where lane's first term comes from (lanes ≥ VL: from b), segments of s = VL >> level
 * lanes: the lower half of each segment of a, then of b; the second term is the upper half (+ s / 2). */
#if TSL_LANES == 16
static const ireal FOLD_LO_v3[4][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
    {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
    {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
    {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}};
#elif TSL_LANES == 8
static const ireal FOLD_LO_v3[3][8] = {
    {0, 1, 2, 3, 8, 9, 10, 11},
    {0, 1, 4, 5, 8, 9, 12, 13},
    {0, 2, 4, 6, 8, 10, 12, 14}};
#elif TSL_LANES == 4
static const ireal FOLD_LO_v3[2][4] = {
    {0, 1, 4, 5},
    {0, 2, 4, 6}};
#elif TSL_LANES == 2
static const ireal FOLD_LO_v3[1][2] = {
    {0, 2}};
#else
#error "TSL_LANES must be 2, 4, 8 or 16"
#endif

ALWAYS_INLINE vec fold2_v3(vec a, vec b, int level) {
    imask m1, m2;
    memcpy(&m1, FOLD_LO_v3[level], sizeof m1);
    m2 = m1 + (ireal)((VL >> level) / 2);
    return __builtin_shuffle(a, b, m1) + __builtin_shuffle(a, b, m2);
}

ALWAYS_INLINE void hsum16_v3(vec *v, real *out) {
    int64_t n = 16, s = VL;
    for (int level = 0; s > 1 && n > 1; n /= 2, s /= 2, level++)
        for (int64_t k = 0; k < n / 2; k++) v[k] = fold2_v3(v[2 * k], v[2 * k + 1], level);
    for (int64_t k = 0; k < n; k++) vstore_v3(out + k * VL, v[k]);
}

/* ---- the second micro-kernel, for small ranks: H[i·ldh + j] = ⟨X_i, W_j⟩ over L ------------------- */
/* At 2r ≤ VL the broadcast tile above would read x one element at a time into half-empty vectors;
 * here x is read in full vectors (it is the DRAM stream) against 4 W rows kept in L1, and a 4 × 4
 * tile of dot products is reduced horizontally at the end. W rows past n repeat row n−1 (dropped). */
ALWAYS_INLINE void dot_tile_v3(const int mr, const real *const *x, const real *const *w, int64_t L,
                               real *H, int64_t ldh, int64_t nj) {
    vec acc[4][4];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = (vec){0};
    const int64_t Lv = L - L % VL;
    for (int64_t d = 0; d < Lv; d += VL) {
        vec xv[4];
        for (int i = 0; i < mr; i++) xv[i] = vload_v3(x[i] + d);
        for (int j = 0; j < 4; j++) {
            const vec wv = vload_v3(w[j] + d);
            for (int i = 0; i < mr; i++) acc[i][j] += xv[i] * wv;
        }
    }
    if (Lv < L && L >= VL) { /* ragged tail: the row's last full vector [L−VL, L), with the lanes that were
                                summed already cleared in W (bitwise, so they are exact zeros) */
        imask keep;
        for (int64_t l = 0; l < VL; l++) keep[l] = l >= VL - (L - Lv) ? (ireal)-1 : 0;
        for (int j = 0; j < 4; j++) {
            const vec wv = (vec)((imask)vload_v3(w[j] + L - VL) & keep);
            for (int i = 0; i < mr; i++) acc[i][j] += vload_v3(x[i] + L - VL) * wv;
        }
    } else if (Lv < L) { /* a row shorter than one vector: zero-padded copies */
        real xt[4][VL], wt[4][VL];
        for (int i = 0; i < mr; i++)
            for (int64_t l = 0; l < VL; l++) xt[i][l] = Lv + l < L ? x[i][Lv + l] : 0;
        for (int j = 0; j < 4; j++)
            for (int64_t l = 0; l < VL; l++) wt[j][l] = Lv + l < L ? w[j][Lv + l] : 0;
        for (int j = 0; j < 4; j++) {
            const vec wv = vload_v3(wt[j]);
            for (int i = 0; i < mr; i++) acc[i][j] += vload_v3(xt[i]) * wv;
        }
    }
    real sums[16];
    vec v[16];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) v[i * 4 + j] = i < mr ? acc[i][j] : (vec){0};
    hsum16_v3(v, sums);
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nj; j++) H[i * ldh + j] = sums[i * 4 + j];
}

static void dots_v3(int64_t m, int64_t n, int64_t L, const real *const *X, const real *W, int64_t ldw,
                    real *H, int64_t ldh) {
    for (int64_t j0 = 0; j0 < n; j0 += 4) { /* 4 W rows stay in L1 while the x rows stream past */
        const real *w[4];
        for (int j = 0; j < 4; j++) w[j] = W + min64_v3(j0 + j, n - 1) * ldw;
        const int64_t nj = min64_v3(4, n - j0);
        int64_t i = 0;
        for (; i + 4 <= m; i += 4) dot_tile_v3(4, X + i, w, L, H + i * ldh + j0, ldh, nj);
        for (; i < m; i++) dot_tile_v3(1, X + i, w, L, H + i * ldh + j0, ldh, nj);
    }
}

/* ---- the problem, packed weights and per-thread scratch ---------------------------------------- */
typedef struct {
    int64_t N, D, O, r, E, K;
    int64_t rg, rp;                /* rank rows per group (E·r dense, r otherwise), padded to VL  */
    const real *x, *dy;            /* (N,D), (N,O)                                               */
    const real *Ap, *Bt;           /* (E·r, D) A', (E·r, O) B'ᵀ                                   */
    const real *ApT, *Bp;          /* (groups, D, rp), (groups, O, rp)                           */
    const int32_t *idx;            /* (N,K) or NULL (dense)                                      */
    const real *w, *scale;         /* (N,K) or NULL (index form), (E)                            */
    real *y, *dx, *dgate;          /* outputs (NULL = not wanted)                                */
    real *dA;                      /* (E·r, D) output: thread 0's dA partial is dA itself        */
    int dense, topk, index;        /* exactly one is set                                         */
    int accumulate;                /* forward: add into y instead of overwriting it              */
} prob_t_v3;

typedef struct {
    const real **xrows, **dyrows, **inrows, **crows; /* gathered rows; (max(D,O,R)) In rows; (R) coef rows */
    real **yrows, **hrows, **grows, **prows;         /* (TB) out rows, H rows, G rows; (R) partial rows    */
    real *coef, *H, *G, *P;                          /* (TB·Eg), (TB·rp), (TB·rp), (TB·max(D,O,R)) packing */
    int64_t *gpos;                                   /* (TB·Eg) where the entry's dgate goes, −1 = nowhere */
    int32_t *tok, *slot;                             /* (TB·K) bucketed (token, slot) pairs for top-k      */
    int64_t *count;                                  /* (E+1) bucket offsets                               */
    real *dAp, *dBt;                                 /* (E·r, D), (E·r, O) this thread's dA, dB partials   */
} scratch_t_v3;

/* Carves this thread's scratch from its arena (slot 1); returns 0 on success. The dA / dB partials are
 * there (zeroed) only when wanted. */
static int scratch_alloc_v3(scratch_t_v3 *s, const prob_t_v3 *p, int64_t TB, int want_dA, int want_dB, int t) {
    const int64_t Eg = p->dense ? p->E : 1, R = p->rg, rp = p->rp;
    const int64_t L = max64_v3(max64_v3(p->D, p->O), R);
    const size_t nA = want_dA ? p->E * p->r * p->D : 0, nB = want_dB ? p->E * p->r * p->O : 0;
    real *const direct = t == 0 && nA ? p->dA : NULL; /* thread 0 sums straight into dA (no extra pass) */
    char *base = NULL;
    size_t used = 0;
    for (int pass = 0; pass < 2; pass++) { /* pass 0 measures, pass 1 carves */
        used = 0;
        s->xrows = carve_v3(&base, &used, TB, sizeof *s->xrows);
        s->dyrows = carve_v3(&base, &used, TB, sizeof *s->dyrows);
        s->yrows = carve_v3(&base, &used, TB, sizeof *s->yrows);
        s->hrows = carve_v3(&base, &used, TB, sizeof *s->hrows);
        s->grows = carve_v3(&base, &used, TB, sizeof *s->grows);
        s->inrows = carve_v3(&base, &used, L, sizeof *s->inrows);
        s->crows = carve_v3(&base, &used, R, sizeof *s->crows);
        s->prows = carve_v3(&base, &used, R, sizeof *s->prows);
        s->coef = carve_v3(&base, &used, TB * Eg, sizeof *s->coef);
        s->gpos = carve_v3(&base, &used, TB * Eg, sizeof *s->gpos);
        s->H = carve_v3(&base, &used, TB * rp, sizeof *s->H);
        s->G = carve_v3(&base, &used, TB * rp, sizeof *s->G);
        s->P = carve_v3(&base, &used, TB * L, sizeof *s->P);
        s->tok = carve_v3(&base, &used, TB * p->K, sizeof *s->tok);
        s->slot = carve_v3(&base, &used, TB * p->K, sizeof *s->slot);
        s->count = carve_v3(&base, &used, p->E + 1, sizeof *s->count);
        s->dAp = direct ? direct : nA ? carve_v3(&base, &used, nA, sizeof *s->dAp) : NULL;
        s->dBt = nB ? carve_v3(&base, &used, nB, sizeof *s->dBt) : NULL;
        if (pass == 0 && !(base = arena_v3(1, used))) return 1;
    }
    if (s->dAp) memset(s->dAp, 0, nA * sizeof *s->dAp);
    if (s->dBt) memset(s->dBt, 0, nB * sizeof *s->dBt);
    return 0;
}

/* In rows [first, first + n) of a row-major matrix with row length ld, as pointers. */
ALWAYS_INLINE const real *const *rows_of_v3(const real **buf, const real *base, int64_t n, int64_t ld) {
    for (int64_t b = 0; b < n; b++) buf[b] = base + b * ld;
    return buf;
}

/* ---- one group, forward: m token rows (s->xrows, s->yrows) × rank rows [R0, R0+R) of group q ---- */
/* coef (m, Eg), Eg = R / r experts in the group; a zero coefficient gives an exact zero, not 0·H.   */
static void group_forward_v3(const prob_t_v3 *p, scratch_t_v3 *s, int64_t m, int64_t q, int overwrite) {
    const int64_t r = p->r, R = p->rg, rp = p->rp, R0 = q * R, Eg = R / r, D = p->D, O = p->O;
    for (int64_t i = 0; i < m; i++) s->hrows[i] = s->H + i * rp;
    /* H (m, rp) = X_rows · ApT_q                       (D × rp panel of this group, rank on the fast axis) */
    if (2 * R > VL) axpys_v3(m, D, rp, s->hrows, rows_of_v3(s->inrows, p->ApT + q * D * rp, D, rp), s->xrows, 1, s->P, 1);
    else dots_v3(m, R, D, s->xrows, p->Ap + R0 * D, D, s->H, rp);
    for (int64_t i = 0; i < m; i++) /* C = coef ⊙ H in place: exact 0 for skipped entries */
        for (int64_t e = 0; e < Eg; e++) {
            const real c = s->coef[i * Eg + e];
            real *h = s->H + i * rp + e * r;
            for (int64_t j = 0; j < r; j++) h[j] = c != 0 ? c * h[j] : 0;
        }
    /* Y_rows (+)= C · Bt[R0 : R0+R] */
    axpys_v3(m, R, O, s->yrows, rows_of_v3(s->inrows, p->Bt + R0 * O, R, O), (const real *const *)s->hrows, 1,
             s->P, overwrite);
}

/* ---- one group, backward -------------------------------------------------------------------------- */
/*   H = X ApT_q, G = dY Bp_q: g = B'ᵀ dy, the rank-space gradient
 *   dgate = s·⟨G, H⟩ per entry   (d y/d c is u = B'A'x, and ⟨dy, B'h⟩ = ⟨B'ᵀdy, h⟩: O(r), not O(O))
 *   dx_rows (+)= (c·G) · Ap      (y depends on x through c·B'A'x)
 *   dAp     += (c·G)ᵀ · X_rows   (the same product, differentiated in A')
 *   dBt     += (c·H)ᵀ · dY_rows  (y is linear in B' with coefficient c·h)                             */
static void group_backward_v3(const prob_t_v3 *p, scratch_t_v3 *s, int64_t m, int64_t q, int overwrite) {
    const int64_t r = p->r, R = p->rg, rp = p->rp, R0 = q * R, Eg = R / r, D = p->D, O = p->O;
    for (int64_t i = 0; i < m; i++) {
        s->hrows[i] = s->H + i * rp;
        s->grows[i] = s->G + i * rp;
    }
    if (2 * R > VL) {
        axpys_v3(m, D, rp, s->hrows, rows_of_v3(s->inrows, p->ApT + q * D * rp, D, rp), s->xrows, 1, s->P, 1);
        axpys_v3(m, O, rp, s->grows, rows_of_v3(s->inrows, p->Bp + q * O * rp, O, rp), s->dyrows, 1, s->P, 1);
    } else { /* ranks that fill at most half a vector: dot products, reading x and dy in full vectors */
        dots_v3(m, R, D, s->xrows, p->Ap + R0 * D, D, s->H, rp);
        dots_v3(m, R, O, s->dyrows, p->Bt + R0 * O, O, s->G, rp);
    }
    for (int64_t i = 0; i < m; i++)
        for (int64_t e = 0; e < Eg; e++) {
            const real c = s->coef[i * Eg + e];
            real *h = s->H + i * rp + e * r, *g = s->G + i * rp + e * r;
            const int64_t pos = s->gpos[i * Eg + e];
            if (pos >= 0) {
                real dot = 0;
                for (int64_t j = 0; j < r; j++) dot += g[j] * h[j];
                p->dgate[pos] = p->scale[R0 / r + e] * dot;
            }
            for (int64_t j = 0; j < r; j++) { /* from here on H holds c·H and G holds c·G */
                h[j] = c != 0 ? c * h[j] : 0;
                g[j] = c != 0 ? c * g[j] : 0;
            }
        }
    if (p->dx)
        axpys_v3(m, R, D, s->yrows, rows_of_v3(s->inrows, p->Ap + R0 * D, R, D), (const real *const *)s->grows, 1,
                 s->P, overwrite);
    if (s->dAp) {
        for (int64_t j = 0; j < R; j++) {
            s->prows[j] = s->dAp + (R0 + j) * D;
            s->crows[j] = s->G + j; /* coefficient (j, i) = (c·G)[i, j]: column j, stride rp */
        }
        axpys_v3(R, m, D, s->prows, s->xrows, s->crows, rp, s->P, 0);
    }
    if (s->dBt) {
        for (int64_t j = 0; j < R; j++) {
            s->prows[j] = s->dBt + (R0 + j) * O;
            s->crows[j] = s->H + j;
        }
        axpys_v3(R, m, O, s->prows, s->dyrows, s->crows, rp, s->P, 0);
    }
}

/* ---- work items ---------------------------------------------------------------------------------- */
/* Token n joins a group as row i. `out` is y (forward) or dx (backward, may be NULL). */
ALWAYS_INLINE void add_row_v3(const prob_t_v3 *p, scratch_t_v3 *s, int64_t i, int64_t n, real *out, int64_t ldo) {
    s->xrows[i] = p->x + n * p->D;
    s->dyrows[i] = p->dy ? p->dy + n * p->O : NULL;
    s->yrows[i] = out ? out + n * ldo : NULL;
}

/* Dense gates, tokens [n0, n1): one group with all E experts stacked. A row joins when one of its
 * coefficients is nonzero, or (backward) when its dgate row is wanted. Each row of the block is written
 * exactly once: by the group (overwrite) or, if it did not join, with zeros. */
static void dense_block_v3(const prob_t_v3 *p, scratch_t_v3 *s, int64_t n0, int64_t n1, int backward) {
    const int64_t E = p->E, wantg = backward && p->dgate;
    real *out = backward ? p->dx : p->y;
    const int64_t ldo = backward ? p->D : p->O;
    int64_t m = 0;
    for (int64_t n = n0; n < n1; n++) {
        int any = 0;
        for (int64_t e = 0; e < E; e++) {
            const real c = p->w[n * E + e] * p->scale[e];
            s->coef[m * E + e] = c;
            s->gpos[m * E + e] = wantg ? n * E + e : -1;
            any |= c != 0;
        }
        if (any || wantg) add_row_v3(p, s, m++, n, out, ldo);
        else if (out && !p->accumulate) memset(out + n * ldo, 0, ldo * sizeof *out);
    }
    if (!m) return;
    if (backward) group_backward_v3(p, s, m, 0, 1);
    else group_forward_v3(p, s, m, 0, !p->accumulate);
}

/* Top-k gates, tokens [n0, n1): bucket the (token, slot) entries by expert (counting sort), then one
 * group per expert that has entries in this block. */
static void topk_block_v3(const prob_t_v3 *p, scratch_t_v3 *s, int64_t n0, int64_t n1, int backward) {
    const int64_t E = p->E, K = p->K, wantg = backward && p->dgate;
    real *out = backward ? p->dx : p->y;
    const int64_t ldo = backward ? p->D : p->O;
    int64_t *count = s->count;
    if (out && !p->accumulate) /* several experts add into a row: zero the block while it is hot */
        memset(out + n0 * ldo, 0, (n1 - n0) * ldo * sizeof *out);
    memset(count, 0, (E + 1) * sizeof *count);
    for (int64_t n = n0; n < n1; n++)
        for (int64_t j = 0; j < K; j++) {
            const int32_t e = p->idx[n * K + j];
            if (e >= 0 && (wantg || p->w[n * K + j] * p->scale[e] != 0)) count[e + 1]++;
        }
    for (int64_t e = 0; e < E; e++) count[e + 1] += count[e];
    for (int64_t n = n0; n < n1; n++)
        for (int64_t j = 0; j < K; j++) {
            const int32_t e = p->idx[n * K + j];
            if (e >= 0 && (wantg || p->w[n * K + j] * p->scale[e] != 0)) {
                const int64_t at = count[e]++;
                s->tok[at] = (int32_t)(n - n0);
                s->slot[at] = (int32_t)j;
            }
        }
    int64_t start = 0; /* count[e] is now the end of bucket e */
    for (int64_t e = 0; e < E; e++) {
        const int64_t end = count[e], m = end - start;
        for (int64_t i = 0; i < m; i++) {
            const int64_t n = n0 + s->tok[start + i], j = s->slot[start + i];
            s->coef[i] = p->w[n * K + j] * p->scale[e];
            s->gpos[i] = wantg ? n * K + j : -1;
            add_row_v3(p, s, i, n, out, ldo);
        }
        if (m && backward) group_backward_v3(p, s, m, e, 0);
        else if (m) group_forward_v3(p, s, m, e, 0);
        start = end;
    }
}

/* Per-token index, one chunk of expert e's sorted tokens; each token is in exactly one chunk, so its
 * row is overwritten (rows with index −1 are zeroed by run). */
static void index_chunk_v3(const prob_t_v3 *p, scratch_t_v3 *s, const int32_t *tokens, int64_t m, int64_t e,
                           int backward) {
    real *out = backward ? p->dx : p->y;
    const int64_t ldo = backward ? p->D : p->O;
    for (int64_t i = 0; i < m; i++) {
        s->coef[i] = p->scale[e];
        s->gpos[i] = -1;
        add_row_v3(p, s, i, tokens[i], out, ldo);
    }
    if (backward) group_backward_v3(p, s, m, e, 1);
    else group_forward_v3(p, s, m, e, !p->accumulate);
}

/* ---- driver shared by forward and backward ------------------------------------------------------ */
/* Rank row er (expert e = er / r, row j = er % r; column jq of group q) of the masked, packed factors. */
static void pack_row_v3(const prob_t_v3 *p, const real *A, const real *B, const real *in_mask, const real *out_mask,
                     real *Ap, real *Bt, real *ApT, real *Bp, int64_t er) {
    const int64_t D = p->D, O = p->O, r = p->r, R = p->rg, rp = p->rp;
    const int64_t e = er / r, j = er % r, q = er / R, jq = er % R;
    for (int64_t d = 0; (Ap || ApT) && d < D; d++) {
        const real a = in_mask ? A[er * D + d] * in_mask[e * D + d] : A[er * D + d];
        if (Ap) Ap[er * D + d] = a;
        if (ApT) ApT[(q * D + d) * rp + jq] = a;
    }
    for (int64_t o = 0; o < O; o++) {
        const real b = out_mask ? B[(e * O + o) * r + j] * out_mask[e * O + o] : B[(e * O + o) * r + j];
        Bt[er * O + o] = b;
        if (Bp) Bp[(q * O + o) * rp + jq] = b;
    }
}

/* Rank row er of dA = Σ_threads dAp ⊙ m_in and dB = (Σ_threads dBt)ᵀ ⊙ m_out (threads that did not run
 * have no partial). */
static void reduce_row_v3(const prob_t_v3 *p, const scratch_t_v3 *scr, int nthreads, const real *in_mask,
                       const real *out_mask, real *dA, real *dB, int64_t er) {
    const int64_t D = p->D, O = p->O, r = p->r, e = er / r, j = er % r;
    if (dA) { /* thread 0's partial is dA itself: add the others in thread order, then mask */
        real *out = dA + er * D;
        for (int t = 1; t < nthreads; t++)
            if (scr[t].dAp)
                for (int64_t d = 0; d < D; d++) out[d] += scr[t].dAp[er * D + d];
        if (in_mask)
            for (int64_t d = 0; d < D; d++) out[d] *= in_mask[e * D + d];
    }
    if (dB)
        for (int64_t o = 0; o < O; o++) {
            real acc = 0;
            for (int t = 0; t < nthreads; t++)
                if (scr[t].dBt) acc += scr[t].dBt[er * O + o];
            dB[(e * O + o) * r + j] = out_mask ? acc * out_mask[e * O + o] : acc;
        }
}

/* Iterations [lo, hi) of n that thread t of nth gets: contiguous shares, the first n % nth threads one
 * more (OpenMP's schedule(static) split, so the item → thread map, and with it the order in which dA, dB
 * are summed, is fixed). */
static void share_v3(int64_t n, int t, int nth, int64_t *lo, int64_t *hi) {
    const int64_t q = n / nth, rem = n % nth;
    *lo = t * q + min64_v3(t, rem);
    *hi = *lo + q + (t < rem);
}

/* Waits until `count` threads have arrived at *arrived (this one included). Inside one parallel region
 * every thread is awake, so the wait is only the imbalance between them: spin on it, yielding the core
 * now and then (a thread that is not running on this machine would otherwise be waited for by spinning).
 * An OpenMP barrier would do the same but, under OMP_WAIT_POLICY=PASSIVE, puts the early thread to sleep
 * in the kernel; waking it costs ~50 µs on a 2-core VM, more than a small call's whole work. */
static void spin_wait_v3(int *arrived, int count) {
    __atomic_add_fetch(arrived, 1, __ATOMIC_ACQ_REL);
    for (int64_t spins = 1; __atomic_load_n(arrived, __ATOMIC_ACQUIRE) < count; spins++) {
        if (spins % 1024 == 0) sched_yield();
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        __asm__ __volatile__("yield");
#endif
    }
}

typedef struct {
    prob_t_v3 *p;
    scratch_t_v3 *scr;
    const int32_t *order;
    const int64_t *seg;
    int64_t TB, nitems;
    int backward, want_dA, want_dB;
    /* packing and reducing the factors (split over the threads when pack_parallel) */
    const real *A, *B, *in_mask, *out_mask;
    real *Ap, *Bt, *ApT, *Bp, *dA, *dB;
    int pack_parallel, nthreads;
    int packed, done, err; /* spin_wait_v3 counters; err: some thread could not allocate its scratch */
} work_t_v3;

/* Rank rows [lo, hi) of the packed factors. */
static void pack_rows_v3(work_t_v3 *w, int64_t lo, int64_t hi) {
    for (int64_t er = lo; er < hi; er++)
        pack_row_v3(w->p, w->A, w->B, w->in_mask, w->out_mask, w->Ap, w->Bt, w->ApT, w->Bp, er);
}

/* One thread's part of the whole call, inside the parallel region (or all of it on the calling thread):
 * its share of the packing, then of the work items, then of the dA, dB reduction. The only waits are
 * spin_wait_v3 between the phases that need everybody's results, and one at the very end, so that the
 * calling thread never has to sleep at the region's closing barrier. */
static void run_thread_v3(work_t_v3 *w) {
    prob_t_v3 *p = w->p;
    const int64_t TB = w->TB, nitems = w->nitems, *seg = w->seg, ER = p->E * p->r;
    int t = 0, nth = 1;
#ifdef _OPENMP
    if (w->nthreads > 1) {
        t = omp_get_thread_num();
        nth = omp_get_num_threads(); /* the runtime may give fewer threads than asked for */
    }
#endif
    int64_t lo, hi;
    if (w->pack_parallel) {
        share_v3(ER, t, nth, &lo, &hi);
        pack_rows_v3(w, lo, hi);
        spin_wait_v3(&w->packed, nth);
    }
    scratch_t_v3 *s = &w->scr[t];
    const int ok = !scratch_alloc_v3(s, p, TB, w->backward && w->want_dA, w->backward && w->want_dB, t);
    if (!ok) __atomic_store_n(&w->err, 1, __ATOMIC_RELEASE); /* the call fails; the others still finish */
    share_v3(nitems, t, nth, &lo, &hi);
    for (int64_t it = lo; ok && it < hi; it++) {
        if (p->index) {
            int64_t e = 0, base = 0; /* item → (expert, chunk), items numbered in segment order */
            for (;; e++) {
                const int64_t chunks = (seg[e + 1] - seg[e] + TB - 1) / TB;
                if (it < base + chunks) break;
                base += chunks;
            }
            const int64_t first = seg[e] + (it - base) * TB;
            index_chunk_v3(p, s, w->order + first, min64_v3(TB, seg[e + 1] - first), e, w->backward);
        } else {
            const int64_t n0 = it * TB, n1 = min64_v3(p->N, n0 + TB);
            if (p->dense) dense_block_v3(p, s, n0, n1, w->backward);
            else topk_block_v3(p, s, n0, n1, w->backward);
        }
    }
    /* backward: dA = Σ_threads dAp ⊙ m_in,  dB = (Σ_threads dBt)ᵀ ⊙ m_out, by rank row; every partial
     * must be complete first */
    const int reduce = w->backward && (w->dA || w->dB);
    if (nth > 1) spin_wait_v3(&w->done, nth);
    if (reduce && !__atomic_load_n(&w->err, __ATOMIC_ACQUIRE) && (w->pack_parallel || t == 0)) {
        if (w->pack_parallel) share_v3(ER, t, nth, &lo, &hi);
        else lo = 0, hi = ER;
        for (int64_t er = lo; er < hi; er++) reduce_row_v3(p, w->scr, nth, w->in_mask, w->out_mask, w->dA, w->dB, er);
    }
    if (nth > 1 && reduce && w->pack_parallel) spin_wait_v3(&w->done, 2 * nth);
}

/* Packs the masked factors, builds the work list, runs it on the threads, and for the backward reduces
 * the per-thread dA, dB partials. */
static int run_v3(prob_t_v3 *p, const real *A, const real *B, const real *in_mask, const real *out_mask,
                  real *dA, real *dB, int backward) {
    const int64_t N = p->N, D = p->D, O = p->O, r = p->r, E = p->E, ER = E * r;
    const int64_t work = N * p->K * r * (D + O) * (backward ? 2 : 1); /* multiply-adds */
    int nthreads = threads_for_v3(work, (N + 7) / 8);
    const int64_t groups = p->dense ? 1 : E, R = p->dense ? ER : r, rp = (R + VL - 1) / VL * VL;
    p->rg = R;
    p->rp = rp;
    scratch_t_v3 *scr = NULL;
    int32_t *order = NULL;
    int64_t *seg = NULL, TB = 0, nitems = 0;

    /* packed factors, O(E·r·(D+O)) each, small next to the N·k·r·(D+O) of the op, and the index form's
     * work list: all from the caller's arena (slot 0) */
    const int wide = 2 * R > VL; /* rank side ≥ half a vector: broadcast kernel on ApT / Bp, else dots */
    real *Ap = NULL, *Bt = NULL, *ApT = NULL, *Bp = NULL;
    char *base = NULL;
    size_t used = 0;
    for (int pass = 0; pass < 2; pass++) { /* pass 0 measures, pass 1 carves */
        used = 0;
        Ap = in_mask ? carve_v3(&base, &used, ER * D, sizeof *Ap) : NULL;
        Bt = carve_v3(&base, &used, ER * O, sizeof *Bt);
        ApT = wide ? carve_v3(&base, &used, groups * D * rp, sizeof *ApT) : NULL;
        Bp = wide && backward ? carve_v3(&base, &used, groups * O * rp, sizeof *Bp) : NULL;
        order = p->index ? carve_v3(&base, &used, N, sizeof *order) : NULL;
        seg = p->index ? carve_v3(&base, &used, E + 2, sizeof *seg) : NULL;
        scr = carve_v3(&base, &used, nthreads, sizeof *scr);
        if (pass == 0 && !(base = arena_v3(0, used))) return 1;
    }
    if (ApT) memset(ApT, 0, groups * D * rp * sizeof *ApT); /* rank padding stays zero */
    if (Bp) memset(Bp, 0, groups * O * rp * sizeof *Bp);
    if (seg) memset(seg, 0, (E + 2) * sizeof *seg);
    memset(scr, 0, nthreads * sizeof *scr);
    p->Ap = Ap ? Ap : A;
    p->Bt = Bt;
    p->ApT = ApT;
    p->Bp = Bp;

    /* work list: token blocks (dense, top-k) or chunks of each expert's sorted tokens (index) */
    if (p->index) {
        for (int64_t n = 0; n < N; n++) /* counting sort by expert; −1 rows drop out here */
            if (p->idx[n] >= 0) seg[p->idx[n] + 2]++;
        for (int64_t e = 0; e < E; e++) seg[e + 2] += seg[e + 1];
        for (int64_t n = 0; n < N; n++) /* seg[e+1] walks through bucket e; afterwards seg[e] = its start */
            if (p->idx[n] >= 0) order[seg[p->idx[n] + 1]++] = (int32_t)n;
        real *out = backward ? p->dx : p->y;
        const int64_t ldo = backward ? D : O;
        if (out && !p->accumulate) /* base-only rows are written once, here */
            for (int64_t n = 0; n < N; n++)
                if (p->idx[n] < 0) memset(out + n * ldo, 0, ldo * sizeof *out);
        TB = min64_v3(256, block_tokens_v3(max64_v3(seg[E], 1), 1, 1, 0, nthreads));
        for (int64_t e = 0; e < E; e++) nitems += (seg[e + 1] - seg[e] + TB - 1) / TB;
    } else {
        TB = block_tokens_v3(N, E, p->K, p->dense, nthreads);
        nitems = (N + TB - 1) / TB;
    }
    if (nitems < 2) nthreads = 1;

    /* One parallel region for the whole call (packing, items, reduction), or none at all when the problem
     * is small: the calling thread then does everything without any OpenMP call. */
    work_t_v3 w = {p, scr, order, seg, TB, nitems, backward, dA != NULL, dB != NULL,
                   A, B, in_mask, out_mask, Ap, Bt, ApT, Bp, dA, dB,
                   nthreads > 1 && ER * (D + O) > 65536, nthreads, 0, 0, 0};
    if (!w.pack_parallel) pack_rows_v3(&w, 0, ER);
    if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
        run_thread_v3(&w);
    } else {
        run_thread_v3(&w);
    }
    return w.err;
}

static void setup_v3(prob_t_v3 *p, int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                     const real *x, const int32_t *idx, const real *w, const real *scale) {
    memset(p, 0, sizeof *p);
    p->N = N; p->D = D; p->O = O; p->r = r; p->E = E; p->K = K;
    p->x = x; p->idx = idx; p->w = w; p->scale = scale;
    p->dense = idx == NULL;
    p->index = idx != NULL && w == NULL;
    p->topk = idx != NULL && w != NULL;
}

/* ---- the two entry points of version 2 (lowrank.h gives the contract; lowrank_cpu_f32.c exports them) */
static int forward_v3(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                      const real *x, const real *A, const real *B, const int32_t *idx,
                      const real *w, const real *scale, const real *in_mask,
                      const real *out_mask, real *y, int accumulate) {
    if (N == 0 || D == 0 || O == 0 || r == 0 || E == 0 || K == 0) {
        if (!accumulate) memset(y, 0, (size_t)(N * O) * sizeof *y);
        return 0;
    }
    prob_t_v3 p;
    setup_v3(&p, N, D, O, r, E, K, x, idx, w, scale);
    p.y = y;
    p.accumulate = accumulate;
    return run_v3(&p, A, B, in_mask, out_mask, NULL, NULL, 0);
}

static int backward_v3(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                       const real *x, const real *A, const real *B, const int32_t *idx,
                       const real *w, const real *scale, const real *in_mask,
                       const real *out_mask, const real *dy, real *dx, real *dA, real *dB,
                       real *dgate) {
    if (dgate && w) memset(dgate, 0, (size_t)(N * K) * sizeof *dgate); /* empty slots stay 0 */
    if (idx && !w) dgate = NULL; /* the index form has no gate weights */
    if (N == 0 || D == 0 || O == 0 || r == 0 || E == 0 || K == 0 || (!dx && !dA && !dB && !dgate)) {
        if (dx) memset(dx, 0, (size_t)(N * D) * sizeof *dx);
        if (dA) memset(dA, 0, (size_t)(E * r * D) * sizeof *dA);
        if (dB) memset(dB, 0, (size_t)(E * O * r) * sizeof *dB);
        return 0;
    }
    prob_t_v3 p;
    setup_v3(&p, N, D, O, r, E, K, x, idx, w, scale);
    p.dy = dy; p.dx = dx; p.dgate = dgate; p.dA = dA;
    return run_v3(&p, A, B, in_mask, out_mask, dA, dB, 1);
}

