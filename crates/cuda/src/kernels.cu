// flashmoe CUDA kernels, compiled at run time by NVRTC for the device's architecture.
// No headers: bf16/f16 are decoded by hand so NVRTC needs no include path.
// Every kernel has a CPU twin in flashmoe_core (kernels::*_ref and the model's CPU path);
// crates/cuda/tests/device.rs compares them.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
#define INFINITY __int_as_float(0x7f800000)

#define MAXP 16
// Up to MAXP independent matrix-vector products of one shape and format in one launch
// (blockIdx.y picks the problem): the K routed experts of a layer, or a single matrix.
struct MvBatch {
    u64 w[MAXP];
    u64 s[MAXP];
    u64 b[MAXP];
    u64 x[MAXP];
    u64 y[MAXP];
};
// Argument structs are passed by value from Rust (device.rs mirrors them with #[repr(C)] and
// asserts the same sizes there, and the field offsets, which NVRTC cannot evaluate at compile
// time): a field added or removed on one side only fails the build.
static_assert(sizeof(MvBatch) == 5 * MAXP * 8, "MvBatch layout (device.rs)");

__device__ __forceinline__ float bf16f(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ float f16f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
// SDT/DT: 0 = bf16, 1 = f16, 2 = f32.
template <int SDT> __device__ __forceinline__ float ldsc(const void* p, long i) {
    if (SDT == 0) return bf16f(__ldg((const u16*)p + i));
    if (SDT == 1) return f16f(__ldg((const u16*)p + i));
    return __ldg((const float*)p + i);
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum over the block; every thread gets the result. `red` holds >= 32 floats.
__device__ float block_sum(float v, float* red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    float t = 0.f;
    for (int i = 0; i < nw; i++) t += red[i];
    return t;
}
// Programmatic dependent launch (sm_90+; no-ops when the kernel was launched plainly): a
// primary releases its dependent grid, which may then start and must wait before reading the
// primary's output.
__device__ __forceinline__ void pdl_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Greedy decoding's order-preserving key of (value, index): see argmax_f32.
__device__ __forceinline__ u64 amax_key(float v, int i) {
    u32 b = __float_as_uint(v);
    u32 o = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    if (v != v) o = 0;
    return ((u64)o << 32) | (u32)~(u32)i;
}
__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ float siluf_(float x) { return x / (1.f + expf(-x)); }

// ---------------------------------------------------------------------------------------------
// Affine (MLX) quantised matvec / small matmul. W [rows, cols*BITS/32] u32 LSB-first, scales and
// biases [rows, cols/group]. Per group: y += s * sum(q*x) + b * sum(x) (bias folded, no
// dequantised weight is ever formed). A warp owns R rows; each lane reads 16-byte chunks
// (4 words) with the next chunk's loads issued before the current one is used.
// ---------------------------------------------------------------------------------------------
// Exact code extraction without integer-to-float conversion (I2F runs at quarter rate and was
// the bottleneck): a code masked in place at bit offset o < 16 of a 16-bit half, OR'ed into the
// mantissa of 2^23, is the float 2^23 + q * 2^o exactly; subtracting 2^23 leaves q * 2^o. One
// accumulator per in-half position p collects sum(q * 2^(p*BITS) * x) and is scaled back by
// 2^-(p*BITS) (exact) when the group is flushed.
template <int BITS> __device__ __forceinline__ float mag(u32 half16, int p) {
    return __int_as_float(0x4B000000u | (half16 & (((1u << BITS) - 1u) << (p * BITS)))) - 8388608.f;
}

// Shared-memory copy of x, padded by 4 floats every 32 so that lanes reading 16 bytes at a
// stride of 32 elements hit different banks.
__device__ __forceinline__ int xpad(int e) { return e + ((e >> 5) << 2); }

template <int BITS, int SDT, int R, int NT, bool XSM>
__device__ __forceinline__ void qmv_chunk(const uint4* wv, int e0, int lg, const void* S, const void* B,
                                          const int* rowv, int gpr, const float* X, int ldx, int ntok,
                                          int t0, float (*acc)[NT]) {
    const int EPW = 32 / BITS;  // elements per word
    const int E16 = 16 / BITS;  // positions per 16-bit half
    float d[R][NT][E16], xs[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) {
        xs[t] = 0.f;
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int p = 0; p < E16; p++) d[r][t][p] = 0.f;
    }
    int gcur = e0 >> lg;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        int e = e0 + k * EPW;
        int g = e >> lg;
        if (g != gcur) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                float s = ldsc<SDT>(S, (long)rowv[r] * gpr + gcur), b = ldsc<SDT>(B, (long)rowv[r] * gpr + gcur);
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    float dot = 0.f;
#pragma unroll
                    for (int p = 0; p < E16; p++) {
                        dot += d[r][t][p] * __int_as_float((127 - p * BITS) << 23);
                        d[r][t][p] = 0.f;
                    }
                    acc[r][t] += s * dot + b * xs[t];
                }
            }
#pragma unroll
            for (int t = 0; t < NT; t++) xs[t] = 0.f;
            gcur = g;
        }
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t0 + t >= ntok) break;
            float xv[EPW];
#pragma unroll
            for (int i = 0; i < EPW / 4; i++) {
                float4 f;
                if (XSM) f = *(const float4*)(X + xpad(e + 4 * i));
                else f = __ldg((const float4*)(X + (long)(t0 + t) * ldx + e) + i);
                xv[4 * i] = f.x; xv[4 * i + 1] = f.y; xv[4 * i + 2] = f.z; xv[4 * i + 3] = f.w;
            }
#pragma unroll
            for (int i = 0; i < EPW; i++) xs[t] += xv[i];
#pragma unroll
            for (int r = 0; r < R; r++) {
                u32 w = (k == 0) ? wv[r].x : (k == 1) ? wv[r].y : (k == 2) ? wv[r].z : wv[r].w;
                u32 lo = w & 0xffffu, hi = w >> 16;
#pragma unroll
                for (int p = 0; p < E16; p++) {
                    d[r][t][p] += mag<BITS>(lo, p) * xv[p];
                    d[r][t][p] += mag<BITS>(hi, p) * xv[E16 + p];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        float s = ldsc<SDT>(S, (long)rowv[r] * gpr + gcur), b = ldsc<SDT>(B, (long)rowv[r] * gpr + gcur);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float dot = 0.f;
#pragma unroll
            for (int p = 0; p < E16; p++) dot += d[r][t][p] * __int_as_float((127 - p * BITS) << 23);
            acc[r][t] += s * dot + b * xs[t];
        }
    }
}

