// lowrank_cuda.cu — float32 CUDA kernels of the low-rank mixture op (docs/methods.md §8), extern "C" API
// declared at the end of ext/lowrank.h and loaded from Python with cffi ABI mode (kernels/cuda.py).
//
//   y_n = Σ_slots c · B'_e (A'_e x_n)      c = w[n,s] · scale[e],  A' = A ⊙ m_in,  B' = m_out ⊙ B
//
// Shape legend: N tokens, D in, O out, r rank, E experts, K gate entries (slots) per token, TM tokens
// per thread block, RC rank rows per register chunk, P = N·K (token, slot) pairs.
//   x (N,D)  A (E,r,D)  B (E,O,r)  y, dy (N,O)  idx (N,K) or NULL (dense)  w (N,K) or NULL (index)
//
// Kernels (each one simple; versions are numbered the llm.c way when a faster one is added):
//   forward_v1        one block per TM tokens, one warp per token. For every slot: the warp forms
//                     h = c·A'x in shared memory (float32, never in global memory), then all threads
//                     add B'h into the block's own y rows (no atomics: a row belongs to one block).
//   backward_tokens   same layout: h and g = B'ᵀdy in shared memory, dgate = s⟨g,h⟩ (rank space),
//                     dx += A'ᵀ(c·g); writes c·g and c·h per pair to a workspace for dA, dB.
//   count/scan/scatter  counting sort of the active pairs by expert (lists of pair ids).
//   backward_weights  one block per (expert, rank chunk, column tile): dA = Σ_pairs (c·g) xᵀ and
//                     dB = Σ_pairs dy (c·h)ᵀ over the expert's list, RC sums per thread in registers.
// Entries with c = 0 or expert −1 are skipped everywhere (an all-zero row of y is exactly 0).
#include <cuda_runtime.h>
#include <stdint.h>
#include <stddef.h>

#define TM 8            // tokens per block = warps per block
#define THREADS (TM * 32)
#define RC 4            // rank rows per register chunk

// expert and coefficient of pair (n, s) for the three gate forms (see lowrank.h)
__device__ __forceinline__ int pair_expert(const int32_t *idx, int64_t K, int64_t n, int64_t s) {
    return idx ? idx[n * K + s] : (int)s;
}
__device__ __forceinline__ float pair_coef(const float *w, const float *scale, int64_t K, int64_t n, int64_t s,
                                           int e) {
    return (w ? w[n * K + s] : 1.f) * scale[e];
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// out[j] = Σ_d x[d]·m_in[d]·A_e[j,d] for j < r, one warp; lane 0 holds the sums (scaled by c).
__device__ void warp_project_in(const float *x, const float *Ae, const float *m_in, int64_t D, int64_t r,
                                float c, float *out, int lane) {
    for (int64_t j0 = 0; j0 < r; j0 += RC) {
        float acc[RC] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t d = lane; d < D; d += 32) {
            const float xv = m_in ? x[d] * m_in[d] : x[d];
#pragma unroll
            for (int q = 0; q < RC; q++)
                if (j0 + q < r) acc[q] += xv * Ae[(j0 + q) * D + d];
        }
#pragma unroll
        for (int q = 0; q < RC; q++) {
            const float v = warp_sum(acc[q]);
            if (lane == 0 && j0 + q < r) out[j0 + q] = c * v;
        }
    }
}

// out[j] = Σ_o dy[o]·m_out[o]·B_e[o,j] for j < r (g = B'ᵀ dy), one warp.
__device__ void warp_project_out(const float *dy, const float *Be, const float *m_out, int64_t O, int64_t r,
                                 float *out, int lane) {
    for (int64_t j0 = 0; j0 < r; j0 += RC) {
        float acc[RC] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t o = lane; o < O; o += 32) {
            const float dv = m_out ? dy[o] * m_out[o] : dy[o];
#pragma unroll
            for (int q = 0; q < RC; q++)
                if (j0 + q < r) acc[q] += dv * Be[o * r + j0 + q];
        }
#pragma unroll
        for (int q = 0; q < RC; q++) {
            const float v = warp_sum(acc[q]);
            if (lane == 0 && j0 + q < r) out[j0 + q] = v;
        }
    }
}

