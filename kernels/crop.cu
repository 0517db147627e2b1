// Fused face crop: frame pixels -> aligned, resized, CLIP-normalised fp16 NCHW, in one pass.
//
// One launch crops every face of one frame: grid (ceil(S*S / 256), faces), 256 threads per
// block, one thread per output pixel. Each face has a 2x3 inverse map (output pixel centre
// -> frame coordinates; the alignment composed with the 317 -> S resize, see
// crop::fused_inverse), pixel centres at integer coordinates as OpenCV. Sampling is bilinear
// with a black border, rounded to 0..255 like the CPU reference (crop::warp::
// warp_affine_bilinear), then normalised as v * scale[c] - shift[c] with scale = 1/(255 std)
// and shift = mean/std, and written as fp16 at out[face][c][y][x].
//
// Compiled at run time by NVRTC (src/gpu); CI compiles it with no GPU present.

#include <cuda_fp16.h>

struct CropParams {
    int width;        // frame width in pixels
    int height;       // frame height in pixels
    int size;         // output side S
    float scale[3];   // per channel: 1 / (255 * std)
    float shift[3];   // per channel: mean / std
};

// Bilinear weights and the four neighbours of (sx, sy); false when all four are outside.
__device__ __forceinline__ bool neighbours(float sx, float sy, int w, int h, int& x0, int& y0,
                                           float& ax, float& ay) {
    if (!isfinite(sx) || !isfinite(sy)) return false;
    float fx = floorf(sx), fy = floorf(sy);
    x0 = (int)fx;
    y0 = (int)fy;
    ax = sx - fx;
    ay = sy - fy;
    return !(x0 >= w || x0 + 1 < 0 || y0 >= h || y0 + 1 < 0);
}

__device__ __forceinline__ float round_u8(float v) {
    return fminf(fmaxf(rintf(v), 0.0f), 255.0f);
}

// Output pixel `idx` of a face with inverse map `m` (6 floats): its source position's
// neighbours and bilinear weights; false when all four are outside the frame.
__device__ __forceinline__ bool source_neighbours(const float* m, int idx, const CropParams& p,
                                                  int& x0, int& y0, float& ax, float& ay) {
    const int u = idx % p.size, v = idx / p.size;
    const float sx = m[0] * u + m[1] * v + m[2];
    const float sy = m[3] * u + m[4] * v + m[5];
    return neighbours(sx, sy, p.width, p.height, x0, y0, ax, ay);
}

// CLIP normalisation of one output pixel, written as fp16 at out[face][c][idx].
__device__ __forceinline__ void store_normalised(const float rgb[3], int face, int idx,
                                                 const CropParams& p, __half* __restrict__ out) {
    const int plane = p.size * p.size;
    __half* o = out + (size_t)face * 3 * plane;
    for (int c = 0; c < 3; ++c) {
        o[c * plane + idx] = __float2half(rgb[c] * p.scale[c] - p.shift[c]);
    }
}

// Packed RGB8 frame with a row stride in bytes.
extern "C" __global__ void crop_rgb_fp16(const unsigned char* __restrict__ frame, int stride,
                                         const float* __restrict__ inverse,  // faces x 6
                                         CropParams p, __half* __restrict__ out) {
    const int face = blockIdx.y;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= p.size * p.size) return;
    float rgb[3] = {0.0f, 0.0f, 0.0f};
    int x0, y0;
    float ax, ay;
    if (source_neighbours(inverse + 6 * face, idx, p, x0, y0, ax, ay)) {
        for (int c = 0; c < 3; ++c) {
            float q[4];
            for (int k = 0; k < 4; ++k) {
                const int x = x0 + (k & 1), y = y0 + (k >> 1);
                const bool in = x >= 0 && y >= 0 && x < p.width && y < p.height;
                q[k] = in ? (float)frame[(size_t)y * stride + 3 * x + c] : 0.0f;
            }
            const float top = (1.0f - ax) * q[0] + ax * q[1];
            const float bottom = (1.0f - ax) * q[2] + ax * q[3];
            rgb[c] = round_u8((1.0f - ay) * top + ay * bottom);
        }
    }
    store_normalised(rgb, face, idx, p, out);
}

// YUV -> RGB coefficients (full 8-bit scale): r = ky (y - y_off) + kr v', ...
struct YuvParams {
    float y_offset;   // 16 for limited range, 0 for full
    float y_scale;    // 255/219 limited, 1 full
    float c_scale;    // 255/224 limited, 1 full
    float kr_v;       // red from V
    float kg_u;       // green from U
    float kg_v;       // green from V
    float kb_u;       // blue from U
};

__device__ __forceinline__ void nv12_rgb(const unsigned char* __restrict__ luma, int luma_stride,
                                         const unsigned char* __restrict__ chroma,
                                         int chroma_stride, int x, int y, const YuvParams& k,
                                         float out[3]) {
    const float yy = ((float)luma[(size_t)y * luma_stride + x] - k.y_offset) * k.y_scale;
    const size_t ci = (size_t)(y >> 1) * chroma_stride + 2 * (x >> 1);
    const float cu = ((float)chroma[ci] - 128.0f) * k.c_scale;
    const float cv = ((float)chroma[ci + 1] - 128.0f) * k.c_scale;
    out[0] = round_u8(yy + k.kr_v * cv);
    out[1] = round_u8(yy - k.kg_u * cu - k.kg_v * cv);
    out[2] = round_u8(yy + k.kb_u * cu);
}

// NV12 frame (what NVDEC hands out): each of the four neighbours is converted to RGB (nearest
// chroma sample, as a CPU NV12 -> RGB conversion followed by the RGB crop would), then
// interpolated.
extern "C" __global__ void crop_nv12_fp16(const unsigned char* __restrict__ luma, int luma_stride,
                                          const unsigned char* __restrict__ chroma,
                                          int chroma_stride,
                                          const float* __restrict__ inverse,  // faces x 6
                                          CropParams p, YuvParams k, __half* __restrict__ out) {
    const int face = blockIdx.y;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= p.size * p.size) return;
    float rgb[3] = {0.0f, 0.0f, 0.0f};
    int x0, y0;
    float ax, ay;
    if (source_neighbours(inverse + 6 * face, idx, p, x0, y0, ax, ay)) {
        float q[4][3];
        for (int n = 0; n < 4; ++n) {
            const int x = x0 + (n & 1), y = y0 + (n >> 1);
            if (x >= 0 && y >= 0 && x < p.width && y < p.height) {
                nv12_rgb(luma, luma_stride, chroma, chroma_stride, x, y, k, q[n]);
            } else {
                q[n][0] = q[n][1] = q[n][2] = 0.0f;
            }
        }
        for (int c = 0; c < 3; ++c) {
            const float top = (1.0f - ax) * q[0][c] + ax * q[1][c];
            const float bottom = (1.0f - ax) * q[2][c] + ax * q[3][c];
            rgb[c] = round_u8((1.0f - ay) * top + ay * bottom);
        }
    }
    store_normalised(rgb, face, idx, p, out);
}
