// What a kernel boundary costs on the decode path, against a grid barrier inside one persistent
// kernel. Built and run on the device machine: nvcc -O3 -arch=sm_90 boundary_probe.cu && ./a.out
// A "phase" is either a small op (every block reads a 4096-float row from L2 and writes its
// slice, like a norm) or a streaming op (the grid reads MB megabytes of a buffer much larger
// than L2, like a matvec's weights). Modes: a chain of kernels launched plainly, with
// programmatic dependent launch (PDL), the PDL chain captured in a graph, and one cooperative
// kernel whose phases are separated by grid barriers.
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

struct P {
    const float* xin; float* y0; float* y1; const uint4* big; size_t seg_u4; int nseg; float* sink; unsigned* bar;
};

__device__ __forceinline__ void pdl_release() { asm volatile("griddepcontrol.launch_dependents;"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v; asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
// Monotonic counter: barrier k of a launch waits for k * gridDim.x arrivals.
__device__ __forceinline__ void grid_bar(unsigned* bar, unsigned target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(bar, 1u);
        while (ld_acquire(bar) < target) { }
    }
    __syncthreads();
}

__device__ float block_sum(float v) {
    __shared__ float red[32];
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(~0u, v, o);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) red[w] = v;
    __syncthreads();
    float t = 0; for (int i = 0; i < (int)(blockDim.x >> 5); i++) t += red[i];
    return t;
}

// Every virtual block `vb` of `nvb` reads the whole row and writes its slice.
__device__ void small_op(const float* x, float* y, int vb, int nvb) {
    float s = 0;
    for (int i = threadIdx.x; i < 4096; i += blockDim.x) s += x[i] * x[i];
    float r = rsqrtf(block_sum(s) / 4096.f + 1e-6f);
    int per = 4096 / nvb;
    for (int i = vb * per + threadIdx.x; i < (vb + 1) * per; i += blockDim.x) y[i] = x[i] * r;
}
__device__ void stream_op(const uint4* seg, size_t n, float* sink, int vb, int nvb) {
    unsigned acc = 0;
    size_t stride = (size_t)nvb * blockDim.x;
    size_t i = (size_t)vb * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = __ldg(seg + i), b = __ldg(seg + i + stride), c = __ldg(seg + i + 2 * stride), d = __ldg(seg + i + 3 * stride);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n; i += stride) { uint4 a = __ldg(seg + i); acc ^= a.x ^ a.y ^ a.z ^ a.w; }
    float v = block_sum((float)(acc & 0xff));
    if (threadIdx.x == 0) sink[vb] = v;
}

// kind: 0 small, 1 stream. `ph` selects buffers / segment.
__global__ void __launch_bounds__(256) one(P p, int kind, int ph, int pdl) {
    if (pdl) { pdl_release(); pdl_wait(); }
    if (kind == 0) small_op(ph & 1 ? p.y0 : p.y1, ph & 1 ? p.y1 : p.y0, blockIdx.x, gridDim.x);
    else stream_op(p.big + (size_t)(ph % p.nseg) * p.seg_u4, p.seg_u4, p.sink, blockIdx.x, gridDim.x);
}
__global__ void __launch_bounds__(256) persistent(P p, const int* kinds, int n) {
    for (int ph = 0; ph < n; ph++) {
        if (kinds[ph] == 0) small_op(ph & 1 ? p.y0 : p.y1, ph & 1 ? p.y1 : p.y0, blockIdx.x, gridDim.x);
        else stream_op(p.big + (size_t)(ph % p.nseg) * p.seg_u4, p.seg_u4, p.sink, blockIdx.x, gridDim.x);
        grid_bar(p.bar, (unsigned)(ph + 1) * gridDim.x);
    }
}