template <int BITS, int SDT, int R, int NT, int D, bool XSM>
__device__ void qmv_body(const MvBatch& p, int rows, int cols, int lg, int ntok, int ldx, int ldy) {
    extern __shared__ float xsm[];
    const int EPW = 32 / BITS;
    const u32 MASK = (1u << BITS) - 1u;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const u32* W = (const u32*)p.w[blockIdx.y];
    const void* S = (const void*)p.s[blockIdx.y];
    const void* B = (const void*)p.b[blockIdx.y];
    const float* Xg = (const float*)p.x[blockIdx.y];
    float* Y = (float*)p.y[blockIdx.y];
    if (XSM) {
        // 16-byte loads, several in flight per thread: staging is one L2 round trip, not
        // cols / blockDim of them. A float4 at e (a multiple of 4) stays inside its 32-float
        // run of the padded layout.
        if ((cols & 3) == 0) {
#pragma unroll 4
            for (int e = threadIdx.x * 4; e < cols; e += blockDim.x * 4)
                *(float4*)(xsm + xpad(e)) = __ldg((const float4*)(Xg + e));
        } else {
            for (int i = threadIdx.x; i < cols; i += blockDim.x) xsm[xpad(i)] = __ldg(Xg + i);
        }
        __syncthreads();
    }
    const float* X = XSM ? xsm : Xg;
    const int wpr = cols / EPW, gpr = cols >> lg;
    const bool vec = (wpr & 3) == 0;
    const int nch = vec ? wpr / 4 : 0;
    const int groups = (rows + nw * R - 1) / (nw * R);
    for (int grp = blockIdx.x; grp < groups; grp += gridDim.x) {
    const int row0 = (grp * nw + warp) * R;
    if (row0 >= rows) continue;
    int rowv[R];
#pragma unroll
    for (int r = 0; r < R; r++) rowv[r] = min(row0 + r, rows - 1);
    for (int t0 = 0; t0 < ntok; t0 += NT) {
        float acc[R][NT];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < NT; t++) acc[r][t] = 0.f;
        // D chunks per lane in flight before any is used: one memory latency per D chunks.
        for (int c0 = lane; c0 < nch; c0 += 32 * D) {
            uint4 wv[D][R];
#pragma unroll
            for (int d = 0; d < D; d++)
#pragma unroll
                for (int r = 0; r < R; r++)
                    if (c0 + 32 * d < nch) wv[d][r] = __ldg((const uint4*)(W + (long)rowv[r] * wpr) + c0 + 32 * d);
#pragma unroll
            for (int d = 0; d < D; d++)
                if (c0 + 32 * d < nch)
                    qmv_chunk<BITS, SDT, R, NT, XSM>(wv[d], (c0 + 32 * d) * 4 * EPW, lg, S, B, rowv, gpr, X, ldx,
                                                     ntok, t0, acc);
        }
        // Rows whose word count is not a multiple of 4: one word per lane, scalar.
        if (!vec) {
            for (int wi = lane; wi < wpr; wi += 32) {
                int e = wi * EPW, g = e >> lg;
#pragma unroll
                for (int r = 0; r < R; r++) {
                    u32 w = __ldg(W + (long)rowv[r] * wpr + wi);
                    float s = ldsc<SDT>(S, (long)rowv[r] * gpr + g), b = ldsc<SDT>(B, (long)rowv[r] * gpr + g);
#pragma unroll
                    for (int t = 0; t < NT; t++) {
                        if (t0 + t >= ntok) break;
                        float d = 0.f, xs = 0.f;
                        for (int i = 0; i < EPW; i++) {
                            float xi = XSM ? X[xpad(e + i)] : X[(long)(t0 + t) * ldx + e + i];
                            d += (float)((w >> (i * BITS)) & MASK) * xi;
                            xs += xi;
                        }
                        acc[r][t] += s * d + b * xs;
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < NT; t++) {
                float v = warp_sum(acc[r][t]);
                if (lane == 0 && row0 + r < rows && t0 + t < ntok) Y[(long)(t0 + t) * ldy + row0 + r] = v;
            }
    }
    }
}

// dp4a with an unsigned first operand (packed codes) and a signed second (int8 x).
__device__ __forceinline__ int dp4a_us(u32 a, u32 b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// ---------------------------------------------------------------------------------------------
// Decode matvec on the integer dot-product unit with x quantised once per product (`mp`
// kernels; `quant_x3_*` writes the prepared x). Three int8 levels per element,
// x ~= sc * (q0 + (q1 + q2 / 254) / 254) per block of XB elements with sc = max|x| / 127: the
// error is at most sc / (2 * 254^2), about 6e-8 of the block's largest element (f32 rounding
// territory, unlike the two-level `mq`, whose 16 bits moved a near-tied router choice).
// Layout of one prepared x (qx_size bytes): per chunk of 4 words, CS = 4 * WB + 16 bytes with
// WB = 3 * EPW (word k's levels at k * WB + l * EPW, element i of the word at byte
// (i % PER) * 4 + i / PER, the order a masked code word unpacks to); then nxb floats sc / 254
// and nxb floats of block sums (the bias term).
// ---------------------------------------------------------------------------------------------
template <int BITS> __device__ __forceinline__ int qx_size(int cols) {
    const int EPW = 32 / BITS, XB = 4 * EPW < 32 ? 4 * EPW : 32, CS = 12 * EPW + 16;
    return ((cols / (4 * EPW)) * CS + (cols / XB) * 8 + 15) & ~15;
}

// One element's share of preparing x: called by all 32 lanes of a warp with consecutive,
// warp-aligned e (the XB-lane segments are x blocks); lanes with e >= cols pass v = 0 and write
// nothing. Producers of a matvec's input (norms, SwiGLU) call it to prepare x as they write it.
template <int BITS> __device__ __forceinline__ void quant_x3_elem(float v, int e, int cols, unsigned char* out) {
    const int EPW = 32 / BITS, PER = 8 / BITS;
    const int XB = 4 * EPW < 32 ? 4 * EPW : 32, WB = 3 * EPW, CS = 4 * WB + 16;
    const int nch = cols / (4 * EPW), nxb = cols / XB;
    float* scx = (float*)(out + nch * CS);
    float* xbs = scx + nxb;
    float a = fabsf(v), sm = v;
#pragma unroll
    for (int o = XB / 2; o > 0; o >>= 1) {
        a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
        sm += __shfl_xor_sync(0xffffffffu, sm, o);
    }
    if (e >= cols) return;
    const float sc = a > 0.f ? a / 127.f : 1.f, u = sc * (1.f / 254.f), u2 = u * (1.f / 254.f);
    const float q0 = fminf(fmaxf(rintf(v / sc), -127.f), 127.f);
    float r = fmaf(-q0, sc, v);
    const float q1 = fminf(fmaxf(rintf(r / u), -127.f), 127.f);
    r = fmaf(-q1, u, r);
    const float q2 = fminf(fmaxf(rintf(r / u2), -127.f), 127.f);
    const int wi = e / EPW, k = e % EPW;
    unsigned char* wb = out + (wi >> 2) * CS + (wi & 3) * WB + (k % PER) * 4 + k / PER;
    wb[0] = (unsigned char)(signed char)(int)q0;
    wb[EPW] = (unsigned char)(signed char)(int)q1;
    wb[2 * EPW] = (unsigned char)(signed char)(int)q2;
    if (e % XB == 0) {
        scx[e / XB] = u;
        xbs[e / XB] = sm;
    }
}

// As quant_x3_elem for the code width `bits` (2, 4 or 8; anything else prepares nothing).
__device__ __forceinline__ void quant_x3_any(int bits, float v, int e, int cols, unsigned char* out) {
    if (bits == 4) quant_x3_elem<4>(v, e, cols, out);
    else if (bits == 2) quant_x3_elem<2>(v, e, cols, out);
    else if (bits == 8) quant_x3_elem<8>(v, e, cols, out);
}

template <int BITS> __device__ void quant_x3_body(const float* X, int cols, unsigned char* out) {
    // The `mp` matvec that follows may start now: it only reads weights before its pdl_wait.
    pdl_release();
    // blockDim is a multiple of 32: each warp covers 32 consecutive elements.
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    quant_x3_elem<BITS>(e < cols ? X[e] : 0.f, e, cols, out);
}

// The PER u32 of one level of word k (x bytes in smem at `p`, aligned to 4 * PER bytes).
template <int PER> __device__ __forceinline__ void ld_level(const unsigned char* p, u32* x) {
    if (PER == 4) {
        uint4 t = *(const uint4*)p;
        x[0] = t.x; x[1 % PER] = t.y; x[2 % PER] = t.z; x[3 % PER] = t.w;
    } else if (PER == 2) {
        uint2 t = *(const uint2*)p;
        x[0] = t.x; x[1 % PER] = t.y;
    } else {
        x[0] = *(const u32*)p;
    }
}

template <int BITS, int R, int D>
__device__ __forceinline__ void prep_load(uint4 (*wv)[R], const u32* W, const int* rowv, int wpr, int c0, int nch) {
#pragma unroll
    for (int d = 0; d < D; d++)
#pragma unroll
        for (int r = 0; r < R; r++)
            if (c0 + 32 * d < nch) wv[d][r] = __ldg((const uint4*)(W + (long)rowv[r] * wpr) + c0 + 32 * d);
}

// `early`: the weights (and, for `mpi`, the batch naming them) were complete before the previous
// kernel started, so the first weight loads may precede the wait. Not so for an `mpi` launched
// right after the `router_experts` that writes its batch.
// Dependents are released at the start, or after the wait when the batch is fresh, so a
// dependent may read the batch before its own wait.
// What an `mp` launch does with its outputs besides writing them (EPI):
// 1 (`mpc`): the GatedDeltaNet causal conv of output rows < cd (one channel per row: the
//   in-projection's q, k, v), as `gdn_conv` does: u[row] = silu(sum_j w[row, j] state[j, row] +
//   w[row, K-1] y[row]) and the conv state shifted, by the lane that owns the row. Its inputs
//   are read when the row group starts (the state's writer is this kernel a token ago).
// 2 (`mpa`): greedy decoding's argmax: each block's largest amax_key over its rows, one
//   atomicMax per block into *key (zero before the launch), as `argmax_f32` does.
// The GatedDeltaNet causal conv of one channel c (arch-spec §6), as gdn_conv and the
// in-projection's `mpc` epilogue both run it: the channel's K weights w[c*K ..] and its K-1
// previous inputs state[j*cd + c] (oldest first) fetched into registers (K <= CONV_MAXK), then
// silu(sum_j cw[j] cs[j] + cw[K-1] x), with the state shifted so that x is the newest input.
#define CONV_MAXK 8
__device__ __forceinline__ void conv_fetch(const float* w, const float* state, int cd, int K, int c, float* cw,
                                           float* cs) {
#pragma unroll
    for (int j = 0; j < CONV_MAXK; j++)
        if (j < K) {
            cw[j] = w[(long)c * K + j];
            if (j < K - 1) cs[j] = state[(long)j * cd + c];
        }
}
__device__ __forceinline__ float conv_apply(const float* cw, const float* cs, float x, int K, float* state, int cd,
                                            int c) {
    float a = 0.f, wl = 0.f;
#pragma unroll
    for (int j = 0; j < CONV_MAXK; j++) {
        if (j < K - 1) a += cw[j] * cs[j];
        if (j == K - 1) wl = cw[j];
    }
    a += wl * x;
#pragma unroll
    for (int j = 0; j + 1 < CONV_MAXK - 1; j++)
        if (j + 1 < K - 1) state[(long)j * cd + c] = cs[j + 1];
    if (K > 1) state[(long)(K - 2) * cd + c] = x;
    return siluf_(a);
}

struct Epi {
    float* state;
    const float* w;
    float* u;
    int cd, K;
    u64* key;
};
static_assert(sizeof(Epi) == 40, "Epi layout (device.rs)");
template <int BITS, int SDT, int R, int D, int EPI = 0>
__device__ void qmv_prep(const MvBatch& p, int rows, int cols, int lg, const unsigned char* qx, int qb, bool early,
                         Epi ep = Epi{}) {
    extern __shared__ __align__(16) unsigned char smem[];
    if (!early) pdl_wait();
    pdl_release();
    const int EPW = 32 / BITS, PER = 8 / BITS;
    const int XB = 4 * EPW < 32 ? 4 * EPW : 32, WB = 3 * EPW, CS = 4 * WB + 16;
    const u32 M = ((1u << BITS) - 1u) * 0x01010101u;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const u32* W = (const u32*)p.w[blockIdx.y];
    const void* S = (const void*)p.s[blockIdx.y];
    const void* B = (const void*)p.b[blockIdx.y];
    float* Y = (float*)p.y[blockIdx.y];
    const int wpr = cols / EPW, nch = wpr / 4, gpr = cols >> lg, nxb = cols / XB;
    const float* scx = (const float*)(smem + nch * CS);
    const float* xbs = scx + nxb;
    const int groups = (rows + nw * R - 1) / (nw * R);
    int grp = blockIdx.x;  // < groups: the launch gives no block without rows
    int row0 = (grp * nw + warp) * R;
    int rowv[R];
#pragma unroll
    for (int r = 0; r < R; r++) rowv[r] = min(row0 + r, rows - 1);
    // EPI 1: lane r < R holds row row0 + r's conv weights and state.
    float cw[CONV_MAXK], cs[CONV_MAXK];
    auto conv_load = [&]() {
        const int row = row0 + lane;
        if (EPI == 1 && lane < R && row < rows && row < ep.cd) conv_fetch(ep.w, ep.state, ep.cd, ep.K, row, cw, cs);
    };
    conv_load();
    u64 best = 0;
    // The first weights are in flight while the prepared x is copied into shared memory.
    uint4 wv[D][R];
    prep_load<BITS, R, D>(wv, W, rowv, wpr, lane, nch);
    // Launched dependent on the producer of the prepared x (quant_x3, a norm, SwiGLU): with
    // `early`, the weights and the batch are ready, the prepared x only after this.
    if (early) pdl_wait();
    {
        const uint4* q = (const uint4*)(qx + (long)blockIdx.y * qb);
        for (int i = threadIdx.x; i < qx_size<BITS>(cols) / 16; i += blockDim.x) ((uint4*)smem)[i] = __ldg(q + i);
    }
    __syncthreads();
    while (true) {
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] = 0.f;
        for (int c0 = lane; c0 < nch; c0 += 32 * D) {
            if (c0 != lane) prep_load<BITS, R, D>(wv, W, rowv, wpr, c0, nch);
#pragma unroll
            for (int d = 0; d < D; d++) {
                const int c = c0 + 32 * d;
                if (c >= nch) break;
                // The chunk lies in one group (the launch checks group >= 4 * EPW).
                const int g = (c * 4 * EPW) >> lg;
                float s[R], b[R];
#pragma unroll
                for (int r = 0; r < R; r++) {
                    s[r] = ldsc<SDT>(S, (long)rowv[r] * gpr + g);
                    b[r] = ldsc<SDT>(B, (long)rowv[r] * gpr + g);
                }
                int i0[R], i1[R], i2[R];
#pragma unroll
                for (int r = 0; r < R; r++) { i0[r] = 0; i1[r] = 0; i2[r] = 0; }
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const unsigned char* xw = smem + c * CS + k * WB;
                    u32 x0[PER], x1[PER], x2[PER];
                    ld_level<PER>(xw, x0);
                    ld_level<PER>(xw + EPW, x1);
                    ld_level<PER>(xw + 2 * EPW, x2);
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        const u32 w = (k == 0) ? wv[d][r].x : (k == 1) ? wv[d][r].y : (k == 2) ? wv[d][r].z : wv[d][r].w;
#pragma unroll
                        for (int q = 0; q < PER; q++) {
                            const u32 wq = PER == 1 ? w : (w >> (q * BITS)) & M;
                            i0[r] = dp4a_us(wq, x0[q], i0[r]);
                            i1[r] = dp4a_us(wq, x1[q], i1[r]);
                            i2[r] = dp4a_us(wq, x2[q], i2[r]);
                        }
                    }
                    if (((k + 1) * EPW) % XB == 0) {
                        const int xb = (c * 4 * EPW + (k + 1) * EPW) / XB - 1;
                        const float u = scx[xb], xs = xbs[xb];
#pragma unroll
                        for (int r = 0; r < R; r++) {
                            // sum(q x) / u = 254^2 i0 + 254 i1 + i2. For 2/4-bit blocks of 32,
                            // |254 i0 + i1| < 2^24 stays exact in one conversion.
                            float t;
                            if (BITS == 8) t = fmaf((float)i0[r], 254.f, fmaf((float)i2[r], 1.f / 254.f, (float)i1[r]));
                            else t = fmaf((float)i2[r], 1.f / 254.f, (float)(i0[r] * 254 + i1[r]));
                            acc[r] = fmaf(s[r] * u, t, fmaf(b[r], xs, acc[r]));
                            i0[r] = 0; i1[r] = 0; i2[r] = 0;
                        }
                    }
                }
            }
        }
        float mine = 0.f;  // EPI 1: lane r's row value
#pragma unroll
        for (int r = 0; r < R; r++) {
            float v = warp_sum(acc[r]);
            if (lane == 0 && row0 + r < rows) Y[row0 + r] = v;
            if (EPI == 1 && lane == r) mine = v;
            if (EPI == 2 && row0 + r < rows) {
                const u64 k = amax_key(v, row0 + r);
                best = k > best ? k : best;
            }
        }
        if (EPI == 1) {
            const int row = row0 + lane;
            if (lane < R && row < rows && row < ep.cd) ep.u[row] = conv_apply(cw, cs, mine, ep.K, ep.state, ep.cd, row);
        }
        grp += gridDim.x;
        if (grp >= groups) break;
        row0 = (grp * nw + warp) * R;
#pragma unroll
        for (int r = 0; r < R; r++) rowv[r] = min(row0 + r, rows - 1);
        conv_load();
        prep_load<BITS, R, D>(wv, W, rowv, wpr, lane, nch);
    }
    if (EPI == 2) {
        __shared__ u64 bk[32];
        if (lane == 0) bk[warp] = best;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < nw; w++) best = bk[w] > best ? bk[w] : best;
            atomicMax((unsigned long long*)ep.key, (unsigned long long)best);
        }
    }
}