// ---- forward ------------------------------------------------------------------------------------------
// shared: h (TM, r) = c·A'x per token of the block; ex (TM) its expert or −1 when the pair is skipped
__global__ void forward_v1(int64_t N, int64_t D, int64_t O, int64_t r, int64_t K, const float *x,
                           const float *A, const float *B, const int32_t *idx, const float *w,
                           const float *scale, const float *in_mask, const float *out_mask, float *y) {
    extern __shared__ float smem[];
    float *h = smem;                         // (TM, r)
    __shared__ int ex[TM];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t n0 = (int64_t)blockIdx.x * TM;

    for (int t = 0; t < TM && n0 + t < N; t++)  // this block's rows start at exactly 0
        for (int64_t o = threadIdx.x; o < O; o += blockDim.x) y[(n0 + t) * O + o] = 0.f;

    for (int64_t s = 0; s < K; s++) {
        const int64_t n = n0 + warp;
        int e = -1;
        float c = 0.f;
        if (n < N) {
            e = pair_expert(idx, K, n, s);
            if (e >= 0) c = pair_coef(w, scale, K, n, s, e);
            if (c == 0.f) e = -1;            // skipped, not multiplied by zero
        }
        if (e >= 0)                          // warp-uniform branch
            warp_project_in(x + n * D, A + (int64_t)e * r * D, in_mask ? in_mask + (int64_t)e * D : nullptr, D, r,
                            c, h + warp * r, lane);
        if (lane == 0) ex[warp] = e;
        __syncthreads();
        for (int64_t o = threadIdx.x; o < O; o += blockDim.x)
            for (int t = 0; t < TM; t++) {
                const int et = ex[t];
                if (et < 0) continue;
                const float *Bo = B + ((int64_t)et * O + o) * r;
                float acc = 0.f;
                for (int64_t j = 0; j < r; j++) acc += Bo[j] * h[t * r + j];
                if (out_mask) acc *= out_mask[(int64_t)et * O + o];
                y[(n0 + t) * O + o] += acc;
            }
        __syncthreads();                     // h and ex are rewritten by the next slot
    }
}

// ---- backward, per token: dgate, dx, and the rank vectors c·g, c·h of every pair ----------------------
// wg, wh (P, r): c·g and c·h for active pairs (zeros elsewhere; only listed pairs are read later)
__global__ void backward_tokens(int64_t N, int64_t D, int64_t O, int64_t r, int64_t K, const float *x,
                                const float *A, const float *B, const int32_t *idx, const float *w,
                                const float *scale, const float *in_mask, const float *out_mask,
                                const float *dy, float *dx, float *dgate, float *wg, float *wh) {
    extern __shared__ float smem[];
    float *h = smem, *g = smem + TM * r;     // (TM, r) each
    __shared__ int ex[TM];
    __shared__ float cf[TM];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t n0 = (int64_t)blockIdx.x * TM;

    if (dx)
        for (int t = 0; t < TM && n0 + t < N; t++)
            for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dx[(n0 + t) * D + d] = 0.f;

    for (int64_t s = 0; s < K; s++) {
        const int64_t n = n0 + warp;
        int e = -1;
        float c = 0.f;
        if (n < N) {
            e = pair_expert(idx, K, n, s);
            if (e >= 0) c = pair_coef(w, scale, K, n, s, e);
        }
        const bool want_gate = dgate && w && e >= 0;    // dgate exists for every listed entry
        const bool active = e >= 0 && c != 0.f;         // only these reach dx, dA, dB
        if (want_gate || active) {                      // warp-uniform
            warp_project_in(x + n * D, A + (int64_t)e * r * D, in_mask ? in_mask + (int64_t)e * D : nullptr, D, r,
                            1.f, h + warp * r, lane);
            warp_project_out(dy + n * O, B + (int64_t)e * O * r, out_mask ? out_mask + (int64_t)e * O : nullptr,
                             O, r, g + warp * r, lane);
        }
        __syncwarp();
        if (lane == 0 && n < N) {
            float dot = 0.f;
            if (want_gate || active)
                for (int64_t j = 0; j < r; j++) dot += g[warp * r + j] * h[warp * r + j];
            if (dgate && w) dgate[n * K + s] = want_gate ? scale[e] * dot : 0.f;  // s_e⟨g, h⟩
            for (int64_t j = 0; j < r; j++) {                                   // pair's rank vectors
                wg[(n * K + s) * r + j] = active ? c * g[warp * r + j] : 0.f;
                wh[(n * K + s) * r + j] = active ? c * h[warp * r + j] : 0.f;
            }
            ex[warp] = active ? e : -1;
            cf[warp] = c;
        }
        __syncthreads();
        if (dx)  // dx_n += A'ᵀ (c·g): y depends on x through c·B'A'x
            for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
                for (int t = 0; t < TM; t++) {
                    const int et = ex[t];
                    if (et < 0) continue;
                    const float *Ae = A + (int64_t)et * r * D;
                    float acc = 0.f;
                    for (int64_t j = 0; j < r; j++) acc += Ae[j * D + d] * g[t * r + j];
                    acc *= cf[t];
                    if (in_mask) acc *= in_mask[(int64_t)et * D + d];
                    dx[(n0 + t) * D + d] += acc;
                }
        __syncthreads();
    }
}

