// The non-GEMM layers of the CLIP ViT-B/32 image tower: fp16 storage with fp32 arithmetic,
// except the residual stream, which stays fp32 (see src/gpu/vit/mod.rs, Act::dtype).
// GEMMs (patch projection, QKV, attention output, MLP, final projection) go through cuBLASLt;
// these kernels do the rest. Activations are row-major [rows, width] with one row per token
// (rows = batch * tokens), as OpenAI CLIP's `x` after `permute(1, 0, 2)` undone.
//
// Compiled at run time by NVRTC (src/gpu); CI compiles it with no GPU present. Launched by
// src/gpu/vit/cuda.rs; each kernel's reference semantics (its CPU twin) is src/gpu/vit/cpu.rs,
// which must change with it. Not yet run on a GPU: tools/gpu-check.sh is the check.

#include <cuda_fp16.h>

#define MAX_HEAD_DIM 64
#define MAX_TOKENS 64

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    float t = lane < warps ? scratch[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffff, t, o);
    return t;
}

// Crops [batch, 3, S, S] -> patches [batch * (S/P)^2, 3 * P * P] in the order of the conv
// weight [width, 3, P, P] flattened, so the patch projection is one GEMM. One thread per value.
extern "C" __global__ void patchify(const __half* __restrict__ crops, int batch, int size,
                                    int patch, __half* __restrict__ out) {
    const int grid = size / patch;
    const int per_patch = 3 * patch * patch;
    const long long total = (long long)batch * grid * grid * per_patch;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int k = (int)(i % per_patch);
    const long long row = i / per_patch;
    const int p = (int)(row % (grid * grid));
    const int b = (int)(row / (grid * grid));
    const int c = k / (patch * patch), r = k % (patch * patch);
    const int y = (p / grid) * patch + r / patch, x = (p % grid) * patch + r % patch;
    out[i] = crops[(((long long)b * 3 + c) * size + y) * size + x];
}

// Tokens [batch * (1 + n_patches), width] of the fp32 residual stream: the class embedding
// then the projected patches, each plus its positional embedding.
extern "C" __global__ void embed_tokens(const __half* __restrict__ patches,  // [batch*n, width]
                                        const __half* __restrict__ class_embedding,  // [width]
                                        const __half* __restrict__ positional,  // [1+n, width]
                                        int batch, int n_patches, int width,
                                        float* __restrict__ out) {
    const int tokens = n_patches + 1;
    const long long total = (long long)batch * tokens * width;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int w = (int)(i % width);
    const long long row = i / width;
    const int t = (int)(row % tokens);
    const long long b = row / tokens;
    const float v = t == 0 ? __half2float(class_embedding[w])
                           : __half2float(patches[(b * n_patches + t - 1) * width + w]);
    out[i] = v + __half2float(positional[(long long)t * width + w]);
}

__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }

// One block per row (launch with (width + 32) * 4 bytes of dynamic shared memory):
// sum = x + residual (when residual is given; written to sum_out when that is given), then
// norm_out = LayerNorm(sum) * gamma + beta with fp32 statistics. x and sum_out are the fp32
// residual stream (sum_out may be x); residual is an fp16 branch.
template <typename Out>
__device__ void add_layernorm_row(const float* x, const __half* residual, float* sum_out,
                                  Out* norm_out, const __half* gamma, const __half* beta,
                                  int width, float eps) {
    extern __shared__ float row[];  // width floats, then 32 for the reduction
    float* scratch = row + width;
    const long long base = (long long)blockIdx.x * width;
    float local = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = x[base + i];
        if (residual) v += __half2float(residual[base + i]);
        row[i] = v;
        local += v;
    }
    const float mean = block_sum(local, scratch) / width;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const float d = row[i] - mean;
        sq += d * d;
    }
    const float rstd = rsqrtf(block_sum(sq, scratch) / width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        if (sum_out) sum_out[base + i] = row[i];
        const float n = (row[i] - mean) * rstd;
        store(norm_out + base + i, n * __half2float(gamma[i]) + __half2float(beta[i]));
    }
}

// The LayerNorms in front of a GEMM (ln_1, ln_2 with the previous branch added, ln_post):
// fp16 out.
extern "C" __global__ void add_layernorm(const float* x, const __half* residual, float* sum_out,
                                         __half* norm_out, const __half* __restrict__ gamma,
                                         const __half* __restrict__ beta, int width, float eps) {
    add_layernorm_row(x, residual, sum_out, norm_out, gamma, beta, width, eps);
}