// Decode matvec on the tensor cores (mma.sync m16n8k16, f16 inputs, f32 accumulation).
// Codes become exact f16 integers with two instructions per pair: a code masked in place at bit
// offset o of each 16-bit half, OR'ed into 0x6400 (1024), is 1024 + q*2^o; one f16x2 FMA
// (* 2^-o, - 1024*2^-o) leaves q exactly. x is staged per block as f16 hi + lo parts of x * 2^k
// with one power-of-two k per 16-byte weight chunk (about 22 bits of x relative to the chunk's
// largest element), so products and sums stay in f32 on the tensor core.
// Layout: lane (g = lane/4, t = lane%4) holds rows g and g+8 of a 16-row tile, chunk t of each
// 4-chunk step. The MMA's k-slots of lane t are the elements of lane t's own chunk, and B column
// n carries x (hi for even n, lo for odd n) only on the k-slots of tig n/2, so C[row][2t..2t+1]
// is exactly the dot of that row with lane t's chunk: each lane applies its own group's scale and
// bias (group >= chunk). The 8 warps of a block split K (steps) and reduce through shared memory.
__device__ __forceinline__ u32 hfma2_(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ u16 f2h_(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// Half pair j (< 16/BITS) of word w: (code j, code 16/BITS + j) as exact f16 integers.
template <int BITS> __device__ __forceinline__ u32 dq2(u32 w, int j) {
    const int PB = 8 / BITS, s = j / PB, o = (j % PB) * BITS;
    const u32 M = (1u << BITS) - 1u;
    const u32 v = ((s ? (w >> 8) : w) & ((M << o) | (M << (16 + o)))) | 0x64006400u;
    const u32 sc = (u32)(15 - o) << 10, nb = 0x8000u | ((u32)(25 - o) << 10);
    return hfma2_(v, sc | (sc << 16), nb | (nb << 16));
}

template <int BITS, int SDT, int RT, int D>
__device__ void qmv_mma(const MvBatch& p, int rows, int cols, int lg) {
    extern __shared__ __align__(16) u32 xf[];
    __shared__ float red[8][16 * RT];
    const int EPW = 32 / BITS, HPW = 16 / BITS, HPC = 4 * HPW, CE = 4 * EPW, PS = HPC + 4;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const u32* W = (const u32*)p.w[blockIdx.y];
    const void* S = (const void*)p.s[blockIdx.y];
    const void* B = (const void*)p.b[blockIdx.y];
    const float* Xg = (const float*)p.x[blockIdx.y];
    float* Y = (float*)p.y[blockIdx.y];
    const int wpr = cols / EPW, nch = wpr / 4, gpr = cols >> lg, nst = (nch + 3) / 4;
    u32* zero = xf + nch * 2 * PS;
    float2* meta = (float2*)(zero + PS);
    const int ntiles = (rows + 16 * RT - 1) / (16 * RT);
    // Pull this warp's first weights toward L2 while x is staged.
    if ((int)blockIdx.x < ntiles) {
#pragma unroll
        for (int d = 0; d < D; d++) {
            int c = (warp + 8 * d) * 4 + t;
            if (c < nch)
#pragma unroll
                for (int i = 0; i < 2 * RT; i++) {
                    int r = min((int)blockIdx.x * 16 * RT + i * 8 + g, rows - 1);
                    asm volatile("prefetch.global.L2 [%0];" ::"l"(W + (long)r * wpr + c * 4));
                }
        }
    }
    // Stage x: per chunk, hi/lo f16 pairs in the order the codes unpack, its scale and sum.
    for (int c = threadIdx.x; c < nch; c += blockDim.x) {
        float xv[CE];
        const float4* xp = (const float4*)(Xg + (long)c * CE);
#pragma unroll
        for (int i = 0; i < CE / 4; i++) {
            float4 f = __ldg(xp + i);
            xv[4 * i] = f.x; xv[4 * i + 1] = f.y; xv[4 * i + 2] = f.z; xv[4 * i + 3] = f.w;
        }
        float m = 0.f, sm = 0.f;
#pragma unroll
        for (int i = 0; i < CE; i++) { m = fmaxf(m, fabsf(xv[i])); sm += xv[i]; }
        int k = 13 - (((__float_as_int(m) >> 23) & 0xff) - 127);
        k = min(max(k, -100), 100);
        const float sc = __int_as_float((127 + k) << 23), inv = __int_as_float((127 - k) << 23);
        u32* hi = xf + c * 2 * PS;
        u32* lo = hi + PS;
#pragma unroll
        for (int wi = 0; wi < 4; wi++)
#pragma unroll
            for (int j = 0; j < HPW; j++) {
                float a = xv[wi * EPW + j] * sc, b = xv[wi * EPW + HPW + j] * sc;
                u16 ha = f2h_(a), hb = f2h_(b);
                u16 la = f2h_(a - f16f(ha)), lb = f2h_(b - f16f(hb));
                hi[wi * HPW + j] = (u32)ha | ((u32)hb << 16);
                lo[wi * HPW + j] = (u32)la | ((u32)lb << 16);
            }
        { float2 mm; mm.x = inv; mm.y = sm; meta[c] = mm; }
    }
    for (int i = threadIdx.x; i < PS; i += blockDim.x) zero[i] = 0u;
    __syncthreads();
    const bool own = (g >> 1) == t;
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int r0 = tile * 16 * RT;
        const u32* wr[RT][2];
        long srow[RT][2];
#pragma unroll
        for (int rt = 0; rt < RT; rt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int r = min(r0 + rt * 16 + h * 8 + g, rows - 1);
                wr[rt][h] = W + (long)r * wpr;
                srow[rt][h] = (long)r * gpr;
            }
        float acc[RT][2];
#pragma unroll
        for (int rt = 0; rt < RT; rt++) acc[rt][0] = acc[rt][1] = 0.f;
        for (int s0 = warp; s0 < nst; s0 += 8 * D) {
            uint4 wv[D][RT][2];
            float sv[D][RT][2], bv[D][RT][2];
#pragma unroll
            for (int d = 0; d < D; d++) {
                const int c = (s0 + 8 * d) * 4 + t;
                const bool ok = s0 + 8 * d < nst && c < nch;
                const long gi = (long)((c * CE) >> lg);
#pragma unroll
                for (int rt = 0; rt < RT; rt++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        if (ok) {
                            wv[d][rt][h] = __ldg((const uint4*)wr[rt][h] + c);
                            sv[d][rt][h] = ldsc<SDT>(S, srow[rt][h] + gi);
                            bv[d][rt][h] = ldsc<SDT>(B, srow[rt][h] + gi);
                        } else {
                            { uint4 z; z.x = z.y = z.z = z.w = 0u; wv[d][rt][h] = z; }
                            sv[d][rt][h] = 0.f;
                            bv[d][rt][h] = 0.f;
                        }
                    }
            }
#pragma unroll
            for (int d = 0; d < D; d++) {
                if (s0 + 8 * d >= nst) break;
                const int c = (s0 + 8 * d) * 4 + t;
                const bool ok = c < nch;
                const u32* xb = (own && ok) ? xf + (c * 2 + (g & 1)) * PS : zero;
                float2 mt; mt.x = 0.f; mt.y = 0.f;
                if (ok) mt = meta[c];
                float cc[RT][4];
#pragma unroll
                for (int rt = 0; rt < RT; rt++) cc[rt][0] = cc[rt][1] = cc[rt][2] = cc[rt][3] = 0.f;
#pragma unroll
                for (int wi = 0; wi < 4; wi++) {
                    u32 bx[HPW];
#pragma unroll
                    for (int j = 0; j < HPW; j += 2) {
                        uint2 v2 = *(const uint2*)(xb + wi * HPW + j);
                        bx[j] = v2.x;
                        bx[j + 1] = v2.y;
                    }
#pragma unroll
                    for (int rt = 0; rt < RT; rt++) {
                        const uint4 q0 = wv[d][rt][0], q1 = wv[d][rt][1];
                        const u32 w0 = wi == 0 ? q0.x : wi == 1 ? q0.y : wi == 2 ? q0.z : q0.w;
                        const u32 w1 = wi == 0 ? q1.x : wi == 1 ? q1.y : wi == 2 ? q1.z : q1.w;
#pragma unroll
                        for (int j = 0; j < HPW; j += 2)
                            mma16816(cc[rt], dq2<BITS>(w0, j), dq2<BITS>(w1, j), dq2<BITS>(w0, j + 1),
                                     dq2<BITS>(w1, j + 1), bx[j], bx[j + 1]);
                    }
                }
#pragma unroll
                for (int rt = 0; rt < RT; rt++) {
                    acc[rt][0] += sv[d][rt][0] * ((cc[rt][0] + cc[rt][1]) * mt.x) + bv[d][rt][0] * mt.y;
                    acc[rt][1] += sv[d][rt][1] * ((cc[rt][2] + cc[rt][3]) * mt.x) + bv[d][rt][1] * mt.y;
                }
            }
        }
#pragma unroll
        for (int rt = 0; rt < RT; rt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float v = acc[rt][h];
                v += __shfl_xor_sync(0xffffffffu, v, 1);
                v += __shfl_xor_sync(0xffffffffu, v, 2);
                if (t == 0) red[warp][rt * 16 + h * 8 + g] = v;
            }
        __syncthreads();
        if (threadIdx.x < 16 * RT) {
            float v = 0.f;
#pragma unroll
            for (int w = 0; w < 8; w++) v += red[w][threadIdx.x];
            if (r0 + (int)threadIdx.x < rows) Y[r0 + threadIdx.x] = v;
        }
        __syncthreads();
    }
}

// Dense matvec / small matmul: W [rows, cols] in bf16, f16 or f32, 16-byte loads per lane.
template <int DT> __device__ __forceinline__ void unpack8(uint4 v, float* o) {
    if (DT == 2) {
        o[0] = __uint_as_float(v.x); o[1] = __uint_as_float(v.y); o[2] = __uint_as_float(v.z); o[3] = __uint_as_float(v.w);
    } else {
        u32 a[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            u16 lo = (u16)(a[i] & 0xffffu), hi = (u16)(a[i] >> 16);
            o[2 * i] = DT == 0 ? bf16f(lo) : f16f(lo);
            o[2 * i + 1] = DT == 0 ? bf16f(hi) : f16f(hi);
        }
    }
}
template <int DT> __device__ __forceinline__ float ld1(const void* W, long i) {
    if (DT == 2) return __ldg((const float*)W + i);
    u16 h = __ldg((const u16*)W + i);
    return DT == 0 ? bf16f(h) : f16f(h);
}

template <int DT, int R, int NT, int D>
__device__ void dmv_body(const MvBatch& p, int rows, int cols, int ntok, int ldx, int ldy) {
    const int EPV = DT == 2 ? 4 : 8;  // elements per 16 bytes
    const int ES = DT == 2 ? 4 : 2;   // element size
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const char* W = (const char*)p.w[blockIdx.y];
    const float* X = (const float*)p.x[blockIdx.y];
    float* Y = (float*)p.y[blockIdx.y];
    const bool vec = (cols % EPV) == 0;
    const int nch = vec ? cols / EPV : 0;
    const int groups = (rows + nw * R - 1) / (nw * R);
    for (int grp = blockIdx.x; grp < groups; grp += gridDim.x) {
    const int row0 = (grp * nw + warp) * R;
    if (row0 >= rows) continue;
    int rowv[R];
#pragma unroll
    for (int r = 0; r < R; r++) rowv[r] = min(row0 + r, rows - 1);
    for (int t0 = 0; t0 < ntok; t0 += NT) {
        float acc[R][NT];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < NT; t++) acc[r][t] = 0.f;
        for (int c0 = lane; c0 < nch; c0 += 32 * D) {
            uint4 wv[D][R];
#pragma unroll
            for (int d = 0; d < D; d++)
#pragma unroll
                for (int r = 0; r < R; r++)
                    if (c0 + 32 * d < nch) wv[d][r] = __ldg((const uint4*)(W + (long)rowv[r] * cols * ES) + c0 + 32 * d);
#pragma unroll
            for (int d = 0; d < D; d++) {
                const int c = c0 + 32 * d;
                if (c >= nch) break;
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    if (t0 + t >= ntok) break;
                    const float4* xp = (const float4*)(X + (long)(t0 + t) * ldx + c * EPV);
                    float xv[EPV];
#pragma unroll
                    for (int i = 0; i < EPV / 4; i++) {
                        float4 f = __ldg(xp + i);
                        xv[4 * i] = f.x; xv[4 * i + 1] = f.y; xv[4 * i + 2] = f.z; xv[4 * i + 3] = f.w;
                    }
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        float wf[8];
                        unpack8<DT>(wv[d][r], wf);
#pragma unroll
                        for (int i = 0; i < EPV; i++) acc[r][t] += wf[i] * xv[i];
                    }
                }
            }
        }
        if (!vec) {
            for (int j = lane; j < cols; j += 32) {
#pragma unroll
                for (int r = 0; r < R; r++) {
                    float w = ld1<DT>(W, (long)rowv[r] * cols + j);
#pragma unroll
                    for (int t = 0; t < NT; t++)
                        if (t0 + t < ntok) acc[r][t] += w * X[(long)(t0 + t) * ldx + j];
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < NT; t++) {
                float v = warp_sum(acc[r][t]);
                if (lane == 0 && row0 + r < rows && t0 + t < ntok) Y[(long)(t0 + t) * ldy + row0 + r] = v;
            }
    }
}
}