static void launch(const P& p, int kind, int ph, bool pdl, int grid, cudaStream_t s) {
    cudaLaunchConfig_t c = {};
    c.gridDim = dim3(grid); c.blockDim = dim3(256); c.stream = s;
    cudaLaunchAttribute a[1];
    a[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    a[0].val.programmaticStreamSerializationAllowed = 1;
    c.attrs = a; c.numAttrs = pdl ? 1 : 0;
    CK(cudaLaunchKernelEx(&c, one, p, kind, ph, (int)pdl));
}

int main(int argc, char** argv) {
    int dev = 0, sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    int per_sm; CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, persistent, 256, 0));
    cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    const size_t big_bytes = (size_t)2 << 30;
    P p; float *x, *y0, *y1, *sink; uint4* big; unsigned* bar; int* dk;
    CK(cudaMalloc(&x, 4096 * 4)); CK(cudaMalloc(&y0, 4096 * 4)); CK(cudaMalloc(&y1, 4096 * 4));
    CK(cudaMalloc(&sink, 1 << 20)); CK(cudaMalloc(&big, big_bytes)); CK(cudaMalloc(&bar, 4));
    CK(cudaMalloc(&dk, 4096 * 4));
    CK(cudaMemset(big, 1, big_bytes));
    std::vector<float> h(4096, 1.0f); CK(cudaMemcpy(y0, h.data(), 16384, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(y1, h.data(), 16384, cudaMemcpyHostToDevice));
    p.xin = x; p.y0 = y0; p.y1 = y1; p.big = big; p.sink = sink; p.bar = bar;
    cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
    printf("sms %d, persistent blocks per sm %d\n", sms, per_sm);
    // D2D reference
    {
        void* d; CK(cudaMalloc(&d, (size_t)1 << 30));
        for (int r = 0; r < 2; r++) {
            CK(cudaEventRecord(e0, s));
            for (int i = 0; i < 10; i++) CK(cudaMemcpyAsync(d, big, (size_t)1 << 30, cudaMemcpyDeviceToDevice, s));
            CK(cudaEventRecord(e1, s)); CK(cudaEventSynchronize(e1));
            float ms; CK(cudaEventElapsedTime(&ms, e0, e1));
            printf("d2d %.0f GB/s (read+write)\n", 2.0 * 10 * (1 << 30) / (ms * 1e6));
        }
        CK(cudaFree(d));
    }
    struct Mix { const char* name; int mb; int small_per_stream; int small_grid; };
    Mix mixes[] = {{"small only", 0, 1, 16}, {"small only, grid=persistent", 0, 1, -1},
                   {"stream 8MB", 8, 0, 0}, {"stream 32MB", 32, 0, 0}, {"stream 16MB + 2 small", 16, 2, 16},
                   {"stream 4MB + 1 small", 4, 1, 16}};
    const int N = 104;
    for (auto& m : mixes) {
        std::vector<int> kinds;
        while ((int)kinds.size() < N) {
            if (m.mb) kinds.push_back(1);
            for (int i = 0; i < m.small_per_stream && (int)kinds.size() < N; i++) kinds.push_back(0);
        }
        CK(cudaMemcpy(dk, kinds.data(), N * 4, cudaMemcpyHostToDevice));
        p.seg_u4 = (size_t)(m.mb ? m.mb : 1) * (1 << 20) / 16;
        p.nseg = (int)(big_bytes / 16 / p.seg_u4);
        int pgrid = sms * (argc > 1 ? atoi(argv[1]) : per_sm);
        int sgrid = m.small_grid > 0 ? m.small_grid : pgrid;
        double bytes = 0; for (int k : kinds) bytes += k ? (double)m.mb * (1 << 20) : 0;
        auto chain = [&](bool pdl) {
            for (int i = 0; i < N; i++) launch(p, kinds[i], i, pdl, kinds[i] ? pgrid : sgrid, s);
        };
        float best[4] = {1e9, 1e9, 1e9, 1e9};
        cudaGraphExec_t ge = nullptr;
        {
            cudaGraph_t g;
            CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
            chain(true);
            CK(cudaStreamEndCapture(s, &g));
            CK(cudaGraphInstantiate(&ge, g, 0));
        }
        for (int rep = 0; rep < 5; rep++) {
            for (int mode = 0; mode < 4; mode++) {
                if (mode == 3) CK(cudaMemsetAsync(bar, 0, 4, s));
                CK(cudaEventRecord(e0, s));
                if (mode == 0) chain(false);
                else if (mode == 1) chain(true);
                else if (mode == 2) CK(cudaGraphLaunch(ge, s));
                else {
                    void* args[] = {&p, &dk, (void*)&N};
                    CK(cudaLaunchCooperativeKernel((void*)persistent, dim3(pgrid), dim3(256), args, 0, s));
                }
                CK(cudaEventRecord(e1, s)); CK(cudaEventSynchronize(e1));
                float ms; CK(cudaEventElapsedTime(&ms, e0, e1));
                if (ms < best[mode]) best[mode] = ms;
            }
        }
        printf("%-30s us/phase: plain %.2f  pdl %.2f  pdl-graph %.2f  persistent+barrier %.2f",
               m.name, best[0] * 1e3 / N, best[1] * 1e3 / N, best[2] * 1e3 / N, best[3] * 1e3 / N);
        if (bytes > 0)
            printf("   GB/s: %.0f %.0f %.0f %.0f", bytes / (best[0] * 1e6), bytes / (best[1] * 1e6),
                   bytes / (best[2] * 1e6), bytes / (best[3] * 1e6));
        printf("\n");
    }
    CK(cudaDeviceSynchronize());
    return 0;
}