// ln_pre, in place on the fp32 stream (out may be x).
extern "C" __global__ void layernorm_f32(const float* x, float* out,
                                         const __half* __restrict__ gamma,
                                         const __half* __restrict__ beta, int width, float eps) {
    add_layernorm_row(x, (const __half*)0, (float*)0, out, gamma, beta, width, eps);
}

// x = QuickGELU(x + bias) = y * sigmoid(1.702 y), in place, x [rows, cols].
extern "C" __global__ void bias_quick_gelu(__half* __restrict__ x, const __half* __restrict__ bias,
                                           int cols, long long total) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const float y = __half2float(x[i]) + __half2float(bias[i % cols]);
    x[i] = __float2half(y / (1.0f + __expf(-1.702f * y)));
}

// x += bias, in place (GEMM outputs without a fused epilogue).
extern "C" __global__ void add_bias(__half* __restrict__ x, const __half* __restrict__ bias,
                                    int cols, long long total) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    x[i] = __float2half(__half2float(x[i]) + __half2float(bias[i % cols]));
}

// Multi-head self-attention for short sequences (CLIP ViT-B/32: 50 tokens, 12 heads of 64).
// One block per (head, image); qkv [batch * tokens, 3 * width] with q, k, v side by side (the
// order of OpenAI CLIP's in_proj), head h in columns h*head_dim .. (h+1)*head_dim - 1 of each;
// out [batch * tokens, width]. head_dim <= 64 and tokens <= 64 (the engine checks both before
// launching). Scores and the softmax in fp32 shared memory.
extern "C" __global__ void attention(const __half* __restrict__ qkv, int tokens, int width,
                                     int head_dim, float scale, __half* __restrict__ out) {
    __shared__ __half q[MAX_TOKENS][MAX_HEAD_DIM];
    __shared__ __half k[MAX_TOKENS][MAX_HEAD_DIM + 2];
    __shared__ __half v[MAX_TOKENS][MAX_HEAD_DIM];
    __shared__ float s[MAX_TOKENS][MAX_TOKENS + 1];
    const int h = blockIdx.x, b = blockIdx.y;
    if (tokens > MAX_TOKENS || head_dim > MAX_HEAD_DIM) return;
    const long long row0 = (long long)b * tokens;
    const int stride = 3 * width;
    for (int i = threadIdx.x; i < tokens * head_dim; i += blockDim.x) {
        const int t = i / head_dim, d = i % head_dim;
        const __half* r = qkv + (row0 + t) * stride + h * head_dim + d;
        q[t][d] = r[0];
        k[t][d] = r[width];
        v[t][d] = r[2 * width];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < tokens * tokens; i += blockDim.x) {
        const int a = i / tokens, c = i % tokens;
        float acc = 0.0f;
        for (int d = 0; d < head_dim; ++d) acc += __half2float(q[a][d]) * __half2float(k[c][d]);
        s[a][c] = acc * scale;
    }
    __syncthreads();
    // Softmax per row, one warp per row.
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int a = warp; a < tokens; a += warps) {
        float m = __int_as_float(0xff800000);  // -inf
        for (int c = lane; c < tokens; c += 32) m = fmaxf(m, s[a][c]);
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
        float sum = 0.0f;
        for (int c = lane; c < tokens; c += 32) {
            const float e = __expf(s[a][c] - m);
            s[a][c] = e;
            sum += e;
        }
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
        const float inv = 1.0f / sum;
        for (int c = lane; c < tokens; c += 32) s[a][c] *= inv;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < tokens * head_dim; i += blockDim.x) {
        const int a = i / head_dim, d = i % head_dim;
        float acc = 0.0f;
        for (int c = 0; c < tokens; ++c) acc += s[a][c] * __half2float(v[c][d]);
        out[(row0 + a) * width + h * head_dim + d] = __float2half(acc);
    }
}

// dst[i] = src[i * stride] for count rows of width values (the class tokens). One thread per
// value.
extern "C" __global__ void take_rows(const __half* __restrict__ src, int count, int stride,
                                     int width, __half* __restrict__ dst) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)count * width) return;
    const long long r = i / width;
    dst[i] = src[r * stride * width + i % width];
}