// Kernel names: qmv{bits}_{sdt}_{variant}, dmv_{dt}_{variant}; variant mv = decode (4 rows per
// warp, one token, x in shared memory; mv2 / mv1: 2 / 1 rows per warp, for matrices too short
// to give every SM a few blocks of 4-row warps), mp = decode on dp4a with x prepared by
// quant_x3 (4 rows per warp),
// mvg = decode with x read from global memory (long rows),
// mm = prefill tile (1 row per warp, 8 tokens per pass).
#define QK(BITS, SDT, SN)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) qmv##BITS##_##SN##_mv(MvBatch p, int rows, int cols, \
                                                                           int lg, int ntok, int ldx, int ldy) { pdl_wait(); pdl_release(); \
        qmv_body<BITS, SDT, 4, 1, 4, true>(p, rows, cols, lg, ntok, ldx, ldy);                                 \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) qmv##BITS##_##SN##_mv1(MvBatch p, int rows, int cols, \
                                                                            int lg, int ntok, int ldx, int ldy) { pdl_wait(); pdl_release(); \
        qmv_body<BITS, SDT, 1, 1, 4, true>(p, rows, cols, lg, ntok, ldx, ldy);                                 \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) qmv##BITS##_##SN##_mv2(MvBatch p, int rows, int cols, \
                                                                            int lg, int ntok, int ldx, int ldy) { pdl_wait(); pdl_release(); \
        qmv_body<BITS, SDT, 2, 1, 4, true>(p, rows, cols, lg, ntok, ldx, ldy);                                 \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) qmv##BITS##_##SN##_mv1i(const MvBatch* pd, int rows, \
                                                                             int cols, int lg, int ntok, int ldx, \
                                                                             int ldy) { pdl_wait(); pdl_release();                           \
        qmv_body<BITS, SDT, 1, 1, 4, true>(*pd, rows, cols, lg, ntok, ldx, ldy);                            \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) qmv##BITS##_##SN##_mv2i(const MvBatch* pd, int rows, \
                                                                             int cols, int lg, int ntok, int ldx, \
                                                                             int ldy) { pdl_wait(); pdl_release();                           \
        qmv_body<BITS, SDT, 2, 1, 4, true>(*pd, rows, cols, lg, ntok, ldx, ldy);                            \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) qmv##BITS##_##SN##_mvg(MvBatch p, int rows, int cols, \
                                                                            int lg, int ntok, int ldx, int ldy) { pdl_wait(); pdl_release(); \
        qmv_body<BITS, SDT, 4, 1, 4, false>(p, rows, cols, lg, ntok, ldx, ldy);                                \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) qmv##BITS##_##SN##_mvi(const MvBatch* pd, int rows, \
                                                                            int cols, int lg, int ntok, int ldx, \
                                                                            int ldy) { pdl_wait(); pdl_release();                           \
        qmv_body<BITS, SDT, 4, 1, 4, true>(*pd, rows, cols, lg, ntok, ldx, ldy);                            \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256, 2) qmv##BITS##_##SN##_mp(MvBatch p, int rows, int cols, \
                                                                           int lg, const unsigned char* qx, int qb) { \
        qmv_prep<BITS, SDT, 4, 2>(p, rows, cols, lg, qx, qb, true);                                         \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256, 2) qmv##BITS##_##SN##_mpi(const MvBatch* pd, int rows, \
                                                                            int cols, int lg, const unsigned char* qx, \
                                                                            int qb, int early) {                      \
        qmv_prep<BITS, SDT, 4, 2>(*pd, rows, cols, lg, qx, qb, early != 0);                                 \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256, 2) qmv##BITS##_##SN##_mpc(MvBatch p, int rows, int cols, \
                                                                            int lg, const unsigned char* qx, int qb, \
                                                                            Epi ep) {                             \
        qmv_prep<BITS, SDT, 4, 2, 1>(p, rows, cols, lg, qx, qb, true, ep);                                  \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256, 2) qmv##BITS##_##SN##_mpa(MvBatch p, int rows, int cols, \
                                                                            int lg, const unsigned char* qx, int qb, \
                                                                            Epi ep) {                             \
        qmv_prep<BITS, SDT, 4, 2, 2>(p, rows, cols, lg, qx, qb, true, ep);                                  \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) qmv##BITS##_##SN##_mm(MvBatch p, int rows, int cols, \
                                                                           int lg, int ntok, int ldx, int ldy) { pdl_wait(); pdl_release(); \
        qmv_body<BITS, SDT, 1, 8, 2, false>(p, rows, cols, lg, ntok, ldx, ldy);                                \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) qmv##BITS##_##SN##_mt1(MvBatch p, int rows, int cols, \
                                                                            int lg, int ntok, int ldx, int ldy) { pdl_wait(); pdl_release(); \
        qmv_mma<BITS, SDT, 1, 4>(p, rows, cols, lg);                                                        \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) qmv##BITS##_##SN##_mt1i(const MvBatch* pd, int rows, \
                                                                             int cols, int lg, int ntok, int ldx, \
                                                                             int ldy) { pdl_wait(); pdl_release();                           \
        qmv_mma<BITS, SDT, 1, 4>(*pd, rows, cols, lg);                                                      \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) qmv##BITS##_##SN##_mt2(MvBatch p, int rows, int cols, \
                                                                            int lg, int ntok, int ldx, int ldy) { pdl_wait(); pdl_release(); \
        qmv_mma<BITS, SDT, 2, 2>(p, rows, cols, lg);                                                        \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) qmv##BITS##_##SN##_mt2i(const MvBatch* pd, int rows, \
                                                                             int cols, int lg, int ntok, int ldx, \
                                                                             int ldy) { pdl_wait(); pdl_release();                           \
        qmv_mma<BITS, SDT, 2, 2>(*pd, rows, cols, lg);                                                      \
    }
QK(4, 0, bf16) QK(4, 1, f16) QK(4, 2, f32)
QK(2, 0, bf16) QK(2, 1, f16) QK(2, 2, f32)
QK(8, 0, bf16) QK(8, 1, f16) QK(8, 2, f32)

// x prepared for the `mp` kernels: grid (ceil(cols / 256), problems), one element per thread.
#define QXK(BITS)                                                                                           \
    extern "C" __global__ void __launch_bounds__(256) quant_x3_##BITS(MvBatch p, int cols, unsigned char* out, \
                                                                     int qb) { pdl_wait();                              \
        quant_x3_body<BITS>((const float*)p.x[blockIdx.y], cols, out + (long)blockIdx.y * qb);              \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) quant_x3_##BITS##i(const MvBatch* pd, int cols,       \
                                                                        unsigned char* out, int qb) { pdl_wait();       \
        quant_x3_body<BITS>((const float*)pd->x[blockIdx.y], cols, out + (long)blockIdx.y * qb);            \
    }
QXK(2) QXK(4) QXK(8)

#define DK(DT, DN)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) dmv_##DN##_mv(MvBatch p, int rows, int cols, int lg,  \
                                                                   int ntok, int ldx, int ldy) { pdl_wait(); pdl_release();            \
        dmv_body<DT, 4, 1, 4>(p, rows, cols, ntok, ldx, ldy);                                                  \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) dmv_##DN##_mvi(const MvBatch* pd, int rows, int cols,  \
                                                                    int lg, int ntok, int ldx, int ldy) { pdl_wait(); pdl_release();    \
        dmv_body<DT, 4, 1, 4>(*pd, rows, cols, ntok, ldx, ldy);                                             \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) dmv_##DN##_mm(MvBatch p, int rows, int cols, int lg,  \
                                                                   int ntok, int ldx, int ldy) { pdl_wait(); pdl_release();            \
        dmv_body<DT, 1, 8, 2>(p, rows, cols, ntok, ldx, ldy);                                                  \
    }
DK(0, bf16) DK(1, f16) DK(2, f32)

// One row of a matrix as f32 (embedding lookup). fmt: 0..2 dense dtype; else affine with
// bits, sdt, lg.
extern "C" __global__ void embed_row(const void* W, const void* S, const void* B, int dense_dt, int bits, int sdt,
                                     int lg, long row, int cols, float* out) {
    pdl_wait();
    pdl_release();
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < cols; j += gridDim.x * blockDim.x) {
        float v;
        if (dense_dt >= 0) {
            long i = row * cols + j;
            v = dense_dt == 0 ? ld1<0>(W, i) : dense_dt == 1 ? ld1<1>(W, i) : ld1<2>(W, i);
        } else {
            int wpr = cols * bits / 32, gpr = cols >> lg;
            u32 w = ((const u32*)W)[row * wpr + (long)j * bits / 32];
            u32 q = (w >> ((j * bits) % 32)) & ((1u << bits) - 1u);
            long g = row * gpr + (j >> lg);
            float s = sdt == 0 ? ldsc<0>(S, g) : sdt == 1 ? ldsc<1>(S, g) : ldsc<2>(S, g);
            float b = sdt == 0 ? ldsc<0>(B, g) : sdt == 1 ? ldsc<1>(B, g) : ldsc<2>(B, g);
            v = s * (float)q + b;
        }
        out[j] = v;
    }
}

// ---------------------------------------------------------------------------------------------
// Norms and elementwise ops.
// ---------------------------------------------------------------------------------------------
// Writes v = out[i] (every thread of the block calls it for the same base, blockDim a multiple
// of 32) and prepares it for up to two `mp` matvecs (code widths b1, b2; 0 = none).
__device__ __forceinline__ void put_prepared(float* o, int i, int n, float v, unsigned char* q1, int b1,
                                             unsigned char* q2, int b2) {
    if (i < n) o[i] = v;
    quant_x3_any(b1, i < n ? v : 0.f, i, n, q1);
    quant_x3_any(b2, i < n ? v : 0.f, i, n, q2);
}

// out[r, :n] = x[r, :n] / sqrt(mean(x^2) + eps) * w. Grid (split, rows): every block of a row
// sums the whole row (from L2; a single block is latency-bound on one SM) and writes its
// 1/split slice. With qbits (one row), out is also prepared at qx for the `mp` matvec reading it.
extern "C" __global__ void rmsnorm_rows(const float* x, int ldx, const float* w, float* out, int ldo, int n,
                                        float eps, unsigned char* qx, int qbits) {
    pdl_wait();
    pdl_release();
    __shared__ float red[32];
    const float* xr = x + (long)blockIdx.y * ldx;
    float* o = out + (long)blockIdx.y * ldo;
    // This thread's first output element is fetched with the row, and the row's loads are all
    // in flight together (16 per thread for 4096 over 256): one L2 round trip, not four.
    const int i0 = blockIdx.x * blockDim.x + threadIdx.x;
    const float x0 = i0 < n ? xr[i0] : 0.f, w0 = i0 < n ? w[i0] : 0.f;
    float ss = 0.f;
#pragma unroll 16
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, red);
    float inv = 1.f / sqrtf(ss / n + eps);
    for (int b = blockIdx.x * blockDim.x; b < n; b += gridDim.x * blockDim.x) {
        const int i = b + threadIdx.x;
        const float xv = i == i0 ? x0 : (i < n ? xr[i] : 0.f), wv = i == i0 ? w0 : (i < n ? w[i] : 0.f);
        put_prepared(o, i, n, i < n ? xv * inv * wv : 0.f, qx, qbits, nullptr, 0);
    }
}

// The bench's dependent-step probe: the least a decode step does after its predecessor (wait,
// read the n-float vector it wrote, reduce over the block, write a slice). A chain of these
// launched like the token's kernels measures what one dependent launch costs on this device.
extern "C" __global__ void chain_step(const float* x, float* y, int n) {
    pdl_wait();
    pdl_release();
    __shared__ float red[32];
    float ss = 0.f;
#pragma unroll 16
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += x[i] * x[i];
    ss = block_sum(ss, red);
    const float r = 1.f / sqrtf(ss / n + 1e-6f);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] = x[i] * r;
}

// Greedy decoding reads 4 bytes back instead of the vocabulary's logits: *key = max over i of
// (order-preserving bits of x[i]) << 32 | ~i, so the largest value wins and, among equal
// values, the lowest index; NaN never wins. Blocks reduce their slice and meet in one 64-bit
// atomicMax; *key must be 0 before the launch. The index is ~(low 32 bits).
extern "C" __global__ void argmax_f32(const float* x, int n, u64* key) {
    pdl_wait();
    pdl_release();
    __shared__ u64 bk[32];
    u64 best = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        u64 k = amax_key(x[i], i);
        best = k > best ? k : best;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        u64 ok = __shfl_xor_sync(0xffffffffu, best, o);
        best = ok > best ? ok : best;
    }
    if ((threadIdx.x & 31) == 0) bk[threadIdx.x >> 5] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) best = bk[w] > best ? bk[w] : best;
        atomicMax(key, best);
    }
}

// Prefill (a chunk of tokens at once). dst[r, :n] = src[rows[r] * ld, :n] for r < nr.
extern "C" __global__ void gather_rows(const float* src, int ld, const int* rows, int nr, int n, float* dst) {
    pdl_wait();
    pdl_release();
    int i = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
    if (i < n && r < nr) dst[(long)r * n + i] = src[(long)rows[r] * ld + i];
}

// x[rows[r] * ld + i] += w[r] * y[r, i] for r < nr, i < n: one routed expert's outputs added to
// the residual rows of the tokens routed to it (distinct rows within a launch).
extern "C" __global__ void scatter_add_rows(float* x, int ld, const int* rows, const float* w, int nr, int n,
                                            const float* y) {
    pdl_wait();
    pdl_release();
    int i = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
    if (i < n && r < nr) x[(long)rows[r] * ld + i] += w[r] * y[(long)r * n + i];
}

// x[t, i] += g_t * y[t, i] for t < T, i < n, with g_t = sigmoid(sg[t * lds]) when sg (the shared
// expert's gate), else 1 (a dense FFN).
extern "C" __global__ void add_rows_gated(float* x, const float* y, const float* sg, int lds, int T, int n) {
    pdl_wait();
    pdl_release();
    int i = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (i >= n || t >= T) return;
    float g = sg ? sigmoidf_(sg[(long)t * lds]) : 1.f;
    x[(long)t * n + i] += g * y[(long)t * n + i];
}

// out = rmsnorm(x + d) * w for the residual stream of one token, also prepared for up to two
// `mp` matvecs that read it (code widths b1, b2; 0 = none). With write_x (one block), x += d
// here; else x is left alone (the caller adds d later, in moe_combine), so that several blocks,
// each summing the whole row and writing its slice, never read an x another block wrote.
// x + d goes to xo: x itself (one block, which updates x in its sum pass), another buffer (any
// number of blocks: each writes its slice of the output pass, and no block reads xo), or nowhere.
extern "C" __global__ void add_rmsnorm(float* x, const float* d, const float* w, float* out, int n, float eps,
                                       unsigned char* q1, int b1, unsigned char* q2, int b2, float* xo) {
    pdl_wait();
    pdl_release();
    __shared__ float red[32];
    // As in rmsnorm_rows: the first output element's inputs fetched up front, every load of
    // the sum in flight together. x + d is the same float whether or not x was updated.
    const int i0 = blockIdx.x * blockDim.x + threadIdx.x;
    const float v0 = i0 < n ? x[i0] + d[i0] : 0.f, w0 = i0 < n ? w[i0] : 0.f;
    float ss = 0.f;
#pragma unroll 16
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = x[i] + d[i];
        if (xo == x) x[i] = v;
        ss += v * v;
    }
    ss = block_sum(ss, red);
    float inv = 1.f / sqrtf(ss / n + eps);
    for (int b = blockIdx.x * blockDim.x; b < n; b += gridDim.x * blockDim.x) {
        const int i = b + threadIdx.x;
        const float v = i == i0 ? v0 : (i < n ? (xo == x ? x[i] : x[i] + d[i]) : 0.f);
        const float wv = i == i0 ? w0 : (i < n ? w[i] : 0.f);
        if (xo && xo != x && i < n) xo[i] = v;
        put_prepared(out, i, n, v * inv * wv, q1, b1, q2, b2);
    }
}