// ---- counting sort of the active pairs by expert ------------------------------------------------------
__device__ __forceinline__ int active_expert(const int32_t *idx, const float *w, const float *scale, int64_t K,
                                             int64_t p) {
    const int64_t n = p / K, s = p % K;
    const int e = pair_expert(idx, K, n, s);
    return (e >= 0 && pair_coef(w, scale, K, n, s, e) != 0.f) ? e : -1;
}

__global__ void count_pairs(int64_t P, int64_t K, const int32_t *idx, const float *w, const float *scale,
                            int *count) {
    for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < P; p += (int64_t)gridDim.x * blockDim.x) {
        const int e = active_expert(idx, w, scale, K, p);
        if (e >= 0) atomicAdd(&count[e + 1], 1);
    }
}

__global__ void scan_counts(int64_t E, int *count, int *cursor) {  // one thread: E is small
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        for (int64_t e = 0; e < E; e++) count[e + 1] += count[e];
        for (int64_t e = 0; e <= E; e++) cursor[e] = count[e];
    }
}

__global__ void scatter_pairs(int64_t P, int64_t K, const int32_t *idx, const float *w, const float *scale,
                              int *cursor, int64_t *list) {
    for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < P; p += (int64_t)gridDim.x * blockDim.x) {
        const int e = active_expert(idx, w, scale, K, p);
        if (e >= 0) list[atomicAdd(&cursor[e], 1)] = p;
    }
}

// ---- backward, per expert: dW_e[j, col] = mask[col] · Σ_{pairs p of e} v[p, j] · rows[n_p, col] ---------
// dA: v = c·g, rows = x (cols D), out (E, r, D) at [j*D + col]
// dB: v = c·h, rows = dy (cols O), out (E, O, r) at [col*r + j]
__global__ void backward_weights(int64_t L, int64_t r, int64_t K, const int *start, const int64_t *list,
                                 const float *v, const float *rows, const float *mask, float *out,
                                 int transposed) {
    const int64_t e = blockIdx.z, j0 = (int64_t)blockIdx.y * RC;
    const int64_t col = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= L) return;
    float acc[RC] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t i = start[e]; i < start[e + 1]; i++) {
        const int64_t p = list[i], n = p / K;
        const float rv = rows[n * L + col];
#pragma unroll
        for (int q = 0; q < RC; q++)
            if (j0 + q < r) acc[q] += v[p * r + j0 + q] * rv;   // same address across the warp: broadcast
    }
    const float m = mask ? mask[e * L + col] : 1.f;
#pragma unroll
    for (int q = 0; q < RC; q++) {
        if (j0 + q >= r) continue;
        const int64_t at = transposed ? (e * L + col) * r + j0 + q : (e * r + j0 + q) * L + col;
        out[at] = acc[q] * m;
    }
}

