/* lowrank_v1.h — version 1 of the low-rank mixture kernel: the op as its equation, in plain loops.
 *
 *   y_n = Σ_entries c · B'_e (A'_e x_n)      c = w[n,j] · s_e,  A'_e = A_e ⊙ m_in_e,  B'_e = m_out_e ⊙ B_e
 *
 * One token and one gate entry (n, j) at a time: expert e = idx[n,j] (top-k, index) or j (dense), weight
 * w[n,j] (1 for the index form). No threads, no packing, no vectors: the reference that version 2 (and
 * on) must match, and the baseline its speed is compared with. Shapes and contract: lowrank.h.
 * Included by lowrank_cpu_f32.c / lowrank_cpu_f64.c with `real` defined.
 */

/* Entry (n, j): its expert (−1 = none) and its coefficient c = weight · scale. */
static int64_t entry_v1(const int32_t *idx, const real *w, const real *scale, int64_t K, int64_t n, int64_t j,
                        real *c) {
    const int64_t e = idx ? idx[n * K + j] : j;
    *c = e < 0 ? 0 : (w ? w[n * K + j] : 1) * scale[e];
    return e;
}

static real a_v1(const real *A, const real *in_mask, int64_t D, int64_t r, int64_t e, int64_t q, int64_t d) {
    return A[(e * r + q) * D + d] * (in_mask ? in_mask[e * D + d] : 1); /* A'[e, q, d] */
}

static real b_v1(const real *B, const real *out_mask, int64_t O, int64_t r, int64_t e, int64_t o, int64_t q) {
    return B[(e * O + o) * r + q] * (out_mask ? out_mask[e * O + o] : 1); /* B'[e, o, q] */
}

static int forward_v1(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K, const real *x,
                      const real *A, const real *B, const int32_t *idx, const real *w, const real *scale,
                      const real *in_mask, const real *out_mask, real *y, int accumulate) {
    real *h = malloc((r + 1) * sizeof *h); /* (r) A'_e x_n */
    if (!h) return 1;
    for (int64_t n = 0; n < N; n++) {
        if (!accumulate) memset(y + n * O, 0, O * sizeof *y);
        for (int64_t j = 0; j < K && r > 0 && E > 0; j++) {
            real c;
            const int64_t e = entry_v1(idx, w, scale, K, n, j, &c);
            if (e < 0 || c == 0) continue; /* skipped, not multiplied by zero */
            for (int64_t q = 0; q < r; q++) {
                h[q] = 0;
                for (int64_t d = 0; d < D; d++) h[q] += a_v1(A, in_mask, D, r, e, q, d) * x[n * D + d];
            }
            for (int64_t o = 0; o < O; o++) {
                real u = 0;
                for (int64_t q = 0; q < r; q++) u += b_v1(B, out_mask, O, r, e, o, q) * h[q];
                y[n * O + o] += c * u;
            }
        }
    }
    free(h);
    return 0;
}

/*   g = B'ᵀ dy_n (rank space), h = A' x_n:   dgate = s⟨g, h⟩,  dx_n += c A'ᵀ g,
 *   dA += (c g x_nᵀ) ⊙ m_in,  dB += (c dy_n hᵀ) ⊙ m_out                                                  */
static int backward_v1(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K, const real *x,
                       const real *A, const real *B, const int32_t *idx, const real *w, const real *scale,
                       const real *in_mask, const real *out_mask, const real *dy, real *dx, real *dA, real *dB,
                       real *dgate) {
    if (idx && !w) dgate = NULL; /* the index form has no gate weights */
    if (dx) memset(dx, 0, N * D * sizeof *dx);
    if (dA) memset(dA, 0, E * r * D * sizeof *dA);
    if (dB) memset(dB, 0, E * O * r * sizeof *dB);
    if (dgate) memset(dgate, 0, N * K * sizeof *dgate); /* empty slots stay 0 */
    real *h = malloc((2 * r + 1) * sizeof *h), *g = h + r; /* (r) A'_e x_n, (r) B'_eᵀ dy_n */
    if (!h) return 1;
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < K && r > 0 && E > 0; j++) {
            real c;
            const int64_t e = entry_v1(idx, w, scale, K, n, j, &c);
            if (e < 0 || (c == 0 && !dgate)) continue;
            for (int64_t q = 0; q < r; q++) {
                h[q] = g[q] = 0;
                for (int64_t d = 0; d < D; d++) h[q] += a_v1(A, in_mask, D, r, e, q, d) * x[n * D + d];
                for (int64_t o = 0; o < O; o++) g[q] += b_v1(B, out_mask, O, r, e, o, q) * dy[n * O + o];
            }
            if (dgate) { /* d y / d w does not depend on w: filled for zero weights too */
                real dot = 0;
                for (int64_t q = 0; q < r; q++) dot += g[q] * h[q];
                dgate[n * K + j] = scale[e] * dot;
            }
            if (c == 0) continue;
            for (int64_t q = 0; q < r; q++)
                for (int64_t d = 0; d < D; d++) {
                    if (dx) dx[n * D + d] += c * g[q] * a_v1(A, in_mask, D, r, e, q, d);
                    if (dA) dA[(e * r + q) * D + d] += c * g[q] * x[n * D + d] * (in_mask ? in_mask[e * D + d] : 1);
                }
            for (int64_t o = 0; o < O && dB; o++)
                for (int64_t q = 0; q < r; q++)
                    dB[(e * O + o) * r + q] += c * dy[n * O + o] * h[q] * (out_mask ? out_mask[e * O + o] : 1);
        }
    free(h);
    return 0;
}