// h[j, i] = silu(gu[j, i]) * gu[j, I + i] for j < nexp, i < I. With qbits, h[j] is also prepared
// for the `mp` matvec that reads it, at qx + j * qb (the launch checks I % 32 == 0, so no warp
// straddles two problems).
extern "C" __global__ void swiglu_k(const float* gu, float* h, int I, int nexp, unsigned char* qx, int qbits,
                                    int qb) {
    pdl_wait();
    pdl_release();
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    const bool in = idx < I * nexp;
    int j = idx / I, i = idx - j * I;
    float v = 0.f;
    if (in) {
        float g = gu[(long)j * 2 * I + i], u = gu[(long)j * 2 * I + I + i];
        v = siluf_(g) * u;
        h[idx] = v;
    }
    if (qbits) quant_x3_any(qbits, v, in ? i : I, I, qx + (long)j * qb);
}

// x[i] += sum_j wts[j] * ye[j, i] + (sg ? sigmoid(*sg) * ys[i] : 0) + (add ? add[i] : 0).
extern "C" __global__ void moe_combine(float* x, const float* ye, const float* wts, int nexp, const float* ys,
                                       const float* sg, const float* add, int n) {
    pdl_wait();
    pdl_release();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float acc = 0.f;
    if (ys) acc = (sg ? sigmoidf_(*sg) : 1.f) * ys[i];
    // Fixed trip count, so every expert's load is in flight at once (same order of adds).
#pragma unroll
    for (int j = 0; j < MAXP; j++)
        if (j < nexp) acc += wts[j] * ye[(long)j * n + i];
    for (int j = MAXP; j < nexp; j++) acc += wts[j] * ye[(long)j * n + i];
    if (add) acc += add[i];
    x[i] += acc;
}

// Router: softmax over E logits (fp32), top-k by probability (ties: lower index; NaN lowest),
// optional renormalisation over the chosen. One block of any size; `p` holds 3E floats
// (probabilities, then candidate values and indices).
// Selection without K rounds of block-wide argmax: with at least K segments of 32 elements, the
// K-th largest segment maximum T is a lower bound of the K-th largest probability (K segment
// maxima are >= T), so only the elements >= T are candidates, and everything that outranks a
// candidate is a candidate too: each candidate's rank among the candidates (count of larger, or
// equal with a lower index) is its true rank, and rank < K places it.
__device__ void topk_body(const float* logits, int E, int K, int norm, int* ids, float* wts, float* p) {
    __shared__ float red[32];
    __shared__ float thr;
    __shared__ int nc;
    float* cv = p + E;
    int* ci = (int*)(p + 2 * E);
    const int lane = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < E; i += blockDim.x) m = fmaxf(m, logits[i]);
    m = warp_max(m);
    __syncthreads();
    if (lane == 0) red[threadIdx.x >> 5] = m;
    __syncthreads();
    m = -INFINITY;
    for (int i = 0; i < nw; i++) m = fmaxf(m, red[i]);
    float s = 0.f;
    for (int i = threadIdx.x; i < E; i += blockDim.x) {
        float e = expf(logits[i] - m);
        p[i] = e;
        s += e;
    }
    s = block_sum(s, red);
    for (int i = threadIdx.x; i < E; i += blockDim.x) {
        float v = p[i] / s;
        p[i] = v != v ? -INFINITY : v;
    }
    // Segment maxima into cv (each lane reads the element it wrote just above).
    const int ns = (E + 31) / 32;
    for (int b = (threadIdx.x >> 5) * 32; b < E; b += blockDim.x) {
        float v = warp_max(b + lane < E ? p[b + lane] : -INFINITY);
        if (lane == 0) cv[b / 32] = v;
    }
    if (threadIdx.x == 0) {
        nc = 0;
        thr = -INFINITY;
    }
    __syncthreads();
    // K-th largest segment maximum (duplicates counted, ties by segment index, so exactly one
    // segment has rank K-1), or no bound with fewer segments than K.
    for (int g = threadIdx.x; ns >= K && g < ns; g += blockDim.x) {
        const float v = cv[g];
        int above = 0;
        for (int q = 0; q < ns; q++) above += cv[q] > v || (cv[q] == v && q < g);
        if (above == K - 1) thr = v;
    }
    __syncthreads();
    const float t = thr;
    for (int i = threadIdx.x; i < E; i += blockDim.x) {
        float v = p[i];
        if (v >= t) {
            int c = atomicAdd(&nc, 1);
            cv[c] = v;
            ci[c] = i;
        }
    }
    __syncthreads();
    const int n = nc;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        float v = cv[c];
        int i = ci[c], r = 0;
        for (int j = 0; j < n; j++) {
            float o = cv[j];
            r += (o > v) || (o == v && ci[j] < i);
        }
        if (r < K) {
            ids[r] = i;
            wts[r] = v;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float tot = 0.f;
        for (int k = 0; k < K; k++) {
            float w = wts[k];
            if (w == -INFINITY) wts[k] = w = 0.f;
            tot += w;
        }
        if (norm)
            for (int k = 0; k < K; k++) wts[k] /= tot;
    }
}

// One block per row: row b's logits at logits + b * ld, its picks at ids/wts + b * K.
extern "C" __global__ void router_topk(const float* logits, int ld, int E, int K, int norm, int* ids, float* wts) {
    pdl_wait();
    pdl_release();
    extern __shared__ float p[];
    const long b = blockIdx.x;
    topk_body(logits + b * ld, E, K, norm, ids + b * K, wts + b * K, p);
}

// With every expert of the layer resident in VRAM: top-k as above, then the router's ids and the
// layer's slot table give the K gate/up and down problems, written to device memory for the
// `mvi` kernels (no host round trip). off[0..6] = gate‖up w, s, b and down w, s, b offsets
// inside a slot. When sh[0] != 0 the shared expert (same shape and format; sh = gate‖up w, s,
// b, down w, s, b) is problem K.
struct ExpertBatchArgs {
    u64 tbl;
    long long off[6];
    u64 sh[6];
    u64 xn, gue, he, ye;
    int I, H;
};
static_assert(sizeof(ExpertBatchArgs) == 144, "ExpertBatchArgs layout (device.rs)");
// Thread j < K (+1 with the shared expert) writes problem j of the two batches: expert ids[j]'s
// gate‖up and down from its slot base tbl[ids[j]], or the shared expert's.
__device__ void write_expert_batch(const int* ids, int K, const ExpertBatchArgs& a, MvBatch* out) {
    int j = threadIdx.x;
    int np = a.sh[0] ? K + 1 : K;
    if (j >= np) return;
    u64 g[3], d[3];
    if (j < K) {
        const u64* tbl = (const u64*)a.tbl;
        u64 base = tbl[ids[j]];
        for (int q = 0; q < 3; q++) { g[q] = base + a.off[q]; d[q] = base + a.off[3 + q]; }
    } else {
        for (int q = 0; q < 3; q++) { g[q] = a.sh[q]; d[q] = a.sh[3 + q]; }
    }
    out[0].w[j] = g[0]; out[0].s[j] = g[1]; out[0].b[j] = g[2];
    out[0].x[j] = a.xn; out[0].y[j] = a.gue + (u64)j * 2 * a.I * 4;
    out[1].w[j] = d[0]; out[1].s[j] = d[1]; out[1].b[j] = d[2];
    out[1].x[j] = a.he + (u64)j * a.I * 4; out[1].y[j] = a.ye + (u64)j * a.H * 4;
}
extern "C" __global__ void router_experts(const float* logits, int E, int K, int norm, int* ids, float* wts,
                                          ExpertBatchArgs a, MvBatch* out) {
    pdl_wait();
    pdl_release();
    extern __shared__ float p[];
    topk_body(logits, E, K, norm, ids, wts, p);
    __syncthreads();
    write_expert_batch(ids, K, a, out);
}
// The same two batches from ids already on the device (a router_topk's, one token): the
// residency tier's resident layers (flashmoe_core::residency, `SlotRouting::Resident`).
extern "C" __global__ void slot_batch(const int* ids, int K, ExpertBatchArgs a, MvBatch* out) {
    pdl_wait();
    pdl_release();
    write_expert_batch(ids, K, a, out);
}

// ---------------------------------------------------------------------------------------------
// Full attention (arch-spec §5), one token at position `pos`.
// ---------------------------------------------------------------------------------------------
// One head of `hd` at `src`, RMSNormed with `w` and rotated (NeoX rotate-half over the first
// `rot` dims at `pos`), written to `dst` (which may be `src`: every read of src comes before the
// block's barrier). `y` is hd floats of shared memory. Same rounding as the CPU twin: inv_freq in
// f32, angle and sin/cos in f64.
__device__ __forceinline__ void head_norm_rope(const float* src, const float* w, int hd, float eps, int rot,
                                               double theta, long pos, float* dst, float* y, float* red) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) ss += src[i] * src[i];
    ss = block_sum(ss, red);
    float inv = 1.f / sqrtf(ss / hd + eps);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) y[i] = src[i] * inv * w[i];
    __syncthreads();
    int half = rot / 2;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float v = y[i];
        if (i < rot) {
            int d = i < half ? i : i - half;
            float invf = (float)(1.0 / pow(theta, (double)(2 * d) / (double)rot));
            double ang = (double)pos * (double)invf;
            float sn = (float)sin(ang), cs = (float)cos(ang);
            float x1 = y[d], x2 = y[d + half];
            v = i < half ? x1 * cs - x2 * sn : x2 * cs + x1 * sn;
        }
        dst[i] = v;
    }
}

// Blocks 0..nh-1: q head b = RoPE(RMSNorm(qkv[b*qw .. +hd]; qnorm)) -> q[b*hd]. Blocks nh..nh+nkv-1:
// k head likewise with knorm -> kc[pos], and v -> vc[pos]. qkv = [qg (nh*qw) | k (nkv*hd) | v].
extern "C" __global__ void attn_prep(const float* qkv, int nh, int nkv, int hd, int qw, const float* qn,
                                     const float* kn, float eps, int rot, double theta, long pos, float* q,
                                     float* kc, float* vc) {
    pdl_wait();
    pdl_release();
    extern __shared__ float y[];
    __shared__ float red[32];
    int b = blockIdx.x;
    bool isq = b < nh;
    int h = isq ? b : b - nh;
    const float* src = isq ? qkv + (long)h * qw : qkv + (long)nh * qw + (long)h * hd;
    float* dst = isq ? q + (long)h * hd : kc + pos * nkv * hd + (long)h * hd;
    head_norm_rope(src, isq ? qn : kn, hd, eps, rot, theta, pos, dst, y, red);
    if (!isq) {
        const float* vs = qkv + (long)nh * qw + (long)nkv * hd + (long)h * hd;
        for (int i = threadIdx.x; i < hd; i += blockDim.x) vc[pos * nkv * hd + (long)h * hd + i] = vs[i];
    }
}

// One block (4 warps) per query head over keys 0..n-1; online softmax per warp, merged at the
// end. o[h] = softmax(q k^T * scale) V, times sigmoid(gate) when gated. hd <= 256.
#define ATT_WARPS 4
// With qbits, o is also prepared at qx for the o-projection's `mp` matvec (hd % 32 == 0, so
// each warp's 32 outputs are consecutive), which then needs no `quant_x3` launch.
extern "C" __global__ void attn_decode(const float* q, const float* kc, const float* vc, const float* qkv, int gated,
                                       int nh, int nkv, int hd, int qw, int n, float scale, float* o,
                                       unsigned char* qx, int qbits) {
    pdl_wait();
    pdl_release();
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ float sacc[ATT_WARPS][256];
    int h = blockIdx.x, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int kvh = h / (nh / nkv);
    int kvw = nkv * hd;
    float qr[8], acc[8];
#pragma unroll
    for (int j = 0; j < 8; j++) {
        int d = lane + 32 * j;
        qr[j] = d < hd ? q[(long)h * hd + d] : 0.f;
        acc[j] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int s = w; s < n; s += ATT_WARPS) {
        const float* kr = kc + (long)s * kvw + (long)kvh * hd;
        float part = 0.f;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            int d = lane + 32 * j;
            if (d < hd) part += qr[j] * kr[d];
        }
        float sc = warp_sum(part) * scale;
        float mn = fmaxf(m, sc);
        float corr = expf(m - mn), pe = expf(sc - mn);
        l = l * corr + pe;
        const float* vr = vc + (long)s * kvw + (long)kvh * hd;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            int d = lane + 32 * j;
            if (d < hd) acc[j] = acc[j] * corr + pe * vr[d];
        }
        m = mn;
    }
    if (lane == 0) { sm[w] = m; sl[w] = l; }
#pragma unroll
    for (int j = 0; j < 8; j++) {
        int d = lane + 32 * j;
        if (d < hd) sacc[w][d] = acc[j];
    }
    __syncthreads();
    float M = -INFINITY;
    for (int i = 0; i < ATT_WARPS; i++) M = fmaxf(M, sm[i]);
    float L = 0.f;
    for (int i = 0; i < ATT_WARPS; i++)
        if (sm[i] > -INFINITY) L += sl[i] * expf(sm[i] - M);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float v = 0.f;
        for (int i = 0; i < ATT_WARPS; i++)
            if (sm[i] > -INFINITY) v += sacc[i][d] * expf(sm[i] - M);
        v /= L;
        if (gated) v *= sigmoidf_(qkv[(long)h * qw + hd + d]);
        o[(long)h * hd + d] = v;
        if (qbits) quant_x3_any(qbits, v, h * hd + d, nh * hd, qx);
    }
}