// ---- extern "C" API -------------------------------------------------------------------------------------
extern "C" {

int tsl_cuda_forward(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K, const float *x,
                     const float *A, const float *B, const int32_t *idx, const float *w, const float *scale,
                     const float *in_mask, const float *out_mask, float *y, void *stream) {
    cudaStream_t st = (cudaStream_t)stream;
    if (N == 0 || O == 0) return 0;
    if (D == 0 || r == 0 || E == 0 || K == 0)
        return (int)cudaMemsetAsync(y, 0, (size_t)(N * O) * sizeof(float), st);
    const size_t smem = (size_t)TM * r * sizeof(float);
    forward_v1<<<(unsigned)((N + TM - 1) / TM), THREADS, smem, st>>>(N, D, O, r, K, x, A, B, idx, w, scale,
                                                                     in_mask, out_mask, y);
    return (int)cudaGetLastError();
}

int tsl_cuda_backward(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K, const float *x,
                      const float *A, const float *B, const int32_t *idx, const float *w, const float *scale,
                      const float *in_mask, const float *out_mask, const float *dy, float *dx, float *dA,
                      float *dB, float *dgate, void *stream) {
    cudaStream_t st = (cudaStream_t)stream;
    cudaError_t err = cudaSuccess;
    if (!w) dgate = nullptr;  // the index form has no gate weights
    if (N == 0 || D == 0 || O == 0 || r == 0 || E == 0 || K == 0) {
        if (dx) err = cudaMemsetAsync(dx, 0, (size_t)(N * D) * sizeof(float), st);
        if (!err && dA) err = cudaMemsetAsync(dA, 0, (size_t)(E * r * D) * sizeof(float), st);
        if (!err && dB) err = cudaMemsetAsync(dB, 0, (size_t)(E * O * r) * sizeof(float), st);
        if (!err && dgate) err = cudaMemsetAsync(dgate, 0, (size_t)(N * K) * sizeof(float), st);
        return (int)err;
    }
    const int64_t P = N * K;
    float *wg = nullptr, *wh = nullptr;
    int *count = nullptr, *cursor = nullptr;
    int64_t *list = nullptr;
    const bool weights = dA || dB;
    if ((err = cudaMallocAsync((void **)&wg, (size_t)(P * r) * sizeof(float), st))) goto done;
    if ((err = cudaMallocAsync((void **)&wh, (size_t)(P * r) * sizeof(float), st))) goto done;
    {
        const size_t smem = 2 * (size_t)TM * r * sizeof(float);
        backward_tokens<<<(unsigned)((N + TM - 1) / TM), THREADS, smem, st>>>(
            N, D, O, r, K, x, A, B, idx, w, scale, in_mask, out_mask, dy, dx, dgate, wg, wh);
        if ((err = cudaGetLastError())) goto done;
    }
    if (weights) {
        if ((err = cudaMallocAsync((void **)&count, (size_t)(E + 1) * sizeof(int), st))) goto done;
        if ((err = cudaMallocAsync((void **)&cursor, (size_t)(E + 1) * sizeof(int), st))) goto done;
        if ((err = cudaMallocAsync((void **)&list, (size_t)P * sizeof(int64_t), st))) goto done;
        if ((err = cudaMemsetAsync(count, 0, (size_t)(E + 1) * sizeof(int), st))) goto done;
        const unsigned grid = (unsigned)((P + 255) / 256 < 4096 ? (P + 255) / 256 : 4096);
        count_pairs<<<grid, 256, 0, st>>>(P, K, idx, w, scale, count);
        scan_counts<<<1, 1, 0, st>>>(E, count, cursor);
        scatter_pairs<<<grid, 256, 0, st>>>(P, K, idx, w, scale, cursor, list);
        if ((err = cudaGetLastError())) goto done;
        const unsigned rchunks = (unsigned)((r + RC - 1) / RC);
        if (dA) {
            dim3 g((unsigned)((D + 127) / 128), rchunks, (unsigned)E);
            backward_weights<<<g, 128, 0, st>>>(D, r, K, count, list, wg, x, in_mask, dA, 0);
        }
        if (dB) {
            dim3 g((unsigned)((O + 127) / 128), rchunks, (unsigned)E);
            backward_weights<<<g, 128, 0, st>>>(O, r, K, count, list, wh, dy, out_mask, dB, 1);
        }
        err = cudaGetLastError();
    }
done:
    if (wg) cudaFreeAsync(wg, st);
    if (wh) cudaFreeAsync(wh, st);
    if (count) cudaFreeAsync(count, st);
    if (cursor) cudaFreeAsync(cursor, st);
    if (list) cudaFreeAsync(list, st);
    return (int)err;
}

int tsl_cuda_device_count(int *count) { return (int)cudaGetDeviceCount(count); }

int tsl_cuda_device_name(int device, char *name, int length) {
    cudaDeviceProp prop;
    cudaError_t err = cudaGetDeviceProperties(&prop, device);
    if (err) return (int)err;
    int i = 0;
    for (; i < length - 1 && prop.name[i]; i++) name[i] = prop.name[i];
    if (length > 0) name[i] = 0;
    return 0;
}

const char *tsl_cuda_error_string(int error) { return cudaGetErrorString((cudaError_t)error); }

int tsl_cuda_malloc(void **ptr, size_t bytes) { return (int)cudaMalloc(ptr, bytes ? bytes : 1); }

int tsl_cuda_free(void *ptr) { return (int)cudaFree(ptr); }

int tsl_cuda_memcpy(void *dst, const void *src, size_t bytes, int kind) {
    const cudaMemcpyKind k = kind == 1 ? cudaMemcpyHostToDevice
                           : kind == 2 ? cudaMemcpyDeviceToHost : cudaMemcpyDeviceToDevice;
    return (int)cudaMemcpy(dst, src, bytes, k);
}

int tsl_cuda_synchronize(void) { return (int)cudaDeviceSynchronize(); }

}  // extern "C"