// ---------------------------------------------------------------------------------------------
// Gated DeltaNet (arch-spec §6), one token.
// ---------------------------------------------------------------------------------------------
// Depthwise causal conv over [state (K-1 rows, oldest first); mixed], SiLU; shifts the state.
extern "C" __global__ void gdn_conv(const float* mixed, float* state, const float* w, int cd, int K, float* u) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    // The weights and this layer's own state are fetched before the wait for the
    // in-projection's output. The state's writer (this kernel, a token ago) is complete: the
    // gdn_step after it released its dependents only after waiting for it.
    float cw[CONV_MAXK], cs[CONV_MAXK];
    const bool regs = c < cd && K <= CONV_MAXK;
    if (regs) conv_fetch(w, state, cd, K, c, cw, cs);
    pdl_wait();
    pdl_release();
    if (c >= cd) return;
    float xin = mixed[c];
    if (regs) {
        u[c] = conv_apply(cw, cs, xin, K, state, cd, c);
        return;
    }
    // Longer kernels, straight from memory (same order of operations).
    float acc = 0.f;
    for (int j = 0; j < K - 1; j++) acc += w[(long)c * K + j] * state[(long)j * cd + c];
    acc += w[(long)c * K + K - 1] * xin;
    u[c] = siluf_(acc);
    for (int j = 0; j + 1 < K - 1; j++) state[(long)j * cd + c] = state[(long)(j + 1) * cd + c];
    if (K > 1) state[(long)(K - 2) * cd + c] = xin;
}

// One block per value head h, blockDim = dv * P: thread (v = t % dv, part = t / dv) owns rows
// [part*rp, part*rp + rp) of column v of S[h] [dk, dv] in registers (rp = ceil(dk / P) <=
// GDN_RP), so P times more warps share the head's state traffic than one thread per column;
// the two sums over rows (k.S and S^T q) are reduced across parts through shared memory.
// l2norm(q, k) of key head h/rep, decay, delta rule, o = S^T q, then the gated RMSNorm with
// silu(z). dk <= 128.
#define GDN_MAXDK 128
// One step of the gated delta rule for value head h = blockIdx.x, columns blockIdx.y * nc ..
// + nc of its state (every column of S is independent: kv_mem, delta, the update and the output
// are per column), each column's dk rows split over P parts of ceil(dk / P) <= GDN_RP rows.
// Writes the raw output o; the gated RMSNorm over the head (which spans blocks) is
// gated_rmsnorm_rows.
template <int GDN_RP>
__device__ __forceinline__ void gdn_step_body(const float* u, const float* bv, const float* av,
                                              const float* dt_bias, const float* neg_a, float* S, float* y,
                                              int nk, int nv, int dk, int dv, int P, int nc) {
    __shared__ float qn[GDN_MAXDK], kn[GDN_MAXDK];
    __shared__ float red[32];
    extern __shared__ float part_sum[];  // [P][nc]
    const int h = blockIdx.x, c = threadIdx.x % nc, part = threadIdx.x / nc, v = blockIdx.y * nc + c;
    // Threads past P * nc (blockDim rounded up to whole warps) only join the reductions.
    const bool act = part < P && v < dv;
    const int rp = (dk + P - 1) / P, i0 = part * rp;
    const int rep = nv / nk, kh = h / rep, kd = nk * dk;
    // The state (this kernel's own output a token ago; gdn_conv, launched before this one,
    // released it only after its wait) and the head's constants are read before waiting for
    // the inputs.
    float* col = S + (long)h * dk * dv + v;
    float s[GDN_RP];
#pragma unroll
    for (int r = 0; r < GDN_RP; r++) {
        int i = i0 + r;
        if (act && r < rp && i < dk) s[r] = col[(long)i * dv];
    }
    const float dtb = dt_bias[h], na = neg_a[h];
    pdl_wait();
    pdl_release();
    const float* qs = u + (long)kh * dk;
    const float* ks = u + kd + (long)kh * dk;
    float sq = 0.f, sk = 0.f;
    for (int i = threadIdx.x; i < dk; i += blockDim.x) { sq += qs[i] * qs[i]; sk += ks[i] * ks[i]; }
    sq = block_sum(sq, red);
    sk = block_sum(sk, red);
    float rq = 1.f / sqrtf(sq + 1e-6f) * (1.f / sqrtf((float)dk));
    float rk = 1.f / sqrtf(sk + 1e-6f);
    for (int i = threadIdx.x; i < dk; i += blockDim.x) { qn[i] = qs[i] * rq; kn[i] = ks[i] * rk; }
    __syncthreads();
    const float beta = sigmoidf_(bv[h]);
    const float x = av[h] + dtb;
    const float sp = x > 20.f ? x : log1pf(expf(x));
    const float decay = expf(na * sp);
    float kvm = 0.f;
#pragma unroll
    for (int r = 0; r < GDN_RP; r++) {
        int i = i0 + r;
        if (act && r < rp && i < dk) {
            s[r] *= decay;
            kvm += s[r] * kn[i];
        }
    }
    if (act) part_sum[threadIdx.x] = kvm;
    __syncthreads();
    kvm = 0.f;
    if (act)
        for (int q = 0; q < P; q++) kvm += part_sum[q * nc + c];
    const float delta = act ? (u[2 * kd + (long)h * dv + v] - kvm) * beta : 0.f;
    float o = 0.f;
#pragma unroll
    for (int r = 0; r < GDN_RP; r++) {
        int i = i0 + r;
        if (act && r < rp && i < dk) {
            s[r] += kn[i] * delta;
            o += s[r] * qn[i];
            col[(long)i * dv] = s[r];
        }
    }
    __syncthreads();
    if (act) part_sum[threadIdx.x] = o;
    __syncthreads();
    if (act && part == 0) {
        o = 0.f;
        for (int q = 0; q < P; q++) o += part_sum[q * nc + c];
        y[(long)h * dv + v] = o;
    }
}
extern "C" __global__ void __launch_bounds__(1024) gdn_step(const float* u, const float* bv, const float* av,
                                                            const float* dt_bias, const float* neg_a, float* S,
                                                            float* y, int nk, int nv, int dk, int dv, int P, int nc) {
    gdn_step_body<16>(u, bv, av, dt_bias, neg_a, S, y, nk, nv, dk, dv, P, nc);
}
extern "C" __global__ void __launch_bounds__(256) gdn_step_wide(const float* u, const float* bv, const float* av,
                                                                const float* dt_bias, const float* neg_a, float* S,
                                                                float* y, int nk, int nv, int dk, int dv, int P,
                                                                int nc) {
    gdn_step_body<128>(u, bv, av, dt_bias, neg_a, S, y, nk, nv, dk, dv, P, nc);
}

// ---------------------------------------------------------------------------------------------
// Primitives of core's op-level `Backend` that the token path above fuses away (backend.rs):
// plain, one thread per element or one block per head, every input read after the wait.
// ---------------------------------------------------------------------------------------------
// out[i] = silu(g[i]) * u[i] for i < n.
extern "C" __global__ void silu_mul(const float* g, const float* u, float* out, int n) {
    pdl_wait();
    pdl_release();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = siluf_(g[i]) * u[i];
}

// o[i] *= sigmoid(g[i]) for i < n (the attention output gate).
extern "C" __global__ void mul_sigmoid(float* o, const float* g, int n) {
    pdl_wait();
    pdl_release();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) o[i] *= sigmoidf_(g[i]);
}

// Attention input preparation for T tokens at positions pos0 + blockIdx.y, grid (nh + nkv, T).
// Blocks b < nh: q head b = RoPE(RMSNorm(qg[t, b*qw .. +hd]; qn)) -> q[t, b*hd], and with qw > hd
// (gated) the gate half qg[t, b*qw + hd ..] -> gate[t, b*hd]. Blocks nh..: k head in place.
// Same arithmetic as attn_prep.
extern "C" __global__ void qk_norm_rope(const float* qg, float* k, const float* qn, const float* kn, int nh,
                                        int nkv, int hd, int qw, float eps, int rot, double theta, long pos0,
                                        float* q, float* gate) {
    pdl_wait();
    pdl_release();
    extern __shared__ float y[];
    __shared__ float red[32];
    const int b = blockIdx.x;
    const long t = blockIdx.y;
    const bool isq = b < nh;
    const int h = isq ? b : b - nh;
    const float* src = isq ? qg + (t * nh + h) * qw : k + (t * nkv + h) * hd;
    float* dst = isq ? q + (t * nh + h) * hd : k + (t * nkv + h) * hd;
    head_norm_rope(src, isq ? qn : kn, hd, eps, rot, theta, pos0 + t, dst, y, red);
    if (isq && qw > hd)
        for (int i = threadIdx.x; i < hd; i += blockDim.x) gate[(t * nh + h) * hd + i] = src[hd + i];
}

// Causal depthwise conv + SiLU over T tokens (arch-spec §6.3), one thread per channel c:
// u[t, c] = silu(sum_j w[c, j] * in(t + j, c)) with in = [state (K-1 rows, oldest first); mixed];
// the state becomes the last K-1 rows of in. Reads the state after the wait (gdn_conv fetches it
// before, which a conv launched right after another conv must not do).
extern "C" __global__ void gdn_conv_rows(const float* mixed, float* state, const float* w, int cd, int K, int T,
                                         float* u) {
    pdl_wait();
    pdl_release();
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cd) return;
#define CONV_IN(r) ((r) < K - 1 ? state[(long)(r) * cd + c] : mixed[(long)((r) - (K - 1)) * cd + c])
    for (int t = 0; t < T; t++) {
        float acc = 0.f;
        for (int j = 0; j < K; j++) acc += w[(long)c * K + j] * CONV_IN(t + j);
        u[(long)t * cd + c] = siluf_(acc);
    }
    // Row i of the new state is in(T + i); rows are read before they are overwritten (T >= 1).
    for (int i = 0; i < K - 1; i++) state[(long)i * cd + c] = CONV_IN(T + i);
#undef CONV_IN
}

// y[r] = rmsnorm(o[r]) * w * silu(z[r]) for rows r = blockIdx.x of dv (any dv).
// With qbits (dv % 32 == 0, so no warp straddles two rows), y is also prepared at qx as one
// vector of cols = rows * dv for the `mp` matvec reading it.
extern "C" __global__ void gated_rmsnorm_rows(const float* o, const float* z, const float* w, int dv, float eps,
                                              float* y, unsigned char* qx, int qbits, int cols) {
    pdl_wait();
    pdl_release();
    __shared__ float red[32];
    const long r = blockIdx.x;
    const float* orow = o + r * dv;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dv; i += blockDim.x) ss += orow[i] * orow[i];
    ss = block_sum(ss, red);
    const float inv = 1.f / sqrtf(ss / dv + eps);
    for (int b = 0; b < dv; b += blockDim.x) {
        const int i = b + threadIdx.x;
        const float v = i < dv ? orow[i] * inv * w[i] * siluf_(z[r * dv + i]) : 0.f;
        if (i < dv) y[r * dv + i] = v;
        if (qbits) quant_x3_any(qbits, v, i < dv ? (int)(r * dv + i) : cols, cols, qx);
    }
}

// =============================================================================================
// Prompt mixers (backend/prefill_mixers.rs): attention over T query rows and the gated delta
// rule over T tokens, one launch per layer each, where the token path launches once per token.
// =============================================================================================
#define APF_Q 16
#define APF_K 16
// Causal GQA attention of T query rows (flash-attention style, f32, online softmax). Grid
// (nh, ceil(T / APF_Q)), 128 threads: a block holds APF_Q query rows of head h in shared memory
// (pre-scaled) and streams key tiles of APF_K rows, keys then values through one buffer.
// q [T, nh*hd] normed and rotated; the caches kc, vc [pos0 + T, nkv*hd] already hold the T new
// rows; query i (position pos0 + i) sees keys 0..=pos0+i. o [T, nh*hd] = softmax(q K^T * scale)
// V, times sigmoid(gate[i, h*hd + d]) when gate is not null. hd % 4 == 0, hd <= 256.
// S = Q K^T: thread (row tid/8, keys tid%8 and tid%8+8); P V: thread (rows 2*(tid/16) and +1,
// float4 columns tid%16 + 16m).
extern "C" __global__ void __launch_bounds__(128) attn_prefill(const float* q, const float* kc, const float* vc,
                                                               const float* gate, int nh, int nkv, int hd, int T,
                                                               long pos0, float scale, float* o) {
    pdl_wait();
    pdl_release();
    extern __shared__ float4 apf_sm4[];
    float* sm = (float*)apf_sm4;
    const int ld = hd + 4;                   // row stride: rows 0..7 of a float4 column hit 8 bank quads
    float* sQ = sm;                          // [APF_Q][ld]
    float* sKV = sQ + APF_Q * ld;            // [APF_K][ld]
    float* sP = sKV + APF_K * ld;            // [APF_Q][APF_K + 1] scores, then probabilities
    float* sM = sP + APF_Q * (APF_K + 1);    // [APF_Q] running max
    float* sL = sM + APF_Q;                  // [APF_Q] running sum
    float* sC = sL + APF_Q;                  // [APF_Q] this tile's rescale of the accumulators
    const int h = blockIdx.x, q0 = blockIdx.y * APF_Q, tid = threadIdx.x;
    const int kvh = h / (nh / nkv);
    const long ldq = (long)nh * hd, kvw = (long)nkv * hd;
    const int nq = min(APF_Q, T - q0);
    for (int r = 0; r < APF_Q; r++)
        for (int d = tid; d < hd; d += blockDim.x)
            sQ[r * ld + d] = r < nq ? q[(q0 + r) * ldq + (long)h * hd + d] * scale : 0.f;
    if (tid < APF_Q) {
        sM[tid] = -INFINITY;
        sL[tid] = 0.f;
    }
    const long kend = pos0 + q0 + nq;        // keys the block's last row sees
    const int sq = tid >> 3, sk = tid & 7;
    const int pr = (tid >> 4) * 2, pd = tid & 15;
    const int nch = hd >> 2;
    float4 acc[2][4];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int m = 0; m < 4; m++) acc[a][m] = make_float4(0.f, 0.f, 0.f, 0.f);
    const long qpos = pos0 + q0 + sq;        // rows past nq see as much as row sq would: no NaN
    for (long k0 = 0; k0 < kend; k0 += APF_K) {
        __syncthreads();  // the previous tile's values and probabilities are consumed
        for (int r = 0; r < APF_K; r++)
            for (int d = tid; d < hd; d += blockDim.x)
                sKV[r * ld + d] = k0 + r < kend ? kc[(k0 + r) * kvw + (long)kvh * hd + d] : 0.f;
        __syncthreads();
        {
            const float4* qr = (const float4*)(sQ + sq * ld);
            const float4* ka = (const float4*)(sKV + sk * ld);
            const float4* kb = (const float4*)(sKV + (sk + 8) * ld);
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
            for (int c = 0; c < nch; c++) {
                const float4 x = qr[c], a = ka[c], b = kb[c];
                s0 = fmaf(x.x, a.x, fmaf(x.y, a.y, s0));
                s1 = fmaf(x.z, a.z, fmaf(x.w, a.w, s1));
                s2 = fmaf(x.x, b.x, fmaf(x.y, b.y, s2));
                s3 = fmaf(x.z, b.z, fmaf(x.w, b.w, s3));
            }
            sP[sq * (APF_K + 1) + sk] = k0 + sk <= qpos ? s0 + s1 : -INFINITY;
            sP[sq * (APF_K + 1) + sk + 8] = k0 + sk + 8 <= qpos ? s2 + s3 : -INFINITY;
        }
        __syncthreads();
        // The values into the key buffer, and each row's softmax update (8 lanes a row).
        for (int r = 0; r < APF_K; r++)
            for (int d = tid; d < hd; d += blockDim.x)
                sKV[r * ld + d] = k0 + r < kend ? vc[(k0 + r) * kvw + (long)kvh * hd + d] : 0.f;
        {
            float* row = sP + sq * (APF_K + 1);
            const float x0 = row[sk], x1 = row[sk + 8], mo = sM[sq];
            float mx = fmaxf(x0, x1);
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            // Key 0 is in every row's first tile, so mn is finite from there on.
            const float mn = fmaxf(mo, mx);
            const float p0 = expf(x0 - mn), p1 = expf(x1 - mn);
            float ps = p0 + p1;
            ps += __shfl_xor_sync(0xffffffffu, ps, 4);
            ps += __shfl_xor_sync(0xffffffffu, ps, 2);
            ps += __shfl_xor_sync(0xffffffffu, ps, 1);
            row[sk] = p0;
            row[sk + 8] = p1;
            __syncwarp();
            if (sk == 0) {
                const float corr = expf(mo - mn);
                sC[sq] = corr;
                sL[sq] = sL[sq] * corr + ps;
                sM[sq] = mn;
            }
        }
        __syncthreads();
        const float c0 = sC[pr], c1 = sC[pr + 1];
#pragma unroll
        for (int m = 0; m < 4; m++) {
            acc[0][m].x *= c0; acc[0][m].y *= c0; acc[0][m].z *= c0; acc[0][m].w *= c0;
            acc[1][m].x *= c1; acc[1][m].y *= c1; acc[1][m].z *= c1; acc[1][m].w *= c1;
        }
        const float* p0r = sP + pr * (APF_K + 1);
        const float* p1r = p0r + (APF_K + 1);
#pragma unroll 4
        for (int j = 0; j < APF_K; j++) {
            const float p0 = p0r[j], p1 = p1r[j];
            const float4* vr = (const float4*)(sKV + j * ld);
#pragma unroll
            for (int m = 0; m < 4; m++) {
                const int c = pd + 16 * m;
                if (c < nch) {
                    const float4 v = vr[c];
                    acc[0][m].x = fmaf(p0, v.x, acc[0][m].x);
                    acc[0][m].y = fmaf(p0, v.y, acc[0][m].y);
                    acc[0][m].z = fmaf(p0, v.z, acc[0][m].z);
                    acc[0][m].w = fmaf(p0, v.w, acc[0][m].w);
                    acc[1][m].x = fmaf(p1, v.x, acc[1][m].x);
                    acc[1][m].y = fmaf(p1, v.y, acc[1][m].y);
                    acc[1][m].z = fmaf(p1, v.z, acc[1][m].z);
                    acc[1][m].w = fmaf(p1, v.w, acc[1][m].w);
                }
            }
        }
    }
#pragma unroll
    for (int a = 0; a < 2; a++) {
        const int r = pr + a;
        if (r >= nq) continue;
        const float inv = 1.f / sL[r];
        const long base = (q0 + r) * ldq + (long)h * hd;
#pragma unroll
        for (int m = 0; m < 4; m++) {
            const int c = pd + 16 * m;
            if (c >= nch) continue;
            float vals[4] = {acc[a][m].x * inv, acc[a][m].y * inv, acc[a][m].z * inv, acc[a][m].w * inv};
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const long i = base + 4 * c + e;
                o[i] = gate ? vals[e] * sigmoidf_(gate[i]) : vals[e];
            }
        }
    }
}

// The gated delta rule (arch-spec §6.4-6.5) over T tokens in one launch: gdn_step's arithmetic
// with each thread's rows of the state in registers across the whole prompt (read and written
// once per call instead of once per token). Grid (nv, ceil(dv / nc)), block nc * P threads
// (rounded up to whole warps): thread (column c = tid / P, part = tid % P) owns rows
// part*RP .. +RP of column v = blockIdx.y*nc + c of S[h]; the P parts of a column are adjacent
// lanes and sum over rows with shuffles. Per chunk of TC tokens the block stages the
// l2-normalised k and q of key head h/rep (one warp a token; laid out so each part reads its
// rows as float4 without bank conflicts), v, decay and beta; then runs the tokens with no
// barrier. dk <= P * RP, P a power of two <= 32; TC tokens a chunk (<= 32, sized to the shared
// memory by the launch).
template <int RP>
__device__ __forceinline__ void gdn_rows_body(const float* u, const float* bv, const float* av,
                                              const float* dt_bias, const float* neg_a, float* S, float* y,
                                              int nk, int nv, int dk, int dv, int P, int nc, int T, int TC) {
    pdl_wait();
    pdl_release();
    extern __shared__ float4 gdr_sm4[];
    float* sm = (float*)gdr_sm4;
    const int W = P * RP;                    // rows, padded
    float* sKQ = sm;                         // [TC][2][W]: k then q; row i = p*RP + r at ((r/4)*P + p)*4 + r%4
    float* sV = sKQ + TC * 2 * W;        // [TC][nc]
    float* sG = sV + TC * nc;            // [TC] decay
    float* sB = sG + TC;                 // [TC] beta
    const int tid = threadIdx.x, part = tid % P, c = tid / P;
    const int h = blockIdx.x, v = blockIdx.y * nc + c;
    const bool act = c < nc && v < dv;
    const int rep = nv / nk, kh = h / rep, kd = nk * dk;
    const long cd = 2L * kd + (long)nv * dv, vd = (long)nv * dv;
    float* col = S + (long)h * dk * dv + v;
    float s[RP];
#pragma unroll
    for (int r = 0; r < RP; r++) {
        const int i = part * RP + r;
        s[r] = act && i < dk ? col[(long)i * dv] : 0.f;
    }
    const float dtb = dt_bias[h], na = neg_a[h];
    const int lane = tid & 31, warp = tid >> 5, nwarp = blockDim.x >> 5;
    for (int t0 = 0; t0 < T; t0 += TC) {
        const int nt = min(TC, T - t0);
        __syncthreads();  // the previous chunk is consumed
        for (int tt = warp; tt < nt; tt += nwarp) {
            const float* ur = u + (long)(t0 + tt) * cd;
            const float* qs = ur + (long)kh * dk;
            const float* ks = ur + kd + (long)kh * dk;
            float sq = 0.f, sk = 0.f;
            for (int i = lane; i < dk; i += 32) {
                sq += qs[i] * qs[i];
                sk += ks[i] * ks[i];
            }
            sq = warp_sum(sq);
            sk = warp_sum(sk);
            const float rq = 1.f / sqrtf(sq + 1e-6f) * (1.f / sqrtf((float)dk));
            const float rk = 1.f / sqrtf(sk + 1e-6f);
            float* dst = sKQ + tt * 2 * W;
            for (int i = lane; i < W; i += 32) {
                const int p = i / RP, r = i % RP;
                const int at = ((r >> 2) * P + p) * 4 + (r & 3);
                dst[at] = i < dk ? ks[i] * rk : 0.f;
                dst[W + at] = i < dk ? qs[i] * rq : 0.f;
            }
        }
        for (int e = tid; e < nt * nc; e += blockDim.x) {
            const int tt = e / nc, cc = e - tt * nc, vv = blockIdx.y * nc + cc;
            sV[e] = vv < dv ? u[(long)(t0 + tt) * cd + 2 * kd + (long)h * dv + vv] : 0.f;
        }
        if (tid < nt) {
            const long t = t0 + tid;
            sB[tid] = sigmoidf_(bv[t * nv + h]);
            const float x = av[t * nv + h] + dtb;
            const float sp = x > 20.f ? x : log1pf(expf(x));
            sG[tid] = expf(na * sp);
        }
        __syncthreads();
        for (int tt = 0; tt < nt; tt++) {
            const float4* k4 = (const float4*)(sKQ + tt * 2 * W);
            const float4* q4 = k4 + W / 4;
            const float decay = sG[tt], beta = sB[tt];
            float kr[RP];
            float m0 = 0.f, m1 = 0.f, m2 = 0.f, m3 = 0.f;
#pragma unroll
            for (int r4 = 0; r4 < RP / 4; r4++) {
                const float4 kk = k4[r4 * P + part];
                kr[4 * r4] = kk.x; kr[4 * r4 + 1] = kk.y; kr[4 * r4 + 2] = kk.z; kr[4 * r4 + 3] = kk.w;
                s[4 * r4] *= decay; s[4 * r4 + 1] *= decay; s[4 * r4 + 2] *= decay; s[4 * r4 + 3] *= decay;
                m0 = fmaf(s[4 * r4], kk.x, m0);
                m1 = fmaf(s[4 * r4 + 1], kk.y, m1);
                m2 = fmaf(s[4 * r4 + 2], kk.z, m2);
                m3 = fmaf(s[4 * r4 + 3], kk.w, m3);
            }
            float kvm = (m0 + m1) + (m2 + m3);
            for (int off = 1; off < P; off <<= 1) kvm += __shfl_xor_sync(0xffffffffu, kvm, off);
            const float delta = act ? (sV[tt * nc + c] - kvm) * beta : 0.f;
            float o0 = 0.f, o1 = 0.f, o2 = 0.f, o3 = 0.f;
#pragma unroll
            for (int r4 = 0; r4 < RP / 4; r4++) {
                const float4 qq = q4[r4 * P + part];
                s[4 * r4] = fmaf(kr[4 * r4], delta, s[4 * r4]);
                s[4 * r4 + 1] = fmaf(kr[4 * r4 + 1], delta, s[4 * r4 + 1]);
                s[4 * r4 + 2] = fmaf(kr[4 * r4 + 2], delta, s[4 * r4 + 2]);
                s[4 * r4 + 3] = fmaf(kr[4 * r4 + 3], delta, s[4 * r4 + 3]);
                o0 = fmaf(s[4 * r4], qq.x, o0);
                o1 = fmaf(s[4 * r4 + 1], qq.y, o1);
                o2 = fmaf(s[4 * r4 + 2], qq.z, o2);
                o3 = fmaf(s[4 * r4 + 3], qq.w, o3);
            }
            float ov = (o0 + o1) + (o2 + o3);
            for (int off = 1; off < P; off <<= 1) ov += __shfl_xor_sync(0xffffffffu, ov, off);
            if (act && part == 0) y[(long)(t0 + tt) * vd + (long)h * dv + v] = ov;
        }
    }
#pragma unroll
    for (int r = 0; r < RP; r++) {
        const int i = part * RP + r;
        if (act && i < dk) col[(long)i * dv] = s[r];
    }
}
#define GDN_ROWS(RP)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) gdn_rows##RP(                                         \
        const float* u, const float* bv, const float* av, const float* dt_bias, const float* neg_a, float* S, \
        float* y, int nk, int nv, int dk, int dv, int P, int nc, int T, int TC) {                             \
        gdn_rows_body<RP>(u, bv, av, dt_bias, neg_a, S, y, nk, nv, dk, dv, P, nc, T, TC);                    \
    }
GDN_ROWS(8)
GDN_ROWS(16)
GDN_ROWS(32)
// =============================================================================================
// End of the prompt mixers.
// BEGIN qgemm: prompt products (T > 1 rows) on the tensor cores (sm_80+; crates/cuda/src/gemm.rs).
// Y[n][r] = sum_c W[r][c] x[n][c] for an affine W (2/4/8-bit codes, group >= 32, bf16/f16/f32
// scales). Near f32: codes become exact f16 integers (dq2), x is staged once per product by
// gemm_prep_x as f16 hi + lo of x * 2^k with one power-of-two k per (row of x, group), the
// tensor cores accumulate sum(q x) of a group in f32 (mma.sync m16n8k16), and each group is
// folded in f32: acc += s * 2^-k * sum(q x 2^k) + b * sum(x).
// k-slot order: in a 16-column chunk, lane t (of a quad) feeds the MMA codes (p0, p0 + 16/BITS)
// and (p0 + 1, p0 + 1 + 16/BITS) of word t*BITS/8 with p0 = 2 (t % (8/BITS)); gemm_prep_x
// stores x of each chunk in that order, so the lane's B fragment is one 8-byte read.
// =============================================================================================
struct GemmProb {
    u64 w, s, b;  // the matrix
    u64 y;        // output of its first token; token n at y + n * ldy floats
    int rows, ldy, ntok, x0;  // x0: first row of the prepared x its tokens read
};
struct GemmBatch {
    GemmProb p[MAXP];
};
static_assert(sizeof(GemmProb) == 48, "GemmProb mirrors gemm::GemmProb");
static_assert(sizeof(GemmBatch) == 48 * MAXP, "GemmBatch mirrors gemm::GemmBatch");

#define QG_BM 128
#define QG_BN 64
#define QG_BK 64
#define QG_NST 4
// Bytes of one staged token row of a k-tile: 4 chunks x (hi 32 + lo 32), padded so that the
// 8 tokens of a B fragment read hit distinct banks.
#define QG_XROW 288
// Bytes of one staged weight row of a k-tile: its codes (8 BITS bytes), padded so that the 8
// rows of an A fragment read hit distinct banks.
#define QG_WROW(BITS) ((BITS) == 2 ? 48 : 8 * (BITS) + 16)

// Position in a chunk's staged x of column j (0..15) of the chunk, for BITS-wide codes.
__device__ __forceinline__ int qg_pos(int bits, int j) {
    const int epw = 32 / bits, hpw = 16 / bits, wpb = 8 / bits;
    const int wi = j / epw, p = j % epw, h = p / hpw, q = p % hpw;
    const int t = wi * wpb + (q >> 1), e = ((q & 1) << 1) | h;
    return t * 4 + e;
}

// x (rows of ldx floats; row i is src row idx[i] when idx is given) staged for qgemm: per row
// `cols` u32 (per 16-column chunk 16 f16 hi then 16 f16 lo, in qg_pos order), and per (row,
// group) (2^-k, sum x). One warp per (row, group).
extern "C" __global__ void __launch_bounds__(256) gemm_prep_x(const float* x, int ldx, const int* idx, int nrows,
                                                              int cols, int lg, int bits, u16* xq, float2* meta) {
    pdl_wait();
    pdl_release();
    const int lane = threadIdx.x & 31, gs = 1 << lg, gpr = cols >> lg;
    const long npairs = (long)nrows * gpr;
    for (long pr = (long)blockIdx.x * 8 + (threadIdx.x >> 5); pr < npairs; pr += (long)gridDim.x * 8) {
        const int r = (int)(pr / gpr), g = (int)(pr % gpr);
        const long src = idx ? (long)idx[r] : (long)r;
        const float* xr = x + src * ldx + (long)g * gs;
        float v[4];
        float m = 0.f, sm = 0.f;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int c = lane + 32 * i;
            v[i] = c < gs ? xr[c] : 0.f;
            m = fmaxf(m, fabsf(v[i]));
            sm += v[i];
        }
        m = warp_max(m);
        sm = warp_sum(sm);
        // The group's largest element scaled to [2^13, 2^14): hi and lo keep about 22 bits.
        int k = 13 - (((__float_as_int(m) >> 23) & 0xff) - 127);
        k = min(max(k, -100), 100);
        const float sc = __int_as_float((127 + k) << 23);
        u16* row = xq + (long)r * cols * 2;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int c = lane + 32 * i;
            if (c < gs) {
                const int col = g * gs + c;
                const float a = v[i] * sc;
                const u16 hi = f2h_(a);
                const u16 lo = f2h_(a - f16f(hi));
                u16* ch = row + (col >> 4) * 32;
                const int pos = qg_pos(bits, col & 15);
                ch[pos] = hi;
                ch[16 + pos] = lo;
            }
        }
        if (lane == 0) {
            float2 mt;
            mt.x = __int_as_float((127 - k) << 23);
            mt.y = sm;
            meta[pr] = mt;
        }
    }
}

__device__ __forceinline__ u32 qg_saddr(const void* p) {
    u32 s;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(s) : "l"(p));
    return s;
}
__device__ __forceinline__ void qg_cp16(void* smem, const void* g) {
    const u32 s = qg_saddr(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(g) : "memory");
}
__device__ __forceinline__ void qg_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void qg_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// One 128-row x 64-token tile of problem P, over k-tiles of 64 columns in a 4-stage ring
// (dynamic shared memory above 48 KiB: gemm.rs opts in). 8 warps: warp & 3 picks 32 rows,
// warp >> 2 picks 32 tokens; each warp holds 2 x 4 MMA tiles (16 rows x 8 tokens) and their
// group sums.
template <int BITS, int SDT>
__device__ void qgemm_tile(const GemmProb& P, int cols, int lg, const u16* xq, const float2* meta) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    extern __shared__ __align__(16) unsigned char qg_sm[];
    const int WROW = 8 * BITS;                 // bytes of a row's k-tile of codes
    const int RS = QG_WROW(BITS);              // their stride in shared memory
    const int WST = QG_BM * RS;                // bytes of a stage's codes
    const int XST = QG_BN * QG_XROW;           // bytes of a stage's x
    const int m0 = blockIdx.x * QG_BM, n0 = blockIdx.y * QG_BN;
    if (m0 >= P.rows || n0 >= P.ntok) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int wm = warp & 3, wn = warp >> 2;
    const int wpr = cols * BITS / 32, gpr = cols >> lg, nkt = cols / QG_BK;
    const unsigned char* W = (const unsigned char*)P.w;
    const u16* X = xq + (long)P.x0 * cols * 2;
    const float2* M = meta + (long)P.x0 * gpr;
    unsigned char* ws = qg_sm;
    unsigned char* xs = qg_sm + QG_NST * WST;
    // Stage k-tile kt into buffer st: codes of 128 rows (rows past the end repeat the last),
    // x of the tokens that exist (a token past the end only feeds its own MMA column, whose
    // results are never written, so its stale shared memory is harmless).
    auto load = [&](int kt, int st) {
        if (kt < nkt) {
            const int CPR = WROW / 16;  // 16-byte copies per row
            for (int i = threadIdx.x; i < QG_BM * CPR; i += 256) {
                const int r = i / CPR, part = i % CPR;
                const long gr = min(m0 + r, P.rows - 1);
                const unsigned char* src = W + (gr * wpr) * 4 + (long)kt * WROW + part * 16;
                qg_cp16(ws + st * WST + r * RS + part * 16, src);
            }
            for (int i = threadIdx.x; i < QG_BN * 16; i += 256) {
                const int n = i >> 4, part = i & 15;
                if (n0 + n < P.ntok) {
                    const u16* src = X + (long)(n0 + n) * cols * 2 + (long)kt * QG_BK * 2 + part * 8;
                    qg_cp16(xs + st * XST + n * QG_XROW + part * 16, src);
                }
            }
        }
        qg_commit();
    };
    pdl_wait();
    pdl_release();
#pragma unroll
    for (int s = 0; s < QG_NST - 1; s++) load(s, s);

    float acc[2][4][4], c[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = c[i][j][e] = 0.f;
    // Rows (g, g + 8 of each 16-row tile) and tokens (2t, 2t + 1 of each 8-token tile) this
    // lane's accumulators hold, clamped for loads.
    long srow[2][2];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) srow[i][h] = (long)min(m0 + wm * 32 + i * 16 + h * 8 + g, P.rows - 1) * gpr;
    int tok[4][2];
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int h = 0; h < 2; h++) tok[j][h] = min(n0 + wn * 32 + j * 8 + 2 * t + h, P.ntok - 1);
    float sv[2][2], bv[2][2], iv[4][2], xv[4][2];
    const int wi = t * BITS / 8, shift = (t % (8 / BITS)) * BITS * 2;
    const int gk = (1 << lg) / 16;  // 16-column chunks per group
    for (int kt = 0; kt < nkt; kt++) {
        qg_wait<QG_NST - 2>();
        __syncthreads();
        load(kt + QG_NST - 1, (kt + QG_NST - 1) % QG_NST);
        const int st = kt % QG_NST;
        const u32* wsm = (const u32*)(ws + st * WST);
        const unsigned char* xsm = xs + st * XST;
#pragma unroll
        for (int kc = 0; kc < 4; kc++) {
            const int ch = kt * 4 + kc;  // 16-column chunk index
            if (ch % gk == 0) {
                const int gi = ch / gk;
#pragma unroll
                for (int i = 0; i < 2; i++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        sv[i][h] = ldsc<SDT>((const void*)P.s, srow[i][h] + gi);
                        bv[i][h] = ldsc<SDT>((const void*)P.b, srow[i][h] + gi);
                    }
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        const float2 mt = M[(long)tok[j][h] * gpr + gi];
                        iv[j][h] = mt.x;
                        xv[j][h] = mt.y;
                    }
            }
            // A warp whose tokens all lie past the problem's end (routed experts: a few tokens
            // each) skips its products; each 8-token tile past the end too.
            if (n0 + wn * 32 < P.ntok) {
            u32 a[2][4];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int r = wm * 32 + i * 16 + g;
                const u32 w0 = wsm[r * (RS / 4) + kc * (BITS / 2) + wi] >> shift;
                const u32 w1 = wsm[(r + 8) * (RS / 4) + kc * (BITS / 2) + wi] >> shift;
                a[i][0] = dq2<BITS>(w0, 0);
                a[i][1] = dq2<BITS>(w1, 0);
                a[i][2] = dq2<BITS>(w0, 1);
                a[i][3] = dq2<BITS>(w1, 1);
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                if (n0 + wn * 32 + j * 8 >= P.ntok) break;
                const unsigned char* xb = xsm + (wn * 32 + j * 8 + g) * QG_XROW + kc * 64 + t * 8;
                const uint2 hi = *(const uint2*)xb;
                const uint2 lo = *(const uint2*)(xb + 32);
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    mma16816(c[i][j], a[i][0], a[i][1], a[i][2], a[i][3], hi.x, hi.y);
                    mma16816(c[i][j], a[i][0], a[i][1], a[i][2], a[i][3], lo.x, lo.y);
                }
            }
            }
            if ((ch + 1) % gk == 0) {
#pragma unroll
                for (int i = 0; i < 2; i++)
#pragma unroll
                    for (int j = 0; j < 4; j++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int h = e >> 1, n = e & 1;  // c[e]: row g + 8h, token 2t + n
                            acc[i][j][e] = fmaf(sv[i][h] * iv[j][n], c[i][j][e], fmaf(bv[i][h], xv[j][n], acc[i][j][e]));
                            c[i][j][e] = 0.f;
                        }
            }
        }
    }
    qg_wait<0>();
    float* Y = (float*)P.y;
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = m0 + wm * 32 + i * 16 + (e >> 1) * 8 + g;
                const int n = n0 + wn * 32 + j * 8 + 2 * t + (e & 1);
                if (r < P.rows && n < P.ntok) Y[(long)n * P.ldy + r] = acc[i][j][e];
            }
#endif
}

// Kernel names: qgemm{bits}_{sdt} (up to MAXP problems by value, blockIdx.z) and
// qgemm{bits}_{sdt}_t (problems in a device table: the routed experts of a prompt).
#define QGK(BITS, SDT, SN)                                                                                  \
    extern "C" __global__ void __launch_bounds__(256, 2) qgemm##BITS##_##SN(GemmBatch b, int cols, int lg,     \
                                                                        const u16* xq, const float2* meta) { \
        qgemm_tile<BITS, SDT>(b.p[blockIdx.z], cols, lg, xq, meta);                                         \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256, 2) qgemm##BITS##_##SN##_t(const GemmProb* tbl, int cols,  \
                                                                            int lg, const u16* xq,          \
                                                                            const float2* meta) {           \
        pdl_wait();                                                                                         \
        const GemmProb P = tbl[blockIdx.z];                                                                 \
        qgemm_tile<BITS, SDT>(P, cols, lg, xq, meta);                                                       \
    }
QGK(4, 0, bf16) QGK(4, 1, f16) QGK(4, 2, f32)
QGK(2, 0, bf16) QGK(2, 1, f16) QGK(2, 2, f32)
QGK(8, 0, bf16) QGK(8, 1, f16) QGK(8, 2, f32)

// out[n] += sum_j w[n k + j] y[idx[n k + j]] over j < k with idx >= 0, in j order (rows of h):
// a prompt's routed experts, each expert's rows computed apart, added back per token.
extern "C" __global__ void gemm_rows_combine(float* out, const float* y, const int* idx, const float* w, int k,
                                             int h) {
    pdl_wait();
    pdl_release();
    const long n = blockIdx.y;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < h; i += gridDim.x * blockDim.x) {
        float v = out[n * h + i];
        for (int j = 0; j < k; j++) {
            const int r = idx[n * k + j];
            if (r >= 0) v = fmaf(w[n * k + j], y[(long)r * h + i], v);
        }
        out[n * h + i] = v;
    }
}
// END qgemm
// =============================================================================================
